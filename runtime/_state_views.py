"""What the control store answers to the state API: records, filters, limits, snapshots.

    shoal.state.list_tasks(...) --STATE {kind, filters, limit}--> ControlStore._h_state
        --> query(control, body) --> REPLY {records, total, truncated, ...}

One request, one reply, in every mode (a client's goes through the head's node manager
like any other). The views read the control store's tables (tasks from its TaskLog,
actors from the actor directory, objects from the object directory, nodes and processes
from their registries) and never change them. Filtering and the limit are applied here,
so that a reply carries only what was asked for. ``snapshot`` is what one tick of a
monitor needs, in one round trip; it costs O(nodes + actors + objects), never a walk over
the task log (task counts are kept up to date as events arrive).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _actor_directory as ad
from ._ids import owner_of
from ._resources import as_floats
from ._task_events import RUNNING, STATE_NAMES
from ._task_log import TaskLog, TaskRecord

if TYPE_CHECKING:
    from ._control_store import ControlStore, NodeInfo

DEFAULT_LIMIT = 100
ACTOR_STATES = {ad.PENDING: "PENDING_CREATION", ad.ALIVE: "ALIVE", ad.DEAD: "DEAD"}

# The keys of each kind of record, which are also the keys filters may use.
FIELDS: dict[str, tuple[str, ...]] = {
    "tasks": (
        "task_id",
        "name",
        "state",
        "type",
        "attempt",
        "job_id",
        "actor_id",
        "parent_task_id",
        "owner_id",
        "node_id",
        "worker_id",
        "pid",
        "submitted_at",
        "started_at",
        "finished_at",
        "duration",
        "error_type",
        "error_message",
        "traceback",
    ),
    "actors": (
        "actor_id",
        "class_name",
        "name",
        "namespace",
        "state",
        "job_id",
        "owner_id",
        "node_id",
        "worker_id",
        "pid",
        "detached",
        "restarts",
        "death_cause",
        "created_at",
        "alive_at",
        "dead_at",
    ),
    "objects": (
        "object_id",
        "size",
        "place",
        "spilled",
        "reference_type",
        "holders",
        "contained_in",
        "owner",
        "owner_id",
        "call_site",
        "nodes",
    ),
    "nodes": (
        "node_id",
        "state",
        "alive",
        "is_head",
        "address",
        "hostname",
        "resources_total",
        "resources_available",
        "workers",
        "object_store_used",
        "object_store_capacity",
        "object_store_objects",
        "spilled_bytes",
        "cpu_count",
        "cpu_percent",
        "memory_used",
        "memory_total",
        "memory_percent",
        "load_1m",
        "death_reason",
        "runtime_envs",
    ),
    "workers": (
        "worker_id",
        "type",
        "state",
        "node_id",
        "pid",
        "job_id",
        "actor_id",
        "actor_class",
        "task_ids",
        "task_names",
    ),
}
KINDS = tuple(FIELDS)
# Values compared without regard to case (they are upper-case names).
_CASELESS = frozenset({"state", "type", "reference_type"})


def check_filters(kind: str, filters: Any) -> list[tuple[str, str, str]]:
    """Filters as ``(key, op, text)``, or ValueError naming what is wrong with them."""
    if kind not in FIELDS:
        raise ValueError(f"unknown kind of state {kind!r}; one of {', '.join(KINDS)}")
    out = []
    for item in filters or ():
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(
                f"a filter is (key, op, value), e.g. ('state', '=', 'RUNNING'); got {item!r}"
            )
        key, op, value = item
        if key not in FIELDS[kind]:
            raise ValueError(
                f"unknown filter key {key!r} for {kind}; the keys are: {', '.join(FIELDS[kind])}"
            )
        if op not in ("=", "!="):
            raise ValueError(f"unknown filter operator {op!r}: use '=' or '!='")
        out.append((str(key), str(op), as_text(value, key)))
    return out


def as_text(value: Any, key: str = "") -> str:
    """The text a filter compares: record values and filter values alike (the CLI's are
    text), so ``alive=true`` and ``pid=123`` match."""
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, (list, tuple)):
        text = ",".join(as_text(v) for v in value)
    else:
        text = str(value)
    return text.upper() if key in _CASELESS else text


def select(
    records: Iterable[Any],
    filters: list[tuple[str, str, str]],
    limit: int,
    get: Callable[[Any, str], Any] = lambda r, k: r.get(k),
    size: int | None = None,
) -> tuple[list[Any], int]:
    """The first ``limit`` records that pass every filter, and how many pass in all.
    ``size``: how many records there are, when known, so that an unfiltered list is not
    walked past the limit."""
    kept: list[Any] = []
    total = 0
    for rec in records:
        if all((as_text(get(rec, key), key) == text) == (op == "=") for key, op, text in filters):
            total += 1
            if len(kept) < limit:
                kept.append(rec)
            elif not filters and size is not None:
                return kept, size
    return kept, total


# -- tasks -------------------------------------------------------------------------------
_TASK_GETTERS: dict[str, Callable[[TaskRecord], Any]] = {
    "task_id": lambda r: r.task_id.hex(),
    "name": lambda r: r.name,
    "state": lambda r: STATE_NAMES[r.state],
    "job_id": lambda r: f"{r.job:08x}",
    "node_id": lambda r: r.node.hex() or None,
    "worker_id": lambda r: r.worker.hex() or None,
    "actor_id": lambda r: r.actor_id.hex() if r.actor_id else None,
    "attempt": lambda r: r.attempt,
    "pid": lambda r: r.pid or None,
}


def _task_value(rec: TaskRecord, key: str) -> Any:
    getter = _TASK_GETTERS.get(key)
    return getter(rec) if getter is not None else rec.as_dict().get(key)


def _task_time(rec: TaskRecord) -> float:
    return rec.submitted or rec.started or rec.finished or 0.0


def list_tasks(log: TaskLog, filters: Any, limit: int, detail: bool) -> dict[str, Any]:
    """The newest tasks first (by submit time)."""
    checked = check_filters("tasks", filters)
    matching, total = select(log.records.values(), checked, len(log.records), _task_value)
    kept = heapq.nlargest(limit, matching, key=_task_time)
    return {"records": [r.as_dict(detail) for r in kept], "total": total}


# -- actors ------------------------------------------------------------------------------
def actor_record(rec: ad.ActorRecord) -> dict[str, Any]:
    return {
        "actor_id": rec.actor_id.hex(),
        "class_name": rec.class_name,
        "name": rec.name or None,
        "namespace": rec.namespace,
        "state": ACTOR_STATES.get(rec.state, rec.state),
        "job_id": f"{rec.job_id:08x}",
        "owner_id": rec.owner.hex(),
        "node_id": rec.node.hex() or None,
        "worker_id": rec.worker_id.hex() or None,
        "pid": rec.pid or None,
        "detached": rec.detached,
        "restarts": rec.num_restarts,
        "death_cause": rec.death_reason or None,
        "created_at": rec.created_at,
        "alive_at": rec.alive_at,
        "dead_at": rec.dead_at,
    }


def _actors_newest_first(control: ControlStore) -> Iterator[dict[str, Any]]:
    for rec in reversed(control.actors.actors.values()):
        yield actor_record(rec)


def find_actor(control: ControlStore, actor_id: str) -> ad.ActorRecord | None:
    """The actor whose hex id is ``actor_id`` or (uniquely) starts with it."""
    actor_id = actor_id.lower()
    found = [r for r in control.actors.actors.values() if r.actor_id.hex().startswith(actor_id)]
    if len(found) > 1:
        raise ValueError(
            f"{len(found)} actors have ids starting with {actor_id!r}: give more of it"
        )
    return found[0] if found else None


# -- objects -----------------------------------------------------------------------------
def object_records(control: ControlStore) -> list[dict[str, Any]]:
    """Largest first. Small values that never left their owner are not in the directory."""
    roles = {p.wid.hex(): f"{p.role} pid={p.pid}" for p in control.procs.values()}
    places = control.local_places() if control.local_places is not None else {}
    records = control.directory.listing()
    for rec in records:
        rec["owner_id"] = rec["owner"]
        rec["owner"] = roles.get(rec["owner"], rec["owner"])
        rec["holders"] = [roles.get(h, h) for h in rec["holders"]]
        if rec["place"] == "node":
            rec["place"] = places.get(rec["object_id"], "remote")
        rec["spilled"] = rec["place"] == "spilled"
        rec["reference_type"] = (
            "LOCAL_REFERENCE"
            if rec["holders"]
            else "CAPTURED_IN_OBJECT"
            if rec["contained_in"]
            else "PINNED_IN_MEMORY"
        )
    records.sort(key=lambda r: -r["size"])
    return records


def store_totals(control: ControlStore) -> dict[str, int]:
    stats = {"objects": 0, "used": 0, "capacity": 0, "spilled": 0, "pooled": 0}
    for node in control.nodes.values():
        if node.alive:
            for k in stats:
                stats[k] += int(node.stats.get(k, 0))
    return stats


# -- nodes and workers -------------------------------------------------------------------
def node_record(control: ControlStore, node: NodeInfo) -> dict[str, Any]:
    stats, system = node.stats, node.system if node.alive else {}
    return {
        "node_id": node.node_id.hex(),
        "state": "ALIVE" if node.alive else "DEAD",
        "alive": node.alive,
        "is_head": node.node_id == control.head_node,
        "address": node.ip,
        "hostname": node.hostname,
        "resources_total": as_floats(node.total),
        "resources_available": as_floats(node.available) if node.alive else {},
        "workers": node.workers,
        "object_store_used": int(stats.get("used", 0)),
        "object_store_capacity": int(stats.get("capacity", 0)),
        "object_store_objects": int(stats.get("objects", 0)),
        "spilled_bytes": int(stats.get("spilled", 0)),
        "cpu_count": system.get("cpu_count"),
        "cpu_percent": system.get("cpu_percent"),
        "memory_used": system.get("memory_used"),
        "memory_total": system.get("memory_total"),
        "memory_percent": system.get("memory_percent"),
        "load_1m": system.get("load_1m"),
        "death_reason": node.death_reason or None,
        "runtime_envs": list(node.envs) if node.alive else [],
    }


def running_by_worker(log: TaskLog) -> dict[bytes, list[TaskRecord]]:
    out: dict[bytes, list[TaskRecord]] = {}
    for rec in log.records.values():
        if rec.state == RUNNING:
            out.setdefault(rec.worker, []).append(rec)
    return out


def worker_records(control: ControlStore, log: TaskLog) -> list[dict[str, Any]]:
    running = running_by_worker(log)
    actors = control.actors
    out = []
    for proc in control.procs.values():
        tasks = running.get(proc.wid, [])
        aid = actors.by_worker.get(proc.wid)
        actor = actors.actors.get(aid) if aid is not None else None
        if proc.role == "driver":
            state = "CONNECTED"
        else:
            state = "RUNNING" if tasks else "IDLE"
        out.append(
            {
                "worker_id": proc.wid.hex(),
                "type": proc.role.upper(),
                "state": state,
                "node_id": proc.node.hex(),
                "pid": proc.pid or None,
                "job_id": f"{proc.job:08x}" if proc.role == "driver" else None,
                "actor_id": aid.hex() if aid is not None else None,
                "actor_class": actor.class_name if actor is not None else None,
                "task_ids": [t.task_id.hex() for t in tasks],
                "task_names": [t.name for t in tasks],
            }
        )
    return out


# -- the request -------------------------------------------------------------------------
def query(control: ControlStore, log: TaskLog, body: dict[str, Any]) -> dict[str, Any]:
    """Answer one STATE request (ValueError for a bad one)."""
    kind = str(body.get("kind", ""))
    limit = body.get("limit")
    limit = DEFAULT_LIMIT if limit is None else int(limit)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    filters = body.get("filters") or []
    if kind == "snapshot":
        return snapshot(control, log, body)
    if kind == "metrics":
        return metrics(control, body)
    if kind == "summary":
        return log.summary()
    if kind == "task":
        found = log.find(str(body["id"]))
        if isinstance(found, list):
            raise ValueError(
                f"{len(found)} tasks have ids starting with {body['id']!r}: give more of it"
            )
        return {"record": found.as_dict() if found is not None else None}
    if kind == "actor":
        rec = find_actor(control, str(body["id"]))
        return {"record": actor_record(rec) if rec is not None else None}
    if kind == "objects":
        checked = check_filters(kind, filters)
        records = object_records(control)
        kept, total = select(records, checked, limit)
        stats = {**store_totals(control), "objects": len(records)}
        return {"records": kept, "total": total, "stats": stats}
    if kind == "tasks":
        result = list_tasks(log, filters, limit, bool(body.get("detail")))
        result["dropped"] = log.evicted
        return result
    checked = check_filters(kind, filters)
    source: Iterable[dict[str, Any]]
    if kind == "actors":
        source = _actors_newest_first(control)
    elif kind == "nodes":
        source = [node_record(control, n) for n in control.nodes.values()]
    else:
        source = worker_records(control, log)
    size = len(control.actors.actors) if kind == "actors" else None
    kept, total = select(source, checked, limit, size=size)
    return {"records": kept, "total": total}


# The largest objects are found by a walk over the object directory: done at most once a
# second, however often monitors ask.
LARGEST_OBJECTS_SECONDS = 1.0


def _largest_objects(control: ControlStore, n: int) -> list[Any]:
    cache = control.snapshot_cache
    now = time.monotonic()
    if cache.get("largest_n") != n or now - cache.get("largest_at", -1e9) > LARGEST_OBJECTS_SECONDS:
        entries = (e for e in control.directory.objects.values() if e.sealed)
        cache["largest"] = heapq.nlargest(n, entries, key=lambda e: e.size)
        cache["largest_at"], cache["largest_n"] = now, n
    largest: list[Any] = cache["largest"]
    return largest


def snapshot(control: ControlStore, log: TaskLog, body: dict[str, Any]) -> dict[str, Any]:
    """Everything one tick of a monitor shows."""
    n_failures = int(body.get("failures", 10))
    n_actors = int(body.get("actors", 100))
    n_objects = int(body.get("objects", 10))
    actor_counts: dict[str, int] = {}
    for rec in control.actors.actors.values():
        state = ACTOR_STATES.get(rec.state, rec.state)
        actor_counts[state] = actor_counts.get(state, 0) + 1
    # Live actors first (newest first), then the most recent deaths.
    ordered = sorted(reversed(control.actors.actors.values()), key=lambda r: r.state == ad.DEAD)
    actors = [actor_record(r) for r in ordered[:n_actors]]
    largest = _largest_objects(control, n_objects)
    roles = {p.wid: f"{p.role} pid={p.pid}" for p in control.procs.values()}
    workers = [p for p in control.procs.values() if p.role == "worker"]
    out = {
        "time": time.time(),
        "nodes": [node_record(control, n) for n in control.nodes.values()],
        "tasks": log.summary(),
        "failures": [r.as_dict() for r in log.recent_failures(n_failures)],
        "actors": actors,
        "actor_counts": actor_counts,
        "objects": {
            **store_totals(control),
            "largest": [
                {
                    "object_id": e.oid.hex(),
                    "size": e.size,
                    "owner": roles.get(owner_of(e.oid), owner_of(e.oid).hex()),
                    "call_site": e.call_site,
                }
                for e in largest
            ],
        },
        "workers": {"total": len(workers), "drivers": len(control.procs) - len(workers)},
    }
    if control.metrics.defs:
        # User metrics, when a process defined any: the first ``metrics`` series.
        out["metrics"] = control.metrics.series(int(body.get("metrics", 100)))
    return out


def metrics(control: ControlStore, body: dict[str, Any]) -> dict[str, Any]:
    """User metrics (as records), the built-in ones, and with ``text`` both in
    Prometheus' text format."""
    from ._prometheus import builtin_records, exposition

    store = control.metrics
    if body.get("text"):
        return {"text": exposition(control)}
    return {
        "metrics": store.series(),
        "builtin": builtin_records(control),
        "errors": list(store.errors),
        "dropped": store.dropped_series + store.dropped_at_source,
    }


