"""The magics in a real kernel, cell by cell through nbclient, asserting on the outputs a
saved notebook would hold. One kernel for the module: the tests run in order and build on
each other (the cluster of the first is used by the next ones)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from kernel_helpers import NotebookKernel, displays, error, no_error, result, stream
from shoal import testing

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def nb(
    kernel_name: str, tmp_path_factory: pytest.TempPathFactory, _leak_guard: Any
) -> Iterator[NotebookKernel]:
    kernel = NotebookKernel(kernel_name, tmp_path_factory.mktemp("nb")).start()
    try:
        yield kernel
    finally:
        kernel.stop()
        _leak_guard.check("after the notebook kernel's shutdown")


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_load_and_start(nb):
    assert no_error(nb.run("%load_ext shoal")).outputs == []
    cell = no_error(nb.run("%cluster start --cpus 2"))
    # The summary, then a live monitor (shoal.widgets.ClusterMonitor; test_widgets_kernel).
    text, monitor = displays(cell)
    assert "(started by this kernel)" in text and "1 node, 2 CPUs" in text
    assert monitor.startswith("Shoal cluster · 1 node · 2 CPUs")
    html, _monitor_html = displays(cell, "text/html")
    assert "<table" in html and "started by this kernel" in html
    assert len(displays(cell, "application/vnd.jupyter.widget-view+json")) == 1


def test_start_again_says_it_is_up(nb):
    cell = no_error(nb.run("%cluster start"))
    assert "A Shoal cluster is already running in this kernel" in stream(cell)
    assert "1 node, 2 CPUs" in displays(cell)[0]


def test_remote_round_trip(nb):
    no_error(
        nb.run(
            "import numpy as np\nbig = np.arange(2_000_000)  # 16 MB: through the store\nfactor = 3"
        )
    )
    cell = no_error(
        nb.run(
            "%%remote\n"
            "print('summing', len(big))\n"
            "total = int(big.sum()) * factor\n"
            "head = big[:3] * factor\n"
            "total"
        )
    )
    assert stream(cell) == "summing 2000000\n"
    assert result(cell) == str(1999999000000 * 3)
    cell = no_error(nb.run("total, head.tolist()"))
    assert result(cell) == f"({1999999000000 * 3}, [0, 3, 6])"


def test_actor_state_lives_across_cells(nb):
    no_error(nb.run("%%remote --actor sim\nsteps = []"))
    for expected in ("[0]", "[0, 1]"):
        cell = no_error(nb.run("%%remote --actor sim\nsteps.append(len(steps))\nsteps"))
        assert result(cell) == expected


def test_all_nodes_are_labelled(nb):
    no_error(nb.run("import shoal\nnode = shoal.get_runtime_context().get_node_id()"))
    node = no_error(nb.run("node")).outputs[0]["data"]["text/plain"].strip("'")
    cell = no_error(nb.run("%%remote --all\nimport os\nprint('from', os.getpid())\n'ok'"))
    assert displays(cell) == [f"[node {node[:8]} (127.0.0.1)] 'ok'"]
    assert "from" in stream(cell)
    assert re.search(rf"^\(%%remote In\[\d+\] @{node[:8]} pid=\d+\) from \d+$", stream(cell), re.M)


def test_remote_cell_error(nb):
    cell = nb.run(
        "%%remote\nconfig = {}\ndef lookup(key):\n    return config[key]\nlookup('depth')"
    )
    err = error(cell)
    assert err is not None
    assert (err["ename"], err["evalue"]) == ("KeyError", "'depth'")
    tb = err["traceback"]
    assert re.search(r"Task %%remote In\[\d+\] failed on node [0-9a-f]{12} \(pid \d+\):", tb)
    assert re.search(r"Cell In\[\d+\], line 5\n", tb)
    assert re.search(r"Cell In\[\d+\], line 4, in lookup\n", tb)
    assert "----> 4     return config[key]" in tb
    assert tb.rstrip().endswith("KeyError: 'depth'")
    for runtime in ("_runner.py", "_worker.py", "shoal/_", "run_cell_magic", "interactiveshell"):
        assert runtime not in tb


def test_task_error_reads_like_a_local_one(nb):
    cell = nb.run(
        "@shoal.remote\ndef ratio(a, b):\n    return a / b\n\nshoal.get(ratio.remote(1, 0))"
    )
    err = error(cell)
    assert (err["ename"], err["evalue"]) == ("ZeroDivisionError", "division by zero")
    tb = err["traceback"]
    assert "----> 5 shoal.get(ratio.remote(1, 0))" in tb  # the caller's line
    assert re.search(r"Cell In\[\d+\], line 3, in ratio\n", tb)  # the remote frame
    assert "----> 3     return a / b" in tb
    assert "Task ratio failed on node" in tb
    assert "_api.py" not in tb and "_core.py" not in tb


def test_reprs(nb):
    cell = no_error(nb.run("ref = shoal.put(np.zeros(100_000))\nref"))
    html = cell.outputs[0]["data"]["text/html"]
    assert "ready" in html and re.search(r"78\d\.\d KiB", html)
    cell = no_error(
        nb.run(
            "@shoal.remote\nclass Box:\n    def ping(self):\n        return 1\nbox = Box.remote()\nshoal.get(box.ping.remote())\nbox"
        )
    )
    assert (
        "Box" in cell.outputs[0]["data"]["text/html"]
        and "alive" in cell.outputs[0]["data"]["text/html"]
    )


def test_stop_leaves_nothing_and_remote_starts_a_cluster(nb):
    cell = no_error(nb.run("head_pid = shoal._api._cluster.head.pid\nhead_pid"))
    head = psutil.Process(int(result(cell)))
    family = [head, *head.children(recursive=True)]
    cell = no_error(nb.run("%cluster stop"))
    assert "Stopped the Shoal cluster that this kernel started." in stream(cell)
    testing.wait_for(lambda: all(gone(p) for p in family), timeout=15)
    cell = no_error(nb.run("%%remote\n6 * 7"))
    assert "%%remote started a local Shoal cluster" in stream(cell)
    assert result(cell) == "42"
