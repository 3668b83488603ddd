"""An owner's lineage bookkeeping (_lineage.Lineage): what is kept, for how long, and what
is dropped first when it grows past its bound."""

from __future__ import annotations

import pytest
from shoal._ids import return_id
from shoal._lineage import Lineage

pytestmark = pytest.mark.timeout(10)

OWNER = b"owner-01"


def tid(n: int) -> bytes:
    return OWNER + n.to_bytes(8, "big")


def ret(n: int, index: int = 1) -> bytes:
    return return_id(tid(n), index)


def keep(lineage: Lineage, n: int, live: int = 1, deps=(), size: int = 100) -> bool:
    return lineage.record(tid(n), f"spec {n}", [], [], size, live, [tid(d) for d in deps])


def test_a_task_nobody_holds_a_result_of_is_not_kept():
    lineage = Lineage(1 << 20)
    assert keep(lineage, 1, live=0) is False
    assert lineage.entries == {} and lineage.bytes == 0


def test_kept_while_a_return_is_held_then_dropped():
    lineage = Lineage(1 << 20)
    assert keep(lineage, 1, live=2)  # both returns of a two-return task are held
    lineage.release(ret(1, 1))
    assert lineage.get(tid(1)) is not None
    lineage.acquire(ret(1, 1))  # taken again (a rebuild passes it as an argument)
    lineage.release(ret(1, 2))
    lineage.release(ret(1, 1))
    assert lineage.get(tid(1)) is None and lineage.bytes == 0


def test_a_task_is_kept_while_a_kept_task_depends_on_it():
    lineage = Lineage(1 << 20)
    keep(lineage, 1)
    keep(lineage, 2, deps=[1, 1])  # an argument named twice counts once
    assert lineage.get(tid(1)).dependents == 1
    lineage.release(ret(1))  # the owner let go of 1's result: 2 may still need it rebuilt
    assert lineage.get(tid(1)) is not None
    lineage.release(ret(2))
    assert lineage.entries == {}  # 2 went, and with it the last reason to keep 1


def test_recording_the_same_task_again_keeps_the_first_entry():
    lineage = Lineage(1 << 20)
    keep(lineage, 1)
    first = lineage.get(tid(1))
    assert keep(lineage, 1) is False
    assert lineage.get(tid(1)) is first and lineage.bytes == 100


def test_the_oldest_entries_go_first_past_the_bound():
    lineage = Lineage(250)
    for n in range(1, 4):
        keep(lineage, n, size=100)
    assert list(lineage.entries) == [tid(2), tid(3)] and lineage.bytes == 200
    assert lineage.evicted == 1
    # An entry larger than the whole bound is not kept at all.
    assert keep(lineage, 4, size=300) is False
    assert lineage.bytes <= 250


def test_dropping_a_long_chain_does_not_recurse():
    lineage = Lineage(1 << 30)
    for n in range(1, 20001):
        keep(lineage, n, deps=[n - 1] if n > 1 else [])
        if n > 1:
            lineage.release(ret(n - 1))
    assert len(lineage.entries) == 20000
    lineage.release(ret(20000))
    assert lineage.entries == {} and lineage.bytes == 0
