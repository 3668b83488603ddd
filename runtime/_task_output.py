"""What tasks print: captured in the worker, prefixed, and sent to the driver of their job.

``print()`` inside a task writes to a per-process stream object; complete lines get the
prefix ``(task_name pid=N)`` and are sent to the head in batches (one message per burst,
not per line), which forwards them to the driver whose job submitted the task.
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


class TaskOutput:
    def __init__(self, core: CoreWorker) -> None:
        self.core = core
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._partial: dict[tuple[int, int], str] = {}  # (thread, fd) -> unfinished line
        self._lines: list[list[Any]] = []
        self._scheduled = False

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
            for line in complete:
                self._lines.append([fd, f"{prefix}{line[:MAX_LINE]}\n"])
            if not self._scheduled:
                self._scheduled = True
                self.core.post(self._send)

    def flush(self) -> None:
        """Emit unfinished lines of this thread too; called when a task ends."""
        if not self._partial:
            # Nothing unfinished (this thread's entries are added by this thread only), and
            # complete lines were scheduled when they were written.
            return
        ident = threading.get_ident()
        with self._lock:
            prefix = self._prefix()
            for fd in (1, 2):
                rest = self._partial.pop((ident, fd), None)
                if rest:
                    self._lines.append([fd, f"{prefix}{rest[:MAX_LINE]}\n"])
            if self._lines and not self._scheduled:
                self._scheduled = True
                self.core.post(self._send)

    def _prefix(self) -> str:
        name = _worker_context.current.task_name or "worker"
        return f"({name} pid={self.pid}) "

    def _send(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
        if lines:
            self.core.head.send(Message(MsgType.LOG_LINES, {"j": self.core.job_id, "l": lines}))


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