# -- stacks ------------------------------------------------------------------------------
def stack_targets(
    control: ControlStore, log: TaskLog, body: dict[str, Any], requester: bytes
) -> dict[bytes, dict[str, Any]]:
    """The workers whose stacks a STACK request asks for: worker id -> labels.

    ``task``: the worker running that task; ``actor``: the actor's worker; ``node``: every
    worker of that node; none of them: every worker of the cluster."""
    wids: dict[bytes, str] = {}
    if body.get("task"):
        found = log.find(str(body["task"]))
        if isinstance(found, list):
            raise ValueError(
                f"{len(found)} tasks have ids starting with {body['task']!r}: give more of it"
            )
        if found is None:
            raise ValueError(
                f"no task {body['task']!r} is known (it may not have started yet, or left the task log)"
            )
        if found.state != RUNNING:
            raise ValueError(
                f"task {found.name} ({found.task_id.hex()}) is not running: it is {STATE_NAMES[found.state]}"
            )
        wids[found.worker] = f"task {found.name} ({found.task_id.hex()})"
    elif body.get("actor"):
        actor = find_actor(control, str(body["actor"]))
        if actor is None:
            raise ValueError(f"no actor {body['actor']!r} is known")
        if actor.state == ad.DEAD or not actor.worker_id:
            state = ACTOR_STATES.get(actor.state, actor.state)
            raise ValueError(
                f"actor {actor.class_name} ({actor.actor_id.hex()}) has no worker: it is {state}"
            )
        wids[actor.worker_id] = f"actor {actor.class_name} ({actor.actor_id.hex()})"
    else:
        node_id = str(body.get("node") or "").lower()
        nodes = [n for n in control.nodes if n.hex().startswith(node_id)]
        if node_id and len(nodes) != 1:
            raise ValueError(
                f"no node id starts with {node_id!r}"
                if not nodes
                else f"{len(nodes)} node ids start with {node_id!r}: give more of it"
            )
        for p in control.procs.values():
            if p.role == "worker" and (not node_id or p.node == nodes[0]):
                wids[p.wid] = "worker"
    out = {}
    for wid, what in wids.items():
        proc = control.procs.get(wid)
        if proc is None:
            if body.get("task") or body.get("actor"):
                raise ValueError(f"the worker of {what} is gone")
            continue
        out[wid] = {
            "worker_id": wid.hex(),
            "pid": proc.pid,
            "node_id": proc.node.hex(),
            "what": what,
        }
    out.pop(requester, None)
    return out
