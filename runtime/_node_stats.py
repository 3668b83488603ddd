"""A machine's CPU and memory use, for the state API and the monitor.

Read from ``/proc`` directly: importing psutil would add ~15 ms to every head's start-up
for a handful of numbers. Sampled at most once a second (with the node's report), so a
monitor polling a few times a second sees values at most about a second old.
"""

from __future__ import annotations

import os
import time
from typing import Any

MIN_INTERVAL = 1.0


class SystemSampler:
    def __init__(self) -> None:
        self._cpu: tuple[int, int] | None = None  # (busy, total) jiffies at the last sample
        self._last = 0.0
        self._stats: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._stats and now - self._last < MIN_INTERVAL:
            return self._stats
        self._last = now
        stats: dict[str, Any] = {"cpu_count": os.cpu_count() or 1}
        cpu = _cpu_times()
        if cpu is not None:
            if self._cpu is not None and cpu[1] > self._cpu[1]:
                busy = cpu[0] - self._cpu[0]
                stats["cpu_percent"] = round(100.0 * busy / (cpu[1] - self._cpu[1]), 1)
            else:
                stats["cpu_percent"] = None  # known from the second sample on
            self._cpu = cpu
        memory = _memory()
        if memory is not None:
            total, available = memory
            stats["memory_total"] = total
            stats["memory_used"] = total - available
            stats["memory_percent"] = (
                round(100.0 * (total - available) / total, 1) if total else 0.0
            )
        try:
            stats["load_1m"] = os.getloadavg()[0]
        except OSError:
            pass
        self._stats = stats
        return stats


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot; idle and iowait count as not busy."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    return total - values[3] - values[4], total


def _memory() -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(rest.split()[0]) * 1024
                    if len(found) == 2:
                        break
    except OSError:
        return None
    if len(found) != 2:
        return None
    return found["MemTotal"], found["MemAvailable"]
