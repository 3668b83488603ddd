"""What this machine gives us: CPUs, memory and /dev/shm, as a container sees them.

``os.cpu_count()`` and ``/proc/meminfo`` describe the host. In a container (Binder, Docker,
Kubernetes) the process may be pinned to fewer cores (CPU affinity), throttled by a cgroup
CPU quota, or capped by a cgroup memory limit; sizing the worker pool or the object store
from host numbers then oversubscribes the container, and the kernel's OOM killer ends the
session. These helpers read the tighter of the two.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# cgroup v2 is mounted here in containers and on modern hosts; v1 files are read as a
# fallback (older Docker hosts).
_CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup CPU quota, or None when there is no quota."""
    text = _read(f"{_CGROUP}/cpu.max")  # v2: "<quota> <period>" or "max <period>"
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_v1, period_v1 = (
        _read(f"{_CGROUP}/cpu/cpu.cfs_quota_us"),
        _read(f"{_CGROUP}/cpu/cpu.cfs_period_us"),
    )
    if quota_v1 and period_v1 and int(quota_v1) > 0:
        return int(quota_v1) / int(period_v1)
    return None


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup quota (rounded up,
    at least 1), like ``len(os.sched_getaffinity(0))`` but quota-aware."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


@dataclass
class MemoryReading:
    used: int  # bytes in use that the kernel cannot simply drop (not the page cache)
    total: int  # bytes the processes here may use: the machine's, or a smaller cgroup limit
    source: str  # "system", "cgroup v1" or "cgroup v2"

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total > 0 else 0.0


def cgroup_reading(
    root: str = _CGROUP, proc_self_cgroup: str = "/proc/self/cgroup"
) -> MemoryReading | None:
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


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_total() -> int:
    """RAM this process may use: the host's, capped by a cgroup memory limit."""
    total = _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limited = cgroup_reading()
    return min(total, limited.total) if limited is not None else total


def memory_available() -> int:
    """RAM still free for us: MemAvailable, capped by what the cgroup limit leaves."""
    available = _meminfo("MemAvailable")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limited = cgroup_reading()
    if limited is not None:
        available = min(available, max(0, limited.total - limited.used))
    return available


def shm_free(path: str = "/dev/shm") -> int | None:
    """Free bytes in the shared-memory filesystem, or None when it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
