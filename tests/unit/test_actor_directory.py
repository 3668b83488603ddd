"""ActorDirectory: names, placement and lifecycle of actors, and who is told what."""

from __future__ import annotations

import itertools

import pytest
from shoal._actor_directory import (
    ALIVE,
    DEAD,
    PENDING,
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


def record(owner=OWNER, name="", namespace="ns", detached=False) -> ActorRecord:
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
