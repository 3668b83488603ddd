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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from ._machine import MemoryReading, cgroup_reading

# How long after a kill the monitor waits for the victim to exit before it may pick
# another one (a process that takes longer to die is probably stuck in the kernel).
VICTIM_GRACE_SECONDS = 5.0

GIB = 1 << 30


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
