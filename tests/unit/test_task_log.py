"""The task log's merge rules and bounds, the event buffer, stack queries and filters,
driven directly (no processes): events in any order, retries, eviction, tombstones."""

from __future__ import annotations

import time

import pytest
from shoal import _task_events as te
from shoal._stacks import StackQueries
from shoal._state_views import as_text, check_filters
from shoal._task_log import TaskLog

pytestmark = pytest.mark.timeout(30)

OWNER = b"o" * 8
WORKER = b"w" * 8
NODE = b"n" * 16


def tid(n: int) -> bytes:
    return OWNER + n.to_bytes(8, "big")


def owner_event(task: bytes, state: int, t: float, attempt: int = 1, name: str = "f") -> tuple:
    return (task, state, t, False, (None, attempt, name, 1, None, t, None), None)


def executor_event(
    task: bytes,
    state: int,
    t: float,
    attempt: int = 1,
    name: str = "f",
    started: float = 0.0,
    error: list | None = None,
) -> tuple:
    return (task, state, t, True, (started, attempt, name, 1, None, None, None), error)


def apply(log: TaskLog, *events: tuple, executor: bool = True) -> None:
    log.apply(list(events), WORKER if executor else OWNER, NODE, 42)


def test_events_merge_in_any_order():
    log = TaskLog(10)
    # The executor's flush arrives before the owner's: the end comes first.
    apply(log, executor_event(tid(1), te.FINISHED, 12.0, started=11.0))
    apply(log, owner_event(tid(1), te.SUBMITTED, 10.0), executor=False)
    rec = log.records[tid(1)].as_dict()
    assert rec["state"] == "FINISHED"
    assert (rec["submitted_at"], rec["started_at"], rec["finished_at"]) == (10.0, 11.0, 12.0)
    assert rec["worker_id"] == WORKER.hex() and rec["pid"] == 42 and rec["node_id"] == NODE.hex()
    assert rec["owner_id"] == OWNER.hex()
    assert log.summary()["by_name"] == {"f": {"FINISHED": 1}}


def test_running_then_a_repeat_then_the_end():
    log = TaskLog(10)
    apply(log, executor_event(tid(1), te.RUNNING, 5.0, started=5.0))
    apply(log, executor_event(tid(1), te.RUNNING, 5.0, started=5.0))  # reported again
    assert log.summary()["by_state"] == {"RUNNING": 1}
    apply(log, executor_event(tid(1), te.FAILED, 6.0, started=5.0, error=["E", "boom", "tb"]))
    rec = log.records[tid(1)].as_dict()
    assert rec["state"] == "FAILED"
    assert (rec["error_type"], rec["error_message"], rec["traceback"]) == ("E", "boom", "tb")
    assert [r.task_id for r in log.recent_failures(5)] == [tid(1)]
    assert log.summary()["by_state"] == {"FAILED": 1}


def test_a_retry_moves_forward_and_an_old_attempt_cannot_move_it_back():
    log = TaskLog(10)
    apply(log, executor_event(tid(1), te.FAILED, 2.0, error=["E", "x", ""]))
    apply(log, owner_event(tid(1), te.SUBMITTED, 3.0, attempt=2), executor=False)
    rec = log.records[tid(1)].as_dict()
    assert (rec["state"], rec["attempt"], rec["error_type"], rec["finished_at"]) == (
        "SUBMITTED",
        2,
        None,
        None,
    )
    apply(log, executor_event(tid(1), te.FINISHED, 2.5, attempt=1))  # stale: attempt 1
    assert log.records[tid(1)].as_dict()["state"] == "SUBMITTED"
    apply(log, executor_event(tid(1), te.FINISHED, 4.0, attempt=2))
    assert log.records[tid(1)].as_dict()["state"] == "FINISHED"
    assert log.summary()["by_state"] == {"FINISHED": 1}


