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


def _cgroup_memory_limit() -> int | None:
    text = _read(f"{_CGROUP}/memory.max") or _read(f"{_CGROUP}/memory/memory.limit_in_bytes")
    if not text or text == "max":
        return None
    limit = int(text)
    # cgroup v1 reports "no limit" as a huge number near 2**63.
    return limit if limit < 1 << 60 else None


def _cgroup_memory_used() -> int | None:
    text = _read(f"{_CGROUP}/memory.current") or _read(f"{_CGROUP}/memory/memory.usage_in_bytes")
    return int(text) if text else None


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
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit is not None else total


def memory_available() -> int:
    """RAM still free for us: MemAvailable, capped by what the cgroup limit leaves."""
    available = _meminfo("MemAvailable")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit, used = _cgroup_memory_limit(), _cgroup_memory_used()
    if limit is not None and used is not None:
        available = min(available, max(0, limit - used))
    return available


def shm_free(path: str = "/dev/shm") -> int | None:
    """Free bytes in the shared-memory filesystem, or None when it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
