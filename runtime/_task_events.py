"""Task state changes recorded in each process and sent to the control store in batches.

    owner (submitter)                          executor (the worker that runs the task)
    -----------------                          ----------------------------------------
    submit -> ``pending`` (no event yet)       start -> ``running`` (no event yet)
    done   -> into ``recent`` (no event yet)   end   -> FINISHED / FAILED / CANCELLED, with
              or, if it was reported waiting,           the submit and start times, the error
              FINISHED / FAILED
    failed here (worker died, cancelled,
      actor died, unschedulable, an argument
      failed) -> FAILED / CANCELLED event
    flush  -> PENDING_ARGS / SUBMITTED for     flush -> RUNNING for tasks still running
              tasks still pending (once)
    close  -> FINISHED / FAILED for ``recent``

    every ~0.5 s (the core's 0.1 s sweep), or sooner past FLUSH_BATCH events:
        one TASK_EVENTS message to the control store, which merges them (_task_log.py)

Recording is a tuple put in a deque or a dict: no lock, no message, no thread woken. A
task that is submitted, runs and ends between two flushes costs a single event (its
executor's): the owner passes the submit time (and the parent task) along with the push,
and keeps the task for a second once it is done (``recent``). Only tasks that wait or run
across a flush, and failures the owner makes itself, cost more. This keeps the control
store's share of a task to one event; measured in docs/architecture.md ("Task events").

An executor killed with SIGKILL (its owner exited, its actor was killed) loses what it
had not flushed. The owner makes up for most of it: how a task it had reported as waiting
ended, and, when the owner itself closes, how the tasks it got back in its last second
ended (``recent``); a duplicate of what the executor said changes nothing.

An event is a tuple ``(task id, state, time, executor, info, error)``, where ``info`` is
``(started, attempt, name, job, actor id, submitted, parent)`` (the tuple an executor keeps
while the task runs, sent as it is) and ``error`` None or [error type, message,
traceback]. ``executor`` says whether the sender ran the task (its node, worker and pid
then belong to the record). The owner is the first 8 bytes of the task id. Tuples, not
dicts, and as few as possible: each costs an allocation (and brings the next garbage
collection closer).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack

# States, in the order a task goes through them within one attempt: an event only moves a
# record forward (a later attempt always does). Values travel as these small ints.
PENDING_ARGS = 0
SUBMITTED = 1
RUNNING = 2
FINISHED = 3
FAILED = 4
CANCELLED = 5
STATE_NAMES = ("PENDING_ARGS", "SUBMITTED", "RUNNING", "FINISHED", "FAILED", "CANCELLED")
TERMINAL = FINISHED  # states >= this are final

# Whether processes record task events at all (SHOAL_TASK_EVENTS=0 turns it off).
ENABLED = os.environ.get("SHOAL_TASK_EVENTS", "1") not in ("0", "false", "no")
# How often events are sent; and how many make a flush due at once.
FLUSH_SECONDS = float(os.environ.get("SHOAL_TASK_EVENTS_FLUSH_SECONDS", 0.5))
FLUSH_BATCH = 5000
# Events kept while they cannot be sent; beyond, new ones are counted as dropped (the
# count goes with the next flush).
MAX_BUFFERED = 100_000
# Error texts are cut to this many characters: a record must stay small.
MAX_ERROR_TEXT = 8192

Event = tuple[Any, ...]


def error_fields(type_name: str, message: str, traceback_text: str = "") -> list[str]:
    return [type_name, message[:MAX_ERROR_TEXT], traceback_text[-MAX_ERROR_TEXT:]]


class TaskEventBuffer:
    """The events of one process since its last flush.

    Invariant: owner-side calls (``submitted``, ``done``, ``failed_here``) and ``take`` are
    IO loop work (the loop thread, or a thread holding the loop), so they never interleave.
    Executor-side calls come from any thread running a task; they only use single dict
    and deque operations, which are atomic."""

    __slots__ = (
        "dropped",
        "enabled",
        "events",
        "last_flush",
        "pending",
        "recent",
        "reported",
        "running",
    )

    def __init__(self, enabled: bool = ENABLED) -> None:
        self.enabled = enabled
        self.events: collections.deque[Event] = collections.deque()
        # Owner: tasks submitted since the last flush and not done yet: task id ->
        # (state, info, reported before); once reported, in ``reported`` until done (a
        # task is in one of the two). Done tasks for a second or so, oldest first, as
        # events whose error is still to be made: (task id, state, time, False, info,
        # error maker).
        self.pending: dict[bytes, tuple[Any, ...]] = {}
        self.reported: dict[bytes, tuple[Any, ...]] = {}
        self.recent: collections.deque[Event] = collections.deque()
        # Executor: tasks running here: task id -> (started, attempt, name, job, actor id,
        # submitted, parent).
        self.running: dict[bytes, tuple[Any, ...]] = {}
        self.dropped = 0
        self.last_flush = time.monotonic()

    def _add(self, event: Event) -> None:
        if len(self.events) >= MAX_BUFFERED:
            self.dropped += 1
            return
        self.events.append(event)

    # -- the owner's side ----------------------------------------------------------------
    def submitted(
        self,
        task_id: bytes,
        state: int,
        submitted: float,
        attempt: int,
        name: str,
        job: int,
        actor_id: bytes | None,
        parent: bytes | None,
    ) -> None:
        """The task waits for its arguments, or was submitted (again, on a retry)."""
        if self.enabled:
            # Reported before (waiting for arguments, or an earlier attempt): once done,
            # its owner says how it ended.
            reported = self.reported.pop(task_id, None) is not None if self.reported else False
            info = (None, attempt, name, job, actor_id, submitted, parent)
            self.pending[task_id] = (state, info, reported)

    def done(self, task_id: bytes, error: Callable[[], list[str]] | None = None) -> None:
        """The owner has the task's result; its executor reports how it went. ``error``:
        for a failed task, what makes its error fields (only called if they are sent)."""
        entry = self.pending.pop(task_id, None)
        if entry is not None:
            reported = entry[2]
        elif self.reported:  # it waited or ran across a flush
            entry = self.reported.pop(task_id, None)
            if entry is None:
                return
            reported = True
        else:
            return
        state = FINISHED if error is None else FAILED
        if reported:
            # Reported as waiting: say how it ended, in case its executor cannot.
            fields = None if error is None else error()
            self._add((task_id, state, time.time(), False, entry[1], fields))
        else:
            self.recent.append((task_id, state, time.time(), False, entry[1], error))

    def failed_here(
        self,
        task_id: bytes,
        attempt: int,
        name: str,
        job: int,
        actor_id: bytes | None,
        error_type: str,
        message: str,
        cancelled: bool = False,
    ) -> None:
        """The owner ended the task with an error of its own making (the worker died, the
        task was cancelled before it ran, the actor died, it cannot be scheduled, an
        argument failed)."""
        if not self.enabled:
            return
        entry = self.pending.pop(task_id, None)
        if self.reported:
            entry = self.reported.pop(task_id, None) or entry
        submitted, parent = (entry[1][5], entry[1][6]) if entry is not None else (None, None)
        info = (None, attempt, name, job, actor_id, submitted, parent)
        state = CANCELLED if cancelled else FAILED
        self._add((task_id, state, time.time(), False, info, error_fields(error_type, message)))

    # -- the executor's side -------------------------------------------------------------
    def started(
        self,
        task_id: bytes,
        attempt: int,
        name: str,
        job: int,
        actor_id: bytes | None,
        submitted: float | None = None,
        parent: bytes | None = None,
    ) -> None:
        if self.enabled:
            self.running[task_id] = (time.time(), attempt, name, job, actor_id, submitted, parent)

    def ended(self, task_id: bytes, state: int, error: list[str] | None = None) -> None:
        info = self.running.pop(task_id, None)
        if info is not None:
            self._add((task_id, state, time.time(), True, info, error))

    # -- flushing (IO loop work) ---------------------------------------------------------
    def due(self, now: float) -> bool:
        if not (self.events or self.running or self.pending):
            return False
        return len(self.events) >= FLUSH_BATCH or now - self.last_flush >= FLUSH_SECONDS

    def take(self, final: bool = False) -> dict[str, Any] | None:
        """The next events to send ``{"e": events, "d": dropped}``, or None when there is
        nothing new (``encode`` makes the message's frame of them). ``final``: the process
        closes, so what it knows of recently done tasks goes too.
        Tasks still running are reported at every flush (the log takes a repeat as a
        no-op), which spares a flag per task; pending ones once per state."""
        self.last_flush = time.monotonic()
        events = self.events
        out = [events.popleft() for _ in range(len(events))]
        recent = self.recent
        if final:
            for task_id, state, t, executor, info, error in recent:
                fields = None if error is None else error()
                out.append((task_id, state, t, executor, info, fields))
            recent.clear()
        else:
            # Executors flush as often as this process: by now they have said how the
            # tasks done more than two flushes ago ended.
            horizon = time.time() - 2 * FLUSH_SECONDS
            while recent and recent[0][2] < horizon:
                recent.popleft()
        if self.pending:
            pending, self.pending = self.pending, {}
            for task_id, (state, info, _) in pending.items():
                out.append((task_id, state, info[5], False, info, None))
            self.reported.update(pending)
        for task_id, info in self.running.copy().items():
            out.append((task_id, RUNNING, info[0], True, info, None))
        dropped, self.dropped = self.dropped, 0
        if not out and not dropped:
            return None
        return {"e": out, "d": dropped}


def encode(events: list[Event]) -> bytes:
    """The events as one msgpack frame of a TASK_EVENTS message. Not in the message's
    header: the control store unpacks this frame into tuples, which cost less to make than
    the lists a header holds, and which the garbage collector soon stops tracking."""
    return msgpack.packb(events, use_bin_type=True)


def decode(frame: Any) -> list[Event]:
    return msgpack.unpackb(frame, raw=False, use_list=False)
