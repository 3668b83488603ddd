"""ObjectStore bookkeeping: holders, containers, waiters, capacity; a fake liveness check."""

from __future__ import annotations

import pytest
from shoal._ids import return_id
from shoal._object_store import (
    LostObject,
    ObjectStore,
    ReplyObjects,
    StoreFull,
    UnlinkSegment,
)

pytestmark = pytest.mark.timeout(10)

DRIVER = b"driver-1"
WORKER = b"worker-1"
READER = b"reader-1"


def oid(owner: bytes, n: int) -> bytes:
    return return_id(owner + n.to_bytes(8, "big"), 1)


def shm(object_id: bytes) -> str:
    return f"/dev/shm/test-{object_id.hex()}"


def on_disk(object_id: bytes) -> str:
    return f"/spill/{object_id.hex()}"


class Processes:
    def __init__(self, *alive: bytes) -> None:
        self.alive = set(alive)

    def __call__(self, process: bytes) -> bool:
        return process in self.alive


@pytest.fixture
def procs() -> Processes:
    return Processes(DRIVER, WORKER, READER)


@pytest.fixture
def store(procs: Processes) -> ObjectStore:
    return ObjectStore(capacity=1000, segment_path=shm, is_alive=procs)


def unlinked(actions) -> list[str]:
    return [a.path for a in actions if isinstance(a, UnlinkSegment)]


def replies(actions) -> list[ReplyObjects]:
    return [a for a in actions if isinstance(a, ReplyObjects)]


def put_segment(store: ObjectStore, object_id: bytes, size: int, holder=DRIVER, contained=()):
    path, actions = store.reserve(object_id, size)
    assert actions == []
    assert store.seal(object_id, 0, list(contained), holder) == []
    return path


# -- inline values --------------------------------------------------------------------------


def test_inline_put_is_answered_to_a_later_get(store):
    a = oid(DRIVER, 1)
    assert store.put_inline(a, 0, [b"pickle", b"buf"], [], DRIVER) == []
    (reply,) = store.get(READER, 9, [a])
    assert (reply.process, reply.req_id) == (READER, 9)
    ((got_id, entry),) = reply.entries
    assert got_id == a and entry.frames == [b"pickle", b"buf"] and entry.size == 9
    # Inline values live in messages, not shared memory.
    stats = store.stats()
    assert (stats["objects"], stats["used"], stats["capacity"]) == (1, 0, 1000)


def test_waiters_get_the_value_when_it_is_put(store):
    a, b = oid(DRIVER, 1), oid(DRIVER, 2)
    store.put_inline(b, 0, [b"bee"], [], DRIVER)
    (first,) = store.get(READER, 1, [a, b])  # b at once; a later
    assert [i for i, _ in first.entries] == [b]
    assert store.get(WORKER, 2, [a]) == []

    actions = store.put_inline(a, 0, [b"ay"], [], DRIVER)
    assert sorted((r.process, r.req_id) for r in replies(actions)) == [(READER, 1), (WORKER, 2)]
    assert all(r.entries[0][0] == a and r.entries[0][1].frames == [b"ay"] for r in replies(actions))


def test_a_second_put_of_the_same_object_changes_nothing(store):
    a = oid(DRIVER, 1)
    store.put_inline(a, 0, [b"first"], [], DRIVER)
    assert store.put_inline(a, 0, [b"second"], [], DRIVER) == []
    assert store.objects[a].frames == [b"first"]


def test_an_object_nobody_holds_or_waits_for_is_freed_at_once(store):
    a = oid(DRIVER, 1)
    store.put_inline(a, 0, [b"x"], [], None)
    assert a not in store.objects


def test_a_holder_that_is_already_dead_is_not_recorded(store, procs):
    procs.alive.discard(WORKER)
    a = oid(DRIVER, 1)
    store.put_inline(a, 0, [b"x"], [], WORKER)
    assert a not in store.objects