def test_the_log_drops_finished_tasks_first_and_counts_everything():
    log = TaskLog(3)
    apply(log, owner_event(tid(0), te.SUBMITTED, 0.0), executor=False)  # never ends here
    for n in range(1, 6):
        apply(log, executor_event(tid(n), te.FINISHED, float(n)))
    assert tid(0) in log.records  # unfinished, kept
    assert set(log.records) == {tid(0), tid(4), tid(5)}
    summary = log.summary()
    assert summary["by_state"] == {"SUBMITTED": 1, "FINISHED": 5}
    assert (summary["kept"], summary["evicted"], summary["evicted_unfinished"]) == (3, 3, 0)
    # A late event for a dropped task brings back no ghost and counts nothing twice.
    apply(log, owner_event(tid(1), te.SUBMITTED, 1.0), executor=False)
    assert tid(1) not in log.records
    assert log.summary()["by_state"] == {"SUBMITTED": 1, "FINISHED": 5}


def test_an_unfinished_task_dropped_from_a_full_log_still_has_its_end_counted():
    log = TaskLog(2)
    for n in range(3):
        apply(log, owner_event(tid(n), te.SUBMITTED, float(n)), executor=False)
    assert tid(0) not in log.records
    assert log.summary()["evicted_unfinished"] == 1
    apply(log, executor_event(tid(0), te.FINISHED, 9.0))
    assert tid(0) not in log.records
    assert log.summary()["by_state"] == {"SUBMITTED": 2, "FINISHED": 1}


def test_find_by_prefix():
    log = TaskLog(10)
    apply(log, executor_event(tid(1), te.FINISHED, 1.0), executor_event(tid(32), te.FINISHED, 2.0))
    assert log.find(tid(1).hex()).task_id == tid(1)
    assert log.find(tid(32).hex()[:-1]).task_id == tid(32)
    assert isinstance(log.find(OWNER.hex()), list)  # ambiguous: both start so
    assert log.find("ffff") is None
    with pytest.raises(ValueError):
        TaskLog(0)


class Spec:
    """What the buffer reads of a TaskSpec."""

    def __init__(self, n: int, name: str = "f", attempts: int = 0, parent: bytes | None = None):
        self.task_id = tid(n)
        self.name = name
        self.job = 1
        self.actor_id = None
        self.submitted_at = float(n)
        self.parent = parent
        self.attempts = attempts


def test_the_buffer_sends_a_fast_task_once_and_a_waiting_one_once_per_state():
    buf = te.TaskEventBuffer(enabled=True)
    pending: list[tuple[Spec, int, int]] = []
    buf.pending_source = lambda before: [p for p in pending if p[0].submitted_at <= before]
    # Owner: submitted and done before a flush: nothing to say (the executor says it).
    buf.done(Spec(1))
    # Owner: waiting across two flushes: reported, once per state.
    waiting = Spec(2, "g", parent=b"p" * 16)
    waiting.submitted_at = time.time()
    waiting.actor_id = b"a" * 16  # an actor call: its owner says how it ended
    pending.append((waiting, te.PENDING_ARGS, 1))
    assert buf.take() is None  # waiting since this flush only: not yet
    # Executor: one task ended, one still running.
    buf.started(tid(3), 1, "h", 1, None, 0.5, None)
    buf.ended(tid(3), te.FINISHED)
    buf.started(tid(4), 1, "k", 1, None, 0.7, None)
    by_task = {e[0]: e for e in buf.take()["e"]}
    assert set(by_task) == {tid(2), tid(3), tid(4)}
    assert by_task[tid(2)][1] == te.PENDING_ARGS and by_task[tid(2)][4][6] == b"p" * 16
    assert by_task[tid(3)][1] == te.FINISHED and by_task[tid(3)][4][5] == 0.5
    assert by_task[tid(4)][1] == te.RUNNING
    # Next flush: the waiting task is not repeated (the running one is) until it moves on.
    assert [e[0] for e in buf.take()["e"]] == [tid(4)]
    pending[0] = (waiting, te.SUBMITTED, 1)
    assert [e[:2] for e in buf.take()["e"]] == [(tid(2), te.SUBMITTED), (tid(4), te.RUNNING)]
    # The owner says how a task it reported as waiting ended (its executor may not).
    pending.clear()
    buf.done(waiting, lambda: ["KeyError", "k", "tb"])
    assert not buf.reported
    buf.failed_here(Spec(5, "m"), 1, "WorkerCrashedError", "died")
    by_task = {e[0]: e for e in buf.take()["e"]}
    assert by_task[tid(2)][1] == te.FAILED and by_task[tid(2)][3] is False
    assert by_task[tid(2)][5] == ["KeyError", "k", "tb"]
    assert by_task[tid(5)][1] == te.FAILED and by_task[tid(5)][5][0] == "WorkerCrashedError"
    # When the process closes, the tasks it got back lately go too.
    assert tid(1) not in by_task
    final = [(e[0], e[1]) for e in buf.take(final=True)["e"]]
    assert (tid(1), te.FINISHED) in final and (tid(4), te.RUNNING) in final
    assert buf.recent == [[], []]


