"""ActorDirectory: names, placement and lifecycle of actors, and who is told what."""

from __future__ import annotations

import itertools

import pytest
from shoal._actor_directory import (
    ALIVE,
    DEAD,
    PENDING,
    RESTARTING,
    ActorDirectory,
    ActorRecord,
    BecomeActor,
    KillActorWorker,
    NameTaken,
    Publish,
    RequestActorLease,
)

pytestmark = pytest.mark.timeout(10)

OWNER = b"owner-01"
OTHER = b"other-01"
CALLER = b"caller-1"
_ids = itertools.count(1)


def record(owner=OWNER, name="", namespace="ns", detached=False, max_restarts=0) -> ActorRecord:
    return ActorRecord(
        actor_id=next(_ids).to_bytes(16, "big"),
        owner=owner,
        job_id=1,
        class_name="Counter",
        name=name,
        namespace=namespace,
        detached=detached,
        resources={"CPU": 10_000},
        meta={"methods": ["incr"]},
        creation=("class", "args"),
        max_restarts=max_restarts,
    )


def alive_actor(directory: ActorDirectory, worker=b"worker-1", **kwargs) -> ActorRecord:
    rec = record(**kwargs)
    directory.create(rec)
    directory.lease_granted(rec.actor_id, worker)
    directory.ready(rec.actor_id, "ipc:///actor", 4242)
    assert rec.state == ALIVE
    return rec


def published(actions) -> list[tuple[list[bytes], str]]:
    return [(sorted(a.subscribers), a.record.state) for a in actions if isinstance(a, Publish)]


@pytest.fixture
def directory() -> ActorDirectory:
    return ActorDirectory()


def test_create_asks_for_a_lease_and_subscribes_the_owner(directory):
    rec = record()
    assert directory.create(rec) == [RequestActorLease(rec.actor_id, {"CPU": 10_000})]
    assert rec.state == PENDING and rec.subscribers == {OWNER}


def test_lease_granted_turns_the_worker_into_the_actor(directory):
    rec = record()
    directory.create(rec)
    assert directory.lease_granted(rec.actor_id, b"worker-1") == [BecomeActor(b"worker-1", rec)]
    assert rec.worker_id == b"worker-1" and rec.state == PENDING


def test_ready_publishes_alive_to_every_subscriber(directory):
    rec = record()
    directory.create(rec)
    directory.subscribe(CALLER, rec.actor_id)
    directory.lease_granted(rec.actor_id, b"worker-1")
    actions = directory.ready(rec.actor_id, "ipc:///actor", 4242)
    assert published(actions) == [(sorted([OWNER, CALLER]), ALIVE)]
    assert (rec.address, rec.pid) == ("ipc:///actor", 4242)
    assert rec.creation is None  # the constructor arguments are not kept once it ran
    assert directory.ready(rec.actor_id, "ipc:///again", 1) == []  # only once
    info = rec.info()
    assert (info["state"], info["addr"], info["pid"], info["wid"]) == (
        ALIVE,
        "ipc:///actor",
        4242,
        b"worker-1",
    )


# -- names ----------------------------------------------------------------------------------


def test_names_are_unique_per_namespace(directory):
    first = record(name="counter", namespace="a")
    directory.create(first)
    assert directory.lookup_name("counter", "a") is first
    assert directory.lookup_name("counter", "b") is None
    with pytest.raises(NameTaken, match="counter"):
        directory.create(record(name="counter", namespace="a"))
    other_ns = record(name="counter", namespace="b")
    directory.create(other_ns)
    assert directory.lookup_name("counter", "b") is other_ns
    assert directory.lookup_name("counter", "a") is first


def test_a_dead_actors_name_can_be_taken_again(directory):
    first = alive_actor(directory, name="svc")
    directory.worker_exited(b"worker-1", "exit code 1")
    assert directory.lookup_name("svc", "ns") is None
    second = record(name="svc")
    directory.create(second)
    assert directory.lookup_name("svc", "ns") is second
    assert first.state == DEAD


# -- death ----------------------------------------------------------------------------------