def test_get_of_an_object_whose_owner_died_reports_owner_died(store, procs):
    procs.alive.discard(WORKER)
    a = oid(WORKER, 1)
    ((_, lost),) = store.get(READER, 3, [a])[0].entries
    assert isinstance(lost, LostObject) and lost.kind == "owner_died"
    assert WORKER.hex() in lost.message and a.hex() in lost.message
    assert a not in store.objects  # nobody is left waiting for it


# -- reference counting ---------------------------------------------------------------------


def test_freed_when_the_last_holder_lets_go(store):
    a = oid(DRIVER, 1)
    path = put_segment(store, a, 100)
    store.update_refs(WORKER, add=[a], remove=[])
    assert store.update_refs(DRIVER, add=[], remove=[a]) == []
    assert a in store.objects and store.used == 100
    assert unlinked(store.update_refs(WORKER, add=[], remove=[a])) == [path]
    assert a not in store.objects and store.used == 0


def test_removing_a_ref_one_never_held_does_not_free_anothers_object(store):
    a = oid(DRIVER, 1)
    put_segment(store, a, 100)
    assert store.update_refs(READER, add=[], remove=[a]) == []
    assert a in store.objects


def test_freeing_a_container_frees_what_it_contains_in_cascade(store):
    inner, middle, outer = oid(WORKER, 1), oid(WORKER, 2), oid(DRIVER, 3)
    inner_path = put_segment(store, inner, 10, holder=WORKER)
    middle_path = put_segment(store, middle, 20, holder=WORKER, contained=[inner])
    outer_path = put_segment(store, outer, 30, holder=DRIVER, contained=[middle])
    # The worker lets go of what it made: containment keeps both alive.
    assert store.update_refs(WORKER, add=[], remove=[inner, middle]) == []
    assert store.objects[middle].containers == 1 and store.objects[inner].containers == 1

    actions = store.update_refs(DRIVER, add=[], remove=[outer])
    assert sorted(unlinked(actions)) == sorted([outer_path, middle_path, inner_path])
    assert store.objects == {} and store.used == 0


def test_a_contained_object_with_its_own_holder_survives_its_container(store):
    child, parent = oid(WORKER, 1), oid(DRIVER, 2)
    put_segment(store, child, 10, holder=WORKER)
    parent_path = put_segment(store, parent, 30, holder=DRIVER, contained=[child])
    assert unlinked(store.update_refs(DRIVER, add=[], remove=[parent])) == [parent_path]
    assert store.objects[child].containers == 0
    assert child in store.objects and store.used == 10


def test_an_object_contained_twice_needs_both_containers_gone(store):
    child, p1, p2 = oid(WORKER, 1), oid(DRIVER, 2), oid(DRIVER, 3)
    store.put_inline(child, 0, [b"c"], [], WORKER)
    store.put_inline(p1, 0, [b"p"], [child], DRIVER)
    store.put_inline(p2, 0, [b"p"], [child], DRIVER)
    store.update_refs(WORKER, add=[], remove=[child])
    store.update_refs(DRIVER, add=[], remove=[p1])
    assert child in store.objects
    store.update_refs(DRIVER, add=[], remove=[p2])
    assert store.objects == {}


def test_a_contained_ref_not_yet_stored_is_a_placeholder_that_goes_with_its_container(store):
    pending_child, parent = oid(WORKER, 1), oid(DRIVER, 2)
    store.put_inline(parent, 0, [b"p"], [pending_child], DRIVER)
    assert store.objects[pending_child].containers == 1
    assert not store.objects[pending_child].sealed
    store.update_refs(DRIVER, add=[], remove=[parent])
    assert store.objects == {}


# -- shared-memory objects and capacity -----------------------------------------------------


