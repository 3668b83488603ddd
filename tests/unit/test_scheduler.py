"""NodeScheduler driven event by event: no processes, no sockets, an injected clock."""

from __future__ import annotations

import pytest
from shoal import _config
from shoal._resources import UNIT, to_fixed
from shoal._scheduler import (
    CancelLeaseRequestEvent,
    Grant,
    KillWorker,
    NodeScheduler,
    NotifyWorkerLost,
    OwnerGoneEvent,
    Queued,
    Reject,
    RequestLeaseEvent,
    ReturnLeaseEvent,
    Revoke,
    StartWorker,
    TickEvent,
    WorkerBlockedEvent,
    WorkerExitedEvent,
    WorkerRegisteredEvent,
    WorkerUnblockedEvent,
)

pytestmark = pytest.mark.timeout(10)

OWNER_A = b"owner-aa"
OWNER_B = b"owner-bb"


def fixed(**amounts: float) -> dict[str, int]:
    return {name: to_fixed(value) for name, value in amounts.items()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def of_type(actions, *kinds):
    return [a for a in actions if isinstance(a, kinds)]


def register_started(sched: NodeScheduler, actions) -> list:
    """Register every StartWorker in ``actions`` (recursively, as the head would); return
    every action the registrations produced."""
    produced = []
    for start in of_type(actions, StartWorker):
        more = sched.handle(WorkerRegisteredEvent(start.worker_id))
        produced.extend(more)
        produced.extend(register_started(sched, more))
    return produced


def ready_scheduler(pool_size: int = 1, clock=None, max_workers=None, **total: float):
    sched = NodeScheduler(fixed(**total), pool_size, max_workers=max_workers, clock=clock)
    starts = sched.start()
    assert register_started(sched, starts) == []
    return sched, [s.worker_id for s in starts]


def request(sched, owner, req_id, actor_id=None, **amounts):
    return sched.handle(RequestLeaseEvent(owner, req_id, fixed(**amounts), actor_id))


# -- pool -----------------------------------------------------------------------------------


def test_start_prestarts_the_pool_and_registration_makes_workers_idle():
    sched = NodeScheduler(fixed(CPU=4), pool_size=3)
    starts = sched.start()
    assert len(starts) == 3 and all(isinstance(a, StartWorker) for a in starts)
    assert len({a.worker_id for a in starts}) == 3
    assert sched.count("starting") == 3
    for action in starts:
        assert sched.handle(WorkerRegisteredEvent(action.worker_id)) == []
    assert sched.count("idle") == 3 and sched.count("starting") == 0


def test_registration_of_an_unknown_worker_changes_nothing():
    sched, _ = ready_scheduler(pool_size=1, CPU=1)
    assert sched.handle(WorkerRegisteredEvent(b"stranger")) == []
    assert sched.worker(b"stranger") is None
    assert len(sched.workers) == 1


# -- leases ---------------------------------------------------------------------------------


def test_grant_binds_an_idle_worker_and_takes_the_resources():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=2)
    actions = request(sched, OWNER_A, 7, CPU=1.5)
    assert actions == [Grant(OWNER_A, 7, wid, [], None)]
    assert sched.available["CPU"] == to_fixed(0.5)
    assert sched.worker(wid).state == "leased"
    assert sched.leased_to(OWNER_A) == [wid]
    assert sched.leased_to(OWNER_B) == []


def test_request_that_does_not_fit_waits_and_is_granted_when_a_lease_returns():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    assert of_type(request(sched, OWNER_A, 1, CPU=1), Grant)
    # No room: the request waits, no worker is started for it, its owner hears it is
    # queued, and the holder of the lease is asked to give it back when idle.
    assert request(sched, OWNER_B, 2, CPU=1) == [Queued(OWNER_B, 2), Revoke(OWNER_A, wid)]
    assert sched.available["CPU"] == 0

    actions = sched.handle(ReturnLeaseEvent(wid))
    assert actions == [Grant(OWNER_B, 2, wid, [], None)]
    assert sched.leased_to(OWNER_B) == [wid]
    assert sched.available["CPU"] == 0


