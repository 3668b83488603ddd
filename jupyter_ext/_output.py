"""Task output in IPython: under the cell that started the task, rate-limited.

Workers send what tasks print to the head, which forwards it to the driver, where the core
calls ``core.on_log(body)`` on its IO thread (``print_log_lines`` by default, which writes
to this process's stdout). ``LogRouter`` wraps that ``on_log``:

- **Cells.** Every task and actor call carries the output tag of the cell that submitted
  it (``CellTags``: tag -> the kernel's parent message; children inherit their parent's
  tag), and so does each line it prints (``_task_output.py``). In a kernel, the router
  publishes a cell's lines and displays under that cell's parent message
  (``shell.set_thread_parent``), even when another cell runs by then. Lines without a known
  tag go to the running cell, as before.
- **Floods.** In a kernel, each cell takes at most ``LINES_BURST`` lines (``BYTES_BURST``
  bytes) at once and ``LINES_PER_SECOND`` (``BYTES_PER_SECOND``) after that; the rest are
  counted by task and summarized once a second: ``... 12,345 more lines from task f
  (pid=4242) suppressed``. Nothing else is ever dropped.
- **%%remote's end of cell.** Results come straight from the worker, so a cell's result may
  arrive before its last lines: a ``%%remote`` cell prints a marker line last, which the
  router drops, waking the cell (``expect``). While a cell waits, its lines lose their
  ``(%%remote In[5] pid=123)`` prefix, so that they read as they would locally.

Outside a kernel (a terminal IPython) the lines go on to ``print_log_lines`` unchanged.
This module does not import IPython: it finds the shell it is given.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_MARK = "\x00shoal-cell-done "
_PREFIX = re.compile(r"\((?P<name>.*?) pid=(?P<pid>\d+)\) ")

DISPLAY = 3  # _task_output.DISPLAY: the "fd" of a rich display entry

# Per cell: this much output at once, then this much a second (a token bucket). A browser
# stays responsive far above these rates; a loop that prints every iteration does not.
# (Jupyter server drops output itself above 1 MB/s, with a warning and no count.)
LINES_BURST = 1000
LINES_PER_SECOND = 100
BYTES_BURST = 512 * 1024
BYTES_PER_SECOND = 64 * 1024
SUMMARY_SECONDS = 1.0

# How many cells keep their tag's parent message (the oldest are forgotten first; output of
# a task of a forgotten cell goes to the running cell, with its prefix).
MAX_CELLS = 1000


def new_marker() -> tuple[str, str]:
    """(token, the line that the cell prints last)."""
    token = os.urandom(8).hex()
    return token, _MARK + token


# -- cells -----------------------------------------------------------------------------
class CellTags:
    """The output tags of one shell's cells.

    A cell is known by its kernel parent message's id (in a kernel), else by its execution
    count (a terminal IPython: no parent to send output to, but interrupts still cancel the
    cell's tasks). Tags are small ints from a random start, so that tags of two drivers are
    unlikely to meet (a threaded actor's batch may mix calls of two drivers)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        self._tags: OrderedDict[Any, int] = OrderedDict()  # cell key -> tag
        self._parents: dict[int, Any] = {}  # tag -> parent message (None: no kernel)
        self._next = int.from_bytes(os.urandom(3), "big") + 1
        # Cells run so far (``begin``, at IPython's pre_run_cell). Outside a kernel a cell is
        # known by it rather than by ``execution_count``, which IPython 9 advances before
        # the cell runs and IPython 8 after, so that it never names one cell in both the
        # cell and its post_run_cell.
        self._cells_begun = 0

    def begin(self) -> None:
        self._cells_begun += 1

    def current(self) -> int | None:
        """The running cell's tag (made on first use); None when the shell runs no cell."""
        try:
            key, parent = self._cell()
        except Exception:
            return None
        if key is None:
            return None
        with self._lock:
            tag = self._tags.get(key)
            if tag is None:
                tag = self._tags[key] = self._next
                self._next += 1
                self._parents[tag] = parent
                while len(self._tags) > MAX_CELLS:
                    _, old = self._tags.popitem(last=False)
                    self._parents.pop(old, None)
            return tag

    def lookup(self, count: int | None = None) -> int | None:
        """The running cell's tag if it has one (it submitted something); ``count``: the
        cell's execution count (IPython has counted the next cell already when a cell's
        ``post_run_cell`` runs)."""
        try:
            key, _ = self._cell(count)
        except Exception:
            return None
        with self._lock:
            return self._tags.get(key)

    def parent(self, tag: Any) -> Any:
        with self._lock:
            return self._parents.get(tag)

    def _cell(self, count: int | None = None) -> tuple[Any, Any]:
        shell = self.shell
        get_parent = getattr(shell, "get_parent", None)
        if get_parent is not None:
            parent = get_parent()
            header = parent.get("header", parent) if isinstance(parent, dict) else None
            msg_id = header.get("msg_id") if isinstance(header, dict) else None
            if msg_id:
                return msg_id, parent
        if self._cells_begun:
            return ("cell", self._cells_begun), None
        if count is None:
            count = getattr(shell, "execution_count", None)
        return (None if count is None else ("In", count)), None


def kernel_publisher(shell: Any) -> Callable[[Any, list[list[Any]]], None] | None:
    """A function that publishes entries under a parent message (None: the running cell),
    for a kernel whose shell can set a thread's parent (ipykernel 7); None otherwise."""
    if not (hasattr(shell, "set_thread_parent") and hasattr(shell, "reset_thread_parent")):
        return None

    def publish(parent: Any, entries: list[list[Any]]) -> None:
        tokens = shell.set_thread_parent(parent) if parent is not None else None
        try:
            texts: list[list[Any]] = []  # [stream, text] runs, in order
            for entry in entries:
                fd, text = entry[0], entry[1]
                bundle = entry[3] if fd == DISPLAY and len(entry) > 3 else None
                if isinstance(bundle, dict) and isinstance(bundle.get("data"), dict):
                    _write(texts)
                    texts = []
                    shell.display_pub.publish(
                        data=bundle["data"], metadata=bundle.get("metadata") or {}
                    )
                    continue
                stream = "stderr" if fd == 2 else "stdout"
                if texts and texts[-1][0] == stream:
                    texts[-1][1] += text
                else:
                    texts.append([stream, text])
            _write(texts)
        finally:
            if tokens is not None:
                shell.reset_thread_parent(tokens)

    return publish


def _write(texts: list[list[Any]]) -> None:
    for stream, text in texts:
        getattr(sys, stream).write(text)


# -- rate limits -----------------------------------------------------------------------
class _Bucket:
    __slots__ = ("bytes", "lines", "suppressed", "when")

    def __init__(self, now: float) -> None:
        self.lines = float(LINES_BURST)
        self.bytes = float(BYTES_BURST)
        self.when = now
        self.suppressed: dict[tuple[str, str], int] = {}  # (task, pid) -> lines dropped

    def take(self, size: int, now: float) -> bool:
        elapsed = now - self.when
        self.when = now
        self.lines = min(float(LINES_BURST), self.lines + elapsed * LINES_PER_SECOND)
        self.bytes = min(float(BYTES_BURST), self.bytes + elapsed * BYTES_PER_SECOND)
        if self.lines < 1 or self.bytes < size:
            return False
        self.lines -= 1
        self.bytes -= size
        return True


def _source(text: str) -> tuple[str, str]:
    match = _PREFIX.match(text)
    if match is None:
        return "", ""
    return match.group("name"), match.group("pid")


def _summary(source: tuple[str, str], count: int) -> str:
    name, pid = source
    who = f"task {name} (pid={pid})" if name else "tasks"
    return (
        f"... {count:,} more line{'s' if count != 1 else ''} from {who} suppressed "
        f"(Shoal shows a cell at most {LINES_PER_SECOND} lines a second)\n"
    )


# -- the router ------------------------------------------------------------------------
class LogRouter:
    """Wraps a core's ``on_log``: cells, floods, end-of-cell markers, prefixes."""

    def __init__(
        self,
        previous: Any,
        tags: CellTags | None = None,
        publish: Callable[[Any, list[list[Any]]], None] | None = None,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.previous = previous
        self.tags = tags
        self.publish = publish  # None: not a kernel; lines go on to ``previous``
        self.call_later = call_later
        self.clock = clock
        self._lock = threading.Lock()
        self._markers: dict[str, list[Any]] = {}  # token -> [markers still to come, event]
        self._quiet: dict[str, int] = {}  # task name -> how many waits want it unprefixed
        self._buckets: dict[Any, _Bucket] = {}  # tag (None: no cell) -> its rate limit
        self._summary_due = False

    def expect(self, token: str, task_names: list[str], count: int = 1) -> threading.Event:
        """An event set once ``count`` tasks printed the marker ``token``; lines of
        ``task_names`` lose their prefix until ``done``."""
        event = threading.Event()
        with self._lock:
            self._markers[token] = [count, event]
            for name in task_names:
                self._quiet[name] = self._quiet.get(name, 0) + 1
        return event

    def done(self, token: str, task_names: list[str]) -> None:
        with self._lock:
            self._markers.pop(token, None)
            for name in task_names:
                n = self._quiet.get(name, 0) - 1
                if n > 0:
                    self._quiet[name] = n
                else:
                    self._quiet.pop(name, None)

    def __call__(self, body: dict[str, Any]) -> None:
        kept: list[list[Any]] = []
        woken: list[threading.Event] = []
        with self._lock:
            for entry in body.get("l", ()):
                line = entry[1]
                if entry[0] != DISPLAY and _MARK in line:
                    before, _, token = line.partition(_MARK)
                    waiting = self._markers.get(token.strip())
                    if waiting is not None:
                        waiting[0] -= 1
                        if waiting[0] <= 0:
                            woken.append(waiting[1])
                    # The cell's last line had no newline yet: it was written with the marker.
                    prefix = _PREFIX.match(before)
                    if prefix is not None and before[prefix.end() :]:
                        kept.append([entry[0], before + "\n", *entry[2:]])
                    continue
                kept.append(entry)
        if self.publish is None:
            if kept and self.previous is not None:
                self.previous({**body, "l": [self._unprefixed(e) for e in kept]})
        else:
            self._route(kept)
            if woken:
                # The cell is about to end: what was held back is told before it does.
                self.flush_summaries()
        # Set only now: a woken cell ends, and its lines must have been written before.
        for event in woken:
            event.set()

    # -- in a kernel -------------------------------------------------------------------
    def _route(self, entries: list[list[Any]]) -> None:
        now = self.clock()
        by_cell: dict[Any, list[list[Any]]] = {}
        schedule = False
        with self._lock:
            for entry in entries:
                tag = entry[2] if len(entry) > 2 else None
                bucket = self._buckets.get(tag)
                if bucket is None:
                    bucket = self._buckets[tag] = _Bucket(now)
                if not bucket.take(len(entry[1]), now):
                    source = _source(entry[1])
                    bucket.suppressed[source] = bucket.suppressed.get(source, 0) + 1
                    if not self._summary_due:
                        self._summary_due = schedule = True
                    continue
                by_cell.setdefault(tag, []).append(self._unprefixed(entry))
            self._forget_idle_buckets(now)
        for tag, cell_entries in by_cell.items():
            self._publish(tag, cell_entries)
        if schedule and self.call_later is not None:
            self.call_later(SUMMARY_SECONDS, self.flush_summaries)

    def flush_summaries(self) -> None:
        """Tell each cell how many lines were held back since the last summary."""
        with self._lock:
            self._summary_due = False
            due = []
            for tag, bucket in self._buckets.items():
                if bucket.suppressed:
                    lines = [[2, _summary(src, n)] for src, n in bucket.suppressed.items()]
                    bucket.suppressed = {}
                    due.append((tag, lines))
        for tag, lines in due:
            self._publish(tag, lines)

    def _publish(self, tag: Any, entries: list[list[Any]]) -> None:
        parent = self.tags.parent(tag) if self.tags is not None and tag is not None else None
        try:
            self.publish(parent, entries)  # type: ignore[misc]
        except Exception:
            pass  # the kernel is going away; output has nowhere to go

    def _forget_idle_buckets(self, now: float) -> None:
        if len(self._buckets) <= 64:
            return
        refill = max(LINES_BURST / LINES_PER_SECOND, BYTES_BURST / BYTES_PER_SECOND)
        for tag in [
            t for t, b in self._buckets.items() if now - b.when > refill and not b.suppressed
        ]:
            del self._buckets[tag]  # full again by now: a fresh bucket is the same

    def _unprefixed(self, entry: list[Any]) -> list[Any]:
        line = entry[1]
        match = _PREFIX.match(line)
        if match is not None and match.group("name") in self._quiet:
            return [entry[0], line[match.end() :], *entry[2:]]
        return entry


def install(core: Any, shell: Any = None) -> LogRouter | None:
    """The core's LogRouter, installed on first use; None when output is not forwarded
    (``init(log_to_driver=False)``)."""
    current = getattr(core, "on_log", None)
    if isinstance(current, LogRouter):
        return current
    if current is None:
        return None
    tags = cell_tags(shell)
    loop = getattr(core, "loop", None)
    router = LogRouter(
        current,
        tags=tags,
        publish=kernel_publisher(shell) if shell is not None else None,
        call_later=(lambda delay, fn: loop.call_later(delay, fn)) if loop is not None else None,
    )
    core.on_log = router
    return router


router_for = install


def cell_tags(shell: Any) -> CellTags | None:
    """The shell's CellTags (made on first use), which also name the cell of the work this
    process submits (``_worker_context.cell_tagger``)."""
    if shell is None:
        return None
    tags = getattr(shell, "_shoal_cell_tags", None)
    if tags is None:
        from shoal import _worker_context

        tags = CellTags(shell)
        shell._shoal_cell_tags = tags
        _worker_context.cell_tagger = tags.current
    return tags


def forget_cell_tags(shell: Any) -> None:
    from shoal import _worker_context

    tags = shell.__dict__.pop("_shoal_cell_tags", None) if shell is not None else None
    if tags is not None and _worker_context.cell_tagger == tags.current:
        _worker_context.cell_tagger = None


# -- interrupting a cell ---------------------------------------------------------------
def cancel_cell_work(shell: Any, count: int | None = None) -> tuple[int, int] | None:
    """The running cell was interrupted: cancel the tasks it started (their children too)
    and its actor calls that were not sent yet. Returns (cancelled, actor calls running
    on), or None when the cell started nothing."""
    from shoal import _worker_context

    tags = getattr(shell, "_shoal_cell_tags", None)
    core = _worker_context.maybe_core()
    if tags is None or core is None or core.closed:
        return None
    tag = tags.lookup(count)
    if tag is None:
        return None
    box: list[tuple[int, int]] = []
    # As loop work in this thread: the submissions this thread posted run first, so that
    # work submitted just before the interrupt is known, and cancelled, too.
    core.loop.run_inline(lambda: box.append(core.tasks.cancel_tag(tag)))
    return box[0] if box and box[0] != (0, 0) else None