def test_reserve_counts_the_size_and_seal_answers_waiters(store):
    a = oid(DRIVER, 1)
    assert store.get(READER, 4, [a]) == []
    path, actions = store.reserve(a, 400)
    assert path == shm(a) and actions == []
    assert store.used == 400
    (reply,) = store.seal(a, 1, [], DRIVER)
    assert (reply.process, reply.req_id) == (READER, 4)
    entry = reply.entries[0][1]
    assert entry.path == path and entry.flags == 1 and entry.sealed


def test_store_full_names_the_sizes_and_reserves_nothing(store):
    put_segment(store, oid(DRIVER, 1), 900)
    with pytest.raises(StoreFull) as info:
        store.reserve(oid(DRIVER, 2), 101)
    assert "101 bytes" in str(info.value) and "900" in str(info.value)
    assert store.used == 900 and oid(DRIVER, 2) not in store.objects
    # Exactly the room that is left still fits.
    path, _ = store.reserve(oid(DRIVER, 3), 100)
    assert path == shm(oid(DRIVER, 3)) and store.used == 1000


def test_an_object_cannot_be_reserved_twice(store):
    a = oid(DRIVER, 1)
    store.reserve(a, 10)
    with pytest.raises(StoreFull, match="already exists"):
        store.reserve(a, 10)
    store.seal(a, 0, [], DRIVER)
    with pytest.raises(StoreFull, match="already exists"):
        store.reserve(a, 10)
    assert store.used == 10


def test_abort_gives_the_room_back_and_unlinks_the_file(store):
    a = oid(DRIVER, 1)
    path, _ = store.reserve(a, 300)
    assert unlinked(store.abort(a)) == [path]
    assert store.used == 0 and a not in store.objects
    assert store.seal(a, 0, [], DRIVER) == []  # a late seal of an aborted object is ignored
    assert store.abort(a) == []


def test_an_object_being_written_is_not_freed_when_refs_drop(store):
    a = oid(DRIVER, 1)
    store.reserve(a, 50)
    store.update_refs(DRIVER, add=[a], remove=[])
    assert store.update_refs(DRIVER, add=[], remove=[a]) == []
    assert a in store.objects and store.used == 50


# -- processes going away -------------------------------------------------------------------


def test_process_gone_drops_its_holds_and_its_waits(store, procs):
    held, waited = oid(DRIVER, 1), oid(DRIVER, 2)
    path = put_segment(store, held, 100, holder=WORKER)
    assert store.get(WORKER, 1, [waited]) == []
    procs.alive.discard(WORKER)
    actions = store.process_gone(WORKER)
    assert unlinked(actions) == [path] and replies(actions) == []
    assert store.objects == {} and store.used == 0


def test_waiters_on_a_dead_owners_object_learn_it_died(store, procs):
    a = oid(WORKER, 1)
    store.get(READER, 5, [a])
    store.get(DRIVER, 6, [a])
    procs.alive.discard(WORKER)
    actions = store.process_gone(WORKER)
    got = sorted((r.process, r.req_id, r.entries[0][1].kind) for r in replies(actions))
    assert got == [(DRIVER, 6, "owner_died"), (READER, 5, "owner_died")]
    assert a not in store.objects


def test_a_dead_owners_sealed_object_stays_while_others_hold_it(store, procs):
    a = oid(WORKER, 1)
    put_segment(store, a, 10, holder=WORKER)
    store.update_refs(READER, add=[a], remove=[])
    procs.alive.discard(WORKER)
    assert store.process_gone(WORKER) == []
    assert store.objects[a].holders == {READER}


def test_an_owner_dying_while_writing_releases_its_reservation(store, procs):
    a = oid(DRIVER, 1)
    path, _ = store.reserve(a, 600)
    procs.alive.discard(DRIVER)
    actions = store.process_gone(DRIVER)
    assert path in unlinked(actions)
    assert store.used == 0 and a not in store.objects
    store.reserve(oid(WORKER, 2), 600)  # the room is usable again


