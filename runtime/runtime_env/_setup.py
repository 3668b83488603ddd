"""What a plugin's ``create`` gets on the node (a SetupContext): packages, cache entries,
commands that are killed when the setup's time is up, and its deadline.

Commands run in their own process group, registered with the node's worker pool (whose
reaper must not take their exit status), and are killed, group and all, when the setup
times out or the node stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import RuntimeEnvSetupError
from ._cache import EnvCache, Timeout
from ._packaging import split_uri, unpack

LOG_TAIL_CHARS = 6000


class Setup:
    """The SetupContext of one build (see _plugin.SetupContext)."""

    def __init__(
        self,
        key: str,
        deadline: float | None,
        cache: EnvCache,
        fetch: Callable[[str, float | None], bytes],
        children: Any,
    ) -> None:
        self.key = key
        self.cache = cache
        self.fetch = fetch
        self.children = children
        self.node_python = sys.executable
        self.deadline = deadline
        self.cancelled = False
        self.procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    def remaining(self) -> float:
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        if self.cancelled:
            raise RuntimeEnvSetupError("its setup was stopped")
        if self.remaining() <= 0:
            raise RuntimeEnvSetupError("its setup ran out of time (setup_timeout_seconds)")

    def _timeout(self) -> float | None:
        return None if self.deadline is None else self.remaining()

    def entry(self, kind: str, name: str) -> Any:
        return _TimedEntry(self, kind, name)

    def package(self, uri: str) -> str:
        base, sub = split_uri(uri)
        digest = base.removeprefix("pkg://")
        with self.entry("pkgs", digest) as entry:
            if not entry.ready:
                data = self.fetch(base, self._timeout())
                self.check()
                shutil.rmtree(entry.path, ignore_errors=True)
                try:
                    unpack(base, data, entry.path)
                except (ValueError, OSError) as exc:
                    raise RuntimeEnvSetupError(f"could not unpack {base}: {exc}") from None
                entry.mark_ready()
            return os.path.join(entry.path, *sub.split("/")) if sub else entry.path

    def run(self, argv: list[str], log_path: str, env: dict[str, str] | None = None) -> int:
        self.check()
        guard = self.children
        with open(log_path, "ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            with guard.child_lock:  # the node's reaper must not take this child's exit status
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own group: killed whole when time is up
                    close_fds=True,
                )
                guard.other_children.add(proc.pid)
        with self._lock:
            self.procs.add(proc)
        try:
            while True:
                try:
                    return proc.wait(timeout=min(0.2, self._timeout() or 0.2))
                except subprocess.TimeoutExpired:
                    if self.cancelled or self.remaining() <= 0:
                        _kill_group(proc)
                        proc.wait()
                        self.check()
        finally:
            with self._lock:
                self.procs.discard(proc)
            with guard.child_lock:
                guard.other_children.discard(proc.pid)

    def log_tail(self, log_path: str, since: int) -> str:
        return log_tail(log_path, since)

    def cancel(self) -> None:
        self.cancelled = True
        with self._lock:
            for proc in self.procs:
                _kill_group(proc)


class _TimedEntry:
    """A cache entry held within the setup's deadline."""

    def __init__(self, setup: Setup, kind: str, name: str) -> None:
        self.cm = setup.cache.entry(kind, name, setup.deadline, abort=lambda: setup.cancelled)
        self.setup = setup

    def __enter__(self) -> Any:
        try:
            return self.cm.__enter__()
        except Timeout:
            raise RuntimeEnvSetupError(
                "its setup ran out of time waiting for another build of the same environment"
            ) from None

    def __exit__(self, *exc: Any) -> Any:
        return self.cm.__exit__(*exc)


def log_tail(log_path: str, since: int) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(since, os.fstat(f.fileno()).st_size - 4 * LOG_TAIL_CHARS))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return text[-LOG_TAIL_CHARS:].strip()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
