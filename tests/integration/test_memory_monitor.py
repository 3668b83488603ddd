"""The memory monitor: a node whose memory use passes the threshold stops the worker of
the newest retriable task (or actor), which then fails with OutOfMemoryError carrying the
figures, after retries that back off.

Real allocations, no faked readings: each test starts a cluster whose threshold is the
machine's current use plus MARGIN (SHOAL_MEMORY_USAGE_THRESHOLD, computed here), and a
task allocates until it is stopped, never more than ALLOCATION_CAP (this machine has far
more free memory than that; the test fails, rather than allocate on, if no stop comes).
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import shoal
from shoal import testing
from shoal.exceptions import ActorDiedError, OutOfMemoryError

pytestmark = pytest.mark.timeout(120)

MB = 1 << 20
MARGIN = 500 * MB  # above what the machine uses when the test starts
ALLOCATION_CAP = 3000 * MB
CHUNK = 25 * MB


def _threshold_above_current_use(margin: int) -> float:
    vm = psutil.virtual_memory()
    free = vm.available
    if free < ALLOCATION_CAP + 2000 * MB:
        pytest.skip(f"only {free / MB:.0f} MB of memory free: too little to test safely")
    return (vm.total - vm.available + margin) / vm.total


@pytest.fixture
def tight_cluster(monkeypatch, make_cluster):
    threshold = _threshold_above_current_use(MARGIN)
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", f"{threshold:.5f}")
    monkeypatch.setenv("SHOAL_MEMORY_MONITOR_PERIOD", "0.05")
    make_cluster(num_cpus=2)
    return threshold


def _make_allocator():
    """The body of the hogs below (built here, so that cloudpickle ships it by value):
    record the attempt, then allocate (and touch) memory until stopped."""

    def allocate(directory: str) -> str:
        open(os.path.join(directory, f"{time.time():.6f}-{os.getpid()}"), "w").close()
        held = []
        for _ in range(ALLOCATION_CAP // CHUNK):
            held.append(b"x" * CHUNK)
            time.sleep(0.01)
        return f"allocated {len(held) * CHUNK // MB} MB and was never stopped"

    return allocate


def _healthy() -> None:
    @shoal.remote
    def square(x):
        return x * x

    assert shoal.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]


def test_a_task_that_allocates_past_the_threshold_gets_out_of_memory_error(tmp_path, tight_cluster):
    allocate = _make_allocator()

    @shoal.remote(max_retries=1)
    def hog(directory):
        return allocate(directory)

    start = time.monotonic()
    with pytest.raises(OutOfMemoryError) as info:
        shoal.get(hog.remote(str(tmp_path)), timeout=90)
    err = info.value
    assert isinstance(err, MemoryError)
    text = str(err)
    assert "task hog failed" in text and "killed by the memory monitor" in text
    assert "SHOAL_MEMORY_USAGE_THRESHOLD" in text and "It ran 2 times (max_retries=1)" in text
    # The figures: the node was over the threshold, and what the victim held. (Not how
    # much: other programs on this machine, shared memory included, move the node's use
    # too, so the last attempt may have been stopped early on.)
    assert err.threshold == pytest.approx(tight_cluster, abs=1e-4)
    assert err.total > 0 and err.used > err.threshold * err.total
    assert 10 * MB < err.rss < err.total
    assert err.task_name == "hog" and err.node_id
    # Two attempts, the second after the back-off (0.5 s after the first stop).
    starts = sorted(float(name.split("-")[0]) for name in os.listdir(tmp_path))
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.5
    assert time.monotonic() - start < 60
    _healthy()  # the node manager and the head were not touched


def test_an_actor_stopped_by_the_monitor_says_why(tmp_path, tight_cluster):
    allocate = _make_allocator()

    @shoal.remote
    class Hoarder:
        def hoard(self, directory):
            return allocate(directory)

    h = Hoarder.remote()
    with pytest.raises(ActorDiedError, match="killed by the memory monitor") as info:
        shoal.get(h.hoard.remote(str(tmp_path)), timeout=90)
    assert "GiB" in info.value.reason
    _healthy()


def test_the_driver_is_never_the_victim(tmp_path, tight_cluster):
    """Memory held by the driver pushes the node over the threshold: the monitor stops
    the worker of a task (the only candidate), never the driver or the node itself."""
    started = str(tmp_path / "started")

    @shoal.remote(max_retries=0)
    def wait_a_little():
        open(started, "w").close()
        time.sleep(60)
        return "not stopped"

    ref = wait_a_little.remote()
    testing.wait_for(lambda: os.path.exists(started), timeout=30)
    held = []
    try:
        # (Allocated step by step until the monitor acts: other programs on the machine
        # may have freed memory since the threshold was computed.)
        while len(held) * CHUNK < ALLOCATION_CAP and not shoal.wait([ref], timeout=0.02)[0]:
            held.append(b"x" * CHUNK)
        with pytest.raises(OutOfMemoryError, match=r"It ran 1 time \(max_retries=0\)"):
            shoal.get(ref, timeout=30)
    finally:
        del held
    _healthy()


def test_a_malformed_setting_is_reported_by_init(monkeypatch, make_cluster):
    monkeypatch.setenv("SHOAL_MEMORY_USAGE_THRESHOLD", "most of it")
    with pytest.raises(ValueError, match="SHOAL_MEMORY_USAGE_THRESHOLD must be a fraction"):
        make_cluster(num_cpus=1)
    assert not shoal.is_initialized()
