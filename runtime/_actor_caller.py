"""Actor calls from one caller: in order, straight to the actor's worker.

    handle.method.remote() --spec--> [IO thread] per-actor queue
    ACTOR_UPDATE ALIVE (address) --> connect, push queued calls in submission order
    TASK_DONE                    --> resolve the call's return values
    ACTOR_UPDATE DEAD (reason)   --> fail queued and in-flight calls with ActorDiedError

A call waits in the queue until the calls before it were pushed and its own owned
arguments are ready, which is what keeps one caller's calls in order.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._protocol import Message, MsgType
from ._serialization import deserialize
from ._task_submitter import STREAMING, TaskSpec, encode_args
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

    def state(self, actor_id: bytes) -> _ActorState:
        st = self.actors.get(actor_id)
        if st is None:
            st = self.actors[actor_id] = _ActorState(actor_id)
        return st

    # -- user thread -------------------------------------------------------------------
    def call(self, spec: TaskSpec) -> None:
        self.core.post(self._call, spec)

    def created(self, actor_id: bytes, creation: Any) -> None:
        """The creator owns the actor and is subscribed by the head already."""
        self.pending_creation[actor_id] = creation
        self.core.post(self._mark_subscribed, actor_id)

    def _mark_subscribed(self, actor_id: bytes) -> None:
        self.state(actor_id).subscribed = True

    # -- IO thread ---------------------------------------------------------------------
    def _call(self, spec: TaskSpec) -> None:
        st = self.state(spec.actor_id)  # type: ignore[arg-type]
        if not st.subscribed:
            st.subscribed = True
            self.core.head.send(Message(M.SUBSCRIBE_ACTOR, {"aid": st.actor_id}))
        st.queue.append(spec)
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
                tasks._finish(spec, [err] * max(1, len(spec.return_ids)))
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
        body["a"] = encode_args(self.core, spec, frames)
        st.conn.conn.send(Message(M.ACTOR_CALL, body, frames))

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
