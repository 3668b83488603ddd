"""Helpers for testing code that uses Shoal, and Shoal itself.

with shoal.testing.local_cluster(num_cpus=2):
    ...                               # shoal.init() has run; shutdown() runs after
shoal.testing.wait_for(lambda: cond(), timeout=10)
shoal.testing.assert_no_leaks()        # no Shoal process or shared-memory segment left
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

SHM_DIR = "/dev/shm"
SHM_PREFIX = "shoal-"
PROCESS_MARKERS = ("shoal._head", "shoal._worker")


@contextlib.contextmanager
def local_cluster(**init_kwargs: Any) -> Iterator[Any]:
    """Start a local cluster with ``shoal.init(**init_kwargs)``; always shut it down."""
    import shoal

    init_kwargs.setdefault("num_cpus", 2)
    context = shoal.init(**init_kwargs)
    try:
        yield context
    finally:
        shoal.shutdown()


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005, message: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s: {predicate!r}")
        time.sleep(interval)


def shoal_processes(all_sessions: bool = False) -> list[psutil.Process]:
    """Live Shoal head and worker processes on this machine.

    When ``SHOAL_TEST_SESSION`` is set (Shoal's own test suite sets it, and the processes
    it starts inherit it), only that session's processes count unless ``all_sessions``,
    so that test runs of other checkouts on the same machine do not look like leaks.
    """
    session = None if all_sessions else os.environ.get("SHOAL_TEST_SESSION")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(marker in cmdline for marker in PROCESS_MARKERS):
            continue
        if session is not None:
            try:
                if proc.environ().get("SHOAL_TEST_SESSION") != session:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.append(proc)
    return found


def shm_segments() -> list[str]:
    """Names of Shoal shared-memory segments in /dev/shm."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX))
    except FileNotFoundError:
        return []


def assert_no_leaks(timeout: float = 10.0) -> None:
    """Wait up to ``timeout`` for every Shoal process and segment to be gone, else fail."""
    try:
        wait_for(lambda: not shoal_processes() and not shm_segments(), timeout=timeout)
    except TimeoutError:
        procs = [(p.pid, " ".join(p.cmdline())) for p in shoal_processes()]
        raise AssertionError(f"leaked processes {procs} and segments {shm_segments()}") from None


def free_port() -> int:
    """A tcp port that was free on 127.0.0.1 a moment ago (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe_run(result: Any) -> str:
    """A finished subprocess (``subprocess.CompletedProcess``) for an assertion message."""
    return f"{result.args} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
