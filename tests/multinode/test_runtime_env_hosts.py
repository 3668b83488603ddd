"""Runtime environments across hosts: a head, a node in another network namespace (its own
/dev/shm, session directory and runtime env cache), and a client-server driver on a third
host that has no Shoal processes.

    head (1 CPU) <--tcp--> a (1 CPU, {"at_a": 1})
                 <--tcp--> client: shoal.init("HEAD:6381", key_file=..., runtime_env=...)

The client's job env (working_dir, py_modules, pip from a wheel made here, env_vars) is
uploaded through its one connection to the head; node a fetches the packages from the head
and builds its own virtual environment. The file system is shared (only networks and
/dev/shm are not), so the wheel's path is valid on every host, as a requirement must be.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import netns
import pytest
from netns import require_netns

pytestmark = pytest.mark.timeout(180)

PORT = 6381


def _start(host: netns.Host, *args: str) -> str:
    argv = [sys.executable, "-m", "shoal", "start", "--num-cpus", "1", *args]
    return host.run(argv, timeout=60).stdout


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.Network]:
    require_netns()
    with netns.Network(["head", "a", "client"], shm_size="512M") as network:
        key_file = str(network.dir / "cluster.key")
        head = network["head"]
        _start(head, "--head", "--port", str(PORT), "--bind", head.ip, "--key-file", key_file)
        address = f"{head.ip}:{PORT}"
        _start(network["a"], "--address", address, "--key-file", key_file,
               "--resources", json.dumps({"at_a": 1}))  # fmt: skip
        yield network


def _drive(host: netns.Host, init: str, body: str, **names: Any) -> Any:
    code = (
        "import json, os, sys\nimport shoal\n"
        + "".join(f"{k} = {v!r}\n" for k, v in names.items())
        + f"shoal.init({init})\n"
        + textwrap.dedent(body)
        + '\nprint("RESULT " + json.dumps(result))\n'
    )
    out = host.python(code, timeout=150).stdout
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the driver printed no result:\n{out}"
    return json.loads(lines[-1][len("RESULT ") :])


def _node_id(host: netns.Host) -> str:
    text = host.run(["sh", "-c", "cat $SHOAL_TMPDIR/session_2*/head.json"]).stdout
    return str(json.loads(text)["node_id"])


def test_client_job_env_runs_on_a_node_in_another_network(
    hosts: netns.Network, make_wheel: Any
) -> None:
    head, a, client = hosts["head"], hosts["a"], hosts["client"]
    shared = hosts.dir / "shared"
    project = shared / "project"
    (project / "data").mkdir(parents=True)
    (project / "hosts_helper.py").write_text("def where():\n    return 'from working_dir'\n")
    (project / "data" / "input.txt").write_text("shipped")
    (project / "data" / "skip.bin").write_bytes(b"\0" * 1000)
    modules = shared / "modules"
    modules.mkdir()
    (modules / "hosts_single.py").write_text("NAME = 'py_module'\n")
    wheel = make_wheel(shared, "shoal_hosts_wheel", "3.1", "VERSION = '3.1'\n")
    env = {
        "working_dir": str(project),
        "excludes": ["*.bin"],
        "py_modules": [str(modules / "hosts_single.py")],
        "pip": {"packages": [wheel], "pip_install_options": ["--no-index"]},
        "env_vars": {"SHOAL_HOSTS_VAR": "job"},
    }
    key_file = str(hosts.dir / "cluster.key")
    result = _drive(
        client,
        f"{head.ip + ':' + str(PORT)!r}, key_file={key_file!r}, runtime_env=ENV",
        """
        @shoal.remote(resources={"at_a": 1})
        def on_a():
            import hosts_helper, hosts_single, shoal_hosts_wheel
            return {
                "node": shoal.get_runtime_context().get_node_id(),
                "helper": hosts_helper.where(),
                "data": open("data/input.txt").read(),
                "listing": sorted(os.listdir("data")),
                "single": hosts_single.NAME,
                "wheel": shoal_hosts_wheel.VERSION,
                "var": os.environ.get("SHOAL_HOSTS_VAR"),
                "cwd": os.getcwd(),
                "prefix": sys.prefix,
            }
        first = shoal.get(on_a.remote(), timeout=120)
        # A task's env_vars merge onto the job's, on that node too.
        var = shoal.get(
            on_a.options(runtime_env={"env_vars": {"SHOAL_HOSTS_VAR": "task"}}).remote(),
            timeout=120,
        )["var"]
        nodes = shoal.nodes()
        result = {"first": first, "var": var,
                  "envs": {n["NodeID"]: n["RuntimeEnvs"] for n in nodes}}
        """,
        ENV=env,
    )
    first = result["first"]
    a_cache = str(a.shoal_tmpdir / "runtime_env_cache")
    assert first["node"] == _node_id(a)
    assert first["helper"] == "from working_dir" and first["data"] == "shipped"
    assert first["listing"] == ["input.txt"]  # skip.bin was excluded
    assert (first["single"], first["wheel"], first["var"]) == ("py_module", "3.1", "job")
    # Unpacked and built in node a's own cache, from packages fetched from the head.
    assert first["cwd"].startswith(a_cache + "/pkgs/"), first["cwd"]
    assert first["prefix"].startswith(a_cache + "/venvs/"), first["prefix"]
    assert result["var"] == "task"
    # eager_install: the job's env was set up on both nodes.
    envs = result["envs"]
    assert {e["state"] for e in envs[_node_id(a)]} == {"ready"}
    assert any(e["state"] == "ready" for e in envs[_node_id(head)])
    status = head.run([sys.executable, "-m", "shoal", "status"]).stdout
    assert "Runtime environments" in status and "shoal_hosts_wheel" in status


def test_a_task_env_from_a_driver_on_the_head_reaches_the_node(hosts: netns.Network) -> None:
    head, a = hosts["head"], hosts["a"]
    project = hosts.dir / "shared" / "task_project"
    project.mkdir(parents=True)
    (project / "task_helper.py").write_text("VALUE = 'task working_dir'\n")
    result = _drive(
        head,
        'address="auto"',
        """
        @shoal.remote(resources={"at_a": 1}, runtime_env={"working_dir": PROJECT})
        def on_a():
            import task_helper
            return shoal.get_runtime_context().get_node_id(), task_helper.VALUE
        result = shoal.get(on_a.remote(), timeout=120)
        """,
        PROJECT=str(project),
    )
    assert result == [_node_id(a), "task working_dir"]
