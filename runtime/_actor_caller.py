"""Actor calls from one caller: in order, straight to the actor's worker.

    handle.method.remote() --spec--> [IO thread] per-actor queue
    ACTOR_UPDATE ALIVE (address) --> connect, push queued calls in submission order
    TASK_DONE                    --> resolve the call's return values
    ACTOR_UPDATE RESTARTING      --> calls in flight are resent (max_task_retries) or fail
                                     with ActorUnavailableError; new calls wait
    ACTOR_UPDATE DEAD (reason)   --> fail queued and in-flight calls with ActorDiedError

A call waits in the queue until the calls before it were pushed and its own owned
arguments are ready, which is what keeps one caller's calls in order. Calls resent after
a restart go back to the front of the queue in the order they were first sent, so the
restarted actor runs them before anything submitted later (at-least-once, in order).

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
from .exceptions import (
    ActorDiedError,
    ActorRuntimeEnvSetupError,
    ActorUnavailableError,
    RuntimeEnvSetupError,
    TaskCancelledError,
)

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
        # Actors of this owner that may be restarted: their creation specs stay pinned
        # until they are dead, not only until they are first alive.
        self.restartable: set[bytes] = set()
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

    def created(self, actor_id: bytes, creation: Any, keep: bool = False) -> None:
        """The creator owns the actor and is subscribed by the head already. ``keep``: the
        actor may be restarted, so its arguments are kept until it is dead."""
        self.pending_creation[actor_id] = creation
        if keep:
            self.restartable.add(actor_id)
        self.core.post(self._mark_subscribed, actor_id)

    def _mark_subscribed(self, actor_id: bytes) -> None:
        self.state(actor_id).subscribed = True

    # -- IO thread ---------------------------------------------------------------------
    def _call(self, spec: TaskSpec) -> None:
        if self.core.lost_reason:
            from ._core import ClusterGone  # the cluster is gone: nothing would ever answer

            err = ClusterGone(self.core.lost_reason)
            self.core.tasks._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
            return
        if self._lazy:
            self.flush_lazy()
        st = self.state(spec.actor_id)  # type: ignore[arg-type]
        tasks = self.core.tasks
        if spec.out_tag is not None and tasks.track_tags:
            tasks.track(spec)
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
        if st.state != "ALIVE" or st.waiting_deps or st.conn.conn.broken:
            # (A broken connection: the worker is gone, and the head's notice of what
            # follows, a restart or the end, is on its way. The calls wait for it.)
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
            if not self._push(st, spec):
                return

    def _push(self, st: _ActorState, spec: TaskSpec) -> bool:
        """Send one call; False when the connection broke as it was sent (the worker is
        gone): then the call is back at the front of the queue, since it surely did not
        run, and waits for the head's notice of a restart or of the end."""
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
        if spec.out_tag is not None:
            body["o"] = spec.out_tag
        add_event_fields(spec, body)
        body["a"] = encode_args(self.core, spec, frames, is_local(st.conn.conn))
        conn = st.conn.conn
        conn.send(Message(M.ACTOR_CALL, body, frames))
        if conn.broken:
            spec.attempts -= 1
            del st.in_flight[spec.task_id]
            self.core.tasks.running.pop(spec.task_id, None)
            st.queue.appendleft(spec)
            return False
        if conn.parked:
            if self.core.loop.in_own_thread():
                conn.unpark()
            else:
                self._lazy.add(conn)
        return True

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
        if (
            st is not None
            and body.get("app_error")
            and spec.num_returns != STREAMING
            and st.state != "DEAD"
            and tasks._should_retry_app_error(spec, body)
        ):
            # retry_exceptions: sent again before the calls still queued behind it.
            st.queue.appendleft(spec)
            self._pump(st)
            return
        if spec.num_returns == STREAMING:
            tasks._end_stream(spec, int(body.get("n", 0)))
            tasks._finish(spec, [])
        else:
            tasks._finish(spec, tasks._decode_results(body["r"], frames))

    def on_update(self, body: dict[str, Any], frames: Sequence[Any]) -> None:
        aid = body["aid"]
        st = self.state(aid)
        state = body["state"]
        if state == "DEAD":
            # Also when already marked dead by a local kill(): calls in flight end here.
            self.pending_creation.pop(aid, None)
            self.restartable.discard(aid)
            st.state = "DEAD"
            self._take_unread_replies(st)
            message = f"the actor {body.get('cls') or ''} ({aid.hex()[:12]}) died: {body.get('reason') or 'unknown reason'}"
            error_class = ActorDiedError
            if frames:
                try:
                    cause = deserialize(frames[0], list(frames[1:]))
                    message += f"\n\n{cause}"
                    if isinstance(cause, RuntimeEnvSetupError):
                        error_class = ActorRuntimeEnvSetupError
                except Exception:
                    pass
            st.death = error_class(message, aid.hex(), body.get("reason") or "")
            self._fail(st)
            self._disconnect(st)
            return
        if st.state == "DEAD":
            return  # killed from this process; the head's DEAD notice follows
        if state == "RESTARTING":
            st.state = "RESTARTING"
            self._instance_lost(st, body)
        elif state == "ALIVE":
            address = body["addr"]
            if st.state == "ALIVE" and st.address == address:
                return
            if st.address:
                st.state = "RESTARTING"
                self._instance_lost(st, body)  # a restart this process did not hear of
            if aid not in self.restartable:
                self.pending_creation.pop(aid, None)
            st.state = "ALIVE"
            st.address = address
            st.conn = self.core.tasks.connection(address)
            self._pump(st)

    def _take_unread_replies(self, st: _ActorState) -> None:
        """Replies the dead worker sent before it died may still be unread on its
        connection (the head's notice came another way): take them first, so that a call
        that finished is neither failed nor run again."""
        if st.conn is not None and st.in_flight and not st.conn.conn.closed:
            read = getattr(st.conn.conn, "handle_readable", None)
            if read is not None:
                read()

    def _disconnect(self, st: _ActorState) -> None:
        if st.address:
            self.core.tasks.close_connection(st.address)
        st.conn = None
        st.address = ""

    def _instance_lost(self, st: _ActorState, body: dict[str, Any]) -> None:
        """The actor's worker is gone and the actor restarts (``st.state`` says so already,
        so that nothing is pushed meanwhile): the calls it had are resent in the order
        they were first sent (``max_task_retries``), or fail."""
        self._take_unread_replies(st)
        self._disconnect(st)
        reason = body.get("reason") or "its worker died"
        label = f"the actor {body.get('cls') or ''} ({st.actor_id.hex()[:12]})"
        tasks = self.core.tasks
        resend: list[TaskSpec] = []
        for spec in list(st.in_flight.values()):  # in the order they were sent
            tasks.running.pop(spec.task_id, None)
            if spec.num_returns != STREAMING and (
                spec.max_retries < 0 or spec.attempts <= spec.max_retries
            ):
                resend.append(spec)
                continue
            if spec.max_retries == 0:
                why = "it is not sent again because max_task_retries is 0"
            else:
                why = f"it was sent {spec.attempts} times (max_task_retries={spec.max_retries})"
            err = ActorUnavailableError(
                f"{label} is being restarted: {reason}. The call {spec.name} had been sent "
                f"to it and may or may not have run; {why}. Calls made from now on wait "
                "for the restarted actor.",
                st.actor_id.hex(),
                reason,
            )
            tasks._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
        st.in_flight.clear()
        st.queue.extendleft(reversed(resend))

    def cancel_queued(self, spec: TaskSpec) -> bool:
        """Cancel a call that has not been sent to its actor yet (it waits for the actor
        to start, or for its arguments); a call already sent is left to run (False)."""
        st = self.actors.get(spec.actor_id)  # type: ignore[arg-type]
        if st is None or spec not in st.queue:
            return False
        if st.queue[0] is spec:
            # It may be the call whose arguments the queue waits for: the next one need not.
            # (Its pending callback only pumps again, which is harmless.)
            st.waiting_deps = False
        st.queue.remove(spec)
        spec.cancelled = True
        err = TaskCancelledError(f"the actor call {spec.name} was cancelled")
        self.core.tasks._finish(spec, [("x", err)] * max(1, len(spec.return_ids)))
        self._pump(st)  # the calls behind it may go now
        return True

    def cancel_waiting(self, task_id: bytes) -> bool:
        """``cancel`` of an actor call: only while it waits in this process."""
        for st in self.actors.values():
            for spec in st.queue:
                if spec.task_id == task_id:
                    return self.cancel_queued(spec)
        return False

    def mark_killed(self, actor_id: bytes) -> None:
        """``kill`` was called here: calls made after it fail at once, not after the news."""
        st = self.state(actor_id)
        if st.state != "DEAD":
            st.state = "DEAD"
            st.death = ActorDiedError(
                f"the actor ({actor_id.hex()[:12]}) died: it was killed with shoal.kill()",
                actor_id.hex(),
                "it was killed with shoal.kill()",
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