def test_worker_exit_publishes_dead_with_the_reason(directory):
    rec = alive_actor(directory)
    directory.subscribe(CALLER, rec.actor_id)
    actions = directory.worker_exited(b"worker-1", "killed by signal SIGKILL")
    assert published(actions) == [(sorted([OWNER, CALLER]), DEAD)]
    assert "SIGKILL" in rec.death_reason and "worker process died" in rec.death_reason
    assert rec.subscribers == set()
    assert directory.worker_exited(b"worker-1", "again") == []
    assert directory.worker_exited(b"not-an-actor", "exit code 0") == []


def test_kill_stops_the_worker_and_death_carries_the_kill_reason(directory):
    rec = alive_actor(directory)
    assert directory.kill(rec.actor_id, "it was killed with shoal.kill()") == [
        KillActorWorker(b"worker-1")
    ]
    assert rec.state == ALIVE  # dead once its worker is gone
    actions = directory.worker_exited(b"worker-1", "killed by signal SIGKILL")
    assert published(actions) == [([OWNER], DEAD)]
    assert rec.death_reason == "it was killed with shoal.kill()"
    assert directory.kill(rec.actor_id, "again") == []


def test_killing_a_pending_actor_kills_the_worker_it_gets_later(directory):
    rec = record()
    directory.create(rec)
    assert published(directory.kill(rec.actor_id, "killed")) == [([OWNER], DEAD)]
    assert directory.lease_granted(rec.actor_id, b"worker-9") == [KillActorWorker(b"worker-9")]
    assert rec.state == DEAD


def test_lease_rejected_makes_the_actor_dead_with_the_reason(directory):
    rec = record()
    directory.create(rec)
    actions = directory.lease_rejected(rec.actor_id, "it asks for GPU=1 but ...")
    assert published(actions) == [([OWNER], DEAD)]
    assert rec.death_reason == "it asks for GPU=1 but ..."


def test_constructor_failure_keeps_the_error_and_stops_the_worker(directory):
    rec = record()
    directory.create(rec)
    directory.lease_granted(rec.actor_id, b"worker-1")
    actions = directory.constructor_failed(rec.actor_id, [b"pickled error"])
    assert published(actions) == [([OWNER], DEAD)]
    assert KillActorWorker(b"worker-1") in actions
    assert rec.death_error == [b"pickled error"]
    assert "constructor" in rec.death_reason
    assert directory.worker_exited(b"worker-1", "killed") == []  # already dead: no second notice


def test_subscribing_to_a_dead_actor_returns_it_without_subscribing(directory):
    rec = alive_actor(directory)
    directory.worker_exited(b"worker-1", "exit code 1")
    assert directory.subscribe(CALLER, rec.actor_id) is rec
    assert rec.subscribers == set()
    assert directory.subscribe(CALLER, b"no such actor") is None


# -- release and owners ---------------------------------------------------------------------


def test_release_ends_a_normal_actor(directory):
    rec = alive_actor(directory)
    assert directory.release(rec.actor_id) == [KillActorWorker(b"worker-1")]
    assert rec.released
    directory.worker_exited(b"worker-1", "killed by signal SIGKILL")
    assert rec.state == DEAD and "handles" in rec.death_reason


def test_release_does_not_end_a_detached_actor(directory):
    rec = alive_actor(directory, detached=True)
    assert directory.release(rec.actor_id) == []
    assert rec.state == ALIVE and not rec.released


def test_owner_gone_ends_its_normal_actors_only(directory):
    mine = alive_actor(directory, worker=b"worker-1")
    detached = alive_actor(directory, worker=b"worker-2", detached=True)
    theirs = alive_actor(directory, worker=b"worker-3", owner=OTHER)
    directory.subscribe(OWNER, theirs.actor_id)

    actions = directory.owner_gone(OWNER)
    assert actions == [KillActorWorker(b"worker-1")]
    assert detached.state == ALIVE and theirs.state == ALIVE
    # The gone owner is no longer told about anything.
    assert OWNER not in theirs.subscribers
    assert published(directory.worker_exited(b"worker-1", "killed")) == [([], DEAD)]
    assert mine.state == DEAD and "owner" in mine.death_reason


def test_owner_gone_while_pending_makes_the_actor_dead_at_once(directory):
    rec = record()
    directory.create(rec)
    directory.subscribe(CALLER, rec.actor_id)
    assert published(directory.owner_gone(OWNER)) == [([CALLER], DEAD)]
    assert directory.lease_granted(rec.actor_id, b"worker-5") == [KillActorWorker(b"worker-5")]


