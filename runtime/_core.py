"""The core worker: what every driver and worker process uses to own and read objects.

    user threads                      IO thread (one IOLoop)
    ------------                      ----------------------
    remote()  -- spec ----------->    TaskSubmitter: leases, pushes to workers
    actor call -- spec ---------->    ActorCaller: per-actor queues, direct pushes
    get()/wait() -- waiters ----->    results resolve values, fire waiters
    ObjectRef.__del__ -- deque -->    reference counts drop, store holds released (batched)

User threads never touch a socket: they hand work to the IO thread with
``call_soon_threadsafe`` (one eventfd write per burst) and block on events. Values owned
by this process live in ``_values`` until their last reference goes; values that other
processes must read (large ones, and refs that escaped inside other values) are in the
node's object store, where this process is registered as a holder.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import _config, _metrics, _shm
from ._ids import IdFactory, owner_of
from ._ioloop import IOLoop
from ._lineage import Lineage
from ._protocol import Message, MsgType, Signer
from ._sealing import trim_spares
from ._serialization import FLAG_ERROR, SerializedValue, deserialize, serialize_error
from ._task_events import TaskEventBuffer
from ._task_events import encode as encode_events
from ._transport import LEND_STALE_SECONDS, Connection, LazyContext
from .exceptions import (
    ClusterGoneError,
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    OwnerDiedError,
)

log = logging.getLogger("shoal.core")

M = MsgType

# A resolved value, one of:
#   ("v", SerializedValue)    held here, inline
#   ("s", path, flags)        in this node's shared-memory store
#   ("x", exception)          a failure made here (worker crashed, cancelled ...)
Value = tuple[Any, ...]


# The longest a dropped ObjectRef waits before its release is applied when the program
# makes no Shoal call in the meantime.
RELEASE_SWEEP_SECONDS = 0.1


# The connection to the cluster was lost (the public name is ClusterGoneError).
ClusterGone = ClusterGoneError


class _Signal:
    """A one-shot event that makes its lock only if a thread has to block on it: the reply
    to a synchronous call is usually read by the waiting thread itself."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        event = self._event
        if event is None:
            event = self._event = threading.Event()
            if self._set:  # set between the check above and the assignment
                event.set()
        return event.wait(timeout)


class _Reply:
    __slots__ = ("event", "msg")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.msg: Message | None = None


