"""The state API against a real local cluster: tasks running, finished, failed (with the
error), cancelled and retried; actors alive and dead; objects; workers; nodes; filters,
limits, summaries, snapshots; and the stacks of running workers.

Task records come from events flushed about twice a second, so every check waits for its
condition (with a deadline) instead of expecting the record at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import shoal
import shoal.state as state
from shoal import testing
from shoal._state_views import FIELDS
from shoal.exceptions import ActorDiedError, WorkerCrashedError

pytestmark = pytest.mark.timeout(120)

CLUSTER_KWARGS = {"num_cpus": 2}


def task_hex(ref) -> str:
    return ref.binary()[:16].hex()


def wait_task(ref, state_name: str, timeout: float = 20.0) -> dict:
    def check():
        rec = state.get_task(ref)
        return rec if rec is not None and rec["state"] == state_name else None

    return testing.wait_for(check, timeout=timeout, message=f"task never {state_name}")


def test_finished_and_failed_tasks_with_their_error(cluster):
    @shoal.remote
    def add_one(x):
        return x + 1

    @shoal.remote
    def divide_by_zero_here():
        return 1 / 0

    refs = [add_one.remote(i) for i in range(5)]
    assert shoal.get(refs) == [1, 2, 3, 4, 5]
    bad = divide_by_zero_here.remote()
    with pytest.raises(ZeroDivisionError):
        shoal.get(bad)

    rec = wait_task(bad, "FAILED")
    assert rec["task_id"] == task_hex(bad)
    assert rec["name"] == "divide_by_zero_here" and rec["type"] == "NORMAL_TASK"
    assert (rec["error_type"], rec["error_message"]) == ("ZeroDivisionError", "division by zero")
    assert "divide_by_zero_here" in rec["traceback"] and "1 / 0" in rec["traceback"]
    assert rec["attempt"] == 1
    assert rec["node_id"] == cluster["node_id"]
    assert rec["pid"] and rec["pid"] != os.getpid()
    assert rec["submitted_at"] <= rec["started_at"] <= rec["finished_at"]

    finished = [wait_task(ref, "FINISHED") for ref in refs]
    for rec in finished:
        assert rec["name"] == "add_one" and rec["error_type"] is None
        assert rec["job_id"] == cluster["job_id"]
        assert rec["duration"] is not None and rec["duration"] >= 0
    drivers = state.list_workers(filters=[("type", "=", "DRIVER"), ("pid", "=", os.getpid())])
    assert [d["worker_id"] for d in drivers] == [finished[0]["owner_id"]]


def test_a_running_task_filters_and_limits(cluster, gate, wait_path):
    path = gate()

    @shoal.remote
    def held_at_gate(p):
        wait_path(p)
        return "done"

    @shoal.remote
    def quick():
        return 1

    shoal.get([quick.remote() for _ in range(3)])
    ref = held_at_gate.remote(path)
    running = testing.wait_for(
        lambda: state.list_tasks(
            filters=[("state", "=", "running"), ("name", "=", "held_at_gate")]
        ),
        timeout=20,
    )
    assert [r["task_id"] for r in running] == [task_hex(ref)]
    assert running.total == 1 and not running.truncated
    others = state.list_tasks(filters=[("state", "!=", "RUNNING")], limit=1000)
    assert task_hex(ref) not in {r["task_id"] for r in others}
    assert state.list_tasks(filters=[("pid", "=", running[0]["pid"])])  # ints compare as text

    one = state.list_tasks(limit=1)
    assert len(one) == 1 and one.truncated and one.total >= 4
    assert state.list_tasks(limit=0) == [] and state.list_tasks(limit=0).total >= 4

    workers = state.list_workers(filters=[("state", "=", "RUNNING")])
    busy = [w for w in workers if task_hex(ref) in w["task_ids"]]
    assert len(busy) == 1 and busy[0]["pid"] == running[0]["pid"]
    assert busy[0]["task_names"] == ["held_at_gate"] and busy[0]["type"] == "WORKER"

    with pytest.raises(ValueError, match="unknown filter key 'colour' for tasks"):
        state.list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(ValueError, match="unknown filter operator '~'"):
        state.list_actors(filters=[("state", "~", "ALIVE")])
    with pytest.raises(ValueError, match="limit must be"):
        state.list_nodes(limit=-1)

    Path(path).touch()
    assert shoal.get(ref, timeout=30) == "done"
    assert wait_task(ref, "FINISHED")["pid"] == running[0]["pid"]


def test_summary_counts_by_name_and_state(cluster):
    @shoal.remote
    def counted_three_times():
        return None

    @shoal.remote
    def counted_failure():
        raise KeyError("missing")

    shoal.get([counted_three_times.remote() for _ in range(3)])
    with pytest.raises(KeyError):
        shoal.get(counted_failure.remote())

    def counts():
        summary = state.summarize_tasks()
        by_name = summary["by_name"]
        if by_name.get("counted_three_times") == {"FINISHED": 3} and by_name.get(
            "counted_failure"
        ) == {"FAILED": 1}:
            return summary
        return None

    summary = testing.wait_for(counts, timeout=20)
    assert summary["by_state"]["FINISHED"] >= 3 and summary["by_state"]["FAILED"] >= 1
    assert summary["total"] == sum(summary["by_state"].values())
    assert summary["capacity"] == 10_000 and summary["dropped_events"] == 0


def test_waiting_for_an_argument_then_cancelled(cluster, gate, wait_path):
    path = gate()

    @shoal.remote
    def slow_producer(p):
        wait_path(p)
        return 1

    @shoal.remote
    def consumer(x):
        return x

    blocker = slow_producer.remote(path)
    waiting = consumer.remote(blocker)
    wait_task(waiting, "PENDING_ARGS")
    shoal.cancel(waiting)
    rec = wait_task(waiting, "CANCELLED")
    assert rec["error_type"] == "TaskCancelledError"
    Path(path).touch()
    assert shoal.get(blocker, timeout=30) == 1


def test_a_retried_task_counts_its_attempts(cluster):
    @shoal.remote(max_retries=1)
    def crash_the_worker():
        os._exit(3)

    ref = crash_the_worker.remote()
    with pytest.raises(WorkerCrashedError):
        shoal.get(ref, timeout=60)
    rec = wait_task(ref, "FAILED")
    assert rec["attempt"] == 2
    assert rec["error_type"] == "WorkerCrashedError" and "died" in rec["error_message"]


def test_actors_alive_then_dead_and_their_calls(cluster):
    @shoal.remote
    class StateCounter:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n

    counter = StateCounter.options(name="state-api-counter").remote()
    assert shoal.get(counter.incr.remote()) == 1
    aid = counter._actor_id.hex()
    rec = testing.wait_for(lambda: state.get_actor(counter), timeout=10)
    assert rec["actor_id"] == aid and rec["state"] == "ALIVE"
    assert (rec["class_name"], rec["name"]) == ("StateCounter", "state-api-counter")
    assert rec["node_id"] == cluster["node_id"] and rec["pid"]
    assert rec["created_at"] <= rec["alive_at"]
    assert state.get_actor(aid[:10])["actor_id"] == aid  # a prefix will do
    alive = state.list_actors(filters=[("state", "=", "ALIVE"), ("actor_id", "=", aid)])
    assert len(alive) == 1

    calls = testing.wait_for(
        lambda: state.list_tasks(filters=[("actor_id", "=", aid), ("state", "=", "FINISHED")]),
        timeout=20,
    )
    assert calls[0]["name"] == "StateCounter.incr" and calls[0]["type"] == "ACTOR_TASK"
    assert calls[0]["pid"] == rec["pid"]
    workers = state.list_workers(filters=[("actor_id", "=", aid)])
    assert [w["actor_class"] for w in workers] == ["StateCounter"]

    shoal.kill(counter)
    late = counter.incr.remote()  # fails in this process: the actor was killed
    with pytest.raises(ActorDiedError):
        shoal.get(late)
    dead = testing.wait_for(
        lambda: (r := state.get_actor(aid)) and r["state"] == "DEAD" and r, timeout=20
    )
    assert "killed" in dead["death_cause"] and dead["dead_at"] >= dead["alive_at"]
    assert aid in {a["actor_id"] for a in state.list_actors(filters=[("state", "=", "DEAD")])}
    failed_call = wait_task(late, "FAILED")
    assert failed_call["error_type"] == "ActorDiedError"
    assert state.get_actor("00" * 16) is None


def test_objects_nodes_and_a_snapshot(cluster):
    big = shoal.put(b"x" * (1 << 20))
    records = testing.wait_for(
        lambda: state.list_objects(filters=[("object_id", "=", big.hex())]), timeout=10
    )
    obj = records[0]
    assert obj["size"] >= 1 << 20
    assert obj["place"] == "shared_memory" and obj["spilled"] is False
    assert obj["reference_type"] == "LOCAL_REFERENCE"
    assert obj["owner"] == f"driver pid={os.getpid()}"
    # Store totals come with the node's reports (sent within 20 ms of a change).
    testing.wait_for(lambda: state.summarize_objects()["used"] >= 1 << 20, timeout=10)

    nodes = state.list_nodes()
    assert len(nodes) == 1
    node = nodes[0]
    assert node["node_id"] == cluster["node_id"] and node["is_head"] and node["alive"]
    assert node["resources_total"]["CPU"] == 2.0
    assert node["object_store_capacity"] > 0 and node["memory_total"] > 0
    # CPU use is known from the node's second report on (it is a difference).
    testing.wait_for(lambda: state.list_nodes()[0]["cpu_percent"] is not None, timeout=10)
    assert state.list_nodes(filters=[("alive", "=", "false")]) == []

    @shoal.remote
    def fails_for_the_snapshot():
        raise ValueError("shown in the monitor")

    with pytest.raises(ValueError):
        shoal.get(fails_for_the_snapshot.remote())

    def snapshot_with_failure():
        snap = state.cluster_snapshot()
        names = [f["name"] for f in snap["failures"]]
        return snap if "fails_for_the_snapshot" in names else None

    snap = testing.wait_for(snapshot_with_failure, timeout=20)
    failure = next(f for f in snap["failures"] if f["name"] == "fails_for_the_snapshot")
    assert "shown in the monitor" in failure["traceback"]
    assert snap["nodes"][0]["node_id"] == cluster["node_id"]
    assert snap["tasks"]["by_state"]["FAILED"] >= 1
    assert big.hex() in {o["object_id"] for o in snap["objects"]["largest"]}
    assert snap["objects"]["used"] >= 1 << 20 and snap["workers"]["drivers"] >= 1


def test_every_kind_has_the_documented_keys(cluster):
    @shoal.remote
    class KeyHolder:
        def ping(self):
            return 1

    holder = KeyHolder.remote()
    shoal.get(holder.ping.remote())
    kept = shoal.put(b"k" * (200 << 10))
    testing.wait_for(
        lambda: state.list_tasks(filters=[("name", "=", "KeyHolder.ping")]), timeout=20
    )
    for kind in ("tasks", "actors", "objects", "nodes", "workers"):
        records = getattr(state, f"list_{kind}")(**({"detail": True} if kind == "tasks" else {}))
        assert records, kind
        assert set(records[0]) == set(FIELDS[kind]), kind
    assert set(state.get_task(state.list_tasks()[0]["task_id"])) == set(FIELDS["tasks"])
    # Ray's name for the module works too.
    import shoal.util.state as util_state

    assert util_state.list_tasks is state.list_tasks
    shoal.kill(holder)
    del kept


def test_stack_of_a_task_blocked_on_a_gate_while_it_keeps_running(cluster, gate, wait_path):
    path = gate()

    @shoal.remote
    def parked_in_a_distinctive_frame(p):
        wait_path(p)
        return "finished after the stack was taken"

    ref = parked_in_a_distinctive_frame.remote(path)
    running = wait_task(ref, "RUNNING")
    text = state.stack(task_id=ref)
    assert "parked_in_a_distinctive_frame" in text and "wait_path" in text
    assert f"pid {running['pid']}" in text and 'Thread "MainThread"' in text
    assert "parked_in_a_distinctive_frame" in state.stack(task_id=task_hex(ref))
    node_text = state.stack(node_id=cluster["node_id"][:8])
    assert "parked_in_a_distinctive_frame" in node_text
    # Taking the stacks did not stop the task: it is still running, and finishes.
    ready, _ = shoal.wait([ref], timeout=0.2)
    assert ready == []
    assert state.get_task(ref)["state"] == "RUNNING"
    Path(path).touch()
    assert shoal.get(ref, timeout=30) == "finished after the stack was taken"
    wait_task(ref, "FINISHED")
    with pytest.raises(ValueError, match="is not running: it is FINISHED"):
        state.stack(task_id=ref)
    with pytest.raises(ValueError, match="pass at most one"):
        state.stack(task_id=ref, node_id="ab")


def test_stack_of_an_actor(cluster, gate, wait_path, track_actor):
    path = gate()

    @shoal.remote
    class Parked:
        def wait_in_a_method_named_for_the_test(self, p):
            wait_path(p)
            return "out"

    actor = track_actor(Parked.remote())
    call = actor.wait_in_a_method_named_for_the_test.remote(path)
    wait_task(call, "RUNNING")
    text = state.stack(actor_id=actor)
    assert "wait_in_a_method_named_for_the_test" in text and "Parked" in text
    Path(path).touch()
    assert shoal.get(call, timeout=30) == "out"
