"""Task submission by an owner: dependency resolution, worker leases, direct pushes.

    remote() --spec--> [IO thread] wait for owned pending arguments
                   --> queue per resource shape --REQUEST_LEASE--> head
    LEASE_GRANTED --> push specs straight to the leased worker (PUSH_TASK)
    TASK_DONE     --> resolve return values, push the next queued spec, or keep the idle
                      lease for a moment before RETURN_LEASE
    WORKER_DIED   --> retry the worker's tasks (max_retries) or fail them
    REBUILD_OBJECT --> a stored result was lost with its node: run its task again from the
                      lineage (_lineage.py), its lost arguments first

Everything here runs on the IO thread except ``submit`` (called from user threads) and
``next_stream_item`` / ``run_inline_while_blocked`` (user threads, blocking).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import _config, _worker_context
from ._ids import owner_of, return_id
from ._lineage import ENTRY_OVERHEAD, Arg
from ._protocol import Message, MsgType
from ._serialization import FLAG_ERROR, SerializedValue, deserialize
from ._task_events import PENDING_ARGS, SUBMITTED, error_fields
from ._transport import Connection
from .exceptions import (
    GetTimeoutError,
    OutOfMemoryError,
    RuntimeEnvSetupError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)

if TYPE_CHECKING:
    from ._core import CoreWorker, Value

log = logging.getLogger("shoal.tasks")

M = MsgType
STREAMING = -1

# Lease requests one resource shape may have outstanding at the head at once.
MAX_PENDING_LEASE_REQUESTS = 10

# Queued tasks of one shape from which pushing several to one worker starts.
PIPELINE_MIN_BACKLOG = 16

# How deep a blocked worker may nest the children it runs itself (see
# run_inline_while_blocked); beyond it, children wait for other workers.
MAX_INLINE_DEPTH = 24

# Where a task runs when its owner runs it inline.
INLINE: Any = object()

# How many levels of freed arguments a rebuild makes again itself before giving up (each
# level is a task run again; deeper chains would rather be cut by a checkpoint).
MAX_REBUILD_DEPTH = 100


class TaskSpec:
    """Everything needed to run (and re-run) one task or actor call."""

    __slots__ = (
        "actor_id",
        "args",
        "attempts",
        "cancelled",
        "deps",
        "env_key",
        "fn_bytes",
        "fn_hash",
        "job",
        "key",
        "kwnames",
        "max_retries",
        "method",
        "name",
        "num_returns",
        "oom_kills",
        "out_tag",
        "parent",
        "pins",
        "resources",
        "strategy",
        "retry_exceptions",
        "return_ids",
        "runtime_env",
        "submitted_at",
        "task_id",
        "worker",
    )

    def __init__(self) -> None:
        self.task_id = b""
        self.name = ""
        self.fn_hash = b""
        self.fn_bytes = b""
        self.args: list[tuple[int, Any]] = []  # (0, SerializedValue) or (1, ObjectRef)
        self.kwnames: list[str] = []
        self.num_returns = 1
        self.resources: dict[str, int] = {}
        self.strategy: Any = None  # None (default), or what _options.scheduling sends
        self.key: tuple[Any, ...] = ()
        self.max_retries = _config.DEFAULT_MAX_RETRIES
        # A bool, or exception classes (or their qualified names, for actor methods).
        self.retry_exceptions: bool | tuple[Any, ...] = False
        self.job = 0
        self.return_ids: list[bytes] = []
        self.deps: list[Any] = []  # ObjectRefs passed at the top level
        self.pins: list[Any] = []  # ObjectRefs found inside arguments, kept alive
        self.actor_id: bytes | None = None
        self.method = ""
        self.cancelled = False
        self.attempts = 0
        self.oom_kills = 0  # times the memory monitor stopped its worker (its back-off)
        self.parent: bytes | None = None
        self.worker: bytes | None = None
        self.out_tag: int | None = None  # the notebook cell it belongs to (_worker_context)
        # Its runtime env as it travels (None: the node's default) and that env's key.
        self.runtime_env: dict[str, Any] | None = None
        self.env_key = ""
        self.submitted_at = 0.0  # time.time() at submission, for the task log


def encode_args(
    core: CoreWorker, spec: TaskSpec, frames: list[Any], local: bool = True
) -> list[Any]:
    """Argument descriptors for a push; dependency values are inlined when small.

    A stored value's file is named only to a worker of this node (``local``); a worker
    elsewhere gets the id and reads the object through its own node, which fetches it."""
    out = []
    for kind, x in spec.args:
        if kind == 0:
            sv: SerializedValue = x
            out.append([0, 1 + len(sv.buffers), sv.flags])
            frames.append(sv.data)
            frames.extend(sv.buffers)
            continue
        oid = x.binary()
        value = core.lookup(oid)
        if value is not None and value[0] == "v":
            sv = value[1]
            out.append([0, 1 + len(sv.buffers), sv.flags])
            frames.append(sv.data)
            frames.extend(sv.buffers)
        elif value is not None and value[0] == "s" and local:
            out.append([2, value[1], value[2], oid])
        else:
            out.append([1, oid])
    return out


class _WorkerConn:
    __slots__ = ("conn", "fns")

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a Connection, or a _client.RelayConnection
        self.fns: set[bytes] = set()


class _Lease:
    __slots__ = (
        "bounced",
        "conn",
        "gpu_ids",
        "idle_timer",
        "in_flight",
        "key",
        "pid",
        "revoked",
        "worker_id",
    )

    def __init__(
        self, worker_id: bytes, conn: _WorkerConn, gpu_ids: list[int], key: _Key, pid: int
    ) -> None:
        self.worker_id = worker_id
        self.conn = conn
        self.gpu_ids = gpu_ids
        self.key = key
        self.pid = pid
        self.in_flight: dict[bytes, TaskSpec] = {}
        self.idle_timer: Any = None
        # The worker handed queued tasks back because its task blocked: push nothing more
        # until what it runs now is done.
        self.bounced = False
        # The head wants it back: return it the moment it is idle, with no grace period.
        self.revoked = False


class _Key:
    """The queue and leases of one resource shape."""

    __slots__ = (
        "leases",
        "queue",
        "queued_at_head",
        "requests",
        "resources",
        "retriable",
        "runtime_env",
        "strategy",
    )

    def __init__(
        self,
        resources: dict[str, int],
        strategy: Any = None,
        runtime_env: dict[str, Any] | None = None,
        retriable: bool = True,
    ) -> None:
        self.resources = resources
        self.strategy = strategy
        self.runtime_env = runtime_env  # leases of this key are of workers of this env
        self.retriable = retriable  # its tasks have retries (max_retries != 0)
        self.queue: collections.deque[TaskSpec] = collections.deque()
        self.leases: dict[bytes, _Lease] = {}
        self.requests = 0
        # Lease requests the head holds because the node's resources are all taken. Only
        # then are tasks pipelined onto busy workers: while more leases can be had, each
        # task gets its own worker (tasks that must run side by side always can).
        self.queued_at_head: set[int] = set()


class _Stream:
    __slots__ = ("cond", "done", "items")

    def __init__(self) -> None:
        self.items: dict[int, Any] = {}  # index -> ObjectRef, until the consumer takes it
        self.done: int | None = None  # the number of items, once the task finished
        self.cond = threading.Condition()


class TaskSubmitter:
    def __init__(self, core: CoreWorker) -> None:
        self.core = core
        self.keys: dict[tuple[Any, ...], _Key] = {}
        self.lease_requests: dict[int, _Key] = {}
        self.leases: dict[bytes, _Lease] = {}
        self.conns: dict[str, _WorkerConn] = {}
        self.running: dict[bytes, tuple[TaskSpec, _Lease | None]] = {}  # task id -> where
        self.queued: dict[bytes, TaskSpec] = {}  # submitted, not pushed yet
        self.children: dict[bytes, list[bytes]] = {}  # parent task id -> child task ids
        self.streams: dict[bytes, _Stream] = {}
        self._req_ids = itertools.count(1)
        # A driver's unfinished tasks and actor calls per notebook cell (output tag), so
        # that interrupting a cell can cancel what it started (cancel_tag).
        self.track_tags = core.role == "driver"
        self.by_tag: dict[int, dict[bytes, TaskSpec]] = {}
        # Owned objects the directory lost and asked us to make again: when their task
        # ends, a value that does not go to a store itself (an error) is put there, so
        # that the readers waiting at the directory get it.
        self.rebuild_wanted: set[bytes] = set()

    def connections(self) -> list[Connection]:
        return [c.conn for c in self.conns.values()]

    # -- user thread -------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        self.core.drain_releases()
        if spec.num_returns == STREAMING:
            self.streams[spec.task_id] = _Stream()
        self.core.post(self._submit, spec)

    def next_stream_item(self, task_id: bytes, index: int, timeout: float | None) -> Any:
        stream = self.streams.get(task_id)
        if stream is None:
            return None
        with stream.cond:
            ok = stream.cond.wait_for(
                lambda: (
                    index in stream.items
                    or (stream.done is not None and index >= stream.done)
                    or self.core.closed
                ),
                timeout,
            )
            if not ok:
                raise GetTimeoutError(f"no new item from the generator within {timeout}s")
            return stream.items.pop(index, None)

    def run_inline_while_blocked(self, event: Any, oids: Sequence[bytes]) -> None:
        """A worker waits for ``oids``: run those of its own queued children it can, here.

        A task that waits for its children holds a CPU it does not use; running the
        children that are still queued in this very thread (depth first, as a work-stealing
        scheduler would) uses that CPU, needs no new worker process, and cannot deadlock.
        Only children whose resources fit in the parent's are taken.
        """
        executor = self.core.inline_executor
        ctx = _worker_context.current
        if executor is None or ctx.task_id is None or ctx.inline_depth >= MAX_INLINE_DEPTH:
            return
        limit = ctx.fixed_resources or {}
        while not event.is_set():
            box: list[Any] = []
            done = threading.Event()
            self.core.post(self._steal, oids, limit, box, done)
            done.wait()
            if not box:
                return
            spec, body, frames = box[0]
            ctx.inline_depth += 1
            try:
                reply = executor(body, frames)
            finally:
                ctx.inline_depth -= 1
            self.core.post(self._on_inline_done, spec, reply)

    def _steal(
        self, oids: Sequence[bytes], limit: dict[str, int], box: list[Any], done: threading.Event
    ) -> None:
        try:
            for oid in oids:
                spec = self.queued.get(oid[:16])
                if spec is None or spec.cancelled or spec.num_returns == STREAMING:
                    continue
                if any(limit.get(k, 0) < v for k, v in spec.resources.items()):
                    continue
                own = self.core.runtime_env
                if spec.env_key != (own.key if own is not None else ""):
                    continue  # it needs a worker of another runtime env
                key = self.keys.get(spec.key)
                if key is None or spec not in key.queue:
                    continue  # still waiting for its arguments
                key.queue.remove(spec)
                self.queued.pop(spec.task_id, None)
                spec.attempts += 1
                self.running[spec.task_id] = (spec, INLINE)
                frames: list[Any] = [spec.fn_bytes]
                body: dict[str, Any] = {
                    "t": spec.task_id,
                    "f": spec.fn_hash,
                    "fb": 1,
                    "n": spec.name,
                    "nr": spec.num_returns,
                    "j": spec.job,
                    "kw": spec.kwnames,
                    "g": _worker_context.current_gpu_ids(),
                    "res": spec.resources,
                }
                if spec.out_tag is not None:
                    body["o"] = spec.out_tag
                add_event_fields(spec, body)
                body["a"] = encode_args(self.core, spec, frames)
                box.append((spec, body, frames))
                return
        finally:
            done.set()

    def _on_inline_done(self, spec: TaskSpec, reply: Message) -> None:
        if self.running.pop(spec.task_id, None) is None:
            return
        self._finish(spec, self._decode_results(reply.body["r"], reply.frames))

    # -- IO thread ---------------------------------------------------------------------
    def _submit(self, spec: TaskSpec) -> None:
        if self.core.lost_reason:
            from ._core import ClusterGone

            err = ClusterGone(self.core.lost_reason)
            self._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
            return
        self.queued[spec.task_id] = spec
        if spec.out_tag is not None and self.track_tags:
            self.track(spec)
        if spec.parent is not None:
            self.children.setdefault(spec.parent, []).append(spec.task_id)
        if self.core.events.enabled:
            spec.submitted_at = time.time()  # for the task log (see _task_events.py)
        self._when_deps_ready(spec, lambda: self._enqueue(spec))

    def pending(self, before: float) -> Iterator[tuple[TaskSpec, int, int]]:
        """For the task log, at a flush: (spec, state, attempt) of the tasks submitted
        here before ``before`` (wall clock) and not done: waiting for arguments or a
        worker, pushed, actor calls queued or sent. The tables keep submission order
        (near enough), so the walk stops at the first newer task."""
        core = self.core
        me = core.worker_id
        reported = core.events.reported
        for spec in self.queued.values():
            if spec.submitted_at > before:
                break
            if spec.cancelled:
                continue
            attempt = spec.attempts + 1
            if spec.deps and reported.get(spec.task_id) != (SUBMITTED, attempt):
                # Not yet known to be past its arguments: look at them.
                for ref in spec.deps:
                    oid = ref.binary()
                    if oid[:8] == me and core.lookup(oid) is None:
                        yield spec, PENDING_ARGS, attempt
                        break
                else:
                    yield spec, SUBMITTED, attempt
            else:
                yield spec, SUBMITTED, attempt
        for spec, _ in self.running.values():
            if spec.submitted_at <= before:
                yield spec, SUBMITTED, max(1, spec.attempts)
        for st in core.actors.actors.values():
            for spec in st.queue:
                if spec.submitted_at > before:
                    break
                yield spec, SUBMITTED, 1

    def _when_deps_ready(self, spec: TaskSpec, then: Any) -> None:
        """Call ``then`` once the owned arguments of ``spec`` have values."""
        core = self.core
        pending = [
            ref.binary()
            for ref in spec.deps
            if ref.binary()[:8] == core.worker_id and core.lookup(ref.binary()) is None
        ]
        if not pending:
            then()
            return
        remaining = [len(pending)]

        def on_dep(_oid: bytes, _value: Value) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                then()

        with core._lock:
            for oid in pending:
                if oid in core._values:
                    remaining[0] -= 1
                else:
                    core._waiters.setdefault(oid, []).append(on_dep)
        if remaining[0] == 0:
            then()

    def dep_error(self, spec: TaskSpec) -> Value | None:
        """An argument that failed makes the task fail with the same error, unrun."""
        for ref in spec.deps:
            value = self.core.lookup(ref.binary())
            if value is None:
                continue
            if (
                value[0] == "x"
                or (value[0] == "v" and value[1].is_error)
                or (value[0] == "s" and value[2] & 1)
            ):
                return value
        return None

    def fail_unrun(self, spec: TaskSpec, err: Value) -> None:
        """An argument of ``spec`` failed: the task fails with the same error, unrun."""
        if err[0] != "x":  # an "x" error is recorded by _finish
            cause = _error_info(err)[0]
            self.core.events.failed_here(
                spec,
                spec.attempts + 1,
                cause,
                f"an argument of this task failed ({cause}), so it did not run",
            )
        self._finish(spec, [err] * max(1, len(spec.return_ids)))

    def _enqueue(self, spec: TaskSpec) -> None:
        if spec.cancelled:
            return
        err = self.dep_error(spec)
        if err is not None:
            self.fail_unrun(spec, err)
            return
        key = self.keys.get(spec.key)
        if key is None:
            key = self.keys[spec.key] = _Key(
                spec.resources, spec.strategy, spec.runtime_env, spec.max_retries != 0
            )
        key.queue.append(spec)
        self._pump(key)

    def _pump(self, key: _Key) -> None:
        # Pipeline only when it cannot cost parallelism: the node has no resources for
        # another lease right now, and the backlog is long.
        pipeline = key.queued_at_head and len(key.queue) >= PIPELINE_MIN_BACKLOG
        limit = _config.MAX_TASKS_IN_FLIGHT_PER_WORKER if pipeline else 1
        queue = key.queue
        while queue:
            lease = None
            for candidate in key.leases.values():
                if len(candidate.in_flight) < (1 if candidate.bounced else limit):
                    lease = candidate
                    break
            if lease is None:
                break
            spec = queue.popleft()
            if spec.cancelled:
                continue
            self._push(spec, lease)
        want = min(len(queue) - key.requests, MAX_PENDING_LEASE_REQUESTS - key.requests)
        for _ in range(max(0, want)):
            rid = next(self._req_ids)
            self.lease_requests[rid] = key
            key.requests += 1
            body: dict[str, Any] = {"r": rid, "res": key.resources}
            if key.strategy is not None:
                body["st"] = key.strategy
            if key.runtime_env is not None:
                body["env"] = key.runtime_env
            if not key.retriable:
                body["nr"] = True
            self.core.head.send(Message(M.REQUEST_LEASE, body))
        if not queue:
            for lease in list(key.leases.values()):
                if lease.in_flight:
                    continue
                if lease.revoked:
                    self._return_if_idle(lease)
                elif lease.idle_timer is None:
                    lease.idle_timer = self.core.loop.call_later(
                        _config.IDLE_LEASE_SECONDS, self._return_if_idle, lease
                    )

    def _push(self, spec: TaskSpec, lease: _Lease) -> None:
        if lease.idle_timer is not None:
            lease.idle_timer.cancel()
            lease.idle_timer = None
        self.queued.pop(spec.task_id, None)
        spec.attempts += 1
        spec.worker = lease.worker_id
        lease.in_flight[spec.task_id] = spec
        self.running[spec.task_id] = (spec, lease)
        frames: list[Any] = []
        body: dict[str, Any] = {
            "t": spec.task_id,
            "f": spec.fn_hash,
            "n": spec.name,
            "nr": spec.num_returns,
            "j": spec.job,
            "kw": spec.kwnames,
            "g": lease.gpu_ids,
            "res": spec.resources,
        }
        if spec.out_tag is not None:
            body["o"] = spec.out_tag
        add_event_fields(spec, body)
        if spec.fn_hash not in lease.conn.fns:
            lease.conn.fns.add(spec.fn_hash)
            body["fb"] = 1
            frames.append(spec.fn_bytes)
        body["a"] = encode_args(self.core, spec, frames, is_local(lease.conn.conn))
        lease.conn.conn.send(Message(M.PUSH_TASK, body, frames))

    def connection(self, address: str) -> _WorkerConn:
        """The connection to a worker; ``address`` lists its ipc and tcp addresses."""
        wc = self.conns.get(address)
        if wc is None and self.core.client:
            from ._client import RelayConnection

            wc = self.conns[address] = _WorkerConn(RelayConnection(self.core, address))
        if wc is None:
            conn = Connection(
                self.core.ctx,
                self.core.signer,
                pick_address(address, self.core.session_path),
                {"role": self.core.role, "wid": self.core.worker_id, "pid": self.core.pid},
                self.on_worker_message,
            )
            wc = self.conns[address] = _WorkerConn(conn)
            conn.attach(self.core.loop)
        return wc

    def close_connection(self, address: str) -> None:
        wc = self.conns.pop(address, None)
        if wc is not None:
            wc.conn.close()  # a relayed connection asks the head to close its end

    def _return_if_idle(self, lease: _Lease) -> None:
        if lease.idle_timer is not None:
            lease.idle_timer.cancel()
        lease.idle_timer = None
        if lease.in_flight or lease.key.queue or self.leases.get(lease.worker_id) is not lease:
            return
        self._drop_lease(lease)
        self.core.head.send(Message(M.RETURN_LEASE, {"w": lease.worker_id}))

    def return_idle_leases(self) -> None:
        """This process closes: leases with nothing in flight go back now. Their workers
        return to the pool instead of being killed with their owner, and so live to send
        their last task events."""
        for lease in list(self.leases.values()):
            if not lease.in_flight:
                if lease.idle_timer is not None:
                    lease.idle_timer.cancel()
                    lease.idle_timer = None
                self._drop_lease(lease)
                self.core.head.send(Message(M.RETURN_LEASE, {"w": lease.worker_id}))

    def _drop_lease(self, lease: _Lease) -> None:
        self.leases.pop(lease.worker_id, None)
        lease.key.leases.pop(lease.worker_id, None)

    def on_head_message(self, msg: Message) -> None:
        body = msg.body
        if msg.type == M.LEASE_REVOKE:
            lease = self.leases.get(body["w"])
            if lease is not None:
                lease.revoked = True
                if not lease.in_flight and not lease.key.queue:
                    self._return_if_idle(lease)
        elif msg.type == M.LEASE_QUEUED:
            key = self.lease_requests.get(body["r"])
            if key is not None:
                key.queued_at_head.add(body["r"])
                self._pump(key)
        elif msg.type == M.LEASE_GRANTED:
            key = self.lease_requests.pop(body["r"], None)
            if key is None:
                self.core.head.send(Message(M.RETURN_LEASE, {"w": body["w"]}))
                return
            key.requests -= 1
            key.queued_at_head.discard(body["r"])
            lease = _Lease(
                body["w"], self.connection(body["a"]), list(body["g"]), key, int(body["p"])
            )
            self.leases[lease.worker_id] = lease
            key.leases[lease.worker_id] = lease
            self._pump(key)
        elif msg.type == M.LEASE_FAILED:
            key = self.lease_requests.pop(body["r"], None)
            if key is None:
                return
            key.requests -= 1
            key.queued_at_head.discard(body["r"])
            if body.get("retry"):
                # The node the request was sent to died before answering: ask again.
                self._pump(key)
                return
            err: Exception = TaskUnschedulableError(f"this task can never run: {body['e']}")
            if body.get("env"):
                err = RuntimeEnvSetupError(body["e"])
            while key.queue:
                spec = key.queue.popleft()
                self._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
        elif msg.type == M.WORKER_DIED:
            lease = self.leases.get(body["w"])
            if lease is not None:
                self._lease_lost(lease, body["e"], body.get("oom"))

    def _lease_lost(self, lease: _Lease, reason: str, oom: dict[str, Any] | None = None) -> None:
        """The leased worker died (``oom``: the memory monitor stopped it, and why): its
        tasks run again if they have retries left, else fail with the reason."""
        self._drop_lease(lease)
        self.close_connection(lease.conn.conn.address)  # the worker is gone for good
        if lease.idle_timer is not None:
            lease.idle_timer.cancel()
        specs = list(lease.in_flight.values())
        lease.in_flight.clear()
        for spec in specs:
            self.running.pop(spec.task_id, None)
            if spec.cancelled:
                self._finish(
                    spec,
                    [("x", TaskCancelledError(f"task {spec.name} was cancelled"))]
                    * max(1, len(spec.return_ids)),
                )
            elif spec.attempts <= spec.max_retries or spec.max_retries < 0:
                self.queued[spec.task_id] = spec
                if oom is None:
                    lease.key.queue.appendleft(spec)
                else:
                    spec.oom_kills += 1
                    delay = min(
                        _config.OOM_RETRY_MAX_DELAY_SECONDS,
                        _config.OOM_RETRY_DELAY_SECONDS * 2 ** (spec.oom_kills - 1),
                    )
                    self.core.loop.call_later(delay, self._retry_after_oom, spec, lease.key)
            else:
                err = self._death_error(spec, lease, reason, oom)
                self._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
        self._pump(lease.key)

    def _retry_after_oom(self, spec: TaskSpec, key: _Key) -> None:
        if spec.cancelled or self.queued.get(spec.task_id) is not spec:
            return  # cancelled (or failed) while it waited
        key.queue.appendleft(spec)
        self._pump(key)

    def _death_error(
        self, spec: TaskSpec, lease: _Lease, reason: str, oom: dict[str, Any] | None
    ) -> Exception:
        tries = f"it ran {spec.attempts} time{'s' if spec.attempts != 1 else ''}"
        tries += f" (max_retries={spec.max_retries})"
        if oom is not None:
            return OutOfMemoryError(
                f"task {spec.name} failed: its worker (pid {lease.pid}, id "
                f"{lease.worker_id.hex()[:12]}) was {reason}. {tries[0].upper()}{tries[1:]}. "
                "Use less memory per task, run fewer at once (ask for more num_cpus or "
                "memory), or raise SHOAL_MEMORY_USAGE_THRESHOLD.",
                task_name=spec.name,
                node_id=str(oom.get("node", "")),
                **{k: oom[k] for k in ("used", "total", "threshold", "rss") if k in oom},
            )
        return WorkerCrashedError(
            f"task {spec.name} failed: its worker (pid {lease.pid}, id "
            f"{lease.worker_id.hex()[:12]}) died ({reason}) while running it; {tries}, and "
            "its worker died each time",
            task_name=spec.name,
            pid=lease.pid,
            worker_id=lease.worker_id.hex(),
            reason=reason,
            attempts=spec.attempts,
        )

    def on_worker_message(self, msg: Message) -> None:
        if msg.type == M.TASK_DONE:
            self._on_task_done(msg.body, msg.frames)
        elif msg.type == M.STREAM_ITEM:
            self._on_stream_item(msg.body, msg.frames)

    def _decode_results(self, descs: list[Any], frames: Sequence[Any]) -> list[Value]:
        out: list[Value] = []
        pos = 0
        for d in descs:
            if d[0] == 0:
                n = d[1]
                parts = frames[pos : pos + n]
                pos += n
                sv = SerializedValue(parts[0], list(parts[1:]), list(d[3]), d[2])
                # ("v", sv, True): also in the store with this process as its holder.
                out.append(("v", sv, True) if len(d) > 4 and d[4] else ("v", sv))
            else:
                out.append(("s", d[1], d[2]))
        return out

    def _on_task_done(self, body: dict[str, Any], frames: Sequence[Any]) -> None:
        tid = body["t"]
        entry = self.running.pop(tid, None)
        if entry is None:
            return
        spec, lease = entry
        if lease is None:
            self.core.actors.on_call_done(spec, body, frames)
            return
        if lease is INLINE:
            self.running[tid] = entry  # not from a worker; the inline run reports itself
            return
        lease.in_flight.pop(tid, None)
        if body.get("bounce"):
            # Not run: the worker's current task blocked. Back to the front of the queue.
            lease.bounced = True
            spec.attempts -= 1
            self.queued[tid] = spec
            lease.key.queue.appendleft(spec)
            self._pump(lease.key)
            return
        if not lease.in_flight:
            lease.bounced = False
        if spec.num_returns == STREAMING:
            self._end_stream(spec, int(body.get("n", 0)))
            self._finish(spec, [])
        else:
            values = self._decode_results(body["r"], frames)
            if body.get("app_error") and self._should_retry_app_error(spec, body):
                self.queued[tid] = spec
                lease.key.queue.appendleft(spec)
            else:
                self._finish(spec, values)
        self._pump(lease.key)

    def _should_retry_app_error(self, spec: TaskSpec, body: dict[str, Any]) -> bool:
        if spec.cancelled or not spec.retry_exceptions:
            return False
        if spec.max_retries >= 0 and spec.attempts > spec.max_retries:
            return False
        if spec.retry_exceptions is True:
            return True
        names = set(body.get("app_error_types") or ())
        return any(
            (t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}") in names
            for t in spec.retry_exceptions  # type: ignore[union-attr]
        )

    def _finish(self, spec: TaskSpec, values: list[Value]) -> None:
        """The task is over (for good): publish its results and let go of its arguments."""
        self.queued.pop(spec.task_id, None)
        self.running.pop(spec.task_id, None)
        if spec.out_tag is not None and self.track_tags:
            cell = self.by_tag.get(spec.out_tag)
            if cell is not None:
                cell.pop(spec.task_id, None)
                if not cell:
                    del self.by_tag[spec.out_tag]
        if spec.parent is not None:
            siblings = self.children.get(spec.parent)
            if siblings is not None:
                try:
                    siblings.remove(spec.task_id)
                except ValueError:
                    pass
                if not siblings:
                    del self.children[spec.parent]
        events = self.core.events
        if events.enabled:
            first = values[0] if values else None
            if first is None or not _is_error(first):
                events.done(spec)
            elif first[0] == "x":
                # Failed here, not in a worker (the worker died, the task was cancelled
                # before it ran, the actor died ...): only this process can tell the log.
                exc = first[1]
                events.failed_here(
                    spec,
                    max(1, spec.attempts),
                    type(exc).__name__,
                    str(exc),
                    isinstance(exc, TaskCancelledError),
                )
            else:
                events.done(spec, lambda: _error_info(first))
        if spec.num_returns == STREAMING and values:
            self._stream_error(spec, values[0])
        elif spec.actor_id is None and any(v[0] == "s" for v in values):
            self._record_lineage(spec)
        for oid, value in zip(spec.return_ids, values, strict=False):
            self.core.resolve(oid, value)
            if self.rebuild_wanted and oid in self.rebuild_wanted:
                self.rebuild_wanted.discard(oid)
                if value[0] != "s":
                    self.core._promote(oid, value)
        spec.args = []
        spec.deps = []
        spec.pins = []

    # -- lineage (see _lineage.py) -------------------------------------------------------
    def _record_lineage(self, spec: TaskSpec) -> None:
        """Keep what it takes to run ``spec`` again, should a stored result of it be lost."""
        from ._refs import ObjectRef

        core = self.core
        args: list[Arg] = []
        pins = list(spec.pins)
        dep_tasks: list[bytes] = []
        size = ENTRY_OVERHEAD + len(spec.name)
        for kind, x in spec.args:
            if kind == 0:
                args.append((0, x))
                size += x.nbytes
                continue
            oid = x.binary()
            if owner_of(oid) != core.worker_id:
                args.append((2, x))  # borrowed: its owner makes it again if need be
                continue
            value = core.lookup(oid)
            if value is not None and value[0] == "v":
                sv: SerializedValue = value[1]
                args.append((0, sv))  # small: kept as the value, nothing to rebuild
                size += sv.nbytes
                pins.extend(ObjectRef(c, core) for c in sv.contained)
            else:
                args.append((1, oid))  # stored: by id, its value may be freed meanwhile
                dep_tasks.append(oid[:16])
        with core._lock:
            live = sum(1 for oid in spec.return_ids if oid in core._refcounts)
            core.lineage.record(spec.task_id, spec, args, pins, size, live, dep_tasks)

    def rebuild(self, oid: bytes) -> None:
        """The directory lost every copy of ``oid`` (ours): run its task again. The readers
        wait at the directory until the result is sealed again, or get our reason."""
        self.rebuild_wanted.add(oid)
        tid = oid[:16]
        if tid in self.queued or tid in self.running:
            return  # running already (a retry after its node died): its result answers
        error = self._resubmit(oid, 0)
        if error:
            self.rebuild_wanted.discard(oid)
            log.info("cannot rebuild object %s: %s", oid.hex(), error)
            self.core.head.send(Message(M.REBUILD_FAILED, {"o": oid, "e": error}))

    def _resubmit(self, oid: bytes, depth: int) -> str:
        """Submit again the task that made ``oid``; the reason when that cannot be done."""
        from ._refs import ObjectRef

        core = self.core
        if depth == 0:
            what = f"object {oid.hex()} was lost with its node and cannot be made again"
        else:
            what = f"object {oid.hex()} is gone too and cannot be made again"
        if oid[16:] == b"\0\0\0\0":
            return (
                f"{what}: it was made with put(), and only a task's result can be made "
                "again (by running the task again)"
            )
        tid = oid[:16]
        with core._lock:
            entry = core.lineage.get(tid)
        if entry is None:
            return (
                f"{what}: its owner no longer keeps the task that made it (a task's spec is "
                "kept while its owner holds its results, up to SHOAL_MAX_LINEAGE_BYTES; "
                "results of actor calls are never made again)"
            )
        old: TaskSpec = entry.spec
        budget = old.max_retries if old.max_retries >= 0 else _config.MAX_OBJECT_RECONSTRUCTIONS
        if entry.rebuilds >= budget:
            return (
                f"{what}: its task {old.name} was run again {entry.rebuilds} times already "
                f"(max_retries={old.max_retries})"
            )
        args: list[tuple[int, Any]] = []
        deps: list[Any] = []
        for kind, x in entry.args:
            if kind == 0:
                args.append((0, x))
                continue
            if kind == 2:
                args.append((1, x))
                deps.append(x)
                continue
            ref = ObjectRef(x, core)
            if core.lookup(x) is None and x[:16] not in self.queued and x[:16] not in self.running:
                # Freed since (only the lineage remembered it): make it first.
                if depth >= MAX_REBUILD_DEPTH:
                    return f"{what}: its arguments were lost {MAX_REBUILD_DEPTH} levels deep"
                error = self._resubmit(x, depth + 1)
                if error:
                    return f"{what}: it needs its argument {x.hex()}, and {error}"
            args.append((1, ref))
            deps.append(ref)
        entry.rebuilds += 1
        spec = TaskSpec()
        for name in TaskSpec.__slots__:
            setattr(spec, name, getattr(old, name))
        spec.args, spec.deps, spec.pins = args, deps, list(entry.pins)
        spec.attempts = 0
        spec.cancelled = False
        spec.worker = None
        spec.parent = None
        spec.out_tag = None
        log.info("running task %s again to make lost object %s", old.name, oid.hex())
        self._submit(spec)
        return ""

    # -- streaming ---------------------------------------------------------------------
    def _on_stream_item(self, body: dict[str, Any], frames: Sequence[Any]) -> None:
        from ._refs import ObjectRef

        tid = body["t"]
        index = int(body["i"])
        value = self._decode_results([body["r"]], frames)[0]
        stream = self.streams.get(tid)
        if stream is None:
            return  # nobody listens any more
        oid = return_id(tid, index + 1)
        ref = ObjectRef(oid, self.core)
        self.core.resolve(oid, value)
        with stream.cond:
            stream.items[index] = ref
            stream.cond.notify_all()

    def _end_stream(self, spec: TaskSpec, count: int) -> None:
        stream = self.streams.get(spec.task_id)
        if stream is not None:
            with stream.cond:
                stream.done = count
                stream.cond.notify_all()

    def _stream_error(self, spec: TaskSpec, value: Value) -> None:
        """A streaming task that failed before starting: its first item is the error."""
        from ._refs import ObjectRef

        stream = self.streams.get(spec.task_id)
        if stream is None:
            return
        oid = return_id(spec.task_id, 1)
        ref = ObjectRef(oid, self.core)
        self.core.resolve(oid, value)
        with stream.cond:
            if stream.done is None:
                stream.items[0] = ref
                stream.done = 1
            stream.cond.notify_all()

    def drop_stream(self, task_id: bytes) -> None:
        self.streams.pop(task_id, None)

    # -- cancel ------------------------------------------------------------------------
    def cancel(self, task_id: bytes, force: bool, recursive: bool) -> None:
        spec = self.queued.get(task_id)
        if spec is not None:
            spec.cancelled = True
            key = self.keys.get(spec.key)
            if key is not None:
                try:
                    key.queue.remove(spec)
                except ValueError:
                    pass
            self._finish(
                spec,
                [("x", TaskCancelledError(f"task {spec.name} was cancelled"))]
                * max(1, len(spec.return_ids)),
            )
            return
        entry = self.running.get(task_id)
        if entry is None:
            # An actor call still waiting here (for its actor or its arguments) ends now.
            self.core.actors.cancel_waiting(task_id)
            return
        spec, lease = entry
        if lease is None or lease is INLINE:
            return  # actor calls sent, and children run inline by this very worker, go on
        spec.cancelled = True
        self.core.head.send(
            Message(
                M.CANCEL_TASK,
                {"w": lease.worker_id, "t": task_id, "force": force, "rec": recursive},
            )
        )

    def cancel_children(self, parent: bytes) -> None:
        for child in list(self.children.get(parent, ())):
            self.cancel(child, force=False, recursive=True)

    def track(self, spec: TaskSpec) -> None:
        self.by_tag.setdefault(spec.out_tag, {})[spec.task_id] = spec  # type: ignore[arg-type]

    def cancel_tag(self, tag: int) -> tuple[int, int]:
        """Cancel every unfinished task and actor call that carries ``tag`` (a notebook
        cell was interrupted), with their children. Actor calls are cancelled only while
        they wait in this process: one that was sent to its actor runs to its end.
        Returns (how many were cancelled, how many actor calls run on)."""
        cancelled = running_on = 0
        for tid, spec in list(self.by_tag.get(tag, {}).items()):
            if spec.actor_id is None:
                self.cancel(tid, force=False, recursive=True)
                cancelled += 1
            elif self.core.actors.cancel_queued(spec):
                cancelled += 1
            else:
                running_on += 1
        return cancelled, running_on

    def fail_all(self, err: Exception) -> None:
        for spec in list(self.queued.values()) + [s for s, _ in self.running.values()]:
            self._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
        for key in self.keys.values():
            key.queue.clear()
        for stream in self.streams.values():
            with stream.cond:
                if stream.done is None:
                    stream.done = len(stream.items)
                stream.cond.notify_all()


def add_event_fields(spec: TaskSpec, body: dict[str, Any]) -> None:
    """What the executor's task event needs from the owner, added to a push: the submit
    time, the attempt (when not the first) and the parent task (when there is one)."""
    if spec.submitted_at:
        body["ts"] = spec.submitted_at
    if spec.attempts > 1:
        body["at"] = spec.attempts
    if spec.parent is not None:
        body["pt"] = spec.parent


def is_local(conn: Any) -> bool:
    """Whether a worker connection reaches a worker of this node (over ipc)."""
    return conn.sock is not None and str(conn.address).startswith("ipc://")


def pick_address(addresses: str, session_path: str) -> str:
    """ipc for a worker of this node (its socket is in our session directory), else tcp."""
    choices = addresses.split()
    for address in choices:
        if address.startswith("ipc://") and session_path and address[6:].startswith(session_path):
            return address
    for address in choices:
        if address.startswith("tcp://"):
            return address
    return choices[0]


def _is_error(value: Value) -> bool:
    kind = value[0]
    if kind == "v":
        return bool(value[1].flags & FLAG_ERROR)
    return kind == "x" or bool(value[2] & FLAG_ERROR)


def _error_info(value: Value) -> list[str]:
    """The task log's fields (type, message, traceback) of the error a failed value holds."""
    if value[0] == "v":
        try:
            err = deserialize(value[1].data, value[1].buffers)
        except Exception:
            err = None
        if err is not None:
            cause = getattr(err, "cause", None)
            return error_fields(
                str(getattr(err, "cause_type_name", "") or type(err).__name__),
                str(cause if cause is not None else err),
                str(getattr(err, "remote_traceback", "")),
            )
    return error_fields("TaskError", "the task failed (its error is in the object store)")
