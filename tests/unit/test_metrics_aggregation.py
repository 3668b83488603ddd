"""User metrics without a cluster: the checks of Counter/Gauge/Histogram, a process's
registry and its batches, the control store's aggregation, and the Prometheus text (read
back by an independent parser)."""

from __future__ import annotations

import math
import pickle
import threading

import prometheus_text
import pytest
from shoal import _metrics
from shoal._metrics_store import MetricsStore
from shoal._prometheus import render, user_families
from shoal.util import metrics
from shoal.util.metrics import Counter, Gauge, Histogram

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> _metrics.Registry:
    """A registry of the test's own: metrics made here must not reach a later cluster."""
    fresh = _metrics.Registry()
    monkeypatch.setattr(_metrics, "REGISTRY", fresh)
    monkeypatch.setattr(metrics, "REGISTRY", fresh)
    return fresh


# -- definitions and recording checks ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "needs a name"),
        ("1st", "invalid metric name '1st'"),
        ("a-b", "invalid metric name 'a-b'"),
        ("a b", "invalid metric name"),
        ("shoal_tasks", "Shoal's own built-in metrics"),
    ],
)
def test_names_prometheus_would_refuse_are_errors(name, reason):
    with pytest.raises(ValueError, match=reason):
        Counter(name)


def test_good_names_and_keys_are_taken():
    assert Counter("a:b_c9", tag_keys=("_x", "y1")).info == {
        "name": "a:b_c9",
        "description": "",
        "tag_keys": ("_x", "y1"),
        "default_tags": {},
    }


@pytest.mark.parametrize(
    ("tag_keys", "error", "reason"),
    [
        (("a-b",), ValueError, "invalid tag key 'a-b'"),
        (("__x",), ValueError, "invalid tag key '__x'"),
        (("9a",), ValueError, "invalid tag key '9a'"),
        (("a", "a"), ValueError, "repeat a key"),
        ("route", TypeError, "must be a tuple of str"),
        ((1,), TypeError, "tag keys must be str"),
    ],
)
def test_bad_tag_keys(tag_keys, error, reason):
    with pytest.raises(error, match=reason):
        Gauge("g", tag_keys=tag_keys)


def test_le_is_not_a_histogram_tag_key():
    with pytest.raises(ValueError, match="'le'"):
        Histogram("h", boundaries=[1], tag_keys=("le",))
    Counter("c_le", tag_keys=("le",))  # only histograms use it


def test_unknown_and_missing_tags_name_the_keys():
    c = Counter("requests", tag_keys=("route", "code"))
    with pytest.raises(ValueError, match=r"missing value for tag key\(s\) 'route', 'code'"):
        c.inc()
    with pytest.raises(ValueError, match=r"missing value for tag key\(s\) 'code'"):
        c.inc(tags={"route": "/"})
    with pytest.raises(ValueError, match="unknown tag key 'colour'.*tag keys are 'route', 'code'"):
        c.inc(tags={"route": "/", "code": "200", "colour": "red"})
    with pytest.raises(ValueError, match="unknown tag key 'x' in the default tags"):
        c.set_default_tags({"x": "1"})
    with pytest.raises(TypeError, match="tag values must be str.*'code'.*int 200"):
        c.inc(tags={"route": "/", "code": 200})  # type: ignore[dict-item]
    untagged = Gauge("untagged")
    with pytest.raises(ValueError, match="unknown tag key 'a'.*tag keys are none"):
        untagged.set(1, tags={"a": "b"})


def test_default_tags_and_given_tags_merge():
    c = Counter("merged", tag_keys=("route", "code")).set_default_tags({"route": "/"})
    assert isinstance(c, Counter)
    c.inc(tags={"code": "200"})
    c.inc(2, tags={"code": "500", "route": "/api"})
    assert c._series.values == {("/", "200"): 1, ("/api", "500"): 2}


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
     ("1", TypeError), (True, TypeError), (None, TypeError)],
)  # fmt: skip
def test_counter_increments_must_be_positive_finite_numbers(value, error):
    with pytest.raises(error, match="increment"):
        Counter("c").inc(value)


def test_gauge_none_is_a_no_op_and_histogram_refuses_nan():
    g = Gauge("g")
    g.set(None)
    assert g._series.values == {}
    with pytest.raises(TypeError, match="gauge's value"):
        g.set("3")  # type: ignore[arg-type]
    h = Histogram("h", boundaries=[1.0])
    with pytest.raises(ValueError, match="NaN"):
        h.observe(math.nan)


@pytest.mark.parametrize(
    ("boundaries", "reason"),
    [
        (None, "needs boundaries"),
        ([], "at least one boundary"),
        ([0, 1], "boundary 0 .* > 0"),
        ([1, 1], "must increase"),
        ([2, 1], "must increase"),
        ([1, math.inf], "finite"),
        (["a"], "must be an int or a float"),
    ],
)
def test_histogram_boundaries_are_checked(boundaries, reason):
    with pytest.raises((ValueError, TypeError), match=reason):
        Histogram("h", boundaries=boundaries)


