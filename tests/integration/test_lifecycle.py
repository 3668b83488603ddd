"""Lifecycle: init and shutdown, and that every way a driver ends (shutdown, exit, SIGKILL)
leaves no process and no shared-memory segment behind. Also: task output reaches the
driver's stdout.

No module-scoped cluster here: each test owns its cluster, in-process or in a driver
subprocess.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import psutil
import pytest
import shoal
from shoal import testing

pytestmark = pytest.mark.timeout(60)


def _square_sum():
    @shoal.remote
    def square(x):
        return x * x

    return sum(shoal.get([square.remote(i) for i in range(4)], timeout=30))


def test_spec_example_with_default_init(make_cluster):
    make_cluster()  # shoal.init() with no arguments

    @shoal.remote
    def square(x):
        return x * x

    assert shoal.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]

    @shoal.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def increment(self):
            self.n += 1
            return self.n

    c = Counter.remote()
    [c.increment.remote() for _ in range(5)]
    assert shoal.get(c.increment.remote(), timeout=30) == 6
    assert shoal.cluster_resources()["CPU"] >= 1


@pytest.mark.parametrize(
    "fresh_cluster",
    [{"num_cpus": 1}, {"num_cpus": 3, "num_gpus": 1, "resources": {"widget": 2}}],
    indirect=True,
    ids=["1-cpu", "3-cpus-1-gpu-widgets"],
)
def test_node_capacity_comes_from_init(fresh_cluster, request):
    requested = request.node.callspec.params["fresh_cluster"]
    expected = {"CPU": requested["num_cpus"], **requested.get("resources", {})}
    if "num_gpus" in requested:
        expected["GPU"] = requested["num_gpus"]
    resources = shoal.cluster_resources()
    assert {name: resources.get(name) for name in expected} == expected
    assert shoal.nodes()[0]["Resources"]["CPU"] == requested["num_cpus"]


def test_init_and_shutdown(make_cluster, leak_check):
    assert not shoal.is_initialized()
    make_cluster(num_cpus=2)
    assert shoal.is_initialized()
    assert _square_sum() == 14
    shoal.shutdown()
    assert not shoal.is_initialized()
    leak_check("after shutdown()")


def test_shutdown_twice_is_harmless(make_cluster):
    make_cluster(num_cpus=1)
    shoal.shutdown()
    shoal.shutdown()
    assert not shoal.is_initialized()


def test_init_again_after_shutdown(make_cluster, leak_check):
    make_cluster(num_cpus=1)
    assert _square_sum() == 14
    shoal.shutdown()
    leak_check("after the first shutdown()")
    make_cluster(num_cpus=1)
    assert _square_sum() == 14


def test_shutdown_with_actors_and_large_objects_leaves_nothing(make_cluster, leak_check):
    make_cluster(num_cpus=2)

    @shoal.remote
    class Holder:
        def __init__(self, array):
            self.array = array

        def size(self):
            return self.array.nbytes

    big = shoal.put(np.ones(10 * 1024 * 1024, dtype=np.uint8))
    holder = Holder.remote(big)
    assert shoal.get(holder.size.remote(), timeout=30) == 10 * 1024 * 1024
    shoal.shutdown()
    leak_check("after shutdown() with an actor and a large object alive")


def test_shutdown_stops_the_runtime_threads(make_cluster):
    before = set(threading.enumerate())
    make_cluster(num_cpus=1)
    assert _square_sum() == 14
    shoal.shutdown()
    testing.wait_for(
        lambda: set(threading.enumerate()) <= before,
        timeout=10,
        message="threads left after shutdown()",
    )


# -------------------------------------------------------------------- driver subprocesses

BUSY_DRIVER = """
import os, sys
import numpy as np
import shoal

shoal.init(num_cpus=2)

@shoal.remote
def pid():
    return os.getpid()

@shoal.remote
def forever(path):
    import time
    while not os.path.exists(path):  # never created: runs until its worker is killed
        time.sleep(0.05)

@shoal.remote
class Keeper:
    def pid(self):
        return os.getpid()

keeper = Keeper.remote()
big = shoal.put(np.ones(10 * 1024 * 1024, dtype=np.uint8))
pids = [shoal.get(pid.remote(), timeout=60), shoal.get(keeper.pid.remote(), timeout=60)]
running = forever.remote(os.path.join(os.getcwd(), "never"))
print("PIDS " + " ".join(map(str, pids)), flush=True)
sys.stdin.read()
"""


def _pids(driver):
    return [int(p) for p in driver.wait_for_line("PIDS ").split()[1:]]


def _assert_pids_gone(pids):
    alive = [pid for pid in pids if psutil.pid_exists(pid) and _is_shoal(pid)]
    assert not alive, f"worker processes still alive: {alive}"


def _is_shoal(pid):
    return any(p.pid == pid for p in testing.shoal_processes())


def test_leak_checks_see_the_runtime_processes(start_driver, leak_check):
    """Guards the other tests here: shoal.testing must see workers, else they prove nothing."""
    driver = start_driver(BUSY_DRIVER)
    pids = _pids(driver)
    seen = {p.pid for p in testing.shoal_processes()}
    assert set(pids) <= seen, f"shoal.testing.shoal_processes() misses workers {set(pids) - seen}"
    driver.finish(timeout=30)
    leak_check("after the driver exited")


def test_driver_sigkill_leaves_nothing(start_driver, leak_check):
    driver = start_driver(BUSY_DRIVER)
    pids = _pids(driver)
    assert testing.shoal_processes()
    driver.sigkill()
    leak_check("after the driver was killed with SIGKILL", timeout=20)
    _assert_pids_gone(pids)


def test_driver_exit_without_shutdown_leaves_nothing(start_driver, leak_check):
    driver = start_driver(BUSY_DRIVER.replace("sys.stdin.read()", "sys.stdin.read()\nprint('BYE')"))
    pids = _pids(driver)
    assert "BYE" in driver.finish(timeout=30)
    leak_check("after the driver exited without shutdown()")
    _assert_pids_gone(pids)


def test_driver_shutdown_leaves_nothing(start_driver, leak_check):
    driver = start_driver(
        BUSY_DRIVER.replace("sys.stdin.read()", "sys.stdin.read()\nshoal.shutdown()")
    )
    pids = _pids(driver)
    driver.finish(timeout=30)
    leak_check("after the driver called shutdown()")
    _assert_pids_gone(pids)


CHATTY_DRIVER = """
import os, sys
import shoal

sys.stdout.reconfigure(line_buffering=True)  # as on a terminal; workers keep their defaults

shoal.init(num_cpus=1)

@shoal.remote
def chatty_task():
    print("hello-from-chatty-task")
    return os.getpid()

print(f"WORKER_PID {shoal.get(chatty_task.remote(), timeout=60)}", flush=True)
sys.stdin.read()
shoal.shutdown()
"""


def test_task_prints_reach_the_driver_stdout_with_name_and_pid(start_driver, leak_check):
    driver = start_driver(CHATTY_DRIVER, unbuffered=False)
    pid = int(driver.wait_for_line("WORKER_PID ").split()[1])
    # Output is forwarded asynchronously: wait for it, after the result if need be.
    stdout = driver.wait_for_stdout("hello-from-chatty-task", timeout=20)
    line = next(ln for ln in stdout.splitlines() if "hello-from-chatty-task" in ln)
    prefix = line[: line.index("hello-from-chatty-task")]
    assert "chatty_task" in prefix, line
    assert re.search(rf"\b{pid}\b", prefix), line
    driver.finish(timeout=30)
    leak_check("after the chatty driver")
