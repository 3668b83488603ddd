"""The control store's actor table: placement, names, state, and who wants to know.

    owner --CREATE_ACTOR--> directory --RequestActorLease--> scheduler --Grant-->
    directory --BecomeActor--> worker --ACTOR_READY--> directory --Publish ALIVE--> callers
    worker exits / kill / owner gone --> directory --Publish DEAD (with the reason)

Callers send method calls straight to the actor's worker; the directory is only asked for
the address (SUBSCRIBE_ACTOR) and tells subscribers when the actor dies. No IO here.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import Any

PENDING, ALIVE, DEAD = "PENDING", "ALIVE", "DEAD"

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
            "reason": self.death_reason,
            "detached": self.detached,
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
        return self._die(actor_id, reason)

    def ready(self, actor_id: bytes, address: str, pid: int) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None or rec.state != PENDING:
            return []
        rec.state, rec.address, rec.pid = ALIVE, address, pid
        rec.alive_at = time.time()
        rec.creation = None  # the constructor ran; its arguments can go
        return [Publish(list(rec.subscribers), rec)]

    def constructor_failed(self, actor_id: bytes, error: Any) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None:
            return []
        rec.death_error = error
        actions = self._die(actor_id, "its constructor raised an exception")
        if rec.worker_id:
            actions.append(KillActorWorker(rec.worker_id))
        return actions

    def worker_exited(self, worker_id: bytes, reason: str) -> list[Action]:
        aid = self.by_worker.pop(worker_id, None)
        if aid is None:
            return []
        rec = self.actors.get(aid)
        if rec is None or rec.state == DEAD:
            return []
        return self._die(aid, rec.death_reason or f"its worker process died ({reason})")

    def kill(self, actor_id: bytes, reason: str) -> list[Action]:
        rec = self.actors.get(actor_id)
        if rec is None or rec.state == DEAD:
            return []
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
        rec.state = DEAD
        rec.death_reason = rec.death_reason or reason
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