def test_one_name_one_shape_per_process():
    a = Counter("shared", "first", tag_keys=("k",))
    b = Counter("shared", "a task makes it again", tag_keys=("k",))
    assert a._series is b._series  # the same series: what both record adds up
    with pytest.raises(ValueError, match="already defined in this process as a counter"):
        Gauge("shared", tag_keys=("k",))
    with pytest.raises(ValueError, match="tag keys"):
        Counter("shared", tag_keys=("other",))
    Histogram("hb", boundaries=[1, 2])
    with pytest.raises(ValueError, match="boundaries"):
        Histogram("hb", boundaries=[1, 3])


def test_metrics_pickle_with_their_default_tags():
    c = Counter("pickled", "d", tag_keys=("k",)).set_default_tags({"k": "v"})
    h = Histogram("pickled_h", "d", boundaries=[1, 2], tag_keys=("k",))
    c2 = pickle.loads(pickle.dumps(c))
    h2 = pickle.loads(pickle.dumps(h))
    assert c2.info == c.info and h2.info == h.info
    c2.inc()
    assert c._series.values == {("v",): 1}


# -- the registry's batches -------------------------------------------------------------
def test_take_sends_deltas_changed_gauges_and_definitions_once(registry):
    c = Counter("c", "count", tag_keys=("k",))
    g = Gauge("g", "gauge")
    h = Histogram("h", "hist", boundaries=[1, 10])
    c.inc(tags={"k": "a"})
    c.inc(2, tags={"k": "a"})
    g.set(7)
    for v in (0.5, 1, 5, 50):
        h.observe(v)
    sent: set[str] = set()
    batch = registry.take(sent)
    assert sorted(d[0] for d in batch["defs"]) == ["c", "g", "h"]
    assert batch["c"] == [["c", ["a"], 3]]
    assert batch["g"] == [["g", [], 7]]
    assert batch["h"] == [["h", [], [2, 1, 1, 56.5, 4]]]  # le=1: 0.5, 1; le=10: 5; +Inf: 50
    assert registry.take(sent) is None  # nothing new
    c.inc(tags={"k": "b"})
    batch = registry.take(sent)
    assert batch["defs"] == [] and batch["c"] == [["c", ["b"], 1]] and batch["g"] == []
    # Another cluster (a new core): every definition and every gauge's value again.
    batch = registry.take(set())
    assert len(batch["defs"]) == 3 and batch["g"] == [["g", [], 7]] and batch["c"] == []


def test_no_increment_is_lost_or_counted_twice_across_threads(registry):
    c = Counter("threads")
    sent: set[str] = set()
    taken = []
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            batch = registry.take(sent)
            if batch:
                taken.extend(v for _, _, v in batch["c"])

    def worker() -> None:
        for _ in range(20_000):
            c.inc()

    workers = [threading.Thread(target=worker) for _ in range(4)]
    flush = threading.Thread(target=flusher)
    flush.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    stop.set()
    flush.join(20)
    last = registry.take(sent)
    if last:
        taken.extend(v for _, _, v in last["c"])
    assert sum(taken) == 80_000


def test_a_process_keeps_a_bounded_number_of_series(registry, monkeypatch):
    monkeypatch.setattr(_metrics, "MAX_SERIES_PER_METRIC", 3)
    g = Gauge("per_call", tag_keys=("id",))
    for i in range(5):
        g.set(i, tags={"id": str(i)})
    batch = registry.take(set())
    assert len(batch["g"]) == 3 and batch["d"] == 2


# -- the control store's aggregation ----------------------------------------------------
def _batches(*recordings):
    """One batch per process: each recording runs in a registry of its own."""
    out = []
    for record in recordings:
        reg = _metrics.Registry()
        _metrics.REGISTRY = metrics.REGISTRY = reg
        record()
        out.append(reg.take(set()))
    return out