def test_a_request_that_fits_but_finds_no_idle_worker_starts_exactly_one():
    sched, (first,) = ready_scheduler(pool_size=1, CPU=4)
    assert of_type(request(sched, OWNER_A, 1, CPU=1), Grant)
    actions = request(sched, OWNER_A, 2, CPU=1)
    starts = of_type(actions, StartWorker)
    assert len(starts) == 1 and not of_type(actions, Grant)
    # While it starts, other events do not start another for the same request.
    assert of_type(sched.handle(TickEvent()), StartWorker) == []
    assert of_type(sched.handle(ReturnLeaseEvent(b"unknown")), StartWorker) == []

    granted = sched.handle(WorkerRegisteredEvent(starts[0].worker_id))
    assert granted == [Grant(OWNER_A, 2, starts[0].worker_id, [], None)]
    assert sorted(sched.leased_to(OWNER_A)) == sorted([first, starts[0].worker_id])


def test_cancelled_request_is_never_granted():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    request(sched, OWNER_A, 1, CPU=1)
    request(sched, OWNER_B, 2, CPU=1)
    request(sched, OWNER_B, 3, CPU=1)
    assert sched.handle(CancelLeaseRequestEvent(OWNER_B, 2)) == []
    assert sched.handle(ReturnLeaseEvent(wid)) == [Grant(OWNER_B, 3, wid, [], None)]


def test_infeasible_request_is_rejected_with_a_reason_and_not_kept():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=2)
    actions = request(sched, OWNER_A, 5, actor_id=b"actor-1", CPU=3)
    assert len(actions) == 1 and isinstance(actions[0], Reject)
    reject = actions[0]
    assert (reject.owner, reject.req_id, reject.actor_id) == (OWNER_A, 5, b"actor-1")
    assert "CPU=3" in reject.reason and "CPU=2" in reject.reason
    # It was not queued: freeing every resource grants nothing.
    assert of_type(sched.handle(TickEvent()), Grant) == []
    assert sched.pending == []


@pytest.mark.parametrize(
    ("node", "amounts", "named"),
    [
        ({"CPU": 2}, {"GPU": 1}, "GPU=1"),
        ({"CPU": 2, "GPU": 2}, {"GPU": 3}, "GPU=3"),
        ({"CPU": 2}, {"accelerator": 1}, "accelerator=1"),
    ],
)
def test_requests_for_resources_the_node_lacks_are_rejected(node, amounts, named):
    sched, _ = ready_scheduler(pool_size=1, **node)
    (reject,) = request(sched, OWNER_A, 1, **amounts)
    assert isinstance(reject, Reject)
    assert named in reject.reason
    assert sched.pending == []


def test_return_with_kill_stops_the_worker_and_the_pool_is_refilled():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    request(sched, OWNER_A, 1, CPU=1)
    actions = sched.handle(ReturnLeaseEvent(wid, kill=True))
    assert KillWorker(wid) in actions
    assert sched.worker(wid) is None
    assert len(of_type(actions, StartWorker)) == 1
    assert sched.available["CPU"] == UNIT


def test_returning_an_actor_lease_always_kills_its_worker():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    (grant,) = of_type(request(sched, OWNER_A, 1, actor_id=b"actor-1", CPU=1), Grant)
    assert grant.actor_id == b"actor-1"
    actions = sched.handle(ReturnLeaseEvent(wid))
    assert KillWorker(wid) in actions
    assert sched.worker(wid) is None


def test_a_stale_return_changes_nothing():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    assert sched.handle(ReturnLeaseEvent(wid)) == []  # idle, not leased
    assert sched.handle(ReturnLeaseEvent(b"nobody")) == []
    assert sched.available["CPU"] == UNIT
    assert sched.worker(wid).state == "idle"


# -- blocked workers ------------------------------------------------------------------------


def test_a_blocked_worker_lends_its_cpu_to_a_new_lease():
    sched, (a,) = ready_scheduler(pool_size=1, CPU=1)
    request(sched, OWNER_A, 1, CPU=1)
    assert not of_type(request(sched, OWNER_A, 2, CPU=1), Grant, StartWorker)  # no room yet

    actions = sched.handle(WorkerBlockedEvent(a))
    assert sched.available["CPU"] == UNIT
    starts = of_type(actions, StartWorker)
    assert len(starts) == 1  # the waiting request now fits: a worker is started for it
    (grant,) = sched.handle(WorkerRegisteredEvent(starts[0].worker_id))
    assert (grant.req_id, grant.worker_id) == (2, starts[0].worker_id)
    assert sched.available["CPU"] == 0

    # Waking up takes the CPU back, even below zero for a moment.
    sched.handle(WorkerUnblockedEvent(a))
    assert sched.available["CPU"] == -UNIT
    sched.handle(ReturnLeaseEvent(a))
    sched.handle(ReturnLeaseEvent(grant.worker_id))
    assert sched.available["CPU"] == UNIT


