"""The memory monitor's decisions: whom to stop, when, and how memory is read (cgroup
files written here; the system reading is the real one)."""

from __future__ import annotations

import pytest
from shoal import _config
from shoal._memory_monitor import (
    VICTIM_GRACE_SECONDS,
    Candidate,
    MemoryMonitor,
    MemoryReading,
    cgroup_reading,
    describe,
    pick_victim,
    read_memory,
)

pytestmark = pytest.mark.timeout(10)

GIB = 1 << 30


def cand(name: str, actor=False, retriable=True, at=0.0) -> Candidate:
    return Candidate(name.encode(), 100, actor, retriable, at)


def test_the_newest_retriable_task_is_picked_first():
    old = cand("old-task", at=1.0)
    new = cand("new-task", at=2.0)
    newest_not_retriable = cand("fragile", retriable=False, at=3.0)
    newest_actor = cand("actor", actor=True, at=4.0)
    assert pick_victim([old, newest_not_retriable, new, newest_actor]) is new


def test_then_restartable_actors_then_tasks_without_retries_then_actors():
    fragile_task = cand("fragile-task", retriable=False, at=1.0)
    fragile_actor = cand("fragile-actor", actor=True, retriable=False, at=2.0)
    restartable = cand("restartable", actor=True, at=0.5)
    assert pick_victim([fragile_task, fragile_actor, restartable]) is restartable
    assert pick_victim([fragile_task, fragile_actor]) is fragile_task
    assert pick_victim([fragile_actor]) is fragile_actor
    assert pick_victim([]) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_monitor_acts_above_the_threshold_once_per_victim():
    reading = MemoryReading(used=9 * GIB, total=10 * GIB, source="system")
    clock = Clock()
    monitor = MemoryMonitor(0.95, 0.25, reader=lambda: reading, clock=clock)
    workers = [cand("a", at=1.0), cand("b", at=2.0)]
    assert monitor.check(lambda: workers) is None  # 90% < 95%
    reading.used = int(9.6 * GIB)
    figures = monitor.check(lambda: workers)
    assert figures is not None and figures["w"] == b"b"
    assert (figures["used"], figures["total"], figures["threshold"]) == (
        int(9.6 * GIB),
        10 * GIB,
        0.95,
    )
    # Until the victim has exited, nobody else is stopped (its memory is not free yet) ...
    assert monitor.check(lambda: workers) is None
    monitor.exited(b"b")
    assert monitor.check(lambda: [workers[0]])["w"] == b"a"
    # ... or until a victim that does not exit has had its grace period.
    clock.now += VICTIM_GRACE_SECONDS + 0.1
    assert monitor.check(lambda: [workers[0]])["w"] == b"a"


def test_monitor_with_nothing_to_stop_does_nothing():
    full = MemoryReading(used=10 * GIB, total=10 * GIB, source="system")
    monitor = MemoryMonitor(0.5, 0.25, reader=lambda: full)
    assert monitor.check(list) is None
    assert monitor.victim is None


def test_disabled_by_a_zero_threshold_or_period():
    assert not MemoryMonitor(0.0, 0.25).enabled
    assert not MemoryMonitor(0.95, 0.0).enabled
    assert MemoryMonitor(0.95, 0.25).enabled


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.delenv("SHOAL_MEMORY_USAGE_THRESHOLD", raising=False)
    monkeypatch.delenv("SHOAL_MEMORY_MONITOR_PERIOD", raising=False)
    assert _config.memory_monitor_settings() == (0.95, 0.25)
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", "0.8")
    monkeypatch.setenv("SHOAL_MEMORY_MONITOR_PERIOD", "0.1")
    assert _config.memory_monitor_settings() == (0.8, 0.1)
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", "95%")
    with pytest.raises(ValueError, match="SHOAL_MEMORY_USAGE_THRESHOLD must be a fraction"):
        _config.memory_monitor_settings()
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", "1.5")
    with pytest.raises(ValueError, match="from 0 to 1"):
        _config.memory_monitor_settings()
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", "0.9")
    monkeypatch.setenv("SHOAL_MEMORY_MONITOR_PERIOD", "-1")
    with pytest.raises(ValueError, match="SHOAL_MEMORY_MONITOR_PERIOD"):
        _config.memory_monitor_settings()


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_this_process_cgroup(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    group = tmp_path / "fs" / "kubepods" / "pod1"
    _write(group / "memory.max", "2147483648\n")
    _write(group / "memory.current", "1610612736\n")
    _write(group / "memory.stat", "anon 1000\ninactive_file 536870912\nactive_file 5\n")
    reading = cgroup_reading(str(tmp_path / "fs"), str(proc))
    assert reading == MemoryReading(1 << 30, 2 << 30, "cgroup v2")


def test_cgroup_v2_without_a_limit_and_v1_limits(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    fs = tmp_path / "fs"
    _write(fs / "memory.max", "max\n")
    _write(fs / "memory.current", "123\n")
    assert cgroup_reading(str(fs), str(proc)) is None
    (fs / "memory.max").unlink()
    # cgroup v1: "no limit" is a huge number; a real limit counts.
    _write(fs / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(fs / "memory" / "memory.usage_in_bytes", "1000\n")
    assert cgroup_reading(str(fs), str(proc)) is None
    _write(fs / "memory" / "memory.limit_in_bytes", "4096\n")
    _write(fs / "memory" / "memory.stat", "total_inactive_file 1000\n")
    _write(fs / "memory" / "memory.usage_in_bytes", "3000\n")
    assert cgroup_reading(str(fs), str(proc)) == MemoryReading(2000, 4096, "cgroup v1")


def test_read_memory_prefers_a_cgroup_limit_below_the_machine(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    fs = tmp_path / "fs"
    _write(fs / "memory.max", str(64 << 20))
    _write(fs / "memory.current", str(32 << 20))
    assert read_memory(str(fs), str(proc)) == MemoryReading(32 << 20, 64 << 20, "cgroup v2")
    machine = read_memory(str(tmp_path / "nothing"), str(tmp_path / "nothing"))
    assert machine.source == "system" and 0 < machine.used < machine.total


def test_describe_gives_the_figures():
    text = describe(
        {
            "used": int(9.6 * GIB),
            "total": 10 * GIB,
            "threshold": 0.95,
            "rss": 3 * GIB,
            "pid": 4242,
            "source": "cgroup v2",
        }
    )
    assert text.startswith("killed by the memory monitor")
    assert "9.60 GiB of 10.00 GiB (cgroup v2 limit) (96.0%)" in text
    assert "threshold 95.0%" in text and "(pid 4242) used 3.00 GiB" in text
