"""Resources: node capacity, resource requests, accounting, runtime context, GPUs,
unschedulable work, and CPU lending by workers blocked in get."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import shoal
from shoal import testing
from shoal.exceptions import TaskUnschedulableError

CLUSTER_KWARGS = {"num_cpus": 2, "num_gpus": 2, "resources": {"custom": 1}}

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]


def _available(name):
    # Like Ray, a resource that is fully in use may be left out of available_resources().
    return shoal.available_resources().get(name, 0.0)


def _get_all(refs, timeout):
    """Wait for every task to end before raising the first error: a failed test must not
    leave tasks running into the next one."""
    shoal.wait(refs, num_returns=len(refs), timeout=timeout)
    return shoal.get(refs, timeout=1)


def _wait_until_idle():
    """Leases of finished tasks come back shortly after; wait for them rather than guess."""
    testing.wait_for(
        lambda: (_available("CPU"), _available("GPU"), _available("custom")) == (2.0, 2.0, 1.0),
        timeout=15,
        message=f"resources never all came back: {shoal.available_resources()}",
    )


def test_cluster_resources_report_node_capacity():
    resources = shoal.cluster_resources()
    assert resources["CPU"] == 2.0
    assert resources["GPU"] == 2.0
    assert resources["custom"] == 1.0
    assert resources["memory"] > 0
    assert resources["object_store_memory"] > 0


def test_available_resources_return_to_capacity_when_idle():
    _wait_until_idle()


def test_available_resources_drop_while_a_task_holds_them(gate, wait_path):
    _wait_until_idle()
    release = gate()

    @shoal.remote(num_gpus=1, resources={"custom": 1})
    def hold():
        wait_path(release)

    ref = hold.remote()
    testing.wait_for(lambda: _available("custom") == 0.0 and _available("GPU") == 1.0, timeout=30)
    Path(release).touch()
    shoal.get(ref, timeout=30)
    _wait_until_idle()


def test_nodes():
    nodes = shoal.nodes()
    assert len(nodes) == 1
    node = nodes[0]
    assert node["Alive"] is True
    assert node["Resources"]["CPU"] == 2.0
    assert node["Resources"]["GPU"] == 2.0
    assert node["Resources"]["custom"] == 1.0
    assert node["NodeID"] == shoal.get_runtime_context().get_node_id()


def test_runtime_context_in_a_task():
    driver = shoal.get_runtime_context()

    @shoal.remote
    def context():
        ctx = shoal.get_runtime_context()
        return ctx.get_job_id(), ctx.get_task_id(), ctx.get_actor_id(), ctx.get_node_id()

    (job1, task1, actor1, node1), (job2, task2, _, _) = shoal.get(
        [context.remote(), context.remote()], timeout=30
    )
    assert job1 == job2 == driver.get_job_id()
    assert task1 and task2 and task1 != task2
    assert actor1 is None
    assert node1 == driver.get_node_id() == shoal.nodes()[0]["NodeID"]


def test_runtime_context_in_an_actor(track_actor):
    @shoal.remote
    class Probe:
        def ids(self):
            ctx = shoal.get_runtime_context()
            return ctx.get_actor_id(), ctx.get_task_id()

    a, b = track_actor(Probe.remote()), track_actor(Probe.remote())
    (actor_a, task_a), (actor_a_again, task_a_again), (actor_b, _) = shoal.get(
        [a.ids.remote(), a.ids.remote(), b.ids.remote()], timeout=30
    )
    assert actor_a and actor_b and actor_a != actor_b
    assert actor_a == actor_a_again
    assert task_a and task_a_again and task_a != task_a_again
    assert shoal.get_runtime_context().get_actor_id() is None


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"CPU": 1.0}),
        ({"num_cpus": 0.5}, {"CPU": 0.5}),
        (
            {"num_cpus": 1, "num_gpus": 1, "resources": {"custom": 1}},
            {"CPU": 1.0, "GPU": 1.0, "custom": 1.0},
        ),
    ],
    ids=["default", "half-cpu", "cpu-gpu-custom"],
)
def test_assigned_resources(options, expected):
    @shoal.remote
    def assigned():
        return shoal.get_runtime_context().get_assigned_resources()

    assert shoal.get(assigned.options(**options).remote(), timeout=30) == expected


@pytest.mark.timeout(90)
def test_fractional_cpus_let_more_tasks_run_at_once(tmp_path, rendezvous):
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    directory = str(arrivals)

    @shoal.remote(num_cpus=0.5)
    def meet():
        rendezvous(directory, 4)  # 4 half-CPU tasks fit in 2 CPUs at once
        return "met"

    assert _get_all([meet.remote() for _ in range(4)], timeout=60) == ["met"] * 4


def test_num_cpus_limit_how_many_tasks_run_at_once(tmp_path, gate, rendezvous, wait_path):
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    directory, release = str(arrivals), gate()

    @shoal.remote(num_cpus=1)
    def hold():
        rendezvous(directory, 2)
        wait_path(release)

    @shoal.remote(num_cpus=1)
    def third():
        return "ran"

    holders = [hold.remote() for _ in range(2)]
    testing.wait_for(lambda: len(os.listdir(directory)) == 2, timeout=30)
    waiting = third.remote()
    ready, _ = shoal.wait([waiting], num_returns=1, timeout=1.0)
    assert ready == [], "a third 1-CPU task ran while two held both CPUs"
    Path(release).touch()
    assert shoal.get(waiting, timeout=30) == "ran"
    shoal.get(holders, timeout=30)


def test_memory_request():
    @shoal.remote(memory=50 * 1024 * 1024)
    def small():
        return "fits"

    assert shoal.get(small.remote(), timeout=30) == "fits"


def test_gpu_task_sees_its_gpu_in_cuda_visible_devices():
    @shoal.remote(num_gpus=1)
    def visible():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert shoal.get(visible.remote(), timeout=30) in {"0", "1"}


@pytest.mark.timeout(90)
def test_concurrent_gpu_tasks_see_different_gpus(tmp_path, rendezvous):
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    directory = str(arrivals)

    @shoal.remote(num_gpus=1)
    def visible():
        rendezvous(directory, 2)  # both hold a GPU at the same time
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert sorted(_get_all([visible.remote(), visible.remote()], timeout=60)) == ["0", "1"]


@pytest.mark.parametrize(
    "options",
    [
        {"num_cpus": 64},
        {"num_gpus": 3},
        {"resources": {"TPU": 1}},
        {"resources": {"custom": 2}},
        {"memory": 10**15},
    ],
    ids=["64-cpus", "3-gpus", "tpu", "2-custom", "petabyte"],
)
def test_work_no_node_can_fit_is_unschedulable(options):
    @shoal.remote
    def never():
        return "ran"

    with pytest.raises(TaskUnschedulableError):
        shoal.get(never.options(**options).remote(), timeout=30)


@pytest.mark.timeout(120)
def test_nested_gets_do_not_deadlock_a_small_cluster():
    @shoal.remote
    def fib(n):
        if n < 2:
            return n
        return shoal.get(fib.remote(n - 1)) + shoal.get(fib.remote(n - 2))

    assert shoal.get(fib.remote(15), timeout=110) == 610