def test_blocking_twice_or_unblocking_an_unblocked_worker_is_counted_once():
    sched, (a,) = ready_scheduler(pool_size=1, CPU=2)
    request(sched, OWNER_A, 1, CPU=1)
    sched.handle(WorkerUnblockedEvent(a))
    assert sched.available["CPU"] == UNIT
    sched.handle(WorkerBlockedEvent(a))
    sched.handle(WorkerBlockedEvent(a))
    assert sched.available["CPU"] == 2 * UNIT


def test_returning_a_blocked_lease_does_not_give_its_cpu_back_twice():
    sched, (a,) = ready_scheduler(pool_size=1, CPU=1, memory=4)
    request(sched, OWNER_A, 1, CPU=1, memory=1)
    sched.handle(WorkerBlockedEvent(a))
    sched.handle(ReturnLeaseEvent(a))
    assert sched.available == fixed(CPU=1, memory=4)
    assert sched.worker(a).blocked is False


# -- GPUs -----------------------------------------------------------------------------------


def test_whole_gpus_go_to_distinct_devices_and_come_back():
    sched, _ = ready_scheduler(pool_size=3, CPU=3, GPU=2)
    (g1,) = of_type(request(sched, OWNER_A, 1, GPU=1), Grant)
    (g2,) = of_type(request(sched, OWNER_A, 2, GPU=1), Grant)
    assert sorted(g1.gpu_ids + g2.gpu_ids) == [0, 1]
    assert of_type(request(sched, OWNER_A, 3, GPU=1), Grant) == []  # both taken: it waits

    (g3,) = of_type(sched.handle(ReturnLeaseEvent(g1.worker_id)), Grant)
    assert g3.req_id == 3 and g3.gpu_ids == g1.gpu_ids


def test_a_two_gpu_lease_gets_two_devices():
    sched, _ = ready_scheduler(pool_size=1, CPU=1, GPU=2)
    (grant,) = of_type(request(sched, OWNER_A, 1, GPU=2), Grant)
    assert sorted(grant.gpu_ids) == [0, 1]


def test_fractional_gpus_share_a_device_and_leave_the_other_whole():
    sched, _ = ready_scheduler(pool_size=3, CPU=3, GPU=2)
    (half1,) = of_type(request(sched, OWNER_A, 1, GPU=0.5), Grant)
    (half2,) = of_type(request(sched, OWNER_A, 2, GPU=0.5), Grant)
    assert half1.gpu_ids == half2.gpu_ids and len(half1.gpu_ids) == 1
    (whole,) = of_type(request(sched, OWNER_A, 3, GPU=1), Grant)
    assert whole.gpu_ids != half1.gpu_ids
    assert sched.gpus.free == [0, 0]


# -- owners and workers going away ----------------------------------------------------------


def test_owner_gone_kills_its_task_workers_keeps_actor_workers_and_drops_requests():
    sched, _ = ready_scheduler(pool_size=3, CPU=3)
    (t1,) = of_type(request(sched, OWNER_A, 1, CPU=1), Grant)
    (t2,) = of_type(request(sched, OWNER_A, 2, CPU=1), Grant)
    actions = request(sched, OWNER_A, 3, actor_id=b"actor-1", CPU=1)
    (actor,) = of_type(actions, Grant)
    assert register_started(sched, actions) == []  # the pool's replacement for the actor
    assert of_type(request(sched, OWNER_A, 4, CPU=1), Queued) == [
        Queued(OWNER_A, 4)
    ]  # no CPU left: waits
    assert of_type(request(sched, OWNER_B, 5, CPU=0.5), Grant) == []  # waits too

    actions = sched.handle(OwnerGoneEvent(OWNER_A))
    killed = {a.worker_id for a in of_type(actions, KillWorker)}
    assert killed == {t1.worker_id, t2.worker_id}
    assert sched.worker(t1.worker_id) is None and sched.worker(t2.worker_id) is None
    assert sched.worker(actor.worker_id).state == "leased"
    # The freed CPUs go to OWNER_B; OWNER_A's own waiting request went with it.
    grants = of_type(actions, Grant)
    assert [(g.owner, g.req_id) for g in grants] == [(OWNER_B, 5)]
    assert sched.pending == []
    assert sched.available["CPU"] == to_fixed(3 - 1 - 0.5)


