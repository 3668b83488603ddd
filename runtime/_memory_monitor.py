"""The memory monitor of a node: when the machine runs out of memory, stop one worker
before the kernel's OOM killer picks a process itself (it might pick the node manager, or
the head, which would take every worker and object of the node down with it).

    every SHOAL_MEMORY_MONITOR_PERIOD s   read_memory() (cgroup limit when there is one)
    used / total > threshold              pick_victim(leased workers) --> SIGKILL it
    the victim exits                      its owner retries the task (with a back-off) or
                                          raises OutOfMemoryError; an actor restarts or dies

Who is stopped (``pick_victim``): only workers leased to run tasks or actors, never a
driver, the node manager or the head (they are not candidates). Retriable work first (a
task with retries left, an actor with restarts left), tasks before actors, and among
those the most recently leased worker: its task has done the least work, and a task
that allocates fast is usually the newest. One victim at a time: the next is chosen only
once the last has exited (or after ``VICTIM_GRACE_SECONDS``), since memory is freed
when the process is gone, not when the signal is sent.

No IO but reading /proc and /sys; the node manager does the killing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

# How long after a kill the monitor waits for the victim to exit before it may pick
# another one (a process that takes longer to die is probably stuck in the kernel).
VICTIM_GRACE_SECONDS = 5.0

GIB = 1 << 30


@dataclass
class MemoryReading:
    used: int  # bytes in use that the kernel cannot simply drop (not the page cache)
    total: int  # bytes the processes here may use: the machine's, or a smaller cgroup limit
    source: str  # "system", "cgroup v1" or "cgroup v2"

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total > 0 else 0.0


@dataclass
class Candidate:
    worker_id: bytes
    pid: int
    is_actor: bool
    retriable: bool  # a task with retries left, an actor with restarts left
    leased_at: float


def pick_victim(candidates: Sequence[Candidate]) -> Candidate | None:
    """Retriable before not, tasks before actors, the most recently leased first."""
    return max(candidates, key=lambda c: (c.retriable, not c.is_actor, c.leased_at), default=None)


def read_memory(
    cgroup_root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup"
) -> MemoryReading:
    """This node's memory use: the cgroup's when it has a limit below the machine's
    memory (a container), else the machine's (total minus what the kernel reports as
    available)."""
    vm = psutil.virtual_memory()
    system = MemoryReading(int(vm.total - vm.available), int(vm.total), "system")
    limited = cgroup_reading(cgroup_root, proc_self_cgroup)
    if limited is not None and 0 < limited.total < system.total:
        return limited
    return system


def cgroup_reading(root: str, proc_self_cgroup: str) -> MemoryReading | None:
    """Usage and limit of this process's cgroup (v2, else v1); None when there is no
    limit or no cgroup file to read. The page cache that the kernel can drop (inactive
    file pages) is not counted as used, as the kernel would reclaim it before an OOM."""
    for path in _v2_dirs(root, proc_self_cgroup):
        limit = _read_int(os.path.join(path, "memory.max"))
        current = _read_int(os.path.join(path, "memory.current"))
        if limit is not None and current is not None:
            inactive = _stat(os.path.join(path, "memory.stat")).get("inactive_file", 0)
            return MemoryReading(max(0, current - inactive), limit, "cgroup v2")
    v1 = os.path.join(root, "memory")
    limit = _read_int(os.path.join(v1, "memory.limit_in_bytes"))
    usage = _read_int(os.path.join(v1, "memory.usage_in_bytes"))
    if limit is not None and usage is not None:
        inactive = _stat(os.path.join(v1, "memory.stat")).get("total_inactive_file", 0)
        return MemoryReading(max(0, usage - inactive), limit, "cgroup v1")
    return None


def _v2_dirs(root: str, proc_self_cgroup: str) -> list[str]:
    """Where this process's cgroup v2 files may be: its own cgroup (from
    /proc/self/cgroup, line "0::/path"), then the root of the mount (inside a container
    with its own cgroup namespace, that root is the container's cgroup)."""
    dirs = []
    try:
        with open(proc_self_cgroup) as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip().lstrip("/")
                    if rel:
                        dirs.append(os.path.join(root, rel))
    except OSError:
        pass
    dirs.append(root)
    return dirs


def _read_int(path: str) -> int | None:
    """An integer file of the cgroup fs; None when missing or "max" (no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    # cgroup v1 writes "no limit" as a huge number (a page-rounded 2**63 - 1).
    return None if value >= 1 << 62 else value


def _stat(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
    except OSError:
        pass
    return out


def rss_of(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


class MemoryMonitor:
    """Decides when to stop a worker and which one; the node manager runs ``check``
    every ``period`` seconds and kills what it returns."""

    def __init__(
        self,
        threshold: float,
        period: float,
        reader: Callable[[], MemoryReading] = read_memory,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.threshold = threshold
        self.period = period
        self.reader = reader
        self.clock = clock or time.monotonic
        self.victim: bytes | None = None  # the last victim, until it has exited
        self.victim_since = 0.0

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.period > 0

    def check(self, candidates: Callable[[], Sequence[Candidate]]) -> dict[str, Any] | None:
        """The victim to stop now and the figures that explain why, or None."""
        if self.victim is not None and self.clock() - self.victim_since < VICTIM_GRACE_SECONDS:
            return None
        reading = self.reader()
        if reading.total <= 0 or reading.fraction <= self.threshold:
            return None
        victim = pick_victim(candidates())
        if victim is None:
            return None  # only drivers and the node itself use memory here: nothing to stop
        self.victim, self.victim_since = victim.worker_id, self.clock()
        return {
            "w": victim.worker_id,
            "pid": victim.pid,
            "actor": victim.is_actor,
            "used": reading.used,
            "total": reading.total,
            "threshold": self.threshold,
            "source": reading.source,
            "rss": rss_of(victim.pid),
        }

    def exited(self, worker_id: bytes) -> None:
        if worker_id == self.victim:
            self.victim = None


def describe(figures: dict[str, Any]) -> str:
    """Why a worker was stopped, in one line (the reason its task or actor reports)."""
    used, total = int(figures["used"]), int(figures["total"])
    fraction = used / total if total else 0.0
    where = "" if figures.get("source") == "system" else f" ({figures.get('source')} limit)"
    return (
        f"killed by the memory monitor: the node's memory use {used / GIB:.2f} GiB of "
        f"{total / GIB:.2f} GiB{where} ({fraction:.1%}) passed the threshold "
        f"{float(figures['threshold']):.1%} (SHOAL_MEMORY_USAGE_THRESHOLD); the worker "
        f"(pid {figures.get('pid', 0)}) used {int(figures.get('rss', 0)) / GIB:.2f} GiB"
    )
