"""The control store's view of user metrics: every process's batches, added up.

    process: Registry.take -> TASK_EVENTS {"m": {defs, c, g, h, d}} -> ControlStore
        -> MetricsStore.apply(process, pid, batch)
    queries: series() for the state API and the monitor, families() for Prometheus text

Aggregation over the cluster, by (name, tag values), as Ray does since it dropped the
per-worker label (2.53, "recommended" cardinality):
- counters: the sum of every process's increments, those of exited processes included
  (a counter never goes down, which is what Prometheus' rate() expects);
- histograms: bucket counts, sums and counts added up, likewise;
- gauges: the sum of the last value each live process set; a process's values go when it
  does (a gauge says how things are now).

The first definition of a name the store sees is the metric's; a process that defines the
same name with another type, other tag keys or other boundaries has its values for that
name dropped, and the reason is kept in ``errors`` (shown by ``shoal metrics``).
Bounded: at most ``max_series`` series (distinct name and tag values) and MAX_METRICS
names; what goes beyond is counted in ``dropped_series``.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

from ._metrics import COUNTER, GAUGE, HISTOGRAM, METRIC_NAME, TAG_KEY, Key, MetricDef

log = logging.getLogger("shoal.metrics")

MAX_SERIES = int(os.environ.get("SHOAL_METRICS_MAX_SERIES", 20_000))
MAX_METRICS = 2_000
MAX_DESCRIPTION = 2_000
MAX_ERRORS = 20

SeriesKey = tuple[str, Key]


class MetricsStore:
    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self.defs: dict[str, MetricDef] = {}
        self.counters: dict[SeriesKey, float] = {}
        self.histograms: dict[SeriesKey, list[Any]] = {}  # [buckets..., sum, count]
        self.gauges: dict[SeriesKey, dict[bytes, float]] = {}  # process -> its last value
        self.gauges_of: dict[bytes, set[SeriesKey]] = {}
        self.rejected: set[tuple[bytes, str]] = set()  # (process, name): values dropped
        self.dropped_series = 0  # values of series beyond max_series
        self.dropped_at_source = 0  # values processes could not keep
        self.errors: collections.deque[str] = collections.deque(maxlen=MAX_ERRORS)

    def __len__(self) -> int:
        return len(self.counters) + len(self.histograms) + len(self.gauges)

    def _error(self, text: str) -> None:
        if text not in self.errors:
            self.errors.append(text)
            log.warning("%s", text)

    # -- batches from processes ----------------------------------------------------------
    def apply(self, process: bytes, pid: int, batch: dict[str, Any]) -> None:
        """Merge one process's batch. A malformed batch raises ValueError/TypeError/
        KeyError (the control store logs it); what was merged before the fault stays."""
        self.dropped_at_source += int(batch.get("d") or 0)
        for wire in batch.get("defs") or ():
            self._define(process, pid, wire)
        for name, key, value in batch.get("c") or ():
            skey = self._series_key(process, name, key, COUNTER)
            if skey is not None and self._room(skey, self.counters):
                self.counters[skey] = self.counters.get(skey, 0.0) + float(value)
        for name, key, value in batch.get("h") or ():
            skey = self._series_key(process, name, key, HISTOGRAM)
            if skey is None or not self._room(skey, self.histograms):
                continue
            n = len(self.defs[name].boundaries) + 3
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise ValueError(f"histogram {name!r}: {len(value)} counts, expected {n}")
            total = self.histograms.get(skey)
            if total is None:
                counts = [int(c) for c in value[:-2]]
                self.histograms[skey] = [*counts, float(value[-2]), int(value[-1])]
            else:
                for i in range(n - 2):
                    total[i] += int(value[i])
                total[-2] += float(value[-2])
                total[-1] += int(value[-1])
        for name, key, value in batch.get("g") or ():
            skey = self._series_key(process, name, key, GAUGE)
            if skey is not None and self._room(skey, self.gauges):
                self.gauges.setdefault(skey, {})[process] = float(value)
                self.gauges_of.setdefault(process, set()).add(skey)

    def _define(self, process: bytes, pid: int, wire: Any) -> None:
        name, kind, description, tag_keys, boundaries = wire
        name, kind = str(name), str(kind)
        if not METRIC_NAME.match(name) or kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"bad metric definition {name!r} ({kind!r})")
        keys = tuple(str(k) for k in tag_keys)
        if not all(TAG_KEY.match(k) for k in keys):
            raise ValueError(f"bad tag keys {keys!r} of metric {name!r}")
        definition = MetricDef(
            name,
            kind,
            str(description)[:MAX_DESCRIPTION],
            keys,
            tuple(float(b) for b in boundaries),
        )
        known = self.defs.get(name)
        if known is None:
            if len(self.defs) >= MAX_METRICS:
                self.rejected.add((process, name))
                self._error(f"metric {name!r} from pid {pid} dropped: over {MAX_METRICS} metrics")
                return
            self.defs[name] = definition
        elif not known.same_shape(definition):
            self.rejected.add((process, name))
            self._error(
                f"metric {name!r} from pid {pid} is {definition.describe()}, but it was first "
                f"defined as {known.describe()}: the values of pid {pid} are dropped"
            )

    def _series_key(self, process: bytes, name: Any, key: Any, kind: str) -> SeriesKey | None:
        definition = self.defs.get(name)
        if definition is None or (process, name) in self.rejected:
            return None
        if definition.kind != kind or len(key) != len(definition.tag_keys):
            raise ValueError(f"values of metric {name!r} do not fit its definition")
        return (name, tuple(str(v) for v in key))

    def _room(self, skey: SeriesKey, table: dict[SeriesKey, Any]) -> bool:
        if skey in table or len(self) < self.max_series:
            return True
        if not self.dropped_series:
            self._error(f"over {self.max_series} metric series: new ones are dropped")
        self.dropped_series += 1
        return False

    def process_gone(self, process: bytes) -> None:
        """A process exited: its gauges no longer count; counters and histograms stay."""
        for skey in self.gauges_of.pop(process, ()):
            values = self.gauges.get(skey)
            if values is not None:
                values.pop(process, None)
                if not values:
                    del self.gauges[skey]
        if self.rejected:
            self.rejected = {r for r in self.rejected if r[0] != process}

    # -- queries -------------------------------------------------------------------------
    def families(self) -> list[tuple[MetricDef, list[tuple[Key, Any]]]]:
        """Each metric with its series (tag values, value), by name then tag values. A
        gauge's value is the sum over processes; a histogram's is [buckets..., sum, count]
        with per-bucket (not cumulative) counts."""
        by_name: dict[str, list[tuple[Key, Any]]] = {name: [] for name in self.defs}
        for (name, key), value in self.counters.items():
            by_name[name].append((key, value))
        for (name, key), per_process in self.gauges.items():
            by_name[name].append((key, sum(per_process.values())))
        for (name, key), counts in self.histograms.items():
            by_name[name].append((key, counts))
        return [(self.defs[name], sorted(by_name[name])) for name in sorted(by_name)]

    def series(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The series as flat records: name, type, description, tags, and ``value`` (counter,
        gauge) or ``boundaries``, ``buckets`` (per bucket, the last for values above every
        boundary), ``sum`` and ``count`` (histogram)."""
        out: list[dict[str, Any]] = []
        for definition, series in self.families():
            for key, value in series:
                if limit is not None and len(out) >= limit:
                    return out
                out.append(series_record(definition, key, value))
        return out


def series_record(definition: MetricDef, key: Key, value: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": definition.name,
        "type": definition.kind,
        "description": definition.description,
        "tags": dict(zip(definition.tag_keys, key, strict=True)),
    }
    if definition.kind == HISTOGRAM:
        record["boundaries"] = list(definition.boundaries)
        record["buckets"] = list(value[:-2])
        record["sum"] = value[-2]
        record["count"] = value[-1]
    else:
        record["value"] = value
    return record
