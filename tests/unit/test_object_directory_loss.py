"""The object directory (an ObjectStore that records which nodes hold each object) when a
node dies: objects left without a copy are rebuilt by their owner when read, readers wait
meanwhile, and get the owner's reason, or OwnerDiedError, when that cannot be done."""

from __future__ import annotations

import pytest
from shoal._ids import return_id
from shoal._object_store import FreeCopies, LostObject, ObjectStore, RebuildObject, ReplyObjects

pytestmark = pytest.mark.timeout(10)

OWNER = b"owner-01"
READER = b"reader-1"
NODE_A, NODE_B, NODE_C = b"A" * 16, b"B" * 16, b"C" * 16


def task_result(owner: bytes, n: int) -> bytes:
    return return_id(owner + n.to_bytes(8, "big"), 1)


def put_id(owner: bytes, n: int) -> bytes:
    return return_id(owner + n.to_bytes(8, "big"), 0)


class Alive:
    def __init__(self, *alive: bytes) -> None:
        self.alive = set(alive)

    def __call__(self, wid: bytes) -> bool:
        return wid in self.alive


@pytest.fixture
def alive() -> Alive:
    return Alive(OWNER, READER)


@pytest.fixture
def directory(alive: Alive) -> ObjectStore:
    store = ObjectStore(1 << 62, lambda oid: "", alive)
    store.recycle = False
    return store


def answers(actions) -> list[tuple[bytes, int, object]]:
    return [
        (a.process, a.req_id, entry)
        for a in actions
        if isinstance(a, ReplyObjects)
        for _, entry in a.entries
    ]


def rebuilds(actions) -> list[RebuildObject]:
    return [a for a in actions if isinstance(a, RebuildObject)]


def test_a_node_death_reports_the_objects_that_lost_their_last_copy(directory):
    only_a, also_b = task_result(OWNER, 1), task_result(OWNER, 2)
    directory.seal_at(only_a, NODE_A, 100, 0, [], OWNER)
    directory.seal_at(also_b, NODE_A, 100, 0, [], OWNER)
    directory.add_copy(also_b, NODE_B)
    assert directory.node_gone(NODE_A) == [only_a]
    assert directory.objects[also_b].nodes == {NODE_B}
    assert directory.node_gone(NODE_A) == []  # told twice: nothing more is lost


def test_a_lost_object_is_rebuilt_by_its_owner_while_readers_wait(directory):
    inner = put_id(OWNER, 9)
    directory.put_inline(inner, 0, [b"x"], [], OWNER)
    lost = task_result(OWNER, 1)
    directory.seal_at(lost, NODE_A, 100, 0, [inner], OWNER)
    directory.node_gone(NODE_A)

    first = directory.get(NODE_B, 0, [lost])
    assert [(r.owner, r.oid) for r in rebuilds(first)] == [(OWNER, lost)]
    assert answers(first) == []  # it waits
    # A second reader waits for the same rebuild: the owner is asked once.
    assert directory.get(NODE_C, 0, [lost]) == []
    # Made again on node C: both readers learn where it is.
    done = directory.seal_at(lost, NODE_C, 100, 0, [inner], OWNER)
    got = answers(done)
    assert sorted(process for process, _, _ in got) == [NODE_B, NODE_C]
    assert all(entry.nodes == {NODE_C} for _, _, entry in got)
    # The refs inside are counted once, not once per making.
    assert directory.objects[inner].containers == 1
    # Later reads are answered at once.
    assert answers(directory.get(NODE_B, 0, [lost]))[0][2].nodes == {NODE_C}


def test_a_rebuild_the_owner_cannot_do_fails_its_readers_and_later_ones(directory):
    lost = task_result(OWNER, 1)
    directory.seal_at(lost, NODE_A, 100, 0, [], OWNER)
    directory.node_gone(NODE_A)
    directory.get(NODE_B, 3, [lost])
    failed = directory.rebuild_failed(lost, "its lineage was dropped")
    ((process, req, entry),) = answers(failed)
    assert (process, req) == (NODE_B, 3)
    assert isinstance(entry, LostObject) and entry.kind == "lost"
    assert entry.message == "its lineage was dropped"
    ((_, _, again),) = answers(directory.get(NODE_C, 0, [lost]))
    assert again.kind == "lost" and rebuilds(directory.get(NODE_C, 0, [lost])) == []


def test_a_rebuilt_task_that_fails_answers_with_its_error_inline(directory):
    lost = task_result(OWNER, 1)
    directory.seal_at(lost, NODE_A, 100, 0, [], OWNER)
    directory.node_gone(NODE_A)
    directory.get(NODE_B, 0, [lost])
    # The owner puts the error (a small value) in the directory itself.
    ((_, _, entry),) = answers(directory.put_inline(lost, 1, [b"error"], [], OWNER))
    assert entry.frames == [b"error"] and entry.flags == 1 and entry.nodes is None


def test_a_lost_object_whose_owner_died_is_owner_died_for_its_readers(directory, alive):
    put = put_id(OWNER, 1)
    directory.seal_at(put, NODE_A, 100, 0, [], OWNER)
    directory.update_refs(READER, [put], [])
    alive.alive.discard(OWNER)
    directory.process_gone(OWNER)
    directory.node_gone(NODE_A)
    actions = directory.get(NODE_B, 0, [put])
    assert rebuilds(actions) == []
    ((_, _, entry),) = answers(actions)
    assert entry.kind == "owner_died" and "made with put() by" in entry.message


def test_an_owner_dying_during_a_rebuild_fails_the_readers_that_wait(directory, alive):
    lost = task_result(OWNER, 1)
    directory.seal_at(lost, NODE_A, 100, 0, [], OWNER)
    directory.update_refs(READER, [lost], [])
    directory.node_gone(NODE_A)
    directory.get(NODE_B, 0, [lost])
    alive.alive.discard(OWNER)
    ((process, _, entry),) = answers(directory.process_gone(OWNER))
    assert process == NODE_B and entry.kind == "owner_died"


def test_a_copy_reported_by_a_node_of_an_object_being_rebuilt_is_dropped(directory):
    lost = task_result(OWNER, 1)
    directory.seal_at(lost, NODE_A, 100, 0, [], OWNER)
    directory.node_gone(NODE_A)
    directory.get(NODE_B, 0, [lost])
    # Nobody can copy what no node holds; a stray report is answered with a free.
    assert directory.add_copy(lost, NODE_C) == [FreeCopies(lost, [NODE_C])]
