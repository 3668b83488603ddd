"""Metrics in Prometheus' text exposition format (version 0.0.4), user and built-in.

    # HELP requests_total Requests served.
    # TYPE requests_total counter
    requests_total{route="/api"} 3.0
    # HELP latency_s Request latency.
    # TYPE latency_s histogram
    latency_s_bucket{le="0.1"} 2.0
    latency_s_bucket{le="+Inf"} 3.0
    latency_s_sum 0.61
    latency_s_count 3.0

A user counter is exported as ``<name>_total`` (unless its name ends so already), as
Prometheus' own clients and Ray (since 2.10) do. Built-in metrics, named ``shoal_*``, are
computed from the control store's tables when asked for: nodes, their CPU, memory,
resources and object store, tasks by name and state, actors by class and state, workers.
Everything here reads; nothing changes the tables.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._metrics import COUNTER, HISTOGRAM
from ._metrics_store import MetricsStore

if TYPE_CHECKING:
    from ._control_store import ControlStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class Family:
    """One metric: its exposition name, type, help and samples (sample name, labels,
    value)."""

    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.samples: list[tuple[str, Labels, float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((self.name, tuple(labels.items()), float(value)))


# -- user metrics --------------------------------------------------------------------------
def user_families(store: MetricsStore) -> list[Family]:
    out = []
    for definition, series in store.families():
        name = definition.name
        if definition.kind == COUNTER and not name.endswith("_total"):
            name += "_total"
        family = Family(name, definition.kind, definition.description)
        for key, value in series:
            labels = tuple(zip(definition.tag_keys, key, strict=True))
            if definition.kind != HISTOGRAM:
                family.samples.append((name, labels, float(value)))
                continue
            cumulative = 0
            for bound, count in zip((*definition.boundaries, math.inf), value[:-2], strict=True):
                cumulative += count
                family.samples.append(
                    (name + "_bucket", (*labels, ("le", _number(bound))), float(cumulative))
                )
            family.samples.append((name + "_sum", labels, float(value[-2])))
            family.samples.append((name + "_count", labels, float(value[-1])))
        out.append(family)
    return out


# -- built-in metrics ----------------------------------------------------------------------
def builtin_families(control: ControlStore) -> list[Family]:
    from ._state_views import ACTOR_STATES, node_record

    out: list[Family] = []

    def family(name: str, kind: str, help: str) -> Family:
        f = Family("shoal_" + name, kind, help)
        out.append(f)
        return f

    nodes = family("nodes", "gauge", "Nodes of the cluster, by state.")
    per_node = {
        "cpu_percent": family("node_cpu_percent", "gauge", "CPU use of the node's machine, in %."),
        "cpu_count": family("node_cpu_count", "gauge", "CPUs of the node's machine."),
        "memory_used": family(
            "node_memory_used_bytes", "gauge", "Memory in use on the node's machine."
        ),
        "memory_total": family("node_memory_total_bytes", "gauge", "Memory of the node's machine."),
        "workers": family("node_workers", "gauge", "Worker processes of the node."),
        "object_store_used": family(
            "object_store_used_bytes", "gauge", "Bytes of objects in the node's shared memory."
        ),
        "object_store_capacity": family(
            "object_store_capacity_bytes", "gauge", "Capacity of the node's object store."
        ),
        "object_store_objects": family(
            "object_store_objects", "gauge", "Objects in the node's object store."
        ),
        "spilled_bytes": family(
            "object_store_spilled_bytes", "gauge", "Bytes of the node's objects spilled to disk."
        ),
    }
    res_total = family("resources_total", "gauge", "Resources of the node, by name.")
    res_avail = family("resources_available", "gauge", "Resources of the node not in use.")
    states: dict[str, int] = {"ALIVE": 0, "DEAD": 0}
    for node in control.nodes.values():
        record = node_record(control, node)
        states[record["state"]] += 1
        if not node.alive:
            continue
        nid = record["node_id"]
        for field, f in per_node.items():
            if record.get(field) is not None:
                f.add(record[field], node_id=nid)
        for resource, amount in sorted(record["resources_total"].items()):
            res_total.add(amount, node_id=nid, resource=resource)
            res_avail.add(
                record["resources_available"].get(resource, 0.0), node_id=nid, resource=resource
            )
    for state, n in states.items():
        nodes.add(n, state=state)

    summary = control.task_log.summary()
    tasks = family(
        "tasks", "gauge", "Tasks seen, by function and state (ended ones count for good)."
    )
    for name, counts in sorted(summary["by_name"].items()):
        for state, n in sorted(counts.items()):
            tasks.add(n, name=name, state=state)
    actor_counts: dict[tuple[str, str], int] = {}
    for rec in control.actors.actors.values():
        key = (rec.class_name, ACTOR_STATES.get(rec.state, str(rec.state)))
        actor_counts[key] = actor_counts.get(key, 0) + 1
    actors = family("actors", "gauge", "Actors by class and state (dead ones as kept).")
    for (class_name, state), n in sorted(actor_counts.items()):
        actors.add(n, class_name=class_name, state=state)
    workers = family("workers", "gauge", "Processes connected to the cluster, by type.")
    by_type = {"WORKER": 0, "DRIVER": 0}
    for proc in control.procs.values():
        kind = "WORKER" if proc.role == "worker" else "DRIVER"
        by_type[kind] += 1
    for kind, n in by_type.items():
        workers.add(n, type=kind)
    family(
        "task_log_evicted_total", COUNTER, "Task records dropped from the bounded task log."
    ).add(summary["evicted"])
    family(
        "task_events_dropped_total", COUNTER, "Task events processes could not keep to send."
    ).add(summary["dropped_events"])
    store = control.metrics
    family(
        "metrics_dropped_total", COUNTER, "Metric values dropped: too many series, or bad ones."
    ).add(store.dropped_series + store.dropped_at_source)
    return out


# -- the text ------------------------------------------------------------------------------
def render(families: list[Family], comments: list[str] | None = None) -> str:
    lines = []
    for text in comments or ():
        lines.append("# " + text.replace("\n", " "))
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for sample, labels, value in f.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{sample}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{sample} {_number(value)}")
    lines.append("")
    return "\n".join(lines)


def exposition(control: ControlStore) -> str:
    """Everything ``shoal metrics`` and ``GET /metrics`` print."""
    store = control.metrics
    comments = [f"shoal: {e}" for e in store.errors]
    return render(user_families(store) + builtin_families(control), comments)


def builtin_records(control: ControlStore) -> list[dict[str, Any]]:
    """The built-in metrics as flat records (name, type, description, tags, value)."""
    return [
        {
            "name": f.name,
            "type": f.kind,
            "description": f.help,
            "tags": dict(labels),
            "value": value,
        }
        for f in builtin_families(control)
        for _, labels, value in f.samples
    ]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    return repr(float(value))
