"""Application metrics: ``Counter``, ``Gauge`` and ``Histogram`` (Ray's ``ray.util.metrics``).

    from shoal.util.metrics import Counter, Gauge, Histogram

    requests = Counter("requests", "Requests served.", tag_keys=("route",))
    requests.set_default_tags({"route": "/"})
    requests.inc()                                  # route="/"
    requests.inc(2, tags={"route": "/api"})
    Gauge("queue_depth", "Items waiting.").set(12)
    Histogram("latency_s", "Request latency.", boundaries=[0.01, 0.1, 1]).observe(0.05)

They work in drivers, tasks and actors alike. Recording is local to the process (a dict
update under a lock, no message); each process sends what changed about once a second
and the control store adds it up over the cluster: counters and histograms are summed
over every process that recorded them (also processes that have exited since), a gauge
is the sum of the last value each live process set for the same tags. ``shoal metrics``
prints them in Prometheus' text format, ``shoal.state.cluster_snapshot()["metrics"]`` and
the notebook monitor show them, and ``shoal start --head --metrics-port`` serves them to
Prometheus. See docs/metrics.md.

Unlike Ray, a name Prometheus would refuse is an error here (Ray warns and drops the
metric), and so is a tag key the metric was not given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .._metrics import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    METRIC_NAME,
    REGISTRY,
    RESERVED_PREFIX,
    TAG_KEY,
    Key,
    MetricDef,
    Series,
    bucket_of,
    check_number,
)

__all__ = ["Counter", "Gauge", "Histogram", "Metric"]

_INF = math.inf


class Metric:
    """What Counter, Gauge and Histogram share: a name, a description, tag keys and
    default tags. Tags given to a recording call take precedence over default tags; every
    tag key must have a value, one way or the other."""

    _kind = ""
    _name: str
    _description: str
    _tag_keys: tuple[str, ...]
    _tag_set: frozenset[str]
    _default_tags: dict[str, str]
    _default_key: Key | None
    _series: Series

    def __init__(
        self,
        name: str,
        description: str = "",
        tag_keys: tuple[str, ...] | None = None,
        *,
        _boundaries: tuple[float, ...] = (),
    ) -> None:
        # A task that makes its metric each time it runs pays the checks once per process.
        made_key = (self._kind, name, description, tag_keys, _boundaries)
        try:
            made = REGISTRY.made.get(made_key)
        except TypeError:  # unhashable arguments (a list of tag keys): checked below
            made = None
        if made is not None:
            self._name, self._description = name, description
            self._tag_keys, self._tag_set, self._series = made
            self._default_tags = {}
            self._default_key = () if not self._tag_keys else None
            return
        if not isinstance(name, str) or not name:
            raise ValueError(f"a metric needs a name (a non-empty str), got {name!r}")
        if not METRIC_NAME.match(name):
            raise ValueError(
                f"invalid metric name {name!r}: a name is made of letters, digits, '_' and "
                "':' and does not start with a digit (Prometheus' rule)"
            )
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"invalid metric name {name!r}: names starting with {RESERVED_PREFIX!r} are "
                "Shoal's own built-in metrics"
            )
        if not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        keys = _check_tag_keys(name, tag_keys, self._kind)
        self._name = name
        self._description = description
        self._tag_keys = keys
        self._tag_set = frozenset(keys)
        self._default_tags = {}
        self._default_key = () if not keys else None
        self._series = REGISTRY.define(MetricDef(name, self._kind, description, keys, _boundaries))
        if isinstance(tag_keys, tuple) or tag_keys is None:
            REGISTRY.made[made_key] = (keys, self._tag_set, self._series)

    def set_default_tags(self, default_tags: Mapping[str, str]) -> Metric:
        """Tag values used when a recording call does not give them; returns the metric."""
        if not isinstance(default_tags, Mapping):
            raise TypeError(f"default_tags must be a dict, got {type(default_tags).__name__}")
        self._check_tags(default_tags, "default tags")
        self._default_tags = dict(default_tags)
        if all(k in self._default_tags for k in self._tag_keys):
            self._default_key = tuple(self._default_tags[k] for k in self._tag_keys)
        else:
            self._default_key = None
        return self

    @property
    def info(self) -> dict[str, Any]:
        """name, description, tag_keys and default_tags (and boundaries, for histograms)."""
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._tag_keys,
            "default_tags": dict(self._default_tags),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, tag_keys={self._tag_keys!r})"

    def __reduce__(self) -> Any:
        # A metric captured by a task travels as its definition; the task's process
        # records into its own registry.
        args = (self._name, self._description, self._tag_keys, self._extra_args())
        return _rebuild, (type(self), *args, dict(self._default_tags))

    def _extra_args(self) -> dict[str, Any]:
        return {}

    # -- tags ----------------------------------------------------------------------------
    def _check_tags(self, tags: Mapping[str, Any], what: str) -> None:
        for key, value in tags.items():
            if key not in self._tag_set:
                known = ", ".join(repr(k) for k in self._tag_keys) or "none"
                raise ValueError(
                    f"unknown tag key {key!r} in the {what} of metric {self._name!r}: its "
                    f"tag keys are {known} (declare them with tag_keys=...)"
                )
            if not isinstance(value, str):
                raise TypeError(
                    f"tag values must be str: tag {key!r} of metric {self._name!r} got "
                    f"{type(value).__name__} {value!r}"
                )

    def _key(self, tags: Mapping[str, str] | None) -> Key:
        if not tags:
            key = self._default_key
            if key is None:
                raise self._missing(self._default_tags)
            return key
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a dict, got {type(tags).__name__}")
        self._check_tags(tags, "tags")
        defaults = self._default_tags
        try:
            return tuple([tags[k] if k in tags else defaults[k] for k in self._tag_keys])
        except KeyError:
            raise self._missing({**defaults, **tags}) from None

    def _missing(self, given: Mapping[str, str]) -> ValueError:
        missing = [k for k in self._tag_keys if k not in given]
        return ValueError(
            f"missing value for tag key(s) {', '.join(repr(k) for k in missing)} of metric "
            f"{self._name!r}: pass tags={{...}} or call set_default_tags first"
        )


class Counter(Metric):
    """A count that only goes up (Prometheus' counter; exported as ``<name>_total``)."""

    _kind = COUNTER

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value`` (> 0, default 1) to the count for these tags."""
        if value.__class__ is not int and value.__class__ is not float:
            check_number(value, "a counter's increment")
        if not 0 < value < _INF:
            raise ValueError(f"a counter's increment must be a finite number > 0, got {value!r}")
        key = self._default_key if not tags else self._key(tags)
        if key is None:
            raise self._missing(self._default_tags)
        REGISTRY.increment(self._series, key, value)


class Gauge(Metric):
    """A value that goes up and down (Prometheus' gauge): the last one set counts."""

    _kind = GAUGE

    def set(self, value: float | None, tags: Mapping[str, str] | None = None) -> None:
        """Set the gauge for these tags to ``value`` (None: do nothing, as in Ray)."""
        if value is None:
            return
        if value.__class__ is not int and value.__class__ is not float:
            check_number(value, "a gauge's value")
        key = self._default_key if not tags else self._key(tags)
        if key is None:
            raise self._missing(self._default_tags)
        REGISTRY.assign(self._series, key, value)


class Histogram(Metric):
    """Counts of observed values in buckets, plus their sum and count (Prometheus'
    histogram). ``boundaries`` are the buckets' upper bounds (``le``), increasing and > 0
    as in Ray; values above the last go to the ``+Inf`` bucket."""

    _kind = HISTOGRAM

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Iterable[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        bounds = _check_boundaries(name, boundaries)
        self.boundaries = list(bounds)
        self._bounds = bounds
        super().__init__(name, description, tag_keys, _boundaries=bounds)

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        """Count ``value`` in its bucket for these tags."""
        if value.__class__ is not int and value.__class__ is not float:
            check_number(value, "an observed value")
        if value != value:
            raise ValueError(f"cannot observe NaN in histogram {self._name!r}")
        key = self._key(tags)
        REGISTRY.observe(self._series, key, bucket_of(self._bounds, value), value)

    @property
    def info(self) -> dict[str, Any]:
        info = super().info
        info["boundaries"] = list(self.boundaries)
        return info

    def _extra_args(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries)}


def _rebuild(
    cls: type[Metric],
    name: str,
    description: str,
    tag_keys: tuple[str, ...],
    extra: dict[str, Any],
    default_tags: dict[str, str],
) -> Metric:
    metric = cls(name, description, tag_keys=tag_keys, **extra)
    if default_tags:
        metric.set_default_tags(default_tags)
    return metric


def _check_tag_keys(name: str, tag_keys: Any, kind: str) -> tuple[str, ...]:
    if tag_keys is None:
        return ()
    if isinstance(tag_keys, str) or not isinstance(tag_keys, (tuple, list)):
        raise TypeError(
            f"tag_keys of metric {name!r} must be a tuple of str, e.g. ('route',); got {tag_keys!r}"
        )
    keys = tuple(tag_keys)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"tag keys must be str: metric {name!r} got {key!r}")
        if not TAG_KEY.match(key) or key.startswith("__"):
            raise ValueError(
                f"invalid tag key {key!r} of metric {name!r}: a tag key is made of letters, "
                "digits and '_', does not start with a digit, nor with '__' (Prometheus' rule)"
            )
        if kind == HISTOGRAM and key == "le":
            raise ValueError(
                f"invalid tag key 'le' of histogram {name!r}: Prometheus uses it for buckets"
            )
    if len(set(keys)) != len(keys):
        raise ValueError(f"tag keys of metric {name!r} repeat a key: {keys!r}")
    return keys


def _check_boundaries(name: str, boundaries: Any) -> tuple[float, ...]:
    if boundaries is None or isinstance(boundaries, (str, bytes)):
        raise ValueError(
            f"histogram {name!r} needs boundaries (the buckets' upper bounds), e.g. "
            "Histogram('latency_s', boundaries=[0.01, 0.1, 1.0])"
        )
    bounds = tuple(boundaries)
    if not bounds:
        raise ValueError(f"histogram {name!r} needs at least one boundary")
    for i, bound in enumerate(bounds):
        check_number(bound, f"boundary {i} of histogram {name!r}")
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(
                f"boundary {i} of histogram {name!r} must be a finite number > 0, got {bound!r}"
            )
        if i and bound <= bounds[i - 1]:
            raise ValueError(
                f"boundaries of histogram {name!r} must increase: {bounds[i - 1]!r} then {bound!r}"
            )
    return tuple(float(b) for b in bounds)