def test_worker_exit_notifies_the_owner_that_held_it():
    sched, _ = ready_scheduler(pool_size=2, CPU=2)
    (ga,) = of_type(request(sched, OWNER_A, 1, CPU=1), Grant)
    (gb,) = of_type(request(sched, OWNER_B, 2, actor_id=b"actor-b", CPU=1), Grant)
    actions = sched.handle(WorkerExitedEvent(gb.worker_id, "killed by signal SIGKILL"))
    assert of_type(actions, NotifyWorkerLost) == [
        NotifyWorkerLost(OWNER_B, gb.worker_id, "killed by signal SIGKILL", b"actor-b")
    ]
    assert sched.worker(gb.worker_id) is None
    assert sched.available["CPU"] == UNIT
    assert sched.leased_to(OWNER_A) == [ga.worker_id]


def test_idle_worker_exit_notifies_nobody_and_refills_the_pool():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=1)
    actions = sched.handle(WorkerExitedEvent(wid, "exit code 1"))
    assert of_type(actions, NotifyWorkerLost) == []
    assert len(of_type(actions, StartWorker)) == 1
    assert sched.worker(wid) is None


def test_pool_is_refilled_when_a_worker_becomes_an_actor():
    sched, (wid,) = ready_scheduler(pool_size=1, CPU=2)
    actions = request(sched, OWNER_A, 1, actor_id=b"actor-1", CPU=1)
    assert of_type(actions, Grant)[0].worker_id == wid
    assert len(of_type(actions, StartWorker)) == 1


def test_max_workers_caps_how_many_are_started():
    sched, _ = ready_scheduler(pool_size=1, max_workers=3, CPU=16)
    started = 0
    for req_id in range(10):
        started += len(of_type(request(sched, OWNER_A, req_id, CPU=1), StartWorker))
    assert len(sched.workers) == 3
    assert started == 2


# -- idle reaping ---------------------------------------------------------------------------


def grow_pool(sched, count):
    """Lease ``count`` workers at once (starting extra ones), then give them all back."""
    grants = []
    for req_id in range(count):
        actions = request(sched, OWNER_A, req_id, CPU=1)
        grants += of_type(actions, Grant) + of_type(register_started(sched, actions), Grant)
    assert len(grants) == count
    return grants


def test_idle_workers_beyond_the_pool_are_reaped_after_the_idle_timeout():
    clock = FakeClock()
    sched, _ = ready_scheduler(pool_size=1, clock=clock, CPU=4)
    grants = grow_pool(sched, 3)
    # Given back one second apart: the longest idle go first.
    order = [grants[2], grants[0], grants[1]]
    for step, grant in enumerate(order):
        clock.now = 1000.0 + step
        sched.handle(ReturnLeaseEvent(grant.worker_id))
    assert len(sched.workers) == 3

    clock.now = 1000.0 + _config.IDLE_WORKER_SECONDS - 0.5
    assert sched.handle(TickEvent()) == []  # nobody idle for long enough yet

    clock.now = 1000.0 + _config.IDLE_WORKER_SECONDS + 0.5
    assert sched.handle(TickEvent()) == [KillWorker(order[0].worker_id)]

    clock.now = 1002.0 + _config.IDLE_WORKER_SECONDS + 0.5
    # Two are past the timeout, but only one more is beyond the pool size.
    assert sched.handle(TickEvent()) == [KillWorker(order[1].worker_id)]
    assert list(sched.workers) == [order[2].worker_id]


def test_reaping_never_goes_below_the_pool_and_ignores_actor_workers():
    clock = FakeClock()
    sched, (w,) = ready_scheduler(pool_size=1, clock=clock, CPU=4)
    actions = request(sched, OWNER_A, 1, actor_id=b"actor-1", CPU=1)
    (actor,) = of_type(actions, Grant)
    register_started(sched, actions)
    assert actor.worker_id == w
    clock.now += 10 * _config.IDLE_WORKER_SECONDS
    assert of_type(sched.handle(TickEvent()), KillWorker) == []
    assert sched.count("idle") == 1 and sched.worker(actor.worker_id).state == "leased"


def test_a_leased_worker_is_never_reaped():
    clock = FakeClock()
    sched, _ = ready_scheduler(pool_size=1, clock=clock, CPU=4)
    grants = grow_pool(sched, 3)
    clock.now += 10 * _config.IDLE_WORKER_SECONDS
    assert sched.handle(TickEvent()) == []
    assert {g.worker_id for g in grants} == set(sched.leased_to(OWNER_A))
