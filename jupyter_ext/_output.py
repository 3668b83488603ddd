"""Task output for ``%%remote`` cells, on top of the driver's log forwarding.

Workers send what tasks print to the head, which forwards it to the driver, where the core
calls ``core.on_log(body)`` on its IO thread (``print_log_lines`` by default). Results come
straight from the worker, so a cell's result may arrive before its last lines. A
``%%remote`` cell therefore prints a marker line last; ``LogRouter`` (which wraps the
core's ``on_log``) drops the marker and wakes the cell, which waits for it (briefly) before
it returns, so that the cell's output lands under the cell.

While a cell waits, its lines lose their ``(%%remote In[5] pid=123)`` prefix, so that they
read as they would locally; lines that arrive later keep it, so that they can be told apart.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

_MARK = "\x00shoal-cell-done "
_PREFIX = re.compile(r"\((?P<name>.*?) pid=\d+\) ")


def new_marker() -> tuple[str, str]:
    """(token, the line that the cell prints last)."""
    token = os.urandom(8).hex()
    return token, _MARK + token


class LogRouter:
    """Wraps a core's ``on_log``: end-of-cell markers, and prefixes of waited-for cells."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self._lock = threading.Lock()
        self._markers: dict[str, list[Any]] = {}  # token -> [markers still to come, event]
        self._quiet: dict[str, int] = {}  # task name -> how many waits want it unprefixed

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
        with self._lock:
            for stream, line in body.get("l", ()):
                if _MARK in line:
                    before, _, token = line.partition(_MARK)
                    waiting = self._markers.get(token.strip())
                    if waiting is not None:
                        waiting[0] -= 1
                        if waiting[0] <= 0:
                            waiting[1].set()
                    # The cell's last line had no newline yet: it was written with the marker.
                    prefix = _PREFIX.match(before)
                    if prefix is not None and before[prefix.end() :]:
                        kept.append([stream, self._strip(before) + "\n"])
                    continue
                kept.append([stream, self._strip(line)])
        if kept and self.previous is not None:
            self.previous({**body, "l": kept})

    def _strip(self, line: str) -> str:
        match = _PREFIX.match(line)
        if match is not None and match.group("name") in self._quiet:
            return line[match.end() :]
        return line


def router_for(core: Any) -> LogRouter | None:
    """The core's LogRouter, installed on first use; None when output is not forwarded
    (``init(log_to_driver=False)``)."""
    current = getattr(core, "on_log", None)
    if isinstance(current, LogRouter):
        return current
    if current is None:
        return None
    router = LogRouter(current)
    core.on_log = router
    return router