# -- restarts -------------------------------------------------------------------------------


def test_worker_exit_with_restarts_left_restarts_from_the_kept_creation(directory):
    rec = alive_actor(directory, max_restarts=2)
    directory.subscribe(CALLER, rec.actor_id)
    assert rec.creation == ("class", "args")  # kept: the constructor may run again
    actions = directory.worker_exited(b"worker-1", "killed by signal SIGKILL (9)")
    assert published(actions) == [(sorted([OWNER, CALLER]), RESTARTING)]
    assert RequestActorLease(rec.actor_id, {"CPU": 10_000}) in actions
    assert rec.num_restarts == 1 and rec.worker_id == b"" and rec.address == ""
    assert "SIGKILL" in rec.restart_reason and rec.info()["reason"] == rec.restart_reason
    assert directory.lease_granted(rec.actor_id, b"worker-2") == [BecomeActor(b"worker-2", rec)]
    actions = directory.ready(rec.actor_id, "ipc:///actor-2", 4343)
    assert published(actions) == [(sorted([OWNER, CALLER]), ALIVE)]
    assert rec.info()["addr"] == "ipc:///actor-2" and rec.info()["nr"] == 1
    assert directory.worker_exited(b"worker-1", "late news of the old worker") == []


def test_out_of_restarts_the_actor_dies_saying_so(directory):
    rec = alive_actor(directory, max_restarts=1)
    directory.worker_exited(b"worker-1", "exit code 1")
    directory.lease_granted(rec.actor_id, b"worker-2")
    directory.ready(rec.actor_id, "ipc:///actor-2", 2)
    assert rec.creation is None  # no restart can follow any more: the arguments can go
    actions = directory.worker_exited(b"worker-2", "killed by signal SIGKILL (9)")
    assert published(actions) == [([OWNER], DEAD)]
    assert not any(isinstance(a, RequestActorLease) for a in actions)
    assert "SIGKILL" in rec.death_reason
    assert "no restarts left (restarted 1 of max_restarts=1 times)" in rec.death_reason


def test_unlimited_restarts_and_a_worker_lost_while_restarting(directory):
    rec = alive_actor(directory, max_restarts=-1)
    for n in range(1, 6):
        worker = f"worker-{n}".encode()
        directory.worker_exited(rec.worker_id, "exit code 1")
        assert rec.state == RESTARTING and rec.num_restarts == n
        directory.lease_granted(rec.actor_id, worker)
    # Its worker died in the constructor (still RESTARTING): that is a restart too.
    directory.worker_exited(b"worker-5", "killed by signal SIGKILL (9)")
    assert rec.state == RESTARTING and rec.num_restarts == 6


def test_kill_without_restart_is_for_good_even_with_restarts_left(directory):
    rec = alive_actor(directory, max_restarts=5)
    assert directory.kill(rec.actor_id, "it was killed with shoal.kill()") == [
        KillActorWorker(b"worker-1")
    ]
    actions = directory.worker_exited(b"worker-1", "killed by signal SIGKILL (9)")
    assert published(actions) == [([OWNER], DEAD)]
    assert rec.death_reason == "it was killed with shoal.kill()" and rec.num_restarts == 0


def test_kill_with_no_restart_false_restarts_with_that_cause(directory):
    rec = alive_actor(directory, max_restarts=1)
    cause = "it was killed with shoal.kill(no_restart=False)"
    assert directory.kill(rec.actor_id, cause, no_restart=False) == [KillActorWorker(b"worker-1")]
    assert rec.state == ALIVE
    directory.worker_exited(b"worker-1", "killed by signal SIGKILL (9)")
    assert rec.state == RESTARTING and rec.restart_reason == cause
    # While it restarts, a kill that allows a restart has nothing to do ...
    assert directory.kill(rec.actor_id, cause, no_restart=False) == []
    directory.lease_granted(rec.actor_id, b"worker-2")
    directory.ready(rec.actor_id, "ipc:///a2", 2)
    directory.kill(rec.actor_id, cause, no_restart=False)
    directory.worker_exited(b"worker-2", "killed by signal SIGKILL (9)")
    assert rec.state == DEAD and rec.death_reason.startswith(cause)
    assert "no restarts left" in rec.death_reason


