"""The state API: what the cluster holds and does, as lists of plain dicts (Ray's names).

    list_tasks()    list_actors()    list_objects()    list_nodes()    list_workers()
    get_task(id)    get_actor(id)    summarize_tasks() summarize_objects()
    cluster_snapshot()               everything a monitor shows, in one round trip
    list_metrics()  metrics_text()   user metrics (shoal.util.metrics), Prometheus text
    stack(task_id=... | actor_id=... | node_id=...)   Python stacks of running workers

Every call is one request to the control store and one reply, in local and client-server
mode alike. Filters are ``(key, op, value)`` tuples with op ``"="`` or ``"!="``; values
are compared as text (``("pid", "=", 123)`` and ``("alive", "=", "true")`` work; states
and types ignore case). A ``list_*`` returns at most ``limit`` records (default 100) as a
``StateList``: a list that also says how many matched (``total``) and whether some were
left out (``truncated``).

Task records come from events each process sends about twice a second, so a task shows
up (and changes state) in the list up to about half a second after it did; the calling
process's own events are sent before each request. The control store keeps the last
10,000 tasks (``SHOAL_TASK_LOG_SIZE``), dropping finished ones first; counts in
``summarize_tasks`` include the dropped ones. See docs/state.md.
"""

from __future__ import annotations

from typing import Any

from ._protocol import Message, MsgType
from ._state_views import DEFAULT_LIMIT, check_filters

__all__ = [
    "StateList",
    "cluster_snapshot",
    "get_actor",
    "get_task",
    "list_actors",
    "list_metrics",
    "list_nodes",
    "list_objects",
    "list_tasks",
    "list_workers",
    "metrics_text",
    "stack",
    "summarize_objects",
    "summarize_tasks",
]

Filter = tuple[str, str, Any]


class StateList(list[dict[str, Any]]):
    """The records a ``list_*`` call returned (a plain list of dicts), plus ``total`` (how
    many matched the filters) and ``truncated`` (True when ``limit`` left some out)."""

    total: int
    truncated: bool

    def __init__(self, records: list[dict[str, Any]], total: int) -> None:
        super().__init__(records)
        self.total = total
        self.truncated = total > len(records)


def _request(body: dict[str, Any], msg_type: MsgType = MsgType.STATE, timeout: float = 30) -> Any:
    from ._api import _auto_init

    core = _auto_init()
    # This process's own events go first, on the same connection: what it just did is
    # in the answer.
    core.post(core.flush_events)
    reply = core.request(Message(msg_type, body), timeout=timeout)
    body = dict(reply.body)
    if "e" in body:
        raise ValueError(body["e"])
    body.pop("r", None)
    return body


def _list(kind: str, filters: list[Filter] | None, limit: int | None, **extra: Any) -> StateList:
    checked = check_filters(kind, filters)  # a bad filter fails here, before any request
    limit = DEFAULT_LIMIT if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")
    body = _request({"kind": kind, "filters": checked, "limit": limit, **extra})
    return StateList(body["records"], int(body["total"]))


def list_tasks(
    filters: list[Filter] | None = None, limit: int | None = DEFAULT_LIMIT, detail: bool = False
) -> StateList:
    """Tasks and actor calls, newest first: task_id, name, state (PENDING_ARGS, SUBMITTED,
    RUNNING, FINISHED, FAILED, CANCELLED), type, attempt, job_id, actor_id, node_id,
    worker_id, pid, submitted_at/started_at/finished_at (epoch seconds), duration,
    error_type and error_message; with ``detail``, the remote traceback too."""
    return _list("tasks", filters, limit, detail=bool(detail))


def list_actors(
    filters: list[Filter] | None = None, limit: int | None = DEFAULT_LIMIT
) -> StateList:
    """Actors, newest first: actor_id, class_name, name, state (PENDING_CREATION, ALIVE,
    DEAD), node_id, pid, death_cause, times."""
    return _list("actors", filters, limit)


def list_objects(
    filters: list[Filter] | None = None, limit: int | None = DEFAULT_LIMIT
) -> StateList:
    """Objects in the object stores, largest first: object_id, size, place (shared_memory,
    spilled, inline, remote), spilled, reference_type, holders, owner, nodes, call_site.

    Small values that never left their owner (most task results) are not in the store
    and are not listed."""
    return _list("objects", filters, limit)


def list_nodes(filters: list[Filter] | None = None, limit: int | None = DEFAULT_LIMIT) -> StateList:
    """Nodes: node_id, state, is_head, address, resources, workers, object store use,
    spilled bytes, and the machine's cpu_percent and memory (sampled once a second)."""
    return _list("nodes", filters, limit)


def list_workers(
    filters: list[Filter] | None = None, limit: int | None = DEFAULT_LIMIT
) -> StateList:
    """Workers and drivers: worker_id, type (WORKER, DRIVER), state (IDLE, RUNNING,
    CONNECTED), node_id, pid, the actor it hosts, the tasks it runs now."""
    return _list("workers", filters, limit)


def get_task(task_id: Any) -> dict[str, Any] | None:
    """One task by id (hex, or a unique prefix of it; an ObjectRef gives its task), with
    its traceback if it failed; None when the log does not have it."""
    return _request({"kind": "task", "id": _task_hex(task_id)})["record"]


