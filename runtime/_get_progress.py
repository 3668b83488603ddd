"""Waiting for many refs while telling someone how far it got.

    get([refs]) ── watcher set? ── no ──> core.wait_values(all)            (as before)
                        │ yes
                        v
        wait up to DELAY ── all there ──> return                            (no display)
                        │ not yet
                        v
        reporter = watcher(total, started)      (None: the watcher declines)
        loop: wait SLICE for the pending ones -> reporter.update(done, failed)
        reporter.finish(done, failed, outcome)

The runtime only counts: the watcher, which decides how progress is shown (a notebook
widget, HTML, a line of text), is set by the notebook extension (``shoal.widgets``), so the
runtime never imports IPython or ipywidgets. ``track`` is the same loop for a display that
follows refs from a thread of its own (``shoal.widgets.progress``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._serialization import FLAG_ERROR

log = logging.getLogger("shoal")

# A get that takes less than this shows nothing.
DELAY_SECONDS = 1.0
# How often a display is updated while the get waits.
SLICE_SECONDS = 0.25


class Reporter(Protocol):
    def update(self, done: int, failed: int) -> None: ...

    def finish(self, done: int, failed: int, outcome: str) -> None:
        """``outcome``: "done", "timeout", "interrupted" or "cluster gone"."""


# Called by get() of several refs that are not ready after DELAY_SECONDS: given how many
# refs there are and when the get began (time.monotonic()), a Reporter, or None to show
# nothing. Set by the notebook extension; None (nothing shown) everywhere else.
Watcher = Callable[[int, float], "Reporter | None"]


def failed(value: tuple[Any, ...]) -> bool:
    """Whether a resolved value (the core's tuple) is an error."""
    kind = value[0]
    if kind == "v":
        return bool(value[1].flags & FLAG_ERROR)
    if kind == "s":
        return bool(value[-1] & FLAG_ERROR)
    return True  # "x": failed before it had a value


class Counter:
    """The refs of one get (or one progress display): which have values, how many failed."""

    def __init__(self, core: Any, oids: Sequence[bytes]) -> None:
        self.core = core
        self.pending = list(dict.fromkeys(oids))  # unique, in order
        self.total = len(self.pending)
        self.values: dict[bytes, tuple[Any, ...]] = {}
        self.failed = 0

    @property
    def done(self) -> int:
        return len(self.values)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the pending refs; True when none is left. Only the
        pending ones are looked at, so a slice costs less as the work gets done."""
        if self.pending:
            found = self.core.wait_values(self.pending, len(self.pending), timeout)
            if found:
                for oid, value in found.items():
                    if oid not in self.values:
                        self.values[oid] = value
                        if failed(value):
                            self.failed += 1
                self.pending = [oid for oid in self.pending if oid not in found]
        return not self.pending


def wait_values(
    core: Any, oids: Sequence[bytes], timeout: float | None, watcher: Watcher
) -> dict[bytes, tuple[Any, ...]]:
    """What ``core.wait_values(oids, all, timeout)`` returns, with progress shown through
    ``watcher`` when it takes longer than DELAY_SECONDS."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    counter = Counter(core, oids)
    first = DELAY_SECONDS if timeout is None else min(DELAY_SECONDS, timeout)
    if counter.wait(first) or (deadline is not None and time.monotonic() >= deadline):
        return counter.values
    try:
        reporter = watcher(counter.total, started)
    except Exception:
        log.exception("shoal: the progress display could not be made; waiting without it")
        reporter = None
    if reporter is None:
        counter.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return counter.values
    run(counter, _Guarded(reporter), deadline, lambda: False)
    return counter.values


class _Guarded:
    """A reporter whose failures never reach the get: a broken display stops showing, the
    get goes on."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter: Reporter | None = reporter

    def update(self, done: int, failed: int) -> None:
        if self.reporter is not None:
            try:
                self.reporter.update(done, failed)
            except Exception:
                log.exception("shoal: the progress display failed; it stops here")
                self.reporter = None

    def finish(self, done: int, failed: int, outcome: str) -> None:
        if self.reporter is not None:
            try:
                self.reporter.finish(done, failed, outcome)
            except Exception:
                log.exception("shoal: the progress display failed to finish")


def run(
    counter: Counter,
    reporter: Reporter,
    deadline: float | None,
    stopped: Callable[[], bool],
    slice_seconds: float = SLICE_SECONDS,
) -> str:
    """Wait in slices, reporting after each, until every ref has a value, the deadline
    passes, ``stopped()`` says so, or the cluster goes; then ``reporter.finish``. Returns
    the outcome. A KeyboardInterrupt is reported and raised again."""
    outcome = "interrupted"
    try:
        reporter.update(counter.done, counter.failed)
        while True:
            slice_ = slice_seconds
            if deadline is not None:
                slice_ = min(slice_, deadline - time.monotonic())
                if slice_ <= 0:
                    outcome = "timeout"
                    break
            if counter.wait(slice_):
                outcome = "done"
                break
            if counter.core.closed:
                outcome = "cluster gone"
                break
            if stopped():
                outcome = "stopped"
                break
            reporter.update(counter.done, counter.failed)
    finally:
        reporter.finish(counter.done, counter.failed, outcome)
    return outcome
