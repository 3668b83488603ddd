"""The state API in client-server mode, and the command line over it: a head started with
`shoal start --head --port`, a client driver in this process (tcp, with the key file),
drivers in subprocesses, and `shoal list|summary|status|memory|stack` with and without
--json (JSON parsed, tables read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import shoal
import shoal.state as state
from shoal import _api, testing

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def head(shoal_cli, leak_check, tmp_path_factory):
    """(port, key file) of a head started by `shoal start --head`, stopped after the module."""
    port = testing.free_port()
    key = str(tmp_path_factory.mktemp("key") / "cluster.key")
    started = shoal_cli(
        "start", "--head", "--port", str(port), "--num-cpus", "2", "--key-file", key
    )  # fmt: skip
    try:
        assert started.returncode == 0, testing.describe_run(started)
        yield port, key
    finally:
        stopped = shoal_cli("stop")
        leak_check("after `shoal stop` of the state CLI tests' head")
    assert stopped.returncode == 0, testing.describe_run(stopped)


def cli_json(shoal_cli, *args: str) -> dict:
    result = shoal_cli(*args, "--json")
    assert result.returncode == 0, testing.describe_run(result)
    return json.loads(result.stdout)


def test_state_api_from_a_client_driver(head, gate, wait_path):
    port, key = head
    shoal.init(f"tcp://127.0.0.1:{port}", key_file=key)
    try:
        assert _api._cluster is not None and _api._cluster.core.client

        @shoal.remote
        def from_the_client(x):
            return x * 2

        @shoal.remote
        def fails_for_the_client():
            raise RuntimeError("seen from afar")

        @shoal.remote
        def client_gated_frame(p):
            wait_path(p)
            return "ok"

        refs = [from_the_client.remote(i) for i in range(4)]
        assert shoal.get(refs) == [0, 2, 4, 6]
        bad = fails_for_the_client.remote()
        with pytest.raises(RuntimeError):
            shoal.get(bad)

        def failed():
            rec = state.get_task(bad)
            return rec if rec and rec["state"] == "FAILED" else None

        rec = testing.wait_for(failed, timeout=20)
        assert (rec["error_type"], rec["error_message"]) == ("RuntimeError", "seen from afar")
        assert "fails_for_the_client" in rec["traceback"]
        summary = testing.wait_for(
            lambda: (
                (s := state.summarize_tasks())["by_name"].get("from_the_client") == {"FINISHED": 4}
                and s
            ),
            timeout=20,
        )
        assert summary["by_name"]["fails_for_the_client"] == {"FAILED": 1}
        me = state.list_workers(filters=[("type", "=", "DRIVER"), ("pid", "=", os.getpid())])
        assert len(me) == 1
        nodes = state.list_nodes()
        assert len(nodes) == 1 and nodes[0]["resources_total"]["CPU"] == 2.0

        path = gate()
        held = client_gated_frame.remote(path)
        testing.wait_for(
            lambda: (r := state.get_task(held)) and r["state"] == "RUNNING", timeout=20
        )
        assert "client_gated_frame" in state.stack(task_id=held)
        Path(path).touch()
        assert shoal.get(held, timeout=30) == "ok"
        snap = state.cluster_snapshot()
        assert snap["tasks"]["total"] >= 6 and len(snap["nodes"]) == 1
    finally:
        shoal.shutdown()


DRIVER = """
import shoal
shoal.init(address="auto")

@shoal.remote
def cli_visible_task(x):
    return x

@shoal.remote
def cli_failing_task():
    return 1 / 0

@shoal.remote
class CliActor:
    def hello(self):
        return "hi"

assert shoal.get([cli_visible_task.remote(i) for i in range(3)]) == [0, 1, 2]
try:
    shoal.get(cli_failing_task.remote())
except ZeroDivisionError:
    pass