def test_counters_and_histograms_sum_and_gauges_add_live_processes():
    def one() -> None:
        Counter("calls", "Calls.", tag_keys=("k",)).inc(3, tags={"k": "x"})
        Gauge("depth", "Depth.").set(5)
        Histogram("lat", "Latency.", boundaries=[1]).observe(0.5)

    def two() -> None:
        Counter("calls", "Calls.", tag_keys=("k",)).inc(4, tags={"k": "x"})
        Gauge("depth", "Depth.").set(2)
        Histogram("lat", "Latency.", boundaries=[1]).observe(3)

    b1, b2 = _batches(one, two)
    store = MetricsStore()
    store.apply(b"p1", 1, b1)
    store.apply(b"p2", 2, b2)
    by_name = {r["name"]: r for r in store.series()}
    assert by_name["calls"]["value"] == 7 and by_name["calls"]["tags"] == {"k": "x"}
    assert by_name["depth"]["value"] == 7
    assert by_name["lat"]["buckets"] == [1, 1] and by_name["lat"]["count"] == 2
    assert by_name["lat"]["sum"] == 3.5
    store.apply(b"p1", 1, {"g": [["depth", [], 1.0]]})  # p1's newer value replaces its old
    assert {r["name"]: r for r in store.series()}["depth"]["value"] == 3
    store.process_gone(b"p1")  # its gauge goes; what it counted stays
    by_name = {r["name"]: r for r in store.series()}
    assert by_name["depth"]["value"] == 2 and by_name["calls"]["value"] == 7
    store.process_gone(b"p2")
    assert "depth" not in {r["name"] for r in store.series()}
    assert {r["name"] for r in store.series()} == {"calls", "lat"}


def test_a_conflicting_definition_is_dropped_with_the_reason():
    b1, b2 = _batches(lambda: Counter("twice").inc(), lambda: Gauge("twice").set(9))
    store = MetricsStore()
    store.apply(b"p1", 11, b1)
    store.apply(b"p2", 22, b2)
    assert [r["value"] for r in store.series()] == [1]
    assert (
        "pid 22 is a gauge" in store.errors[0] and "first defined as a counter" in store.errors[0]
    )
    store.apply(b"p2", 22, {"g": [["twice", [], 4.0]]})  # still dropped, silently
    assert [r["value"] for r in store.series()] == [1]


def test_the_store_bounds_its_series_and_refuses_malformed_batches():
    store = MetricsStore(max_series=2)
    (batch,) = _batches(
        lambda: [Gauge("many", tag_keys=("i",)).set(1, {"i": str(i)}) for i in range(4)]
    )
    store.apply(b"p", 1, batch)
    assert len(store.series()) == 2 and store.dropped_series == 2
    with pytest.raises((ValueError, TypeError)):
        store.apply(b"p", 1, {"g": [["many", ["a", "b"], 1.0]]})  # two tags for one key
    with pytest.raises(ValueError):
        store.apply(b"p", 1, {"defs": [["bad name", "gauge", "", [], []]]})


# -- Prometheus text --------------------------------------------------------------------
def test_the_text_escapes_and_parses_back():
    awkward = 'quote " backslash \\ newline \n end'

    def record() -> None:
        c = Counter("requests", "Requests\nserved \\ here.", tag_keys=("route",))
        c.inc(2, tags={"route": awkward})
        c.inc(tags={"route": "/"})
        Counter("already_total", "Ends in _total.").inc(5)
        Gauge("temp", "Temperature.").set(-1.5)
        h = Histogram("lat_s", "Latency.", boundaries=[0.1, 1], tag_keys=("op",))
        for v in (0.05, 0.1, 0.5, 2, 3):
            h.observe(v, tags={"op": "read"})

    (batch,) = _batches(record)
    store = MetricsStore()
    store.apply(b"p", 1, batch)
    families = prometheus_text.parse(render(user_families(store), ["shoal: a comment"]))
    assert families["requests_total"]["type"] == "counter"
    assert families["requests_total"]["help"] == "Requests\nserved \\ here."
    assert prometheus_text.value(families, "requests_total", route=awkward) == 2
    assert prometheus_text.value(families, "requests_total", route="/") == 1
    assert prometheus_text.value(families, "already_total") == 5
    assert families["temp"]["type"] == "gauge"
    assert prometheus_text.value(families, "temp") == -1.5
    lat = families["lat_s"]
    assert lat["type"] == "histogram"
    buckets = {s[1]["le"]: s[2] for s in lat["samples"] if s[0] == "lat_s_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 5}
    assert prometheus_text.value(families, "lat_s_count", op="read") == 5
    assert prometheus_text.value(families, "lat_s_sum", op="read") == pytest.approx(5.65)


def test_the_text_reads_the_same_with_prometheus_client():
    parser = pytest.importorskip(
        "prometheus_client.parser", reason="prometheus_client is not a dependency; a cross-check"
    )
    (batch,) = _batches(
        lambda: (
            Counter("hits", "Hits.", tag_keys=("path",)).inc(3, tags={"path": 'a"b\\c\nd'}),
            Histogram("size", "Sizes.", boundaries=[10]).observe(5),
        )
    )
    store = MetricsStore()
    store.apply(b"p", 1, batch)
    families = {
        f.name: f for f in parser.text_string_to_metric_families(render(user_families(store)))
    }
    assert families["hits"].type == "counter"
    assert [(s.name, s.labels, s.value) for s in families["hits"].samples] == [
        ("hits_total", {"path": 'a"b\\c\nd'}, 3.0)
    ]
    assert families["size"].type == "histogram"