def test_kill_for_good_while_restarting_ends_it_at_once(directory):
    rec = alive_actor(directory, max_restarts=3)
    directory.worker_exited(b"worker-1", "exit code 1")
    assert published(directory.kill(rec.actor_id, "it was killed with shoal.kill()")) == [
        ([OWNER], DEAD)
    ]
    assert directory.lease_granted(rec.actor_id, b"worker-2") == [KillActorWorker(b"worker-2")]


def test_constructor_failure_on_a_restart_is_final(directory):
    rec = alive_actor(directory, max_restarts=3)
    directory.worker_exited(b"worker-1", "exit code 1")
    directory.lease_granted(rec.actor_id, b"worker-2")
    actions = directory.constructor_failed(rec.actor_id, [b"error"])
    assert published(actions) == [([OWNER], DEAD)] and KillActorWorker(b"worker-2") in actions
    assert "constructor raised" in rec.death_reason and "1st time" in rec.death_reason


def test_a_restarting_actor_keeps_its_name(directory):
    rec = alive_actor(directory, name="svc", max_restarts=1)
    directory.worker_exited(b"worker-1", "exit code 1")
    assert directory.lookup_name("svc", "ns") is rec
    with pytest.raises(NameTaken):
        directory.create(record(name="svc"))


def test_released_and_orphaned_actors_are_not_restarted(directory):
    released = alive_actor(directory, worker=b"worker-1", max_restarts=3)
    directory.release(released.actor_id)
    directory.worker_exited(b"worker-1", "killed by signal SIGKILL (9)")
    assert released.state == DEAD
    orphan = alive_actor(directory, worker=b"worker-2", owner=OTHER, max_restarts=3)
    directory.owner_gone(OTHER)
    directory.worker_exited(b"worker-2", "killed by signal SIGKILL (9)")
    assert orphan.state == DEAD and "owner" in orphan.death_reason


def test_a_cause_given_with_the_worker_exit_is_what_callers_are_told(directory):
    rec = alive_actor(directory, max_restarts=1)
    directory.worker_exited(b"worker-1", "lost", cause="its node ab12 died (no heartbeat)")
    assert rec.state == RESTARTING and rec.restart_reason == "its node ab12 died (no heartbeat)"
    directory.lease_granted(rec.actor_id, b"worker-2")
    directory.ready(rec.actor_id, "ipc:///b", 2)
    directory.worker_exited(b"worker-2", "lost", cause="its node cd34 died (left)")
    assert rec.death_reason.startswith("its node cd34 died (left), and it has no restarts left")


def test_a_restart_that_cannot_be_placed_fails_with_both_reasons(directory):
    rec = alive_actor(directory, max_restarts=1)
    directory.worker_exited(b"worker-1", "its node abc sent nothing for 30 s")
    directory.lease_rejected(rec.actor_id, "it cannot be scheduled: no node has CPU=1")
    assert rec.state == DEAD
    assert rec.death_reason.startswith("it could not be restarted after its worker process died")
    assert "no node has CPU=1" in rec.death_reason


def test_every_state_change_goes_through_the_transition_hook(directory):
    seen = []
    directory.on_transition = lambda rec, old, cause: seen.append((old, rec.state, cause))
    rec = record(max_restarts=1)
    directory.create(rec)
    directory.lease_granted(rec.actor_id, b"worker-1")
    directory.ready(rec.actor_id, "ipc:///a", 1)
    directory.worker_exited(b"worker-1", "exit code 1")
    directory.lease_granted(rec.actor_id, b"worker-2")
    directory.ready(rec.actor_id, "ipc:///b", 2)
    directory.kill(rec.actor_id, "it was killed with shoal.kill()")
    directory.worker_exited(b"worker-2", "killed by signal SIGKILL (9)")
    assert [(old, new) for old, new, _ in seen] == [
        (PENDING, PENDING),
        (PENDING, ALIVE),
        (ALIVE, RESTARTING),
        (RESTARTING, ALIVE),
        (ALIVE, DEAD),
    ]
    assert seen[2][2] == "its worker process died (exit code 1)"
    assert seen[4][2] == "it was killed with shoal.kill()"
