"""User metrics as each process records them, until its core sends them (in batches).

    Counter.inc / Gauge.set / Histogram.observe  (any thread)
        -> Series: values by tag tuple, under one lock: no message, no wake-up
    the core's sweep (IO thread), about once a second, or before a state request
        -> Registry.take(sent): counter and histogram deltas, changed gauges, and the
           definitions the control store has not had from this process
        -> the "m" key of the next TASK_EVENTS message (one message per flush)
    control store: MetricsStore.apply (_metrics_store.py)

Counters and histograms travel as deltas since the last flush, which the control store
adds up, so a process that dies keeps what it had sent; gauges as their last value.

Invariant: every value of a Series is changed under ``Registry.lock``, and ``take`` swaps
the delta dicts under it, so no increment made by another thread is lost or counted twice.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Any

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# Prometheus' rules (the data model page): a metric name is [a-zA-Z_:][a-zA-Z0-9_:]*, a
# label name [a-zA-Z_][a-zA-Z0-9_]*, and label names starting with __ are reserved.
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
TAG_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Built-in metrics are named shoal_*: a user metric cannot take (or shadow) one.
RESERVED_PREFIX = "shoal_"

# Series (distinct tag values) one process keeps per metric between flushes, and gauges
# in all; what goes beyond is counted as dropped (and reported), not kept: a tag that
# takes a new value per call (a task id, a timestamp) must not grow a process without end.
MAX_SERIES_PER_METRIC = 10_000
# How often a process sends its metrics when they changed.
FLUSH_SECONDS = float(os.environ.get("SHOAL_METRICS_FLUSH_SECONDS", 1.0))

Key = tuple[str, ...]


class MetricDef:
    """What a metric is: the same in every process that records it."""

    __slots__ = ("boundaries", "description", "kind", "name", "tag_keys")

    def __init__(
        self,
        name: str,
        kind: str,
        description: str,
        tag_keys: tuple[str, ...],
        boundaries: tuple[float, ...] = (),
    ) -> None:
        self.name = name
        self.kind = kind
        self.description = description
        self.tag_keys = tag_keys
        self.boundaries = boundaries

    def same_shape(self, other: MetricDef) -> bool:
        return (
            self.kind == other.kind
            and self.tag_keys == other.tag_keys
            and self.boundaries == other.boundaries
        )

    def describe(self) -> str:
        text = f"a {self.kind} with tag keys {self.tag_keys}"
        if self.kind == HISTOGRAM:
            text += f" and boundaries {list(self.boundaries)}"
        return text

    def as_wire(self) -> list[Any]:
        return [self.name, self.kind, self.description, list(self.tag_keys), list(self.boundaries)]


class Series:
    """The values of one metric in this process, by tag values (a tuple in tag key order).

    counter: ``values`` holds the increments since the last flush.
    gauge: ``values`` holds the last value set; ``changed`` the keys set since the flush.
    histogram: ``values`` holds, since the last flush, [per-bucket counts..., sum, count]
    (one bucket per boundary, plus the last for values above every boundary).
    """

    __slots__ = ("changed", "definition", "values")

    def __init__(self, definition: MetricDef) -> None:
        self.definition = definition
        self.values: dict[Key, Any] = {}
        self.changed: set[Key] = set()


class Registry:
    """The metrics of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.series: dict[str, Series] = {}
        # (kind, name, description, tag keys, boundaries) of a metric made before -> its
        # checked tag keys and series (see Metric.__init__).
        self.made: dict[Any, Any] = {}
        self.dirty = False  # something was recorded or defined since the last take
        self.dropped = 0  # values not kept (MAX_SERIES_PER_METRIC), since the last take
        self.last_take = time.monotonic()

    def define(self, definition: MetricDef) -> Series:
        """The series of a metric of this name: made on first use, shared afterwards (a task
        that makes its Counter each time it runs adds to the same one)."""
        with self.lock:
            found = self.series.get(definition.name)
            if found is not None:
                if not found.definition.same_shape(definition):
                    raise ValueError(
                        f"metric {definition.name!r} is already defined in this process as "
                        f"{found.definition.describe()}; it cannot also be "
                        f"{definition.describe()}"
                    )
                return found
            series = self.series[definition.name] = Series(definition)
            self.dirty = True
            return series

    # -- recording (any thread) ----------------------------------------------------------
    def increment(self, series: Series, key: Key, value: float) -> None:
        with self.lock:
            values = series.values
            old = values.get(key)
            if old is None:
                if len(values) >= MAX_SERIES_PER_METRIC:
                    self.dropped += 1
                    return
                values[key] = value
            else:
                values[key] = old + value
            self.dirty = True

    def assign(self, series: Series, key: Key, value: float) -> None:
        with self.lock:
            values = series.values
            if key not in values and len(values) >= MAX_SERIES_PER_METRIC:
                self.dropped += 1
                return
            values[key] = value
            series.changed.add(key)
            self.dirty = True

    def observe(self, series: Series, key: Key, bucket: int, value: float) -> None:
        with self.lock:
            values = series.values
            counts = values.get(key)
            if counts is None:
                if len(values) >= MAX_SERIES_PER_METRIC:
                    self.dropped += 1
                    return
                counts = values[key] = [0] * (len(series.definition.boundaries) + 1) + [0.0, 0]
            counts[bucket] += 1
            counts[-2] += value
            counts[-1] += 1
            self.dirty = True

    # -- flushing (the core's IO thread) -------------------------------------------------
    def due(self, now: float) -> bool:
        return self.dirty and now - self.last_take >= FLUSH_SECONDS

    def take(self, sent: set[str]) -> dict[str, Any] | None:
        """What changed since the last take, as the "m" body of a TASK_EVENTS message, or
        None. ``sent``: the names whose definitions the receiving control store already
        has from this process (updated here); a new cluster gets every definition and
        every gauge again."""
        self.last_take = time.monotonic()
        with self.lock:
            if not self.dirty and len(sent) == len(self.series):
                return None
            self.dirty = False
            taken = []
            for name, series in self.series.items():
                kind = series.definition.kind
                if kind == GAUGE:
                    if name in sent:
                        changed = series.changed
                        values = {k: series.values[k] for k in changed}
                    else:
                        values = dict(series.values)
                    series.changed = set()
                else:
                    values = series.values
                    if values:
                        series.values = {}
                taken.append((series.definition, values))
            dropped, self.dropped = self.dropped, 0
        defs: list[list[Any]] = []
        counters: list[list[Any]] = []
        gauges: list[list[Any]] = []
        histograms: list[list[Any]] = []
        for definition, values in taken:
            name = definition.name
            if name not in sent:
                defs.append(definition.as_wire())
                sent.add(name)
            out = (
                counters
                if definition.kind == COUNTER
                else gauges
                if definition.kind == GAUGE
                else histograms
            )
            for key, value in values.items():
                out.append([name, list(key), value])
        if not (defs or counters or gauges or histograms or dropped):
            return None
        return {"defs": defs, "c": counters, "g": gauges, "h": histograms, "d": dropped}


REGISTRY = Registry()


def _after_fork_in_child() -> None:
    # A task that forks while another thread records would leave the child a held lock.
    REGISTRY.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def bucket_of(boundaries: tuple[float, ...], value: float) -> int:
    """The bucket a value goes to: the first whose upper bound (``le``) is >= it."""
    for i, bound in enumerate(boundaries):
        if value <= bound:
            return i
    return len(boundaries)


def check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be an int or a float, got {type(value).__name__}: {value!r}")
    return value


def finite(value: float) -> bool:
    return math.isfinite(value)
