"""%cluster and %%remote against a real cluster, driven from an in-process IPython shell
(one shell and one cluster for the module: `%cluster start` runs once)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shoal
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from shoal.jupyter_ext import _shipping

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ip(_leak_guard: Any) -> Iterator[Any]:
    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.run_line_magic("load_ext", "shoal")
    result = sh.run_cell("%cluster start --cpus 2 --object-store-memory 256MiB")
    assert result.error_in_exec is None
    yield sh
    if shoal.is_initialized():
        shoal.shutdown()
    sh.run_line_magic("unload_ext", "shoal")
    InteractiveShell.clear_instance()
    _leak_guard.check("after the in-process magics tests")


def run(ip: Any, source: str) -> Any:
    """Run a cell; fail on any error; return its value (what Out[n] shows)."""
    result = ip.run_cell(source, store_history=True)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


def test_start_twice_says_it_is_up(ip, capsys):
    address = shoal._api._cluster.address
    run(ip, "%cluster start")
    out = capsys.readouterr().out
    assert "A Shoal cluster is already running in this kernel" in out
    assert "1 node, 2 CPUs" in out
    assert shoal._api._cluster.address == address


def test_status(ip, capsys):
    run(ip, "%cluster status")
    out = capsys.readouterr().out
    assert re.search(r"Shoal cluster at ipc://\S+ \(started by this kernel\)", out)
    assert "object store 0 B / 256.0 MiB" in out


def test_round_trip_of_variables(ip, capsys):
    ip.user_ns.update(x=20, unused=object())
    value = run(ip, "%%remote\nimport os\ny = x + 1\nprint('remote pid', os.getpid())\ny * 2")
    assert value == 42
    assert ip.user_ns["y"] == 21
    assert ip.user_ns["os"].__name__ == "os"  # a module comes back as itself
    out = capsys.readouterr().out
    pid = int(re.search(r"^remote pid (\d+)$", out, re.M).group(1))
    assert pid != __import__("os").getpid()


def test_a_large_array_goes_through_the_store(ip):
    big = np.arange(1_000_000, dtype=np.int64)  # 8 MB
    entry = _shipping.encode("big", big, put_large=True)
    assert entry[0] == "put" and isinstance(entry[1], shoal.ObjectRef)
    ip.user_ns["big"] = big
    assert run(ip, "%%remote\ndoubled = big * 2\nint(big.sum())") == int(big.sum())
    assert np.array_equal(ip.user_ns["doubled"], big * 2)


def test_refs_stay_refs_and_modules_are_imported_by_name(ip):
    ip.user_ns["ref"] = shoal.put(5)
    ip.user_ns["shoal"] = shoal
    ip.user_ns["np"] = np
    value = run(ip, "%%remote\n(type(ref).__name__, shoal.get(ref), int(np.ones(3).sum()))")
    assert value == ("ObjectRef", 5, 3)


def test_functions_and_classes_come_back(ip):
    run(ip, "%%remote\ndef add(a, b):\n    return a + b\nclass Point:\n    x = 1\n")
    assert ip.user_ns["add"](2, 3) == 5
    assert ip.user_ns["Point"].x == 1


def test_push_and_pull_override_the_analysis(ip, capsys):
    ip.user_ns.update(a=1, b=2)
    run(ip, "%%remote --push a --pull c,nope\nc = a + (b if 'b' in dir() else 100)\nd = 1")
    assert ip.user_ns["c"] == 101  # b was not pushed
    assert "d" not in ip.user_ns
    assert "--pull nope: 'nope' is not defined on the cluster" in capsys.readouterr().err


def test_unpicklable_variable_is_named(ip):
    import threading

    ip.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError, match=r"%%remote cannot ship the variable 'lock': lock cannot"):
        run(ip, "%%remote\nwith lock:\n    pass")


def test_unpicklable_result_is_named_and_the_rest_comes_back(ip, capsys):
    value = run(ip, "%%remote\nimport threading\nguard = threading.Lock()\nfine = 7\nguard")
    assert ip.user_ns["fine"] == 7
    err = capsys.readouterr().err
    assert "could not bring back 'guard': lock cannot be pickled" in err
    assert "could not bring back the cell's value: lock cannot be pickled" in err
    assert repr(value).startswith("<unlocked _thread.lock object at 0x")  # its text, at least


def test_cell_that_replaces_stdout_does_not_wait(ip):
    start = time.monotonic()
    run(ip, "%%remote\nimport io, sys\nsys.stdout = io.StringIO()\nprint('swallowed')")
    assert time.monotonic() - start < 3


def test_semicolon_hides_the_value(ip):
    assert run(ip, "%%remote\n1 + 1;") is None


def test_node_affinity_by_prefix(ip, capsys):
    node = shoal.nodes()[0]["NodeID"]
    assert (
        run(
            ip,
            f"%%remote --node {node[:6]}\nimport shoal\nshoal.get_runtime_context().get_node_id()",
        )
        == node
    )
    with pytest.raises(UsageError, match="no alive node has that id"):
        run(ip, "%%remote --node ffffffffffff\n1")


def test_async_binds_on_get(ip, gate, wait_path):
    path = gate()
    ip.user_ns.update(path=path, wait_path=wait_path)
    run(ip, "%%remote --async job\nwait_path(path)\nanswer = 41\nanswer + 1")
    job = ip.user_ns["job"]
    assert not job.ready() and "answer" not in ip.user_ns
    assert "pending" in job._repr_html_()
    Path(path).touch()
    assert run(ip, "job.get()") == 42
    assert ip.user_ns["answer"] == 41 and job.ready()


def test_async_failure_raises_on_get(ip):
    run(ip, "%%remote --async failing\nimport math\nmath.sqrt(-1)")
    for _ in range(2):
        with pytest.raises(ValueError, match="math domain error"):
            run(ip, "failing.get()")


def test_actor_session_keeps_its_namespace(ip, capsys):
    run(ip, "%%remote --actor counter\ncount = 0\nstate = {'n': 0}")
    run(ip, "count = 100")  # the notebook's own value: the session keeps its count
    assert run(ip, "%%remote --actor counter\ncount += 1\nstate['n'] += 1\ncount") == 1
    assert run(ip, "%%remote --actor counter\ncount += 1\ncount") == 2
    assert ip.user_ns["count"] == 2  # assigned names still come back
    # --push sends the notebook's value anyway.
    ip.user_ns["count"] = 10
    assert run(ip, "%%remote --actor counter --push count\ncount += 1\ncount") == 11
    run(ip, "%cluster status")
    assert "%%remote sessions (--actor): counter" in capsys.readouterr().out


def test_actor_name_of_another_class(ip, track_actor):
    @shoal.remote
    class Other:
        def ping(self):
            return 1

    track_actor(Other.options(name="taken").remote())
    with pytest.raises(
        UsageError, match=r"--actor taken: that name belongs to another actor \(Other\)"
    ):
        run(ip, "%%remote --actor taken\n1")


def test_all_nodes(ip, capsys):
    run(ip, "%%remote --all --pull here\nimport os\nhere = os.getpid()\nprint('on', here)\n'hi'")
    out = capsys.readouterr().out
    node = shoal.nodes()[0]["NodeID"]
    assert f"[node {node[:8]} (127.0.0.1)] 'hi'" in out
    assert re.search(rf"\(%%remote In\[\d+\] @{node[:8]} pid=\d+\) on \d+", out)
    assert list(ip.user_ns["here"]) == [node]


def test_remote_error_is_the_original_type(ip, capsys):
    result = ip.run_cell("%%remote\nvalues = {}\nvalues['missing']", store_history=True)
    err = result.error_in_exec
    assert isinstance(err, KeyError) and isinstance(err, shoal.exceptions.TaskError)
    out = capsys.readouterr().out
    assert "KeyError: 'missing'" in out
    assert re.search(r"Cell In\[\d+\], line 3", out)
    assert "----> 3 values['missing']" in out
    assert "_runner.py" not in out and "run_cell_magic" not in out


def test_syntax_error_points_at_the_cell(ip, capsys):
    result = ip.run_cell("%%remote\nx = 1\ny = (", store_history=True)
    assert isinstance(result.error_in_exec, SyntaxError)
    assert result.error_in_exec.lineno == 3
    captured = capsys.readouterr()
    assert re.search(r"Cell In\[\d+\], line 3", captured.out + captured.err)


# -- reprs -----------------------------------------------------------------------------
def test_object_ref_html(gate, wait_path):
    path = gate()

    @shoal.remote
    def slow(p):
        wait_path(p)
        return b"x" * 200_000

    @shoal.remote
    def fail():
        raise ValueError("no")

    ref = slow.remote(path)
    assert "pending" in ref._repr_html_()
    Path(path).touch()
    shoal.get(ref)
    html = ref._repr_html_()
    assert "ready" in html and re.search(r"19\d\.\d KiB", html) and "object store of node" in html
    small = shoal.put(1)
    assert "in this process" in small._repr_html_()
    bad = fail.remote()
    shoal.wait([bad])
    assert "failed: ValueError" in bad._repr_html_()


def test_actor_handle_html(track_actor):
    @shoal.remote
    class Greeter:
        def hi(self):
            return "hi"

    handle = track_actor(Greeter.options(name="greeter").remote())
    shoal.get(handle.hi.remote())
    html = handle._repr_html_()
    assert "Greeter" in html and "greeter" in html and "alive" in html and "this node" in html
    shoal.kill(handle)
    shoal.testing.wait_for(lambda: "dead" in handle._repr_html_(), timeout=10)


def test_cluster_context_html():
    context = shoal.init(ignore_reinit_error=True)
    html = context._repr_html_()
    assert "Shoal cluster" in html and "<table" in html and "started by this" in html


def test_stop_then_reprs_cope_and_restart(ip, capsys):
    ref = shoal.put(3)
    context = shoal.init(ignore_reinit_error=True)
    old = shoal._api._cluster.address
    run(ip, "%cluster stop")
    assert "Stopped the Shoal cluster that this kernel started." in capsys.readouterr().out
    assert "gone" in ref._repr_html_()
    assert "disconnected" in context._repr_html_()
    run(ip, "%cluster stop")
    assert "No Shoal cluster is running" in capsys.readouterr().out
    run(ip, "%cluster start --cpus 1")
    run(ip, "%cluster start --restart --cpus 2")
    assert shoal._api._cluster.address != old
    assert "2 CPUs" in capsys.readouterr().out


# -- interrupting a cell: what it started is cancelled ------------------------------------
def test_interrupted_cell_cancels_its_tasks_and_queued_actor_calls(ip, tmp_path, capsys):
    """In a terminal IPython there is no kernel parent message: a cell is known by its
    execution count. A KeyboardInterrupt that ends the cell cancels the tasks it started
    and its actor calls still queued here (this actor is not up yet, its __init__ waits)."""
    gate = tmp_path / "gate"
    ip.user_ns["gate_path"] = str(gate)
    run(
        ip,
        "import os, time, shoal\n"
        "@shoal.remote\n"
        "class Slow:\n"
        "    def __init__(self, gate):\n"
        "        while not os.path.exists(gate):\n"
        "            time.sleep(0.01)\n"
        "    def ping(self):\n"
        "        return 'pong'\n"
        "@shoal.remote\n"
        "def forever():\n"
        "    time.sleep(3600)\n"
        "slow = Slow.remote(gate_path)",
    )
    capsys.readouterr()
    result = ip.run_cell(
        "call = slow.ping.remote()\nlong = forever.remote()\nraise KeyboardInterrupt",
        store_history=True,
    )
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "Shoal cancelled 2 unfinished tasks of this cell" in capsys.readouterr().err
    with pytest.raises(shoal.exceptions.TaskCancelledError):
        shoal.get(ip.user_ns["long"], timeout=30)
    gate.touch()  # the actor comes up: the cancelled call never reaches it, later ones do
    with pytest.raises(shoal.exceptions.TaskCancelledError):
        shoal.get(ip.user_ns["call"], timeout=30)
    assert run(ip, "shoal.get(slow.ping.remote(), timeout=30)") == "pong"
    # A cell that ends well cancels nothing; nor does one interrupted that started nothing.
    run(ip, "done = forever.options(name='kept').remote()")
    result = ip.run_cell("raise KeyboardInterrupt", store_history=True)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "Shoal cancelled" not in capsys.readouterr().err
    shoal.cancel(ip.user_ns["done"])
    with pytest.raises(shoal.exceptions.TaskCancelledError):
        shoal.get(ip.user_ns["done"], timeout=30)
