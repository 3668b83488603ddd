"""What tasks print: captured in the worker, prefixed, and sent to the driver of their job.

``print()`` inside a task writes to a per-process stream object; complete lines get the
prefix ``(task_name pid=N)`` and are sent to the head in batches (one message per burst,
not per line), which forwards them to the driver whose job submitted the task.

A ``LOG_LINES`` body is ``{"j": job, "l": entries}``; an entry is ``[fd, text]``, or
``[fd, text, tag]`` when the task belongs to a notebook cell (its output tag, see
``_worker_context.output_tag``), or ``[DISPLAY, text, tag, bundle]`` for a rich display
(``bundle``: ``{"data": {mime: ...}, "metadata": {...}}``; ``text`` is its prefixed
``text/plain``, what a driver without a notebook prints).
"""

from __future__ import annotations

import io
import os
import threading
from typing import TYPE_CHECKING, Any

from . import _worker_context
from ._protocol import Message, MsgType

if TYPE_CHECKING:
    from ._core import CoreWorker

# Lines longer than this are cut, so one runaway print cannot make a giant message.
MAX_LINE = 16 * 1024

# The "fd" of a rich display entry.
DISPLAY = 3

# The worker's TaskOutput (display() reaches it through here).
_installed: TaskOutput | None = None


class TaskOutput:
    def __init__(self, core: CoreWorker) -> None:
        global _installed
        self.core = core
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._partial: dict[tuple[int, int], str] = {}  # (thread, fd) -> unfinished line
        self._lines: list[list[Any]] = []
        self._scheduled = False
        _installed = self

    def stream(self, fd: int) -> _Stream:
        return _Stream(self, fd)

    def write(self, fd: int, text: str) -> None:
        key = (threading.get_ident(), fd)
        with self._lock:
            text = self._partial.pop(key, "") + text
            *complete, rest = text.split("\n")
            if rest:
                self._partial[key] = rest
            if not complete:
                return
            prefix = self._prefix()
            tag = _worker_context.output_tag.get()
            for line in complete:
                self._add([fd, f"{prefix}{line[:MAX_LINE]}\n"], tag)

    def display(self, bundle: dict[str, Any]) -> None:
        """A rich display (``IPython.display.display`` in a ``%%remote`` cell)."""
        text = str(bundle.get("data", {}).get("text/plain", ""))[:MAX_LINE]
        self.write_partial_lines()
        with self._lock:
            self._add(
                [DISPLAY, f"{self._prefix()}{text}\n", _worker_context.output_tag.get(), bundle],
                None,
            )

    def _add(self, entry: list[Any], tag: int | None) -> None:
        if tag is not None:
            entry.append(tag)
        self._lines.append(entry)
        if not self._scheduled:
            self._scheduled = True
            self.core.post(self._send)

    def write_partial_lines(self) -> None:
        """Emit this thread's unfinished lines (before a display, or when a task ends)."""
        if not self._partial:
            # Nothing unfinished (this thread's entries are added by this thread only), and
            # complete lines were scheduled when they were written.
            return
        ident = threading.get_ident()
        with self._lock:
            prefix = self._prefix()
            tag = _worker_context.output_tag.get()
            for fd in (1, 2):
                rest = self._partial.pop((ident, fd), None)
                if rest:
                    self._add([fd, f"{prefix}{rest[:MAX_LINE]}\n"], tag)

    flush = write_partial_lines  # called when a task ends

    def _prefix(self) -> str:
        name = _worker_context.current.task_name or "worker"
        return f"({name} pid={self.pid}) "

    def _send(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
        if lines:
            self.core.head.send(Message(MsgType.LOG_LINES, {"j": self.core.job_id, "l": lines}))


def display(bundle: dict[str, Any]) -> bool:
    """Send a rich display to the driver, as the running task's output; False outside a
    worker (nothing was sent)."""
    output = _installed
    if output is None:
        return False
    output.display(bundle)
    return True


class _Stream(io.TextIOBase):
    def __init__(self, output: TaskOutput, fd: int) -> None:
        self._output = output
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._output.write(self._fd, text)
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"