def test_the_owners_word_and_the_executors_merge_either_way():
    log = TaskLog(10)
    owner_says = (tid(1), te.FAILED, 3.0, False, (None, 1, "f", 1, None, 1.0, None), None)
    apply(log, owner_says, executor=False)
    apply(log, executor_event(tid(1), te.FAILED, 2.9, started=2.0, error=["E", "m", "tb"]))
    rec = log.records[tid(1)].as_dict()
    assert (rec["state"], rec["error_type"], rec["worker_id"], rec["started_at"]) == (
        "FAILED",
        "E",
        WORKER.hex(),
        2.0,
    )
    assert log.summary()["by_state"] == {"FAILED": 1}


def test_the_buffer_counts_what_it_cannot_keep(monkeypatch):
    monkeypatch.setattr(te, "MAX_BUFFERED", 2)
    buf = te.TaskEventBuffer(enabled=True)
    for n in range(5):
        buf.started(tid(n), 1, "f", 1, None)
        buf.ended(tid(n), te.FINISHED)
    body = buf.take()
    assert len(body["e"]) == 2 and body["d"] == 3
    assert te.TaskEventBuffer(enabled=False).take() is None


def test_stack_queries_answer_when_all_replied_or_at_the_deadline():
    queries = StackQueries()
    a, b = b"a" * 8, b"b" * 8
    qid, now = queries.start(b"req", 7, {a: {"what": "A"}, b: {"what": "B"}})
    assert now == []
    assert queries.answer(qid, a, "stack of a") == []
    assert queries.answer(qid, b"stranger", "x") == []
    [(requester, reply)] = queries.answer(qid, b, "stack of b")
    assert requester == b"req" and reply["r"] == 7
    assert sorted(s["text"] for s in reply["stacks"]) == ["stack of a", "stack of b"]
    qid, _ = queries.start(b"req", 8, {a: {"what": "A"}})
    [(_, reply)] = queries.expire(now=float("inf"))
    assert reply["stacks"] == [] and reply["missing"][0]["what"] == "A"
    _, [(_, reply)] = queries.start(b"req", 9, {})  # nobody to ask: answered at once
    assert reply == {"r": 9, "stacks": [], "missing": []}


def test_filters_are_checked_and_compared_as_text():
    assert check_filters("tasks", [("state", "=", "running")]) == [("state", "=", "RUNNING")]
    assert check_filters("nodes", [("alive", "!=", True)]) == [("alive", "!=", "true")]
    with pytest.raises(ValueError, match="unknown filter key 'colour' for tasks"):
        check_filters("tasks", [("colour", "=", "red")])
    with pytest.raises(ValueError, match="unknown filter operator '>'"):
        check_filters("tasks", [("state", ">", "RUNNING")])
    with pytest.raises(ValueError, match="a filter is"):
        check_filters("tasks", ["state=RUNNING"])
    with pytest.raises(ValueError, match="unknown kind"):
        check_filters("gizmos", [])
    assert as_text(3.0) == "3" and as_text(None) == "none" and as_text(["a", "b"]) == "a,b"
