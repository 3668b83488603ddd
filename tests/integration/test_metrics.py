"""User metrics against a real local cluster: counters and histograms recorded by tasks on
two workers add up, gauges of an actor and the driver add up and the actor's go when it
dies (its counter stays), bad tags fail the task that used them, a definition that
conflicts with another process's is dropped with the reason; the snapshot, `shoal metrics`
(text parsed back, and JSON) and the HTTP endpoint of ``init(metrics_export_port=0)``.

Processes send their metrics about once a second, so every check waits for its value
(with a deadline).
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path

import prometheus_text
import pytest
import shoal
import shoal.state as state
from shoal import testing
from shoal.util.metrics import Counter, Gauge

pytestmark = pytest.mark.timeout(120)

CLUSTER_KWARGS = {"num_cpus": 2, "metrics_export_port": 0}


def metric(name: str, **tags: str) -> dict | None:
    for record in state.list_metrics():
        if record["name"] == name and record["tags"] == tags:
            return record
    return None


def wait_metric(name: str, field: str, expected: float, timeout: float = 20.0, **tags: str) -> dict:
    def check():
        record = metric(name, **tags)
        return record if record is not None and record[field] == expected else None

    try:
        return testing.wait_for(check, timeout=timeout, interval=0.1)
    except TimeoutError:
        raise AssertionError(
            f"{name}{tags} never had {field}={expected}: now {metric(name, **tags)}"
        ) from None


def test_counters_and_histograms_of_tasks_on_two_workers_add_up(cluster, rendezvous, tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()

    @shoal.remote
    def record(meet: str, rendezvous) -> int:
        import os

        from shoal.util.metrics import Counter, Histogram

        rendezvous(meet, 2)  # both tasks at once: two workers
        calls = Counter("it_calls", "Calls made by the test's tasks.", tag_keys=("kind",))
        for _ in range(50):
            calls.inc(tags={"kind": "task"})
        latency = Histogram("it_latency_s", "Latency.", boundaries=[0.1, 1.0])
        for value in (0.05, 0.5, 5.0):
            latency.observe(value)
        return os.getpid()

    pids = shoal.get([record.remote(str(meet), rendezvous) for _ in range(2)], timeout=60)
    assert len(set(pids)) == 2, pids
    wait_metric("it_calls", "value", 100, kind="task")
    hist = wait_metric("it_latency_s", "count", 6)
    assert hist["type"] == "histogram" and hist["boundaries"] == [0.1, 1.0]
    assert hist["buckets"] == [2, 2, 2]
    assert hist["sum"] == pytest.approx(11.1)
    # Counted once: still 100 after the histogram (flushed later) arrived.
    assert metric("it_calls", kind="task")["value"] == 100


def test_gauges_add_up_over_live_processes_and_a_dead_actors_counter_stays(cluster, track_actor):
    @shoal.remote
    class Meter:
        def __init__(self, name: str) -> None:
            from shoal.util.metrics import Counter, Gauge

            self.depth = Gauge("it_depth", "Queue depth.", tag_keys=("actor",))
            self.depth.set_default_tags({"actor": name})
            self.calls = Counter("it_actor_calls", "Calls.", tag_keys=("actor",))
            self.calls.set_default_tags({"actor": name})

        def work(self, depth: int) -> None:
            self.depth.set(depth)
            self.calls.inc()

    meter = track_actor(Meter.remote("a"))
    shoal.get(meter.work.remote(7))
    shoal.get(meter.work.remote(9))  # a gauge keeps the last value set
    Gauge("it_depth", "Queue depth.", tag_keys=("actor",)).set(1, tags={"actor": "a"})
    wait_metric("it_depth", "value", 10, actor="a")  # the actor's 9 + the driver's 1
    wait_metric("it_actor_calls", "value", 2, actor="a")
    shoal.kill(meter)
    wait_metric("it_depth", "value", 1, actor="a")  # the actor's gauge went with it
    assert metric("it_actor_calls", actor="a")["value"] == 2  # its counter did not


def test_bad_tags_fail_the_task_that_used_them(cluster):
    @shoal.remote
    def unknown_tag() -> None:
        from shoal.util.metrics import Counter

        Counter("it_bad_tags", tag_keys=("route",)).inc(tags={"colour": "red"})

    @shoal.remote
    def missing_tag() -> None:
        from shoal.util.metrics import Counter

        Counter("it_bad_tags", tag_keys=("route",)).inc()

    with pytest.raises(ValueError, match="unknown tag key 'colour'.*tag keys are 'route'"):
        shoal.get(unknown_tag.remote())
    with pytest.raises(ValueError, match=r"missing value for tag key\(s\) 'route'"):
        shoal.get(missing_tag.remote())


def test_a_conflicting_definition_is_dropped_and_said(cluster):
    Counter("it_conflict", "A counter first.").inc()
    wait_metric("it_conflict", "value", 1)

    @shoal.remote
    def as_gauge() -> int:
        import os

        from shoal.util.metrics import Gauge

        Gauge("it_conflict", "Then a gauge.").set(42)
        return os.getpid()

    pid = shoal.get(as_gauge.remote())
    expected = f"# shoal: metric 'it_conflict' from pid {pid} is a gauge"

    def said() -> str | None:
        text = state.metrics_text()
        return text if expected in text else None

    text = testing.wait_for(said, timeout=20, interval=0.1)
    families = prometheus_text.parse(text)
    assert families["it_conflict_total"]["type"] == "counter"
    assert prometheus_text.value(families, "it_conflict_total") == 1


def test_snapshot_carries_the_metrics(cluster):
    Gauge("it_snapshot", "Shown in the monitor.", tag_keys=("k",)).set(3, tags={"k": "v"})

    def in_snapshot():
        snap = state.cluster_snapshot()
        found = [m for m in snap.get("metrics", ()) if m["name"] == "it_snapshot"]
        return found[0] if found else None

    record = testing.wait_for(in_snapshot, timeout=20, interval=0.1)
    assert record == {
        "name": "it_snapshot",
        "type": "gauge",
        "description": "Shown in the monitor.",
        "tags": {"k": "v"},
        "value": 3.0,
    }
    assert len(state.cluster_snapshot(metrics=1)["metrics"]) == 1
    with pytest.raises(ValueError, match="metrics must be an int >= 0"):
        state.cluster_snapshot(metrics=-1)


def test_text_has_user_and_builtin_metrics(cluster, shoal_cli):
    @shoal.remote
    def builtin_probe() -> int:
        return 1

    shoal.get([builtin_probe.remote() for _ in range(3)])
    Counter("it_text", "In the text.").inc(4)

    def parsed():
        families = prometheus_text.parse(state.metrics_text())
        finished = prometheus_text.value(
            families, "shoal_tasks", name="builtin_probe", state="FINISHED"
        )
        return families if finished == 3 else None

    families = testing.wait_for(parsed, timeout=20, interval=0.1)
    node = cluster["node_id"]
    assert prometheus_text.value(families, "it_text_total") == 4
    assert prometheus_text.value(families, "shoal_nodes", state="ALIVE") == 1
    assert prometheus_text.value(families, "shoal_node_cpu_count", node_id=node) >= 1
    assert prometheus_text.value(families, "shoal_object_store_capacity_bytes", node_id=node) > 0
    assert (
        prometheus_text.value(families, "shoal_resources_total", node_id=node, resource="CPU") == 2
    )
    assert prometheus_text.value(families, "shoal_workers", type="DRIVER") >= 1
    assert prometheus_text.value(families, "shoal_node_memory_total_bytes", node_id=node) > 0
    assert families["shoal_tasks"]["type"] == "gauge"
    assert families["shoal_task_log_evicted_total"]["type"] == "counter"

    # The command line prints the same, from another process (address "auto").
    result = shoal_cli("metrics")
    assert result.returncode == 0, result.stderr
    from_cli = prometheus_text.parse(result.stdout)
    assert prometheus_text.value(from_cli, "it_text_total") == 4
    result = shoal_cli("metrics", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert {"name": "it_text", "type": "counter", "description": "In the text.", "tags": {},
            "value": 4.0} in body["metrics"]  # fmt: skip
    assert any(m["name"] == "shoal_nodes" for m in body["builtin"])
    assert body["dropped"] == 0


# -- the HTTP endpoint ------------------------------------------------------------------
def _get(url: str, headers: dict[str, str], method: str = "GET", path: str | None = None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path or parts.path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_the_endpoint_wants_the_cluster_key(cluster):
    url = cluster["metrics_export_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    key = (Path(cluster["session_dir"]) / "cluster.key").read_text().strip()
    Counter("it_http", "Over HTTP.").inc()
    wait_metric("it_http", "value", 1)

    status, headers, body = _get(url, {})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert b"it_http" not in body
    assert _get(url, {"Authorization": "Bearer " + "0" * len(key)})[0] == 401
    assert _get(url, {"Authorization": "Basic " + key})[0] == 401
    assert _get(url, {"Authorization": "Bearer"})[0] == 401
    assert _get(url, {}, path="/elsewhere")[0] == 401  # no hint of what exists without it

    auth = {"Authorization": "Bearer " + key}
    status, headers, body = _get(url, auth)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = prometheus_text.parse(body.decode())
    assert prometheus_text.value(families, "it_http_total") == 1
    assert prometheus_text.value(families, "shoal_nodes", state="ALIVE") == 1
    assert _get(url, {"Authorization": "bearer " + key.upper()})[0] == 200
    assert _get(url, auth, path="/metrics?x=1")[0] == 200
    assert _get(url, auth, path="/elsewhere")[0] == 404
    assert _get(url, auth, method="POST")[0] == 405
    status, headers, body = _get(url, auth, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 100
