"""The node's lease scheduler: which owner may use which worker, with which resources.

    owner --RequestLeaseEvent--> scheduler --Grant--> owner pushes tasks to the worker
    owner --ReturnLeaseEvent---> scheduler            (worker back to the idle pool)
    node  --WorkerExitedEvent--> scheduler --NotifyWorkerLost--> owner retries its tasks

A lease binds one worker process and a resource amount to one owner (a driver, a worker
that submits nested tasks, or an actor being created). Owners push tasks straight to their
leased workers; the scheduler is off the per-task path. This class does no IO: it takes
events and returns actions, and the head's loop carries them out.

Invariants:
- ``available`` = total - sum(resources of leases that are not blocked); it can go below
  zero for CPU only, for a moment, when a blocked worker wakes up.
- Every worker is in exactly one state: starting, idle, leased, or dead (removed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _config
from ._resources import GpuSet, Resources, add, describe, fits, subtract


# -- events ------------------------------------------------------------------------------
@dataclass
class RequestLeaseEvent:
    owner: bytes
    req_id: int
    resources: Resources
    actor_id: bytes | None = None
    # In a cluster: True when the control store already chose this node (no spillback).
    nospill: bool = False
    strategy: object = None  # "SPREAD" or a node-affinity dict: the control store decides
    queued_at: float = 0.0
    pinned: bool = False  # hard node affinity to this node: it never spills elsewhere
    env: str = ""  # the runtime env's key: only a worker of that env will do ("": default)
    # Its work can run again if its worker is stopped (tasks with retries, actors with
    # restarts): the memory monitor stops such workers first.
    retriable: bool = True


@dataclass
class CancelLeaseRequestEvent:
    owner: bytes
    req_id: int


@dataclass
class ReturnLeaseEvent:
    worker_id: bytes
    kill: bool = False


@dataclass
class WorkerRegisteredEvent:
    worker_id: bytes


@dataclass
class WorkerExitedEvent:
    worker_id: bytes
    reason: str


@dataclass
class WorkerBlockedEvent:
    worker_id: bytes


@dataclass
class WorkerUnblockedEvent:
    worker_id: bytes


@dataclass
class OwnerGoneEvent:
    owner: bytes


@dataclass
class TickEvent:
    pass


@dataclass
class EnvReadyEvent:
    """The runtime env ``env`` is set up on this node: its workers can start."""

    env: str


@dataclass
class EnvFailedEvent:
    env: str
    reason: str


Event = (
    RequestLeaseEvent
    | CancelLeaseRequestEvent
    | ReturnLeaseEvent
    | WorkerRegisteredEvent
    | WorkerExitedEvent
    | WorkerBlockedEvent
    | WorkerUnblockedEvent
    | OwnerGoneEvent
    | TickEvent
    | EnvReadyEvent
    | EnvFailedEvent
)


# -- actions -----------------------------------------------------------------------------
@dataclass
class Grant:
    owner: bytes
    req_id: int
    worker_id: bytes
    gpu_ids: list[int]
    actor_id: bytes | None


@dataclass
class Reject:
    owner: bytes
    req_id: int
    reason: str
    actor_id: bytes | None
    env_failed: bool = False  # its runtime env could not be set up (reason says why)


@dataclass
class Queued:
    """The request waits for resources (not just for a worker to start). Sent once."""

    owner: bytes
    req_id: int


@dataclass
class Revoke:
    """Ask an owner to give a lease back as soon as its worker is idle (others wait)."""

    owner: bytes
    worker_id: bytes


@dataclass
class Spill:
    """This node cannot serve the request now (or its strategy is not this node's call):
    the control store picks a node for it."""

    request: RequestLeaseEvent


@dataclass
class StartWorker:
    worker_id: bytes
    env: str = ""


@dataclass
class PrepareEnv:
    """Set up runtime env ``env`` on this node (work waits for it); EnvReady/EnvFailed
    follow."""

    env: str


@dataclass
class KillWorker:
    worker_id: bytes


@dataclass
class NotifyWorkerLost:
    owner: bytes
    worker_id: bytes
    reason: str
    actor_id: bytes | None


Action = (
    Grant
    | Reject
    | Queued
    | Revoke
    | Spill
    | StartWorker
    | KillWorker
    | NotifyWorkerLost
    | PrepareEnv
)


@dataclass
class _Worker:
    worker_id: bytes
    state: str = "starting"  # starting | idle | leased
    owner: bytes = b""
    req_id: int = 0
    resources: Resources = field(default_factory=dict)
    gpu_ids: list[int] = field(default_factory=list)
    actor_id: bytes | None = None
    blocked: bool = False
    idle_since: float = 0.0
    revoked: bool = False  # its owner was asked to give it back
    env: str = ""  # the runtime env it was started in
    leased_at: float = 0.0  # when its lease was granted (the memory monitor's order)
    retriable: bool = True  # what it runs may run again (RequestLeaseEvent.retriable)


class NodeScheduler:
    def __init__(
        self,
        total: Resources,
        pool_size: int,
        max_workers: int | None = None,
        clock: Callable[[], float] | None = None,
        cluster: bool = False,
    ) -> None:
        import time

        self.total = dict(total)
        self.available = dict(total)
        self.gpus = GpuSet(total.get("GPU", 0) // 10_000)
        self.pool_size = pool_size
        # Blocked workers do not count against CPUs, so nested tasks need room to grow; the
        # cap only stops a runaway.
        self.max_workers = max_workers or max(64, 8 * pool_size)
        self.clock = clock or time.monotonic
        self.workers: dict[bytes, _Worker] = {}
        self.pending: list[RequestLeaseEvent] = []
        # Part of a cluster: requests this node cannot serve at once go to the control
        # store instead of waiting here (spillback), unless it sent them here.
        self.cluster = cluster
        self._told_queued: set[int] = set()  # ids of pending requests whose owner knows
        # Runtime envs whose workers can start, and those asked for (PrepareEnv sent).
        self.envs_ready: set[str] = {""}
        self.envs_asked: set[str] = set()

    # -- queries -----------------------------------------------------------------------
    def count(self, state: str) -> int:
        return sum(1 for w in self.workers.values() if w.state == state)

    def leased_to(self, owner: bytes) -> list[bytes]:
        return [
            w.worker_id for w in self.workers.values() if w.state == "leased" and w.owner == owner
        ]

    def worker(self, worker_id: bytes) -> _Worker | None:
        return self.workers.get(worker_id)

    # -- events ------------------------------------------------------------------------
    def start(self) -> list[Action]:
        """Prestart the pool."""
        return [self._new_worker() for _ in range(self.pool_size)]

    def handle(self, event: Event) -> list[Action]:
        actions: list[Action] = []
        if isinstance(event, RequestLeaseEvent):
            infeasible = not fits(self.total, event.resources) or bool(
                event.resources.get("GPU", 0) and self.gpus_infeasible(event.resources["GPU"])
            )
            if (
                self.cluster
                and not event.nospill
                and (
                    infeasible
                    or event.strategy is not None
                    or not fits(self.available, event.resources)
                )
            ):
                return [Spill(event)]
            if infeasible:
                actions.append(
                    Reject(
                        event.owner, event.req_id, self._infeasible(event.resources), event.actor_id
                    )
                )
                return actions
            event.queued_at = self.clock()
            self.pending.append(event)
            if event.env not in self.envs_ready and event.env not in self.envs_asked:
                self.envs_asked.add(event.env)
                actions.append(PrepareEnv(event.env))
        elif isinstance(event, CancelLeaseRequestEvent):
            self.pending = [
                r for r in self.pending if not (r.owner == event.owner and r.req_id == event.req_id)
            ]
        elif isinstance(event, ReturnLeaseEvent):
            w = self.workers.get(event.worker_id)
            if w is not None and w.state == "leased":
                self._release(w)
                if event.kill or w.actor_id is not None:
                    actions.append(KillWorker(w.worker_id))
                    del self.workers[w.worker_id]
        elif isinstance(event, WorkerRegisteredEvent):
            w = self.workers.get(event.worker_id)
            if w is not None and w.state == "starting":
                w.state = "idle"
                w.idle_since = self.clock()
        elif isinstance(event, WorkerExitedEvent):
            w = self.workers.pop(event.worker_id, None)
            if w is not None and w.state == "leased":
                actions.append(NotifyWorkerLost(w.owner, w.worker_id, event.reason, w.actor_id))
                self._release(w)
        elif isinstance(event, WorkerBlockedEvent):
            w = self.workers.get(event.worker_id)
            if w is not None and w.state == "leased" and not w.blocked:
                w.blocked = True
                self.available["CPU"] = self.available.get("CPU", 0) + w.resources.get("CPU", 0)
        elif isinstance(event, WorkerUnblockedEvent):
            w = self.workers.get(event.worker_id)
            if w is not None and w.state == "leased" and w.blocked:
                w.blocked = False
                self.available["CPU"] = self.available.get("CPU", 0) - w.resources.get("CPU", 0)
        elif isinstance(event, OwnerGoneEvent):
            self.pending = [r for r in self.pending if r.owner != event.owner]
            for w in list(self.workers.values()):
                if w.state == "leased" and w.owner == event.owner and w.actor_id is None:
                    # Its results have nowhere to go; a fresh worker is cheaper than a wait.
                    self._release(w)
                    del self.workers[w.worker_id]
                    actions.append(KillWorker(w.worker_id))
        elif isinstance(event, TickEvent):
            actions.extend(self._reap_idle())
            if self.cluster:
                actions.extend(self._respill())
        elif isinstance(event, EnvReadyEvent):
            self.envs_ready.add(event.env)
            self.envs_asked.discard(event.env)
        elif isinstance(event, EnvFailedEvent):
            self.envs_asked.discard(event.env)
            self.envs_ready.discard(event.env)
            keep = []
            for r in self.pending:
                if r.env == event.env:
                    self._told_queued.discard(id(r))
                    actions.append(Reject(r.owner, r.req_id, event.reason, r.actor_id, True))
                else:
                    keep.append(r)
            self.pending = keep
        self._schedule(actions)
        return actions

    def remove_group(self, pg_hex: str) -> list[Action]:
        """A placement group's bundles are released here: the work in them is killed (its
        owners hear of it when the workers exit) and requests for them fail."""
        actions: list[Action] = []
        for w in self.workers.values():
            if w.state == "leased" and any(pg_hex in name for name in w.resources):
                actions.append(KillWorker(w.worker_id))
        keep = []
        for r in self.pending:
            if any(pg_hex in name for name in r.resources):
                reason = f"its placement group {pg_hex} was removed"
                actions.append(Reject(r.owner, r.req_id, reason, r.actor_id))
            else:
                keep.append(r)
        self.pending = keep
        return actions

    def gpus_infeasible(self, amount: int) -> bool:
        return amount >= 10_000 and amount // 10_000 > len(self.gpus.free)

    # -- internals ---------------------------------------------------------------------
    def _infeasible(self, needed: Resources) -> str:
        return f"it asks for {describe(needed)} but this cluster has {describe(self.total)} in all"

    def _new_worker(self, env: str = "") -> StartWorker:
        wid = os.urandom(8)
        self.workers[wid] = _Worker(wid, env=env)
        return StartWorker(wid, env)

    def _release(self, w: _Worker) -> None:
        # Resources of a placement group bundle released meanwhile are gone: skip them.
        res = {k: v for k, v in w.resources.items() if k in self.total}
        if w.blocked:
            res.pop("CPU", None)
        add(self.available, res)
        if w.gpu_ids:
            self.gpus.release(w.gpu_ids, w.resources.get("GPU", 0))
        w.state, w.owner, w.req_id, w.resources, w.gpu_ids, w.blocked = (
            "idle",
            b"",
            0,
            {},
            [],
            False,
        )
        w.revoked = False
        w.idle_since = self.clock()

    def _schedule(self, actions: list[Action]) -> None:
        if not self.pending:
            self._replenish(actions, {})
            return
        idle: dict[str, list[_Worker]] = {}
        for w in self.workers.values():
            if w.state == "idle":
                idle.setdefault(w.env, []).append(w)
        waiting: dict[str, int] = {}  # requests that fit but lack a worker, by env
        for_env = 0  # requests whose runtime env is being set up
        still_pending = []
        for req in self.pending:
            if req.env not in self.envs_ready:
                still_pending.append(req)
                for_env += 1
                continue
            if not fits(self.available, req.resources):
                still_pending.append(req)
                if req.actor_id is None and id(req) not in self._told_queued:
                    self._told_queued.add(id(req))
                    actions.append(Queued(req.owner, req.req_id))
                continue
            pool = idle.get(req.env)
            if not pool:
                still_pending.append(req)
                waiting[req.env] = waiting.get(req.env, 0) + 1
                continue
            gpu_ids: list[int] = []
            if req.resources.get("GPU"):
                got = self.gpus.acquire(req.resources["GPU"])
                if got is None:
                    still_pending.append(req)
                    continue
                gpu_ids = got
            w = pool.pop()
            self._told_queued.discard(id(req))
            subtract(self.available, req.resources)
            w.state, w.owner, w.req_id = "leased", req.owner, req.req_id
            w.resources, w.gpu_ids, w.actor_id = dict(req.resources), gpu_ids, req.actor_id
            w.leased_at, w.retriable = self.clock(), req.retriable
            actions.append(Grant(req.owner, req.req_id, w.worker_id, gpu_ids, req.actor_id))
        self.pending = still_pending
        if len(still_pending) - for_env > sum(waiting.values()):
            # Some requests wait for resources: owners keep idle leases for a moment to
            # save a round trip, so ask for them back now.
            for w in self.workers.values():
                if w.state == "leased" and w.actor_id is None and not w.revoked and w.owner:
                    w.revoked = True
                    actions.append(Revoke(w.owner, w.worker_id))
        self._replenish(actions, waiting)

    def _replenish(self, actions: list[Action], waiting: dict[str, int]) -> None:
        """Start workers for grantable requests that lack one, and keep the pool full.

        The pool (``pool_size`` workers) is of the default env. A worker of another env is
        started only for a request that waits for it; when that would make more task
        workers than the pool's size, an idle worker of another env makes room (the oldest
        idle first), so that many envs do not mean many idle processes.
        """
        starting: dict[str, int] = {}
        for w in self.workers.values():
            if w.state == "starting":
                starting[w.env] = starting.get(w.env, 0) + 1
        task_workers = sum(1 for w in self.workers.values() if w.actor_id is None)
        # Work that waits first; the default pool is topped up last, with what room is left.
        for env in [*sorted(e for e in waiting if e), ""]:
            want = waiting.get(env, 0) - starting.get(env, 0)
            if env == "":
                want = max(want, self.pool_size - task_workers)
            for _ in range(max(0, want)):
                if len(self.workers) >= self.max_workers:
                    return
                if waiting.get(env, 0) and task_workers >= self.pool_size:
                    victim = self._idle_of_other_env(env)
                    if victim is not None:
                        del self.workers[victim.worker_id]
                        actions.append(KillWorker(victim.worker_id))
                        task_workers -= 1
                actions.append(self._new_worker(env))
                task_workers += 1

    def _idle_of_other_env(self, env: str) -> _Worker | None:
        idle = [w for w in self.workers.values() if w.state == "idle" and w.env != env]
        return min(idle, key=lambda w: w.idle_since) if idle else None

    def _respill(self) -> list[Action]:
        """Requests that have waited here a while for resources ask the control store again:
        another node may have room by now (it chose this one when none had)."""
        actions: list[Action] = []
        now = self.clock()
        keep = []
        for r in self.pending:
            if (
                r.actor_id is None
                and not r.pinned
                and now - r.queued_at > _config.RESPILL_SECONDS
                # A placement group bundle's work has nowhere else to go.
                and not any("_group_" in name for name in r.resources)
                and not fits(self.available, r.resources)
            ):
                self._told_queued.discard(id(r))
                actions.append(Spill(r))
            else:
                keep.append(r)
        self.pending = keep
        return actions

    def _reap_idle(self) -> list[Action]:
        actions: list[Action] = []
        now = self.clock()
        idle = sorted(
            (w for w in self.workers.values() if w.state == "idle"), key=lambda w: w.idle_since
        )
        excess = len([w for w in self.workers.values() if w.actor_id is None]) - self.pool_size
        for w in idle:
            if excess <= 0:
                break
            if now - w.idle_since > _config.IDLE_WORKER_SECONDS:
                del self.workers[w.worker_id]
                actions.append(KillWorker(w.worker_id))
                excess -= 1
        return actions
