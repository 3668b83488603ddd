"""NodeScheduler and runtime envs: workers pooled per env, work waiting for its env to be
set up (never for a worker of another env), failures, and idle workers of other envs making
room at the cap. No processes, no sockets."""

from __future__ import annotations

import pytest
from shoal._resources import to_fixed
from shoal._scheduler import (
    EnvFailedEvent,
    EnvReadyEvent,
    Grant,
    KillWorker,
    NodeScheduler,
    PrepareEnv,
    Queued,
    Reject,
    RequestLeaseEvent,
    ReturnLeaseEvent,
    Revoke,
    StartWorker,
    WorkerExitedEvent,
    WorkerRegisteredEvent,
)

pytestmark = pytest.mark.timeout(10)

OWNER = b"owner-aa"
OTHER = b"owner-bb"
ENV_X = "x" * 32
ENV_Y = "y" * 32


def of_type(actions, *kinds):
    return [a for a in actions if isinstance(a, kinds)]


def register(sched, actions):
    out = []
    for start in of_type(actions, StartWorker):
        out.extend(sched.handle(WorkerRegisteredEvent(start.worker_id)))
    return out


def scheduler(cpus=2, pool=2):
    sched = NodeScheduler({"CPU": to_fixed(cpus)}, pool)
    assert register(sched, sched.start()) == []
    return sched


def ask(sched, owner, req_id, env="", cpus=1.0, actor_id=None):
    return sched.handle(
        RequestLeaseEvent(owner, req_id, {"CPU": to_fixed(cpus)}, actor_id, env=env)
    )


def test_work_for_an_env_waits_for_it_and_never_takes_a_default_worker():
    sched = scheduler()
    actions = ask(sched, OWNER, 1, ENV_X)
    # Two default workers are idle, with CPUs free: still nothing is granted.
    assert of_type(actions, Grant, StartWorker, Queued, Revoke) == []
    assert [a.env for a in of_type(actions, PrepareEnv)] == [ENV_X]
    # A second request for the env does not ask again for it to be set up.
    assert of_type(ask(sched, OWNER, 2, ENV_X), PrepareEnv) == []
    ready = sched.handle(EnvReadyEvent(ENV_X))
    starts = of_type(ready, StartWorker)
    assert [s.env for s in starts] == [ENV_X, ENV_X]
    grants = register(sched, ready)
    assert sorted(g.req_id for g in of_type(grants, Grant)) == [1, 2]
    granted = {g.worker_id for g in of_type(grants, Grant)}
    assert granted == {s.worker_id for s in starts}
    assert all(sched.worker(w).env == ENV_X for w in granted)


def test_an_env_workers_are_reused_by_that_env_only():
    sched = scheduler()
    sched.handle(EnvReadyEvent(ENV_X))
    grant = of_type(register(sched, ask(sched, OWNER, 1, ENV_X)), Grant)[0]
    sched.handle(ReturnLeaseEvent(grant.worker_id))
    # The default env gets a default worker, not the idle worker of env X.
    default = of_type(ask(sched, OWNER, 2), Grant)[0]
    assert sched.worker(default.worker_id).env == ""
    # Env X gets its idle worker back, without a start.
    again = ask(sched, OWNER, 3, ENV_X)
    assert of_type(again, StartWorker) == []
    assert of_type(again, Grant)[0].worker_id == grant.worker_id


def test_a_failed_env_rejects_its_work_and_asks_again_later():
    sched = scheduler()
    ask(sched, OWNER, 1, ENV_X)
    ask(sched, OTHER, 2, ENV_X, actor_id=b"actor-1")
    ask(sched, OWNER, 3, ENV_Y)
    actions = sched.handle(EnvFailedEvent(ENV_X, "pip said no"))
    rejects = of_type(actions, Reject)
    assert sorted((r.req_id, r.env_failed, r.reason) for r in rejects) == [
        (1, True, "pip said no"),
        (2, True, "pip said no"),
    ]
    assert [r.req_id for r in sched.pending] == [3]  # other envs' work still waits
    # A later request asks for the env to be set up again.
    assert [a.env for a in of_type(ask(sched, OWNER, 4, ENV_X), PrepareEnv)] == [ENV_X]


def test_idle_workers_of_other_envs_make_room_at_the_cap():
    sched = scheduler(cpus=2, pool=2)
    default_workers = set(sched.workers)
    sched.handle(EnvReadyEvent(ENV_X))
    actions = ask(sched, OWNER, 1, ENV_X)
    # Two task workers already (the pool): one idle default worker goes for the new one.
    killed = {k.worker_id for k in of_type(actions, KillWorker)}
    assert len(killed) == 1 and killed <= default_workers
    assert [s.env for s in of_type(actions, StartWorker)] == [ENV_X]
    grant = of_type(register(sched, actions), Grant)[0]
    sched.handle(ReturnLeaseEvent(grant.worker_id))
    # Now env Y: the idle worker of env X is the oldest idle one of another env.
    sched.handle(EnvReadyEvent(ENV_Y))
    actions = ask(sched, OWNER, 2, ENV_Y)
    assert len(of_type(actions, KillWorker)) == 1
    assert [s.env for s in of_type(actions, StartWorker)] == [ENV_Y]
    assert sum(1 for w in sched.workers.values() if w.actor_id is None) == 2


def test_a_worker_of_an_env_that_exits_is_replaced_by_one_of_that_env():
    sched = scheduler()
    sched.handle(EnvReadyEvent(ENV_X))
    actions = ask(sched, OWNER, 1, ENV_X)
    start = of_type(actions, StartWorker)[0]
    replaced = sched.handle(WorkerExitedEvent(start.worker_id, "exit code 1"))
    assert [s.env for s in of_type(replaced, StartWorker)] == [ENV_X]