def test_a_writer_dying_mid_write_frees_the_room_and_a_retry_can_write_it(store, procs):
    a = oid(DRIVER, 1)  # a task return: owned by the driver, written by a worker
    path, _ = store.reserve(a, 300, writer=WORKER)
    store.get(DRIVER, 2, [a])
    procs.alive.discard(WORKER)
    actions = store.process_gone(WORKER)
    assert unlinked(actions) == [path] and replies(actions) == []  # the driver still waits
    assert store.used == 0
    retry_path, _ = store.reserve(a, 300, writer=READER)
    (reply,) = store.seal(a, 0, [], DRIVER)
    assert reply.process == DRIVER and reply.entries[0][1].path == retry_path


def test_waiters_learn_the_owner_died_while_writing(store, procs):
    a = oid(WORKER, 1)
    store.reserve(a, 100)
    store.get(READER, 8, [a])
    procs.alive.discard(WORKER)
    actions = store.process_gone(WORKER)
    assert [(r.process, r.req_id, r.entries[0][1].kind) for r in replies(actions)] == [
        (READER, 8, "owner_died")
    ]
    assert a not in store.objects


# -- spilling -------------------------------------------------------------------------------


class Disk:
    def __init__(self, free: int) -> None:
        self.free = free
        self.copies: list[tuple[str, str]] = []

    def spill(self, src: str, dst: str) -> str | None:
        self.copies.append((src, dst))
        return None


def spilling_store(procs: Processes, disk: Disk) -> ObjectStore:
    return ObjectStore(
        capacity=1000,
        segment_path=shm,
        is_alive=procs,
        spill=disk.spill,
        spill_path=on_disk,
        disk_free=lambda: disk.free,
    )


def test_least_recently_used_objects_spill_first_past_the_threshold(procs):
    disk = Disk(free=10_000)
    store = spilling_store(procs, disk)
    older, newer = oid(DRIVER, 1), oid(DRIVER, 2)
    older_path = put_segment(store, older, 300)
    put_segment(store, newer, 300)
    store.get(READER, 1, [older])  # reading makes `older` the most recently used

    path, actions = store.reserve(oid(DRIVER, 3), 300)
    newer_shm = shm(newer)
    assert disk.copies == [(newer_shm, on_disk(newer))]
    assert unlinked(actions) == [newer_shm]
    assert path == shm(oid(DRIVER, 3))
    assert store.objects[newer].path == on_disk(newer)
    assert store.objects[older].path == older_path
    assert store.stats()["used"] == 600 and store.stats()["spilled"] == 300

    # Freeing a spilled object removes its file on disk and its count.
    assert unlinked(store.update_refs(DRIVER, add=[], remove=[newer])) == [on_disk(newer)]
    assert store.spilled_bytes == 0


def test_an_object_too_big_for_shared_memory_goes_straight_to_disk(procs):
    store = spilling_store(procs, Disk(free=10_000))
    big = oid(DRIVER, 1)
    path, _ = store.reserve(big, 5000)
    assert path == on_disk(big) and store.used == 0 and store.spilled_bytes == 5000
    assert unlinked(store.abort(big)) == [on_disk(big)]
    assert store.spilled_bytes == 0


def test_a_failed_reserve_still_unlinks_what_it_spilled(procs):
    disk = Disk(free=400)
    store = spilling_store(procs, disk)
    a = oid(DRIVER, 1)
    a_shm = put_segment(store, a, 300)
    with pytest.raises(StoreFull) as info:
        store.reserve(oid(DRIVER, 2), 1100)  # bigger than memory and than the disk
    # What was spilled on the way is reported with the exception, so its shared-memory
    # copy is still unlinked.
    assert disk.copies == [(a_shm, on_disk(a))]
    assert unlinked(info.value.actions) == [a_shm]
    assert store.used == 0
    assert unlinked(store.update_refs(DRIVER, add=[], remove=[a])) == [on_disk(a)]