actor = CliActor.remote()
assert shoal.get(actor.hello.remote()) == "hi"
shoal.shutdown()  # the actor dies with its owner
"""


def test_list_summary_status_memory(head, run_driver, shoal_cli):
    port, key = head
    run_driver(DRIVER)

    def failed_listed():
        body = cli_json(shoal_cli, "list", "tasks", "--filter", "name=cli_failing_task")
        return body if body["records"] and body["records"][0]["state"] == "FAILED" else None

    body = testing.wait_for(failed_listed, timeout=30, interval=0.2)
    rec = body["records"][0]
    assert rec["error_type"] == "ZeroDivisionError" and "traceback" not in rec
    detailed = cli_json(shoal_cli, "list", "tasks", "--detail", "--filter", "state=failed")
    assert any("cli_failing_task" in (r["traceback"] or "") for r in detailed["records"])

    limited = cli_json(shoal_cli, "list", "tasks", "--limit", "1")
    assert len(limited["records"]) == 1 and limited["truncated"] and limited["total"] >= 4

    table = shoal_cli("list", "tasks", "--filter", "name!=nothing-has-this-name")
    assert table.returncode == 0, testing.describe_run(table)
    for text in ("cli_visible_task", "cli_failing_task", "FINISHED", "FAILED", "ZeroDivisionError"):
        assert text in table.stdout, testing.describe_run(table)

    summary = cli_json(shoal_cli, "summary", "tasks")
    assert summary["by_name"]["cli_visible_task"] == {"FINISHED": 3}
    assert summary["by_name"]["CliActor.hello"] == {"FINISHED": 1}
    human = shoal_cli("summary", "tasks")
    assert "cli_visible_task" in human.stdout and "FINISHED" in human.stdout, testing.describe_run(
        human
    )

    def actor_dead():
        actors = cli_json(shoal_cli, "list", "actors", "--filter", "class_name=CliActor")
        return actors if actors["records"] and actors["records"][0]["state"] == "DEAD" else None

    actors = testing.wait_for(actor_dead, timeout=30, interval=0.2)
    assert "owner" in actors["records"][0]["death_cause"]
    actor_table = shoal_cli("list", "actors")
    assert "CliActor" in actor_table.stdout and "DEAD" in actor_table.stdout

    workers = cli_json(shoal_cli, "list", "workers", "--filter", "type=WORKER")
    assert workers["records"] and all(w["type"] == "WORKER" for w in workers["records"])
    nodes = cli_json(shoal_cli, "list", "nodes")
    assert [n["is_head"] for n in nodes["records"]] == [True]
    assert "records" in cli_json(shoal_cli, "list", "objects")

    status = cli_json(shoal_cli, "status")
    assert status["nodes"][0]["resources_total"]["CPU"] == 2.0
    assert status["tasks"]["by_state"]["FAILED"] >= 1
    status_table = shoal_cli("status")
    assert "CPU" in status_table.stdout and "tasks:" in status_table.stdout, testing.describe_run(
        status_table
    )
    memory = cli_json(shoal_cli, "memory")
    assert set(memory) >= {"objects", "stats"} and memory["stats"]["capacity"] > 0

    # A client elsewhere: the same commands over tcp with the key.
    remote = cli_json(
        shoal_cli, "list", "nodes", "--address", f"127.0.0.1:{port}", "--key-file", key
    )
    assert remote["records"][0]["node_id"] == nodes["records"][0]["node_id"]


def test_bad_filters_are_refused_with_the_reason(head, shoal_cli):
    unknown = shoal_cli("list", "tasks", "--filter", "colour=red")
    assert unknown.returncode == 1 and "unknown filter key 'colour' for tasks" in unknown.stderr
    malformed = shoal_cli("list", "actors", "--filter", "nonsense")
    assert malformed.returncode == 1 and "KEY=VALUE" in malformed.stderr
    stack = shoal_cli("stack", "--task", "00" * 16)
    assert stack.returncode == 1 and "no task" in stack.stderr, testing.describe_run(stack)


STACK_DRIVER = """
import os, sys, time
import shoal
shoal.init(address="auto")

@shoal.remote
def cli_stack_target_frame(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return "released"

ref = cli_stack_target_frame.remote(sys.argv[1])
print("TASK " + ref.binary()[:16].hex(), flush=True)
print("RESULT " + shoal.get(ref, timeout=150), flush=True)
"""


def test_stack_of_a_running_task(head, start_driver, shoal_cli, gate):
    path = gate()
    driver = start_driver(STACK_DRIVER, path)
    task_id = driver.wait_for_line("TASK ").split()[1]

    def running():
        body = cli_json(shoal_cli, "list", "tasks", "--filter", f"task_id={task_id}")
        return body["records"] and body["records"][0]["state"] == "RUNNING"

    testing.wait_for(running, timeout=30, interval=0.2)
    stack = shoal_cli("stack", "--task", task_id)
    assert stack.returncode == 0, testing.describe_run(stack)
    assert "cli_stack_target_frame" in stack.stdout and "time.sleep" in stack.stdout
    assert "RESULT" not in driver.stdout()  # still running after its stack was taken
    node_stack = shoal_cli("stack")
    assert "cli_stack_target_frame" in node_stack.stdout, testing.describe_run(node_stack)
    Path(path).touch()
    assert "RESULT released" in driver.finish(timeout=60)
