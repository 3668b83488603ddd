"""The control store's actor table: placement, names, state, and who wants to know.

    owner --CREATE_ACTOR--> directory --RequestActorLease--> scheduler --Grant-->
    directory --BecomeActor--> worker --ACTOR_READY--> directory --Publish ALIVE--> callers
    worker exits / kill / owner gone --> directory --Publish DEAD (with the reason)
    worker exits, restarts left  --> directory --Publish RESTARTING, RequestActorLease
                                 --> ... --Publish ALIVE (new address)

States: PENDING (being created) -> ALIVE -> RESTARTING -> ALIVE ... -> DEAD. Every change
goes through ``_transition`` (the hook ``on_transition`` sees each one, with its cause).

Restarts (``max_restarts``, -1 for no limit): when an actor's worker dies, whatever the
cause (the process crashed, was killed by the memory monitor or by
``kill(no_restart=False)``, or its node died: the control store calls ``worker_exited``
for each actor of a dead node), the actor is created again from its kept creation message
(the constructor runs again with the same arguments) on any node that fits. It is not
restarted when it was killed for good (``kill()``), released by its owner, when its owner
exited, or when its constructor raised (that would only fail again).

Callers send method calls straight to the actor's worker; the directory is only asked for
the address (SUBSCRIBE_ACTOR) and tells subscribers when the actor restarts or dies. No IO
here.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PENDING, ALIVE, RESTARTING, DEAD = "PENDING", "ALIVE", "RESTARTING", "DEAD"

# Records of dead actors kept for the state API; the oldest go first beyond this.
MAX_DEAD_ACTORS = int(os.environ.get("SHOAL_DEAD_ACTORS_KEPT", 10_000))


@dataclass
class ActorRecord:
    actor_id: bytes
    owner: bytes
    job_id: int
    class_name: str
    name: str
    namespace: str
    detached: bool
    resources: dict[str, int]
    meta: dict[str, Any]  # method names, async, max_concurrency: what a handle needs
    creation: Any = None  # the creation message (class, args), kept to send to the worker
    state: str = PENDING
    worker_id: bytes = b""
    address: str = ""
    pid: int = 0
    death_reason: str = ""
    death_error: Any = None  # frames of a serialized constructor exception
    subscribers: set[bytes] = field(default_factory=set)
    released: bool = False
    max_restarts: int = 0  # -1: no limit
    num_restarts: int = 0
    restart_reason: str = ""  # why it was restarted last
    # kill(no_restart=False) asked for its worker to be stopped: the cause of the restart.
    kill_cause: str = ""

    def restarts_left(self) -> bool:
        return self.max_restarts < 0 or self.num_restarts < self.max_restarts

    node: bytes = b""  # where it lives (set when it is ready)
    created_at: float = field(default_factory=time.time)
    alive_at: float | None = None
    dead_at: float | None = None

    def info(self) -> dict[str, Any]:
        return {
            "aid": self.actor_id,
            "state": self.state,
            "addr": self.address,
            "pid": self.pid,
            "wid": self.worker_id,
            "name": self.name,
            "ns": self.namespace,
            "cls": self.class_name,
            "meta": self.meta,
            "reason": self.death_reason if self.state == DEAD else self.restart_reason,
            "detached": self.detached,
            "nr": self.num_restarts,
            "mr": self.max_restarts,
        }


@dataclass
class RequestActorLease:
    actor_id: bytes
    resources: dict[str, int]


@dataclass
class BecomeActor:
    worker_id: bytes
    record: ActorRecord


@dataclass
class Publish:
    subscribers: list[bytes]
    record: ActorRecord


@dataclass
class KillActorWorker:
    worker_id: bytes


Action = RequestActorLease | BecomeActor | Publish | KillActorWorker


class NameTaken(Exception):
    pass


class ActorDirectory:
    def __init__(self) -> None:
        self.actors: dict[bytes, ActorRecord] = {}
        self.names: dict[tuple[str, str], bytes] = {}
        self.by_worker: dict[bytes, bytes] = {}
        # Called after every state change: (record, previous state, cause). For the state
        # API's actor events; the record's ``state`` is the new state.
        self.on_transition: Callable[[ActorRecord, str, str], None] | None = None

    def _transition(self, rec: ActorRecord, state: str, cause: str) -> None:
        """The one place where an actor's state changes."""
        previous, rec.state = rec.state, state
        if self.on_transition is not None:
            self.on_transition(rec, previous, cause)
        self.dead: collections.deque[bytes] = collections.deque()  # oldest death first
        self.forgotten = 0  # dead records dropped beyond MAX_DEAD_ACTORS

    def lookup_name(self, name: str, namespace: str) -> ActorRecord | None:
        aid = self.names.get((namespace, name))
        return self.actors.get(aid) if aid is not None else None

    def create(self, record: ActorRecord) -> list[Action]:
        if record.name:
            existing = self.lookup_name(record.name, record.namespace)
            if existing is not None and existing.state != DEAD:
                raise NameTaken(
                    f"an actor named {record.name!r} already exists in namespace {record.namespace!r}"
                )
            self.names[(record.namespace, record.name)] = record.actor_id
        self.actors[record.actor_id] = record
        record.subscribers.add(record.owner)
        self._transition(record, PENDING, "created")
        return [RequestActorLease(record.actor_id, record.resources)]

    def lease_granted(self, actor_id: bytes, worker_id: bytes) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None or rec.state == DEAD:
            return [KillActorWorker(worker_id)]
        rec.worker_id = worker_id
        self.by_worker[worker_id] = actor_id
        if rec.released:
            return [KillActorWorker(worker_id)]
        return [BecomeActor(worker_id, rec)]

    def lease_rejected(self, actor_id: bytes, reason: str) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is not None and rec.state == RESTARTING:
            reason = f"it could not be restarted after {rec.restart_reason}: {reason}"
        return self._die(actor_id, reason)

    def ready(self, actor_id: bytes, address: str, pid: int) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None or rec.state not in (PENDING, RESTARTING):
            return []
        rec.address, rec.pid = address, pid
        rec.alive_at = time.time()
        self._transition(rec, ALIVE, "its constructor finished")
        if not rec.restarts_left():
            rec.creation = None  # it will not run again; its arguments can go
        return [Publish(list(rec.subscribers), rec)]

    def constructor_failed(self, actor_id: bytes, error: Any) -> list[Action]:
        """Its constructor raised: dead, without a restart (as in Ray: it would raise again)."""
        rec = self.actors.get(actor_id)
        if rec is None:
            return []
        rec.death_error = error
        reason = "its constructor raised an exception"
        if rec.num_restarts:
            reason += f" (when it was restarted for the {_nth(rec.num_restarts)} time)"
        actions = self._die(actor_id, reason)
        if rec.worker_id:
            actions.append(KillActorWorker(rec.worker_id))
        return actions

    def worker_exited(self, worker_id: bytes, reason: str, cause: str = "") -> list[Action]:
        """The actor's worker is gone: ``reason`` says how the process ended ("killed by
        signal SIGKILL (9)"); ``cause``, when given, replaces "its worker process died
        (reason)" as what callers are told (e.g. "its node ... died"). With restarts
        left the actor restarts, else it is dead."""
        aid = self.by_worker.pop(worker_id, None)
        if aid is None:
            return []
        rec = self.actors.get(aid)
        if rec is None or rec.state == DEAD or rec.worker_id != worker_id:
            return []
        if rec.death_reason:  # killed for good, released, or its owner exited
            return self._die(aid, rec.death_reason)
        cause = rec.kill_cause or cause or f"its worker process died ({reason})"
        rec.kill_cause = ""
        return self._restart_or_die(rec, cause)

    def _restart_or_die(self, rec: ActorRecord, cause: str) -> list[Action]:
        if rec.restarts_left() and rec.creation is not None and not rec.released:
            rec.num_restarts += 1
            rec.restart_reason = cause
            rec.worker_id, rec.address, rec.pid = b"", "", 0
            self._transition(rec, RESTARTING, cause)
            return [
                Publish(list(rec.subscribers), rec),
                RequestActorLease(rec.actor_id, rec.resources),
            ]
        if rec.max_restarts != 0:
            cause += (
                f", and it has no restarts left (restarted {rec.num_restarts} of "
                f"max_restarts={rec.max_restarts} times)"
            )
        return self._die(rec.actor_id, cause)

    def kill(self, actor_id: bytes, reason: str, no_restart: bool = True) -> list[Action]:
        """Stop the actor's worker. For good (``no_restart``), or as a crash would: the
        actor is then restarted when it has restarts left."""
        rec = self.actors.get(actor_id)
        if rec is None or rec.state == DEAD:
            return []
        if not no_restart:
            if rec.state != ALIVE or not rec.worker_id:
                return []  # being created or restarted already
            rec.kill_cause = reason
            return [KillActorWorker(rec.worker_id)]
        rec.death_reason = reason
        if rec.worker_id:
            return [KillActorWorker(rec.worker_id)]
        return self._die(actor_id, reason)

    def release(self, actor_id: bytes) -> list[Action]:
        """The owner dropped its last handle: end the actor unless it is detached."""
        rec = self.actors.get(actor_id)
        if rec is None or rec.detached or rec.state == DEAD:
            return []
        rec.released = True
        return self.kill(actor_id, "all handles to it were dropped")

    def owner_gone(self, owner: bytes) -> list[Action]:
        actions: list[Action] = []
        for rec in list(self.actors.values()):
            rec.subscribers.discard(owner)
            if rec.owner == owner and not rec.detached and rec.state != DEAD:
                actions.extend(
                    self.kill(rec.actor_id, "its owner (the process that created it) exited")
                )
        return actions

    def subscribe(self, process: bytes, actor_id: bytes) -> ActorRecord | None:
        rec = self.actors.get(actor_id)
        if rec is not None and rec.state != DEAD:
            rec.subscribers.add(process)
        return rec

    def _die(self, actor_id: bytes, reason: str) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None or rec.state == DEAD:
            return []
        rec.death_reason = rec.death_reason or reason
        self._transition(rec, DEAD, rec.death_reason)
        rec.creation = None
        rec.dead_at = time.time()
        self.dead.append(actor_id)
        while len(self.dead) > MAX_DEAD_ACTORS:
            self.actors.pop(self.dead.popleft(), None)
            self.forgotten += 1
        if rec.name and self.names.get((rec.namespace, rec.name)) == actor_id:
            del self.names[(rec.namespace, rec.name)]
        subs = list(rec.subscribers)
        rec.subscribers.clear()
        return [Publish(subs, rec)]


def _nth(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