class CoreWorker:
    def __init__(
        self,
        *,
        role: str,
        head_address: str,
        key: bytes,
        worker_id: bytes | None = None,
        namespace: str = "",
        worker_address: str = "",
        head_pid: int | None = None,
        worker_hooks: Callable[[Message], None] | None = None,
        client: bool = False,
    ) -> None:
        from ._actor_caller import ActorCaller
        from ._task_submitter import TaskSubmitter

        self.role = role
        # A driver outside the cluster (client-server mode): everything goes through the
        # head connection, and large objects are streamed instead of mapped (_client.py).
        self.client = client
        self.worker_id = worker_id or os.urandom(8)
        self.ids = IdFactory(self.worker_id)
        self.namespace = namespace
        self.pid = os.getpid()
        self.loop = IOLoop()
        self.ctx = LazyContext()  # unused: no carrier needs a context
        self.signer = Signer(key)
        self.closed = False
        self.lost_reason = ""

        self._lock = threading.Lock()
        self._refcounts: dict[bytes, int] = {}
        self._values: dict[bytes, Value] = {}
        self._waiters: dict[bytes, list[Callable[[bytes, Value], None]]] = {}
        self._escaped: set[bytes] = set()
        self._store_held: set[bytes] = set()
        self._nested: dict[bytes, list[Any]] = {}  # local value -> pins of refs inside it
        self._writer_maps = _shm.WriterMappings()
        self._fetching: set[bytes] = set()
        self._released: collections.deque[bytes] = collections.deque()
        self._ref_ops: dict[bytes, list[int]] = {}  # oid -> [first op, last op], +1 add / -1 remove
        self._flush_scheduled = False
        self.borrow_adds = 0  # how many borrowed refs were taken; a worker checks it per task
        # Specs of finished tasks whose stored results may have to be made again (under
        # _lock: reference counts drive it). See _lineage.py.
        self.lineage = Lineage(_config.MAX_LINEAGE_BYTES)
        self._req_ids = itertools.count(1)
        self._replies: dict[int, _Reply] = {}
        # A worker's handler for what the head sends to workers only (BECOME_ACTOR, ...);
        # given here because such a message can arrive right after the WELCOME.
        self.worker_hooks = worker_hooks
        # A worker's way to run a task in the calling thread: (body, frames) -> TASK_DONE.
        self.inline_executor: Callable[[dict[str, Any], list[Any]], Message] | None = None
        # A worker's way to hand back tasks queued behind the one that is about to block.
        self.on_block: Callable[[], None] | None = None
        self.on_log: Callable[[Any], None] | None = None
        # The runtime env this process's work inherits: the job's (a driver) or its own (a
        # worker); a runtime_env._state.EnvState, made on first use.
        self.runtime_env: Any = None
        # Task state changes for the control store's task log, flushed by the sweep; user
        # metrics ride on the same messages (the names whose definitions were sent).
        self.events = TaskEventBuffer()
        self.metrics_sent: set[str] = set()

        self.client_objects: Any = None
        if client:
            from ._client import ClientObjects

            self.client_objects = ClientObjects(self)
        self.head = Connection(
            self.ctx,
            self.signer,
            head_address,
            {
                "role": role,
                "wid": self.worker_id,
                "pid": self.pid,
                "addr": worker_address,
                "ns": namespace,
                "client": client,
            },
            self._on_head_message,
            self._on_refused,
            linger_ms=1000,
            # A client's connection crosses networks: when it breaks, it is resumed within
            # the grace period (CLIENT_TIMEOUT_SECONDS) without losing a message.
            resumable=client,
            on_lost=self._connection_lost,
            # Chunks of a large get are opened (decrypted) straight into their place.
            sink=self.client_objects.sink if client else None,
        )
        self._welcomed = threading.Event()
        self.head.attach(self.loop, self._head_readable)
        self.tasks = TaskSubmitter(self)
        self.actors = ActorCaller(self)
        self.events.pending_source = self.tasks.pending
        self._last_heard = time.monotonic()
        if client:
            self.loop.call_later(0.0, self._ping)
        if head_pid is not None:
            try:
                fd = os.pidfd_open(head_pid)
                self.loop.add_reader(
                    fd, lambda: self._lose_cluster("the cluster's head process exited")
                )
                self._head_pidfd: int | None = fd
            except OSError:
                self._head_pidfd = None
        else:
            self._head_pidfd = None
        self.loop.call_later(RELEASE_SWEEP_SECONDS, self._sweep_releases)
        self.thread = threading.Thread(target=self._run_loop, name="shoal-io", daemon=True)
        self.thread.start()
        if not self._welcomed.wait(_config.START_TIMEOUT_SECONDS) or self.head.welcome is None:
            self.close()
            raise ConnectionError(
                self.lost_reason
                or f"no answer from the cluster at {head_address}"
                + (
                    ": is a head listening there, and is the key the one the head printed? "
                    "(a message signed with another key is dropped unread)"
                    if client
                    else ""
                )
            )
        welcome = self.head.welcome
        self.node_id: bytes = welcome["node"]
        self.job_id: int = int(welcome.get("job", 0))
        self.session_path: str = welcome.get("session", "")
        self.shm_tag: str = welcome.get("tag", "")

    # -- IO thread plumbing ------------------------------------------------------------
    def _run_loop(self) -> None:
        try:
            self.loop.run()
        finally:
            for conn in (self.head, *self.tasks.connections()):
                try:
                    conn.close()  # the head's with its linger: last ref updates still go
                except Exception:
                    pass
            self.loop.close()
            if self._head_pidfd is not None:
                os.close(self._head_pidfd)

    def _head_readable(self) -> None:
        if self.client:
            # A message, not just readability: a connection that fails while the client
            # tries to resume is readable too (its end), but nothing was heard from the head.
            received = self.head.received
            self.head.handle_readable()
            if self.head.received != received:
                self._last_heard = time.monotonic()
        else:
            self.head.handle_readable()
        if not self._welcomed.is_set() and self.head.welcome is not None:
            self._welcomed.set()
        if (
            self.head.closed
            and self.head.welcome is not None
            and not (self.client or self.closed or self.lost_reason)
        ):
            # Our node manager closed the connection: it exited, or it starts again as a
            # new node after losing the cluster (same pid: the pidfd cannot tell).
            self._lose_cluster(
                f"lost the connection to this machine's node manager ({self.head.address}): "
                "it exited (the head, or a node that lost its cluster)"
            )

    def _ping(self) -> None:
        """Client mode: tell the head we are here, and notice when it no longer answers."""
        if self.closed or self.lost_reason:
            return
        silent = time.monotonic() - self._last_heard
        if silent > _config.CLIENT_TIMEOUT_SECONDS:
            self.head.close(0)  # no more attempts to resume it
            self._lose_cluster(
                f"disconnected: nothing was heard from the cluster at {self.head.address} "
                f"for {silent:.0f} s"
            )
            return
        self.head.send(Message(M.PING, {}))
        trim_spares()
        self.loop.call_later(_config.CLIENT_PING_SECONDS, self._ping)

    def _wait_event_sem(self, sem: threading.Semaphore) -> bool:
        """Acquire ``sem`` in short slices; False when this core closed meanwhile."""
        while not sem.acquire(timeout=0.2):
            if self.closed or self.lost_reason:
                return False
        return True

    def _connection_lost(self, reason: str) -> None:
        """A client's broken connection could not be resumed (the head forgot it)."""
        if not self.closed and not self.lost_reason:
            self._lose_cluster(f"disconnected: {reason}")

    def _on_refused(self, reason: str) -> None:
        self.lost_reason = f"the cluster refused this connection: {reason}"
        self._welcomed.set()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the IO thread."""
        self.watch_parked()
        self.loop.call_soon_threadsafe(fn, *args)

    def watch_parked(self) -> None:
        """Something else than a synchronous actor call is going on: have the IO thread
        watch again the connections a push left parked (see ActorCaller._lazy)."""
        if self.actors._lazy:
            self.loop.call_soon_threadsafe(self.actors.flush_lazy)

    def send_head(self, msg: Message) -> None:
        """Send to the head from any thread."""
        if self.loop.in_loop_thread():
            self.head.send(msg)
        else:
            self.loop.call_soon_threadsafe(self.head.send, msg)

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` (its body gets a request id "r") and wait for the reply."""
        if self.loop.in_loop_thread():
            raise RuntimeError("request() called on the IO thread")
        if self.lost_reason:
            raise ClusterGone(self.lost_reason)
        rid = next(self._req_ids)
        msg.body["r"] = rid
        reply = _Reply()
        self._replies[rid] = reply
        self.send_head(msg)
        if not self._wait_event(reply.event, timeout):
            self._replies.pop(rid, None)
            raise GetTimeoutError(f"no reply to {msg.type.name} within {timeout}s")
        if reply.msg is None:
            raise ClusterGone(self.lost_reason or "the connection to the cluster was lost")
        return reply.msg

    def _wait_event(
        self,
        event: Any,
        timeout: float | None,
        each_slice: Callable[[], None] | None = None,
    ) -> bool:
        # Waiting in short slices keeps Ctrl-C responsive in the main thread, and lets a
        # blocked worker hand back tasks that reach it while it waits.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if each_slice is not None:
                each_slice()
            if self.closed and not event.is_set():
                return True
            slice_ = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if slice_ <= 0:
                return event.is_set()
            if event.wait(slice_):
                return True

    def _wait(
        self,
        event: Any,
        oids: Sequence[bytes],
        timeout: float | None,
        each_slice: Callable[[], None] | None,
    ) -> bool:
        """Wait for ``event``; when the values come as replies to actor calls on one local
        connection, read that connection in this thread (no thread is woken for the reply:
        on a small VM that saves a context switch and a GIL hand-off, ~30 us a call)."""
        loop = self.loop
        if loop.in_loop_thread():
            return self._wait_event(event, timeout, each_slice)
        deadline = None if timeout is None else time.monotonic() + timeout
        lent = None
        # Every ``leave`` may raise a KeyboardInterrupt held off meanwhile (_interrupts):
        # the lend is ended by the outer ``finally`` whatever happens after it began.
        try:
            if not loop.enter():
                self.watch_parked()
                return self._wait_event(event, timeout, each_slice)
            try:
                if not event.is_set():
                    lent = self.actors.lend(oids)
            finally:
                loop.leave()
            if lent is None:
                return self._wait_event(event, timeout, each_slice)
            conn = lent[0]
            while not event.is_set():
                if each_slice is not None:
                    each_slice()
                if self.closed or conn.closed:
                    break
                now = time.monotonic()
                conn.lend_deadline = now + LEND_STALE_SECONDS  # still reading it
                slice_ = 0.2 if deadline is None else min(0.2, deadline - now)
                if slice_ <= 0:
                    return event.is_set()
                if conn.wait_readable(slice_):
                    if not loop.enter():
                        break
                    try:
                        conn.handle_readable()
                        if event.is_set() or conn.closed:
                            ending, lent = lent, None
                            self.actors.end_lend(ending)
                            break
                    finally:
                        loop.leave()
        finally:
            if lent is not None:
                ending, lent = lent, None
                if loop.enter():
                    try:
                        self.actors.end_lend(ending)
                    finally:
                        loop.leave()
                else:
                    ending[0].end_lend()  # the loop stopped: nothing else reads it anyway
        if event.is_set() or self.closed:
            return True
        # The connection closed (the actor died): the news of that comes from the head.
        remaining = None if deadline is None else deadline - time.monotonic()
        return self._wait_event(event, remaining, each_slice)

    def _on_head_message(self, msg: Message) -> None:
        t = msg.type
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from the head: %.200r", t.name, msg.body)
        body = msg.body
        if t in (M.OBJECT_CREATED, M.FLUSHED, M.CLUSTER_INFO_REPLY, M.ACTOR_INFO, M.REPLY):
            reply = self._replies.pop(body.get("r"), None)
            if reply is not None:
                reply.msg = msg
                reply.event.set()
        elif t == M.OBJECTS:
            self._on_objects(body, msg.frames)
        elif t in (M.LEASE_GRANTED, M.LEASE_FAILED, M.WORKER_DIED, M.LEASE_QUEUED, M.LEASE_REVOKE):
            self.tasks.on_head_message(msg)
        elif t == M.ACTOR_UPDATE:
            self.actors.on_update(body, msg.frames)
        elif t == M.LOG_LINES:
            if self.on_log is not None:
                self.on_log(body)
        elif t == M.RELAYED:
            self.tasks.on_worker_message(Message(MsgType(body["t"]), body["b"], msg.frames))
        elif t == M.CHUNK:
            self.client_objects.on_chunk(body, msg.frames)
        elif t == M.CHUNK_ACK:
            self.client_objects.on_ack(body)
        elif t == M.PONG:
            pass
        elif t == M.REBUILD_OBJECT:
            self.tasks.rebuild(body["o"])
        elif t == M.EXIT and body.get("lost"):
            if not self.lost_reason:
                self._lose_cluster(str(body.get("reason") or "the cluster was lost"))
        elif t == M.STACK_DUMP:
            from ._stacks import dump_threads

            text = dump_threads(self.events.running)
            self.head.send(Message(M.STACK_DUMP, {"q": body["q"], "text": text}))
        elif self.worker_hooks is not None:
            self.worker_hooks(msg)

    def _lose_cluster(self, reason: str) -> None:
        """The head is gone: fail everything that waits, so that nothing hangs."""
        if self._head_pidfd is not None:
            self.loop.remove_reader(self._head_pidfd)
        self.lost_reason = reason
        err = ClusterGone(reason)
        for reply in list(self._replies.values()):
            reply.event.set()
        self._replies.clear()
        with self._lock:
            waiters = list(self._waiters.items())
            self._waiters.clear()
        for oid, callbacks in waiters:
            for cb in callbacks:
                cb(oid, ("x", err))
        self.tasks.fail_all(err)
        self.actors.fail_all(err)
        if self.client_objects is not None:
            self.client_objects.fail_all(reason)
        if self.worker_hooks is not None:
            self.worker_hooks(Message(M.EXIT, {"reason": reason}))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.thread.is_alive():
            self.post(self._flush_now)
            self.loop.stop()
            if threading.current_thread() is not self.thread:
                self.thread.join(5)
        self.ctx.term()
        self._writer_maps.close()

    def _flush_now(self) -> None:
        if not self.lost_reason:
            self.tasks.return_idle_leases()
        self.flush_events(final=True)
        self._process_releases()
        self._flush_refs()
        if self.client and not self.lost_reason:
            # A client's process is on another machine: say goodbye, so that the head lets
            # its leases and objects go now rather than when it stops hearing from it.
            self.head.send(Message(M.EXIT, {"bye": True}))
            self.head.finish()

    # -- reference counting ------------------------------------------------------------
    def incref(self, oid: bytes) -> None:
        with self._lock:
            self._count_ref(oid)

    def _count_ref(self, oid: bytes) -> None:
        """One more local ref to ``oid``; must hold the lock."""
        n = self._refcounts.get(oid, 0)
        self._refcounts[oid] = n + 1
        if n == 0:
            if oid[:8] != self.worker_id:
                # A borrowed ref: the store must know this process holds it.
                self.borrow_adds += 1
                self._store_held.add(oid)
                self._ref_op(oid, 1)
            elif self.lineage.entries:
                self.lineage.acquire(oid)

    def decref(self, oid: bytes) -> None:
        # Called from __del__, possibly inside a locked region of this very thread: only
        # queue the work (deque.append is atomic). The queue is drained by the next API
        # call of a user thread, by the IO thread whenever it wakes, and at the latest by
        # its periodic sweep: waking the IO thread for every dropped ref would cost a
        # thread switch per task.
        if not self.closed:
            self._released.append(oid)

    def _sweep_releases(self) -> None:
        self.actors.sweep()
        if self._released:
            self._process_releases()
        self._writer_maps.sweep()
        now = time.monotonic()
        if self.events.due(now) or _metrics.REGISTRY.due(now):
            self.flush_events()
        if not self.closed:
            self.loop.call_later(RELEASE_SWEEP_SECONDS, self._sweep_releases)

    def flush_events(self, final: bool = False) -> None:
        """IO thread: send the task events and the metrics recorded since the last flush
        (one message)."""
        taken = self.events.take(final)
        registry = _metrics.REGISTRY
        metrics = registry.take(self.metrics_sent) if registry.series else None
        if (taken is None and metrics is None) or self.lost_reason:
            return
        body: dict[str, Any] = {}
        frames = []
        if taken is not None:
            body["d"] = taken["d"]
            frames.append(encode_events(taken["e"]))
        if metrics is not None:
            body["m"] = metrics
        self.head.send(Message(M.TASK_EVENTS, body, frames))

    def drain_releases(self) -> None:
        """From a user thread at an API call: apply the refs dropped since the last one."""
        if self._released:
            self._process_releases()

    def _process_releases(self) -> None:
        released = self._released
        with self._lock:
            while released:
                oid = released.popleft()
                n = self._refcounts.get(oid, 0) - 1
                if n > 0:
                    self._refcounts[oid] = n
                    continue
                if self._refcounts.pop(oid, None) is not None and self.lineage.entries:
                    self.lineage.release(oid)
                value = self._values.pop(oid, None)
                nested = self._nested.pop(oid, None)
                if nested:
                    nested.clear()  # drops the pins; their releases join this queue
                if oid in self._escaped and value is not None:
                    self._escaped.discard(oid)
                if oid in self._store_held:
                    self._store_held.discard(oid)
                    self._ref_op(oid, -1)

    def _ref_op(self, oid: bytes, op: int) -> None:
        """Queue a store holder change; must hold the lock. Flushed in one batch."""
        ops = self._ref_ops.get(oid)
        if ops is None:
            self._ref_ops[oid] = [op, op]
        else:
            ops[1] = op
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon_threadsafe(self._flush_refs)

    def _flush_refs(self, reply_id: int | None = None) -> None:
        self._flush_scheduled = False
        with self._lock:
            ops, self._ref_ops = self._ref_ops, {}
        # Adds and removes alternate per object, so the first and last ops of a batch say
        # everything: equal means that op stands, different means they cancel out.
        add = [oid for oid, (first, last) in ops.items() if first == last == 1]
        remove = [oid for oid, (first, last) in ops.items() if first == last == -1]
        if add or remove or reply_id is not None:
            body: dict[str, Any] = {"a": add, "d": remove}
            if reply_id is not None:
                body["r"] = reply_id
            self.head.send(Message(M.REF_UPDATES, body))

    def flush_refs_sync(self) -> None:
        """Make sure the store has seen every holder change made so far."""
        self.post(self._process_releases)
        rid = next(self._req_ids)
        reply = _Reply()
        self._replies[rid] = reply
        self.post(self._flush_refs, rid)
        self._wait_event(reply.event, 30)

    # -- values ------------------------------------------------------------------------
    def resolve(self, oid: bytes, value: Value) -> None:
        """IO thread: the value of ``oid`` is known. Cache it, promote it, wake waiters."""
        with self._lock:
            if oid in self._refcounts:
                self._values[oid] = value
            callbacks = self._waiters.pop(oid, None)
            promote = oid in self._escaped
            if (value[0] == "s" or len(value) > 2) and oid[:8] == self.worker_id:
                # Sealed with this process as holder: it must let go when its refs do.
                self._store_held.add(oid)
                if oid not in self._refcounts:
                    self._store_held.discard(oid)
                    self._ref_op(oid, -1)
        if promote:
            self._promote(oid, value)
        if callbacks:
            for cb in callbacks:
                cb(oid, value)

    def mark_escaped(self, oids: Sequence[bytes]) -> None:
        """These refs were serialized into something another process will read."""
        for oid in oids:
            if owner_of(oid) != self.worker_id:
                continue
            with self._lock:
                if oid in self._escaped:
                    continue
                self._escaped.add(oid)
                value = self._values.get(oid)
            if value is not None:
                self.post(self._promote, oid, value)

    def _promote(self, oid: bytes, value: Value) -> None:
        """IO thread: put an owned value in the store so that borrowers can read it."""
        kind = value[0]
        if kind == "s":
            return  # already there
        with self._lock:
            holder = oid in self._refcounts
            if holder:
                self._store_held.add(oid)
        sv = value[1] if kind == "v" else serialize_error(value[1])
        self.head.send(
            Message(
                M.PUT_OBJECT, {"o": oid, "f": sv.flags, "c": sv.contained, "h": holder}, sv.frames()
            )
        )

    def put_serialized(self, oid: bytes, sv: SerializedValue, call_site: str = "") -> Value:
        """User thread: record a new owned value (``put`` or an auto-put argument)."""
        # Refs dropped since the last call are released first, so that their memory (and
        # a segment to reuse) is back before this value asks for room.
        self.drain_releases()
        if sv.nbytes >= _config.INLINE_THRESHOLD:
            path = self.store_large(oid, sv, holder=self.worker_id, call_site=call_site)
            value: Value = ("s", path, sv.flags)
            with self._lock:
                self._store_held.add(oid)
        else:
            value = ("v", sv)
        if sv.contained:
            self.mark_escaped(sv.contained)
        with self._lock:
            self._values[oid] = value
            if sv.contained and value[0] == "v":
                # The value holds refs but stays here: it keeps their objects alive until
                # it is released itself (a stored value does the same in the store).
                self._nested[oid] = [self._pin(c) for c in sv.contained]
        return value

    def _pin(self, oid: bytes) -> Any:
        from ._refs import ObjectRef

        self._count_ref(oid)  # not incref: the caller holds the lock already
        return ObjectRef(oid, self, _counted=True)

    def store_large(
        self, oid: bytes, sv: SerializedValue, holder: bytes, call_site: str = ""
    ) -> str:
        """Write a value into the node's shared-memory store; returns the segment path."""
        if self.client:
            return str(self.client_objects.upload(oid, sv, holder, call_site))
        size = _shm.layout_size(sv)
        reply = self.request(Message(M.CREATE_OBJECT, {"o": oid, "s": size, "cs": call_site}))
        if "e" in reply.body:
            raise ObjectStoreFullError(reply.body["e"])
        path = reply.body["p"]
        try:
            _shm.write(
                path, sv, size, reuse=bool(reply.body.get("reuse")), mappings=self._writer_maps
            )
        except OSError as exc:
            self.send_head(Message(M.SEAL_OBJECT, {"o": oid, "abort": True}))
            raise ObjectStoreFullError(
                f"could not write an object of {size:,} bytes to shared memory: {exc}"
            ) from None
        self.request(
            Message(M.SEAL_OBJECT, {"o": oid, "f": sv.flags, "c": sv.contained, "h": holder})
        )
        return path

    def _on_objects(self, body: dict[str, Any], frames: Sequence[Any]) -> None:
        """IO thread: the store answered a GET_OBJECTS (possibly in several parts)."""
        pos = 0
        for entry in body["e"]:
            oid, kind = entry[0], entry[1]
            self._fetching.discard(oid)
            if kind == "i":
                n = entry[3]
                parts = frames[pos : pos + n]
                pos += n
                value: Value = ("v", SerializedValue(parts[0], list(parts[1:]), [], entry[2]))
            elif kind == "s":
                value = ("s", entry[3], entry[2])
            else:
                cls = OwnerDiedError if entry[2] == "owner_died" else ObjectLostError
                value = ("x", cls(entry[3]))
            self.resolve(oid, value)

    def _keepalive(self, oid: bytes | None) -> Any:
        """A ref that a zero-copy mapping holds, so the store keeps (and never reuses) it."""
        if oid is None or self.closed:
            return None
        from ._refs import ObjectRef

        return ObjectRef(oid, self)

    def relocate(self, oid: bytes, stale_path: str) -> Value:
        """Ask the store again where ``oid`` is, after its file moved away from ``stale_path``
        (spilled, or made on another node). When every copy was lost with its node, the
        answer comes once the owner has made it again, which may take a while."""
        deadline = time.monotonic() + _config.REBUILD_WAIT_SECONDS
        while True:
            event = threading.Event()
            box: list[Value] = []

            def on_value(
                _oid: bytes, value: Value, box: list[Value] = box, event: Any = event
            ) -> None:
                box.append(value)
                event.set()

            with self._lock:
                current = self._values.get(oid)
                if current is not None and current[0] == "s" and current[1] == stale_path:
                    del self._values[oid]
                self._waiters.setdefault(oid, []).append(on_value)
            self.post(self._fetch, [oid])
            if not self._wait_event(event, max(0.0, deadline - time.monotonic())) or not box:
                with self._lock:
                    callbacks = self._waiters.get(oid)
                    if callbacks and on_value in callbacks:
                        callbacks.remove(on_value)
                raise ObjectLostError(
                    f"object {oid.hex()} is no longer at {stale_path} and the store did not "
                    f"say where it went within {_config.REBUILD_WAIT_SECONDS:g} s"
                )
            value = box[0]
            if value[0] == "s" and not self.client and not os.path.exists(value[1]):
                # The owner's own record of a result made (again) on another node: this
                # node's store is still fetching it; wait for that answer instead.
                stale_path = value[1]
                continue
            return value

    def _fetch(self, oids: list[bytes]) -> None:
        """IO thread: ask the store for borrowed objects not already asked for."""
        wanted = [oid for oid in oids if oid not in self._fetching]
        if not wanted:
            return
        self._fetching.update(wanted)
        self.head.send(Message(M.GET_OBJECTS, {"r": 0, "o": wanted}))

    # -- reading values ----------------------------------------------------------------
    def lookup(self, oid: bytes) -> Value | None:
        return self._values.get(oid)

    def wait_value(self, oid: bytes, timeout: float | None) -> Value | None:
        """The value of ``oid`` once known (None after ``timeout``)."""
        if self._released:
            self._process_releases()
        value = self._values.get(oid)  # a dict read is atomic: no lock for the known case
        if value is not None:
            return value
        return self.wait_values((oid,), 1, timeout).get(oid)

    def wait_values(
        self, oids: Sequence[bytes], num: int, timeout: float | None
    ) -> dict[bytes, Value]:
        """Block until ``num`` of ``oids`` have values (or timeout); returns those known."""
        self.drain_releases()
        found: dict[bytes, Value] = {}
        missing: list[bytes] = []
        values = self._values
        with self._lock:
            for oid in oids:
                v = values.get(oid)
                if v is not None:
                    found[oid] = v
                    if len(found) >= num:
                        # Enough (``wait`` asks for the first few): the rest need no look.
                        return found
                else:
                    missing.append(oid)
        if not missing:
            return found
        if self.lost_reason:
            # Nothing more will come: fail at once rather than wait for the timeout.
            err = ClusterGone(self.lost_reason)
            for oid in missing:
                found[oid] = ("x", err)
            return found
        event = _Signal()
        need = [num - len(found)]

        def on_value(oid: bytes, value: Value) -> None:
            found[oid] = value
            need[0] -= 1
            if need[0] <= 0:
                event.set()

        borrowed = []
        with self._lock:
            for oid in missing:
                v = self._values.get(oid)
                if v is not None:
                    on_value(oid, v)
                    continue
                self._waiters.setdefault(oid, []).append(on_value)
                if owner_of(oid) != self.worker_id:
                    borrowed.append(oid)
        if borrowed:
            self.post(self._fetch, borrowed)
        if need[0] > 0 and self.role == "worker":
            # Rather than wait for our own queued children, run them here.
            self.tasks.run_inline_while_blocked(event, missing)
        if need[0] > 0:
            blocked = self.role == "worker" and not event.is_set()
            if blocked:
                # Lend this task's CPU back to the node while it waits, so that the tasks
                # it waits for can run even on a full node.
                self.send_head(Message(M.BLOCKED, {}))
            try:
                self._wait(event, missing, timeout, self.on_block if blocked else None)
            finally:
                if blocked:
                    self.send_head(Message(M.UNBLOCKED, {}))
                with self._lock:
                    for oid in missing:
                        cbs = self._waiters.get(oid)
                        if cbs and on_value in cbs:
                            cbs.remove(on_value)
                            if not cbs:
                                del self._waiters[oid]
            if self.closed and self.lost_reason and len(found) < num:
                err = ClusterGone(self.lost_reason)
                for oid in missing:
                    found.setdefault(oid, ("x", err))
        return dict(found)

    def on_ready(self, ref: Any, fut: Any) -> None:
        """Complete the concurrent future ``fut`` with the value of ``ref``."""
        oid = ref.binary()

        def done(_oid: bytes, value: Value) -> None:
            # Deserializing in a short-lived thread keeps the IO thread free.
            def finish() -> None:
                try:
                    fut.set_result(self.materialize(value, _oid))
                except BaseException as exc:
                    fut.set_exception(exc)
                _ = ref  # keep the ref (and so the value) alive until the future is done

            threading.Thread(target=finish, daemon=True).start()

        with self._lock:
            value = self._values.get(oid)
            if value is None:
                self._waiters.setdefault(oid, []).append(done)
        if value is not None:
            done(oid, value)
        elif owner_of(oid) != self.worker_id:
            self.post(self._fetch, [oid])
        else:
            self.watch_parked()

    def materialize(self, value: Value, oid: bytes | None = None, relocated: bool = False) -> Any:
        """Turn a resolved value into the Python object (raising it if it is an error)."""
        kind = value[0]
        if kind == "v":
            sv = value[1]
            obj = deserialize(sv.data, sv.buffers)
            flags = sv.flags
        elif kind == "s" and self.client:
            data, buffers, flags = _shm.parse(self.client_objects.download(oid or b""))
            obj = deserialize(data, buffers)
        elif kind == "s":
            try:
                data, buffers, flags = _shm.read(value[1], self._keepalive(oid))
            except FileNotFoundError:
                if oid is None or relocated:
                    raise ObjectLostError(
                        f"the file of object {(oid or b'').hex()} is gone: {value[1]}"
                    ) from None
                # The store moved it (spilled to disk) since we learned where it was.
                return self.materialize(self.relocate(oid, value[1]), oid, relocated=True)
            obj = deserialize(data, buffers)
        else:
            raise _fresh(value[1])
        if flags & FLAG_ERROR:
            # Not a local while it propagates: the traceback holds this frame, and a frame
            # holding its own exception is a cycle that keeps the caller's frames (and the
            # refs in them) alive until the garbage collector happens to run.
            error, obj = obj, None
            try:
                raise error
            finally:
                del error
        return obj

    # -- submitting --------------------------------------------------------------------
    def next_stream_item(self, task_id: bytes, index: int, timeout: float | None) -> Any:
        self.watch_parked()  # the items come through the IO thread
        return self.tasks.next_stream_item(task_id, index, timeout)

    def drop_stream(self, task_id: bytes) -> None:
        if not self.closed:
            self.post(self.tasks.drop_stream, task_id)


def _fresh(exc: BaseException) -> BaseException:
    """A copy of a stored error to raise. Raising the stored one would attach the caller's
    traceback to it, and through the traceback's frames keep the caller's locals (refs
    among them) alive as long as the error is stored: a leak that no GC can see, since a
    ref's count lives in a dict, not in Python references."""
    try:
        fresh = copy.copy(exc)
    except Exception:
        return exc.with_traceback(None)
    fresh.__traceback__ = None
    return fresh


def print_log_lines(body: dict[str, Any]) -> None:
    """The default way a driver shows its tasks' output: to its own stdout and stderr."""
    out: list[str] = []
    err: list[str] = []
    for entry in body.get("l", ()):
        # [fd, text] or [fd, text, tag, ...] (_task_output.py): a display prints its text.
        (err if entry[0] == 2 else out).append(entry[1])
    if out:
        sys.stdout.write("".join(out))
        sys.stdout.flush()
    if err:
        sys.stderr.write("".join(err))
        sys.stderr.flush()
