"""The control store's bounded log of tasks, merged from the processes' task events.

    TASK_EVENTS from owners and executors (_task_events.py) --> TaskLog.apply
        one TaskRecord per task id: name, state, attempt, times, where it ran, the error
    TaskLog.records --> the state API (list_tasks, get_task, summarize_tasks, snapshots)

Events of one task come from two processes that flush independently, so they arrive in
any order. Invariant: a record's (attempt, state) only moves forward: an event of an
older attempt, or of an earlier state of the same attempt, fills in missing fields (the
submit time, the owner) but never moves the state back.

The log holds at most ``capacity`` records. When full, the task that finished first is
dropped; only when no task has finished is the oldest task dropped (it is counted as
``evicted_unfinished``). Ids of dropped tasks are remembered (tombstones, up to four per
record kept), so that a late event cannot bring back a ghost record, and so that a task
dropped before it ended still has its end counted. ``counts`` (per name and state) thus
cover every task seen: the summary counts them all, the list shows those kept.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ._ids import owner_of
from ._task_events import FAILED, STATE_NAMES, TERMINAL

DEFAULT_CAPACITY = int(os.environ.get("SHOAL_TASK_LOG_SIZE", 10_000))
RECENT_FAILURES = 100
# Dropped task ids remembered, per record the log keeps.
TOMBSTONES_PER_RECORD = 4


class TaskRecord:
    __slots__ = (
        "actor_id",
        "attempt",
        "error",
        "finished",
        "job",
        "name",
        "node",
        "parent",
        "pid",
        "started",
        "state",
        "submitted",
        "task_id",
        "worker",
    )

    def __init__(self, task_id: bytes, name: str, job: int, actor_id: bytes | None) -> None:
        self.task_id = task_id
        self.name = name
        self.job = job
        self.actor_id = actor_id
        self.state = -1  # no state yet: set by the event that made the record
        self.attempt = 0
        self.parent: bytes | None = None
        self.node = b""
        self.worker = b""
        self.pid = 0
        self.submitted: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.error: Sequence[str] | None = None  # (type, message, traceback)

    def as_dict(self, detail: bool = True) -> dict[str, Any]:
        error = self.error or ("", "", "")
        out = {
            "task_id": self.task_id.hex(),
            "name": self.name,
            "state": STATE_NAMES[self.state],
            "type": "ACTOR_TASK" if self.actor_id else "NORMAL_TASK",
            "attempt": self.attempt,
            "job_id": f"{self.job:08x}",
            "actor_id": self.actor_id.hex() if self.actor_id else None,
            "parent_task_id": self.parent.hex() if self.parent else None,
            "owner_id": owner_of(self.task_id).hex(),
            "node_id": self.node.hex() or None,
            "worker_id": self.worker.hex() or None,
            "pid": self.pid or None,
            "submitted_at": self.submitted,
            "started_at": self.started,
            "finished_at": self.finished,
            "duration": (
                self.finished - self.started
                if self.finished is not None and self.started is not None
                else None
            ),
            "error_type": error[0] or None,
            "error_message": error[1] or None,
        }
        if detail:
            out["traceback"] = error[2] or None
        return out


class TaskLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"the task log needs room for at least one task, got {capacity}")
        self.capacity = capacity
        self.records: dict[bytes, TaskRecord] = {}  # in the order tasks were first seen
        # Ids of tasks in the order they ended: the first to go when the log is full. A
        # deque read lazily (an id whose record is gone or no longer ended is skipped):
        # cheaper per task than keeping an ordered set exact.
        self.ended: collections.deque[bytes] = collections.deque()
        # Ids of dropped tasks, so that a late event does not bring back a ghost record:
        # None, or (name, state, attempt) for a task dropped before it ended.
        self.tombstones: dict[bytes, tuple[str, int, int] | None] = {}
        self.tombstone_order: collections.deque[bytes] = collections.deque()
        self.counts: dict[str, list[int]] = {}  # name -> count per state
        self.failures: collections.deque[bytes] = collections.deque(maxlen=RECENT_FAILURES)
        self.evicted = 0  # records dropped to stay within capacity
        self.evicted_unfinished = 0  # ... of which had not finished
        self.dropped_at_source = 0  # events processes could not keep (reported by them)
        self.events = 0  # events applied

    def apply(
        self, events: Sequence[Any], sender: bytes, node: bytes, pid: int, dropped: int = 0
    ) -> None:
        """Merge the events one process sent (``sender`` on ``node``, with ``pid``).

        Runs for about one event per task in the cluster: kept to plain attribute and dict
        operations (about 1.5 us an event)."""
        self.dropped_at_source += dropped
        self.events += len(events)
        records = self.records
        counts_by_name = self.counts
        for tid, state, t, executor, info, error in events:
            start, attempt, name, job, actor_id, sub, parent = info
            rec = records.get(tid)
            if rec is None:
                if tid in self.tombstones:
                    self._late(tid, state, attempt)
                    continue
                rec = records[tid] = TaskRecord(tid, name, job, actor_id)
                if len(records) > self.capacity:
                    self._evict()
            elif attempt < rec.attempt or (attempt == rec.attempt and state <= rec.state):
                # Not newer than what the record says: it may still fill in a gap (the
                # owner's word on how a task ended may come before its executor's).
                if sub is not None and rec.submitted is None:
                    rec.submitted = sub
                if parent is not None:
                    rec.parent = parent
                if executor and attempt == rec.attempt:
                    if not rec.worker:
                        rec.node, rec.worker, rec.pid, rec.started = node, sender, pid, start
                    if error is not None and rec.error is None:
                        rec.error = error
                continue
            if executor:
                rec.node, rec.worker, rec.pid, rec.started = node, sender, pid, start
            if sub is not None and rec.submitted is None:
                rec.submitted = sub
            if parent is not None:
                rec.parent = parent
            old = rec.state
            rec.state, rec.attempt = state, attempt
            counts = counts_by_name.get(rec.name)
            if counts is None:
                counts = counts_by_name[rec.name] = [0] * len(STATE_NAMES)
            if old >= 0:
                counts[old] -= 1
            counts[state] += 1
            if state >= TERMINAL:
                rec.finished = t
                rec.error = error
                self.ended.append(tid)
                if state == FAILED:
                    self.failures.append(tid)
            elif old >= TERMINAL:  # retried after it ended
                rec.finished = None
                rec.error = None

    def _evict(self) -> None:
        records, ended = self.records, self.ended
        while ended:
            tid = ended.popleft()
            rec = records.get(tid)
            if rec is not None and rec.state >= TERMINAL:
                del records[tid]
                self._bury(tid, None)  # nothing more to count
                return
        # Nothing has ended: the oldest task goes (rare; the dict scan is fine then). Its
        # counts stay: its tombstone keeps what it was, so that its end is counted.
        tid = next(iter(records))
        rec = records.pop(tid)
        self.evicted_unfinished += 1
        self._bury(tid, (rec.name, rec.state, rec.attempt))

    def _bury(self, tid: bytes, seen: tuple[str, int, int] | None) -> None:
        self.evicted += 1
        self.tombstones[tid] = seen
        order = self.tombstone_order
        order.append(tid)
        if len(order) > TOMBSTONES_PER_RECORD * self.capacity:
            self.tombstones.pop(order.popleft(), None)

    def _late(self, tid: bytes, state: int, attempt: int) -> None:
        """An event for a task no longer in the log: only its counts move."""
        seen = self.tombstones[tid]
        if seen is None:
            return
        name, old, old_attempt = seen
        if attempt < old_attempt or (attempt == old_attempt and state <= old):
            return
        counts = self.counts[name]
        counts[old] -= 1
        counts[state] += 1
        self.tombstones[tid] = (name, state, attempt)

    # -- reading -------------------------------------------------------------------------
    def newest_first(self) -> Iterator[TaskRecord]:
        return reversed(self.records.values())

    def find(self, task_id: str) -> TaskRecord | list[TaskRecord] | None:
        """The record whose hex id is ``task_id`` or starts with it; a list when several do."""
        try:
            exact = self.records.get(bytes.fromhex(task_id))
        except ValueError:
            exact = None
        if exact is not None:
            return exact
        task_id = task_id.lower()
        found = [r for r in self.records.values() if r.task_id.hex().startswith(task_id)]
        if len(found) == 1:
            return found[0]
        return found or None

    def recent_failures(self, limit: int) -> list[TaskRecord]:
        out = []
        for tid in reversed(self.failures):
            rec = self.records.get(tid)
            if rec is not None and rec.state == FAILED and rec not in out:
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def summary(self) -> dict[str, Any]:
        by_name = {
            name: {STATE_NAMES[i]: n for i, n in enumerate(counts) if n}
            for name, counts in self.counts.items()
            if any(counts)
        }
        by_state: dict[str, int] = {}
        for counts in by_name.values():
            for state, n in counts.items():
                by_state[state] = by_state.get(state, 0) + n
        return {
            "by_name": by_name,
            "by_state": by_state,
            "total": sum(by_state.values()),
            "kept": len(self.records),
            "capacity": self.capacity,
            "evicted": self.evicted,
            "evicted_unfinished": self.evicted_unfinished,
            "dropped_events": self.dropped_at_source,
            "events": self.events,
        }
