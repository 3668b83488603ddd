"""The shared-memory object store: zero-copy reads, reference counting, spilling, limits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
import shoal
import shoal.state
from shoal import testing
from shoal.exceptions import ObjectStoreFullError

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024


def segments() -> set[str]:
    return set(testing.shm_segments())


def store_stats() -> dict:
    return shoal.state.summarize_objects()


@pytest.mark.parametrize(
    "value",
    [
        b"x" * (300 * 1024),
        bytearray(b"y" * (300 * 1024)),
        np.arange(100_000, dtype=np.float64),
        np.arange(200_000, dtype=np.int8).reshape(400, 500),
        {"a": np.ones(50_000), "b": [np.zeros(30_000, dtype=np.uint16), "text"]},
        np.array(["a", "bb", "ccc"] * 20_000),
    ],
    ids=["bytes", "bytearray", "float64", "int8-2d", "nested", "unicode"],
)
def test_large_values_round_trip_through_shared_memory(make_cluster, value):
    make_cluster(num_cpus=2)
    ref = shoal.put(value)
    assert shoal.state.list_objects()[0]["place"] == "shared_memory"
    got = shoal.get(ref, timeout=30)
    if isinstance(value, dict):
        np.testing.assert_array_equal(got["a"], value["a"])
        np.testing.assert_array_equal(got["b"][0], value["b"][0])
        assert got["b"][1] == "text"
    elif isinstance(value, np.ndarray):
        np.testing.assert_array_equal(got, value)
        assert got.dtype == value.dtype
    else:
        assert bytes(got) == bytes(value)


def test_two_workers_read_the_same_pages_without_copying(make_cluster):
    make_cluster(num_cpus=2)

    @shoal.remote
    def backing_file(arr):
        # The file that the array's memory comes from, per this process's own mappings.
        address = arr.ctypes.data
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if start <= address < end:
                    return arr.flags.writeable, parts[-1], os.getpid()
        return arr.flags.writeable, None, os.getpid()

    big = shoal.put(np.ones(4 * MB // 8))
    results = shoal.get([backing_file.remote(big) for _ in range(2)], timeout=30)
    paths = {path for _, path, _ in results}
    assert all(not writeable for writeable, _, _ in results)
    assert len(paths) == 1 and next(iter(paths)).startswith("/dev/shm/shoal-")
    local = shoal.get(big, timeout=30)
    assert not local.flags.writeable


def test_put_and_delete_cycles_leave_the_store_as_it_was(make_cluster):
    make_cluster(num_cpus=2)
    before = segments()
    payload = np.ones(10 * MB // 8)
    for _ in range(1000):
        ref = shoal.put(payload)
        del ref
    testing.wait_for(lambda: store_stats()["used"] == 0 and segments() == before, timeout=30)
    assert store_stats()["objects"] == 0


def test_a_small_store_spills_to_disk_and_reads_everything_back(make_cluster, tmp_path):
    spill = tmp_path / "spill"
    make_cluster(num_cpus=2, object_store_memory=100 * MB, object_spilling_directory=str(spill))
    refs = [shoal.put(np.full(10 * MB // 8, i, dtype=np.int64)) for i in range(50)]  # 500 MB
    stats = store_stats()
    assert stats["used"] <= 100 * MB and stats["spilled"] >= 400 * MB
    assert any(name.startswith("shoal-") for name in os.listdir(spill))
    places = {rec["place"] for rec in shoal.state.list_objects()}
    assert places == {"shared_memory", "spilled"}
    for i, ref in enumerate(refs):
        arr = shoal.get(ref, timeout=30)
        assert arr[0] == i and arr[-1] == i

    @shoal.remote
    def total(arr):
        return int(arr.sum())

    # Spilled objects also come back as task arguments.
    assert shoal.get(total.remote(refs[0]), timeout=30) == 0
    assert shoal.get(total.remote(refs[1]), timeout=30) == 10 * MB // 8
    del refs
    testing.wait_for(lambda: store_stats()["spilled"] == 0 and not os.listdir(spill), timeout=30)


def test_objects_no_memory_or_disk_can_take_raise_store_full(make_cluster, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the spill directory")
    spill = tmp_path / "tiny"
    spill.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(spill)], check=True)
    try:
        make_cluster(num_cpus=2, object_store_memory=50 * MB, object_spilling_directory=str(spill))
        kept = []
        with pytest.raises(ObjectStoreFullError) as info:
            for _ in range(20):
                kept.append(shoal.put(np.ones(10 * MB // 8)))
        message = str(info.value)
        assert "bytes" in message and "spill" in message
        # The store still works once memory is given back.
        del kept
        testing.wait_for(lambda: store_stats()["used"] == 0, timeout=30)
        assert shoal.get(shoal.put(np.arange(5)), timeout=30).tolist() == [0, 1, 2, 3, 4]
        shoal.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(spill)], check=False)


def test_a_ref_held_only_inside_another_object_keeps_it_alive(make_cluster):
    make_cluster(num_cpus=2)
    inner = shoal.put(np.arange(1 * MB))
    inner_id = inner.hex()
    outer = shoal.put({"payload": inner})
    del inner
    # The inner object lives on because the outer one contains it.
    testing.wait_for(
        lambda: any(r["object_id"] == inner_id for r in shoal.state.list_objects()), timeout=10
    )

    @shoal.remote
    def read(container):
        return int(shoal.get(container["payload"])[-1])

    assert shoal.get(read.remote(outer), timeout=30) == MB - 1
    del outer
    testing.wait_for(lambda: store_stats()["objects"] == 0, timeout=30)


def test_a_large_task_result_is_freed_when_its_ref_goes(make_cluster):
    make_cluster(num_cpus=2)

    @shoal.remote
    def make():
        return np.ones(2 * MB)

    ref = make.remote()
    assert shoal.get(ref, timeout=30).sum() == 2 * MB
    assert store_stats()["objects"] == 1
    del ref
    testing.wait_for(lambda: store_stats()["objects"] == 0, timeout=30)


@contextlib.contextmanager
def driver_holding_objects(tmp_path, count: int) -> Iterator[subprocess.Popen[str]]:
    """A driver process that put ``count`` 8 MB objects and waits; killed on the way out."""
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, numpy as np, shoal
            shoal.init(num_cpus=1)
            refs = [shoal.put(np.ones(1 << 20)) for _ in range({count})]
            print("ready", flush=True)
            sys.stdin.read()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killing_the_driver_frees_its_objects(tmp_path):
    with driver_holding_objects(tmp_path, 5) as proc:
        assert len(testing.shm_segments()) >= 5
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    testing.assert_no_leaks(timeout=20)


def test_the_next_start_removes_what_a_killed_cluster_left(make_cluster, tmp_path):
    with driver_holding_objects(tmp_path, 3) as proc:
        left = set(testing.shm_segments())
        assert len(left) >= 3
        # SIGKILL the head (its workers follow it) and the driver: nobody cleans up.
        for child in psutil.Process(proc.pid).children():
            if "shoal._head" in " ".join(child.cmdline()):
                child.kill()
        proc.kill()
        proc.wait(10)
        testing.wait_for(lambda: not testing.shoal_processes(), timeout=20)
        assert left <= set(testing.shm_segments())
    make_cluster(num_cpus=1)  # a new cluster's head removes the dead one's segments
    testing.wait_for(lambda: not (left & set(testing.shm_segments())), timeout=20)


def test_a_raised_remote_error_does_not_pin_the_callers_refs(make_cluster):
    make_cluster(num_cpus=2)

    @shoal.remote
    def slow(x):
        return x

    def caller():
        big = shoal.put(np.ones(1 * MB))  # a local of the frame that sees the error
        failed = slow.remote(1)
        shoal.cancel(failed)
        try:
            shoal.get(failed, timeout=30)
        except shoal.exceptions.TaskCancelledError:
            pass
        try:
            shoal.get(failed, timeout=30)  # raised twice from the same stored error
        except shoal.exceptions.TaskCancelledError:
            pass
        return big.hex()

    for _ in range(3):
        caller()
    # The stored errors must not hold the callers' frames (and their refs) alive.
    testing.wait_for(lambda: store_stats()["objects"] == 0, timeout=30)