def get_actor(actor_id: Any) -> dict[str, Any] | None:
    """One actor by id (hex, a unique prefix, or an actor handle); None when unknown."""
    return _request({"kind": "actor", "id": _actor_hex(actor_id)})["record"]


def summarize_tasks() -> dict[str, Any]:
    """Task counts: ``by_name`` (name -> state -> count), ``by_state`` and ``total``, over
    every task seen (also those dropped from the log); ``kept`` records of ``capacity``,
    ``evicted`` (dropped from the log), ``dropped_events`` (lost before reaching it)."""
    return _request({"kind": "summary"})


def summarize_objects() -> dict[str, Any]:
    """Totals of the object stores: objects, bytes in shared memory, capacity, spilled."""
    body = _request({"kind": "objects", "limit": 0})
    return dict(body["stats"])


def cluster_snapshot(
    failures: int = 10, actors: int = 100, objects: int = 10, metrics: int = 100
) -> dict[str, Any]:
    """What one tick of a monitor shows, in one round trip: ``nodes`` (as list_nodes),
    ``tasks`` (as summarize_tasks), the latest ``failures`` (task records with their
    tracebacks), ``actors`` (live first) and ``actor_counts``, ``objects`` (store totals
    and the largest objects), ``workers`` (counts) and the head's ``time``; and, once any
    process defined a user metric, ``metrics``: the first ``metrics`` series as
    ``list_metrics`` gives them. Its cost does not grow with the number of tasks."""
    for name, value in (
        ("failures", failures),
        ("actors", actors),
        ("objects", objects),
        ("metrics", metrics),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return _request(
        {
            "kind": "snapshot",
            "failures": failures,
            "actors": actors,
            "objects": objects,
            "metrics": metrics,
        }
    )


def list_metrics(builtin: bool = False) -> list[dict[str, Any]]:
    """The user metrics of the cluster (shoal.util.metrics), one record per series, by
    name then tags: ``name``, ``type`` (counter, gauge, histogram), ``description``,
    ``tags`` and ``value``, or for a histogram ``boundaries``, ``buckets`` (counts per
    bucket, not cumulative; the last for values above every boundary), ``sum`` and
    ``count``. Counters and histograms add up every process's values, a gauge the last
    value of each live process. ``builtin``: the cluster's own ``shoal_*`` metrics too.

    Processes send their metrics about once a second (this one before the request)."""
    body = _request({"kind": "metrics"})
    records: list[dict[str, Any]] = body["metrics"]
    return records + body["builtin"] if builtin else records


def metrics_text() -> str:
    """Every metric, user and built-in, in Prometheus' text format (what ``shoal metrics``
    prints and the ``--metrics-port`` endpoint serves)."""
    return str(_request({"kind": "metrics", "text": True})["text"])


def stack(
    task_id: Any = None, actor_id: Any = None, node_id: str | None = None, timeout: float = 30
) -> str:
    """The Python stacks of every thread of the worker running a task, hosting an actor,
    or of every worker of a node (of the whole cluster when no argument is given), taken
    without stopping them. A worker that does not answer within a few seconds (stuck in
    C code that holds the GIL) is named at the end."""
    given = [x for x in (task_id, actor_id, node_id) if x is not None]
    if len(given) > 1:
        raise ValueError("pass at most one of task_id, actor_id and node_id")
    body: dict[str, Any] = {}
    if task_id is not None:
        body["task"] = _task_hex(task_id)
    elif actor_id is not None:
        body["actor"] = _actor_hex(actor_id)
    elif node_id is not None:
        body["node"] = str(node_id)
    reply = _request(body, MsgType.STACK, timeout)
    return format_stacks(reply)


def format_stacks(reply: dict[str, Any]) -> str:
    parts = []
    for entry in reply["stacks"]:
        parts.append(
            f"=== {entry['what']}: worker {entry['worker_id']} pid {entry['pid']} "
            f"node {entry['node_id'][:12]} ===\n{entry['text'].rstrip()}\n"
        )
    for entry in reply["missing"]:
        parts.append(
            f"=== {entry['what']}: worker {entry['worker_id']} pid {entry['pid']}: "
            f"{entry['reason']} ===\n"
        )
    if not parts:
        return "no workers to show\n"
    return "\n".join(parts)


def _task_hex(task_id: Any) -> str:
    from ._refs import ObjectRef

    if isinstance(task_id, ObjectRef):
        return task_id.binary()[:16].hex()
    if isinstance(task_id, bytes):
        return task_id.hex()
    if isinstance(task_id, str) and task_id:
        return task_id
    raise TypeError(f"a task id is a hex str, bytes or an ObjectRef, got {task_id!r}")


def _actor_hex(actor_id: Any) -> str:
    from ._actor import ActorHandle

    if isinstance(actor_id, ActorHandle):
        return actor_id._actor_id.hex()
    if isinstance(actor_id, bytes):
        return actor_id.hex()
    if isinstance(actor_id, str) and actor_id:
        return actor_id
    raise TypeError(f"an actor id is a hex str, bytes or an ActorHandle, got {actor_id!r}")
