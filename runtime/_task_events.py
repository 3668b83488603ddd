"""Task state changes recorded in each process and sent to the control store in batches.

    owner (submitter)                          executor (the worker that runs the task)
    -----------------                          ----------------------------------------
    submit: notes the time on the spec         start -> ``running`` (no event yet)
    done  -> FINISHED / FAILED for an actor    end   -> FINISHED / FAILED / CANCELLED, with
             call it reported waiting; else             the submit and start times, the error
             a tuple into ``recent``
    failed here (worker died, cancelled,
      actor died, unschedulable, an argument
      failed) -> FAILED / CANCELLED event
    flush -> PENDING_ARGS / SUBMITTED for      flush -> RUNNING for tasks still running
             what its tables hold unfinished
             since the last flush too (once
             per state and attempt)
    close -> FINISHED / FAILED for ``recent``

    every ~0.5 s (the core's 0.1 s sweep), or sooner past FLUSH_BATCH events:
        one TASK_EVENTS message to the control store, which merges them (_task_log.py)

A task that waits less than a flush interval or so costs a single event, its executor's:
the owner passes the submit time (and the parent task, the attempt) with the push,
records nothing when it submits, and at a flush reads what is still waiting or running
from the submitter's own tables (``pending_source``), reporting what was already there
at the flush before. So an owner's share of a short task is a timestamp and a list
append; recording on either side is a tuple put in a deque or a dict, with no lock, no
message, no thread woken. Only tasks that wait longer, and failures the owner makes
itself, cost more.

An executor killed with SIGKILL loses what it had not flushed. A closing owner returns
its idle leases first, so that the workers of its last tasks live on to flush; and it
says, when it closes, how the tasks it got back since the flush before last ended
(``recent``), and, whenever they end, how actor calls it had reported waiting ended (an
actor may be killed before it says so). A duplicate of what the executor said changes
nothing.

An event is a tuple ``(task id, state, time, executor, info, error)``, where ``info`` is
``(started, attempt, name, job, actor id, submitted, parent)`` (the tuple an executor keeps
while the task runs, sent as it is) and ``error`` None or [error type, message,
traceback]. ``executor`` says whether the sender ran the task (its node, worker and pid
then belong to the record). The owner is the first 8 bytes of the task id.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable
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

    Invariant: owner-side calls (``done``, ``failed_here``) and ``take`` are IO loop work
    (the loop thread, or a thread holding the loop), as is every change to the tables
    ``pending_source`` reads, so they never interleave. Executor-side calls come from any
    thread running a task; they use single dict and deque operations, which are atomic."""

    __slots__ = (
        "dropped",
        "enabled",
        "events",
        "last_flush",
        "pending_source",
        "recent",
        "recent_errors",
        "reported",
        "rotated_at",
        "running",
        "flushed_at",
    )

    def __init__(self, enabled: bool = ENABLED) -> None:
        self.enabled = enabled
        self.events: collections.deque[Event] = collections.deque()
        # Owner: what it submitted before a time and has not got back, as (spec, state,
        # attempt); a TaskSpec has task_id, name, job, actor_id, submitted_at and parent.
        self.pending_source: Callable[[float], Iterable[tuple[Any, int, int]]] | None = None
        # Owner: task id -> (state, attempt) last reported, for tasks not done yet.
        self.reported: dict[bytes, tuple[int, int]] = {}
        self.flushed_at = time.time()  # wall clock, as submit times are
        # Owner: tasks done since the last flush ([1]) and the one before ([0]), as
        # (task id, info), and the error makers of those that failed: what a closing
        # owner says about them.
        self.recent: list[list[tuple[Any, ...]]] = [[], []]
        self.recent_errors: list[dict[bytes, Callable[[], list[str]]]] = [{}, {}]
        self.rotated_at = time.monotonic()
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
    def done(self, spec: Any, error: Callable[[], list[str]] | None = None) -> None:
        """The owner has the task's result; its executor reports how it went. ``error``:
        for a failed task, what makes its error fields (called only if they are sent)."""
        if self.reported:
            seen = self.reported.pop(spec.task_id, None)
            if seen is not None and spec.actor_id is not None:
                # An actor call reported as waiting: say how it ended, since its actor
                # may be killed before it says so (a task's worker is not: see
                # return_idle_leases).
                state = FINISHED if error is None else FAILED
                fields = None if error is None else error()
                self._add((spec.task_id, state, time.time(), False, _info(spec, seen[1]), fields))
                return
        # A tuple of plain values rather than the spec: the collector soon stops tracking
        # it, where a second of specs held would make every collection walk them.
        self.recent[1].append(_info(spec, 0, spec.task_id))
        if error is not None:
            self.recent_errors[1][spec.task_id] = error

    def failed_here(
        self,
        spec: Any,
        attempt: int,
        error_type: str,
        message: str,
        cancelled: bool = False,
    ) -> None:
        """The owner ended the task with an error of its own making (the worker died, the
        task was cancelled before it ran, the actor died, it cannot be scheduled, an
        argument failed)."""
        if not self.enabled:
            return
        if self.reported:
            self.reported.pop(spec.task_id, None)
        state = CANCELLED if cancelled else FAILED
        error = error_fields(error_type, message)
        self._add((spec.task_id, state, time.time(), False, _info(spec, attempt), error))

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
            events = self.events  # _add, inlined: this runs once per task
            if len(events) < MAX_BUFFERED:
                events.append((task_id, state, time.time(), True, info, error))
            else:
                self.dropped += 1

    # -- flushing (IO loop work) ---------------------------------------------------------
    def due(self, now: float) -> bool:
        return len(self.events) >= FLUSH_BATCH or now - self.last_flush >= FLUSH_SECONDS

    def take(self, final: bool = False) -> dict[str, Any] | None:
        """The next events to send ``{"e": events, "d": dropped}``, or None when there is
        nothing new (``encode`` makes the message's frame of them). ``final``: the process
        closes, so what it knows of recently done tasks goes too."""
        now = self.last_flush = time.monotonic()
        events = self.events
        out = [events.popleft() for _ in range(len(events))]
        if self.pending_source is not None and self.enabled:
            # Only what was submitted before the last flush: a task that waits less than
            # a flush interval or two is never reported by its owner (its executor says
            # it all), which keeps a burst of short tasks at one event each.
            reported = self.reported
            for spec, state, attempt in self.pending_source(self.flushed_at):
                task_id = spec.task_id
                if reported.get(task_id) != (state, attempt):
                    reported[task_id] = (state, attempt)
                    info = _info(spec, attempt)
                    out.append((task_id, state, spec.submitted_at, False, info, None))
            self.flushed_at = time.time()
        for task_id, info in self.running.copy().items():
            out.append((task_id, RUNNING, info[0], True, info, None))
        if final:
            for generation, errors in zip(self.recent, self.recent_errors, strict=True):
                for task_id, info in generation:
                    error = errors.get(task_id)
                    state = FINISHED if error is None else FAILED
                    fields = None if error is None else error()
                    # When it ended is not known here: the record keeps no end time.
                    out.append((task_id, state, None, False, info, fields))
            self.recent = [[], []]
            self.recent_errors = [{}, {}]
        elif now - self.rotated_at >= FLUSH_SECONDS:
            # Executors flush as often as this process: by now they have said how the
            # tasks done before the flush before last ended.
            self.rotated_at = now
            self.recent = [self.recent[1], []]
            self.recent_errors = [self.recent_errors[1], {}]
        dropped, self.dropped = self.dropped, 0
        if not out and not dropped:
            return None
        return {"e": out, "d": dropped}


def _info(spec: Any, attempt: int, task_id: bytes | None = None) -> Any:
    """An owner's ``info`` for ``spec`` (attempt 0: the latest there was); with
    ``task_id``, the pair (task id, info)."""
    attempt = attempt or max(1, spec.attempts)
    submitted = spec.submitted_at or None
    info = (None, attempt, spec.name, spec.job, spec.actor_id, submitted, spec.parent)
    return info if task_id is None else (task_id, info)


def encode(events: list[Event]) -> bytes:
    """The events as one msgpack frame of a TASK_EVENTS message. Not in the message's
    header: the control store unpacks this frame into tuples, which cost less to make than
    the lists a header holds, and which the garbage collector soon stops tracking."""
    return msgpack.packb(events, use_bin_type=True)


def decode(frame: Any) -> list[Event]:
    return msgpack.unpackb(frame, raw=False, use_list=False)
