"""Actor calls from one caller: in order, straight to the actor's worker.

    handle.method.remote() --spec--> [IO thread] per-actor queue
    ACTOR_UPDATE ALIVE (address) --> connect, push queued calls in submission order
    TASK_DONE                    --> resolve the call's return values
    ACTOR_UPDATE DEAD (reason)   --> fail queued and in-flight calls with ActorDiedError

A call waits in the queue until the calls before it were pushed and its own owned
arguments are ready, which is what keeps one caller's calls in order.

The fast path of a synchronous call wakes no thread of this process: the calling thread
pushes the call itself, holding the IO loop (``IOLoop.run_inline``), and then, in ``get``,
reads the reply from the actor's connection itself (``lend``). A connection that the loop
thread stopped watching ("parked") while a caller read it is watched again as soon as a
reply may come that no caller is about to read (``_lazy``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._protocol import Message, MsgType
from ._serialization import deserialize
from ._task_submitter import STREAMING, TaskSpec, add_event_fields, encode_args, is_local
from .exceptions import ActorDiedError

if TYPE_CHECKING:
    from ._core import CoreWorker

M = MsgType


class _ActorState:
    __slots__ = (
        "actor_id",
        "address",
        "conn",
        "death",
        "in_flight",
        "queue",
        "state",
        "subscribed",
        "waiting_deps",
    )

    def __init__(self, actor_id: bytes) -> None:
        self.actor_id = actor_id
        self.state = "PENDING"
        self.address = ""
        self.conn: Any = None
        self.queue: collections.deque[TaskSpec] = collections.deque()
        self.in_flight: dict[bytes, TaskSpec] = {}
        self.death: ActorDiedError | None = None
        self.subscribed = False
        self.waiting_deps = False


class ActorCaller:
    def __init__(self, core: CoreWorker) -> None:
        self.core = core
        self.actors: dict[bytes, _ActorState] = {}
        self.pending_creation: dict[bytes, Any] = {}  # actor id -> creation spec (pins args)
        # Parked connections a call was pushed on by a thread that holds the loop: that
        # thread probably reads the reply itself next (a synchronous call), so the loop
        # thread is not woken to watch them now. Watched again by ``flush_lazy``: at the
        # caller's next call of any kind, at the next reply-free ``get``, or at the loop's
        # next sweep (0.1 s), whichever comes first.
        self._lazy: set[Any] = set()

    def state(self, actor_id: bytes) -> _ActorState:
        st = self.actors.get(actor_id)
        if st is None:
            st = self.actors[actor_id] = _ActorState(actor_id)
        return st

    # -- user thread -------------------------------------------------------------------
    def call(self, spec: TaskSpec) -> None:
        self.core.loop.run_inline(self._call, spec)

    def created(self, actor_id: bytes, creation: Any) -> None:
        """The creator owns the actor and is subscribed by the head already."""
        self.pending_creation[actor_id] = creation
        self.core.post(self._mark_subscribed, actor_id)

    def _mark_subscribed(self, actor_id: bytes) -> None:
        self.state(actor_id).subscribed = True

    # -- IO thread ---------------------------------------------------------------------
    def _call(self, spec: TaskSpec) -> None:
        if self._lazy:
            self.flush_lazy()
        st = self.state(spec.actor_id)  # type: ignore[arg-type]
        if not st.subscribed:
            st.subscribed = True
            self.core.head.send(Message(M.SUBSCRIBE_ACTOR, {"aid": st.actor_id}))
        st.queue.append(spec)
        if self.core.events.enabled:
            spec.submitted_at = time.time()  # for the task log (see _task_events.py)
        self._pump(st)

    def _pump(self, st: _ActorState) -> None:
        if st.state == "DEAD":
            self._fail(st)
            return
        if st.state != "ALIVE" or st.waiting_deps:
            return
        tasks = self.core.tasks
        while st.queue:
            spec = st.queue[0]
            pending = [
                r.binary()
                for r in spec.deps
                if r.binary()[:8] == self.core.worker_id and self.core.lookup(r.binary()) is None
            ]
            if pending:
                st.waiting_deps = True

                def resume(st: _ActorState = st) -> None:
                    st.waiting_deps = False
                    self._pump(st)

                tasks._when_deps_ready(spec, resume)
                return
            st.queue.popleft()
            err = tasks.dep_error(spec)
            if err is not None:
                tasks.fail_unrun(spec, err)
                continue
            self._push(st, spec)

    def _push(self, st: _ActorState, spec: TaskSpec) -> None:
        spec.attempts += 1
        st.in_flight[spec.task_id] = spec
        self.core.tasks.running[spec.task_id] = (spec, None)
        frames: list[Any] = []
        body = {
            "t": spec.task_id,
            "m": spec.method,
            "n": spec.name,
            "nr": spec.num_returns,
            "j": spec.job,
            "kw": spec.kwnames,
        }
        add_event_fields(spec, body)
        body["a"] = encode_args(self.core, spec, frames, is_local(st.conn.conn))
        conn = st.conn.conn
        conn.send(Message(M.ACTOR_CALL, body, frames))
        if conn.parked:
            if self.core.loop.in_own_thread():
                conn.unpark()
            else:
                self._lazy.add(conn)

    # -- reading replies in the waiting thread (loop work: hold the loop) --------------
    def flush_lazy(self) -> None:
        lazy = self._lazy
        while lazy:
            lazy.pop().unpark()

    def sweep(self) -> None:
        """Loop work, every 0.1 s: watch again every parked connection nobody reads."""
        self.flush_lazy()
        for wc in self.core.tasks.conns.values():
            conn = wc.conn
            if conn.parked and not conn.lend_is_live():
                conn.lent_to = None
                conn.unpark()

    def lend(self, oids: Sequence[bytes]) -> tuple[Any, _ActorState] | None:
        """The connection that will bring the values of ``oids`` (results of calls in flight
        on one actor), lent to this thread; None when there is no such single one. Either
        way, every other connection left parked by a push is watched again."""
        lent = self._lendable(oids)
        if lent is not None:
            self._lazy.discard(lent[0])  # this thread reads it
        if self._lazy:
            self.flush_lazy()
        if lent is not None:
            lent[0].lend()
        return lent

    def _lendable(self, oids: Sequence[bytes]) -> tuple[Any, _ActorState] | None:
        running = self.core.tasks.running
        found: _ActorState | None = None
        for oid in oids:
            entry = running.get(oid[:16])
            if entry is None or entry[1] is not None or entry[0].actor_id is None:
                return None  # not an actor call in flight
            st = self.actors.get(entry[0].actor_id)
            if st is None or st.conn is None or (found is not None and st is not found):
                return None
            found = st
        if found is None or not found.conn.conn.lendable:
            return None
        return found.conn.conn, found

    def end_lend(self, lent: tuple[Any, _ActorState]) -> None:
        conn, st = lent
        conn.end_lend()
        if conn.parked and st.in_flight and st.conn is not None and st.conn.conn is conn:
            conn.unpark()  # a reply is still due: the loop thread must watch for it

    def on_call_done(self, spec: TaskSpec, body: dict[str, Any], frames: Sequence[Any]) -> None:
        st = self.actors.get(spec.actor_id)  # type: ignore[arg-type]
        if st is not None:
            st.in_flight.pop(spec.task_id, None)
        tasks = self.core.tasks
        if spec.num_returns == STREAMING:
            tasks._end_stream(spec, int(body.get("n", 0)))
            tasks._finish(spec, [])
        else:
            tasks._finish(spec, tasks._decode_results(body["r"], frames))

    def on_update(self, body: dict[str, Any], frames: Sequence[Any]) -> None:
        aid = body["aid"]
        st = self.state(aid)
        state = body["state"]
        if state == "ALIVE" and st.state == "PENDING":
            self.pending_creation.pop(aid, None)
            st.state = "ALIVE"
            st.address = body["addr"]
            st.conn = self.core.tasks.connection(st.address)
            self._pump(st)
        elif state == "DEAD":
            # Also when already marked dead by a local kill(): calls in flight end here.
            self.pending_creation.pop(aid, None)
            st.state = "DEAD"
            message = f"the actor {body.get('cls') or ''} ({aid.hex()[:12]}) died: {body.get('reason') or 'unknown reason'}"
            if frames:
                try:
                    cause = deserialize(frames[0], list(frames[1:]))
                    message += f"\n\n{cause}"
                except Exception:
                    pass
            st.death = ActorDiedError(message, aid.hex(), body.get("reason") or "")
            self._fail(st)
            if st.address:
                self.core.tasks.close_connection(st.address)
                st.conn = None

    def mark_killed(self, actor_id: bytes) -> None:
        """``kill`` was called here: calls made after it fail at once, not after the news."""
        st = self.state(actor_id)
        if st.state != "DEAD":
            st.state = "DEAD"
            st.death = ActorDiedError(
                f"the actor ({actor_id.hex()[:12]}) died: it was killed with shoal.kill()",
                actor_id.hex(),
                "killed",
            )
            # Calls already sent may still finish; the rest fail now.
            err = st.death
            tasks = self.core.tasks
            for spec in list(st.queue):
                tasks._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
            st.queue.clear()

    def _fail(self, st: _ActorState) -> None:
        err = st.death or ActorDiedError("the actor is dead")
        tasks = self.core.tasks
        specs = list(st.in_flight.values()) + list(st.queue)
        st.in_flight.clear()
        st.queue.clear()
        for spec in specs:
            tasks.running.pop(spec.task_id, None)
            tasks._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))

    def fail_all(self, err: Exception) -> None:
        for st in self.actors.values():
            if st.state != "DEAD":
                st.state = "DEAD"
                st.death = ActorDiedError(str(err))
                self._fail(st)
