"""Output lands under the cell that started the work, floods are summarized, the stop button
cancels a cell's tasks, and a get of many failed refs summarizes them: in a real kernel,
cell by cell through nbclient, with a second iopub subscriber (``IOPubSpy``) that sees
output arriving for a cell after it finished, as JupyterLab shows it.

One kernel for the module; the tests run in order on its cluster (2 CPUs)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_helpers import (
    NotebookKernel,
    displays,
    error,
    no_error,
    result,
    run_and_interrupt,
    stream,
)
from shoal import testing

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nb(
    kernel_name: str, tmp_path_factory: pytest.TempPathFactory, _leak_guard: Any
) -> Iterator[NotebookKernel]:
    kernel = NotebookKernel(kernel_name, tmp_path_factory.mktemp("nb"), spy=True).start()
    try:
        no_error(kernel.run("%load_ext shoal\n%cluster start --cpus 2"))
        no_error(kernel.run("import os, time, shoal"))
        yield kernel
    finally:
        kernel.stop()
        _leak_guard.check("after the notebook kernel's shutdown")


@pytest.fixture
def gate(tmp_path: Path) -> str:
    """A FIFO: a task that opens it to read blocks until a cell opens it to write."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    return str(path)


def wait_for_text(nb: NotebookKernel, cell: Any, text: str, name: str = "stdout") -> str:
    testing.wait_for(lambda: text in nb.spied_text(cell, name), timeout=20)
    return nb.spied_text(cell, name)


def test_late_output_lands_under_the_cell_that_started_the_task(nb, gate):
    started = no_error(
        nb.run(
            "@shoal.remote\n"
            "def behind_gate(gate):\n"
            "    print('before the gate', flush=True)\n"
            "    open(gate).read()\n"
            "    print('after the gate')\n"
            "    return 7\n"
            f"late = behind_gate.remote({gate!r})"
        )
    )
    wait_for_text(nb, started, "before the gate")
    later = no_error(
        nb.run(f"with open({gate!r}, 'w') as f:\n    f.write('go')\nprint('got', shoal.get(late))")
    )
    text = wait_for_text(nb, started, "after the gate")
    assert re.search(r"^\(behind_gate pid=\d+\) before the gate\n", text, re.M)
    assert re.search(r"^\(behind_gate pid=\d+\) after the gate\n", text, re.M)
    # The later cell has only its own output, in nbclient's record and on the wire.
    assert stream(later) == "got 7\n"
    assert nb.spied_text(later) == "got 7\n"


def test_children_print_under_their_parents_cell(nb, gate):
    started = no_error(
        nb.run(
            "@shoal.remote\n"
            "def child(gate):\n"
            "    open(gate).read()\n"
            "    print('from the child')\n"
            "    return 1\n"
            "@shoal.remote\n"
            "def parent(gate):\n"
            "    print('from the parent')\n"
            "    return shoal.get(child.remote(gate)) + 1\n"
            f"nested = parent.remote({gate!r})"
        )
    )
    later = no_error(
        nb.run(f"with open({gate!r}, 'w') as f:\n    f.write('go')\nprint(shoal.get(nested))")
    )
    text = wait_for_text(nb, started, "from the child")
    assert re.search(r"^\(parent pid=\d+\) from the parent$", text, re.M)
    assert re.search(r"^\(child pid=\d+\) from the child$", text, re.M)
    assert nb.spied_text(later) == "2\n"


def test_actor_output_goes_to_the_calling_cell(nb):
    created = no_error(
        nb.run(
            "@shoal.remote\n"
            "class Counter:\n"
            "    def __init__(self):\n"
            "        print('counter made')\n"
            "        self.n = 0\n"
            "    def add(self):\n"
            "        self.n += 1\n"
            "        print('added', self.n)\n"
            "        return self.n\n"
            "counter = Counter.remote()"
        )
    )
    called = no_error(nb.run("shoal.get(counter.add.remote())"))
    wait_for_text(nb, created, "counter made")
    assert "added 1" in wait_for_text(nb, called, "added 1")
    assert "added" not in nb.spied_text(created)


def test_a_flood_is_summarized_and_counted(nb):
    lines = 20_000
    cell = no_error(
        nb.run(
            "@shoal.remote\n"
            "def flood(n):\n"
            "    for i in range(n):\n"
            "        print('line', i)\n"
            f"shoal.get(flood.remote({lines}))"
        )
    )

    def suppressed() -> int:
        found = re.findall(
            r"^\.\.\. ([\d,]+) more lines from task flood \(pid=\d+\) suppressed",
            nb.spied_text(cell, "stderr"),
            re.M,
        )
        return sum(int(n.replace(",", "")) for n in found)

    def shown() -> int:
        return len(re.findall(r"^\(flood pid=\d+\) line \d+$", nb.spied_text(cell), re.M))

    # Every line is either shown or counted in a summary: nothing goes missing unsaid.
    testing.wait_for(lambda: shown() + suppressed() == lines, timeout=30)
    assert 1000 <= shown() < 5000, shown()  # the burst, then 100 lines a second
    assert suppressed() > 10_000


def test_display_in_a_remote_cell_is_rich(nb):
    cell = no_error(
        nb.run(
            "%%remote\n"
            "from IPython.display import HTML, display\n"
            "print('before')\n"
            "display(HTML('<b>bold</b>'))\n"
            "display({'a': 1})\n"
            "print('after')"
        )
    )
    assert displays(cell, "text/html") == ["<b>bold</b>"]
    assert "{'a': 1}" in displays(cell)
    assert stream(cell) == "before\nafter\n"
    kinds = [o["output_type"] for o in cell.outputs]
    assert kinds.index("display_data") > 0  # after 'before'
    # In a session actor too; the session's namespace does not keep the display function.
    cell = no_error(
        nb.run(
            "%%remote --actor shown\nfrom IPython.display import Markdown\ndisplay(Markdown('*hi*'))"
        )
    )
    assert displays(cell, "text/markdown") == ["*hi*"]
    # (Spelled so that this cell does not mention it, and so gets none.)
    cell = no_error(nb.run("%%remote --actor shown\n'disp' + 'lay' in globals()"))
    assert result(cell) == "False"


def test_stop_button_cancels_the_cells_tasks_and_their_children(nb, tmp_path):
    d = str(tmp_path)
    no_error(
        nb.run(
            "@shoal.remote\n"
            "def spin(path):\n"
            "    try:\n"
            "        open(path + '.started', 'w').close()\n"
            "        time.sleep(3600)\n"
            "    finally:\n"
            "        open(path + '.stopped', 'w').close()\n"
            "@shoal.remote\n"
            "def spin_parent(path):\n"
            "    try:\n"
            "        return shoal.get(spin.remote(path + '.child'))\n"
            "    finally:\n"
            "        open(path + '.stopped', 'w').close()"
        )
    )
    started = [os.path.join(d, "a.started"), os.path.join(d, "b.child.started")]
    stopped = [os.path.join(d, n) for n in ("a.stopped", "b.stopped", "b.child.stopped")]
    cell, took = run_and_interrupt(
        nb,
        f"refs = [spin.remote({d + '/a'!r}), spin_parent.remote({d + '/b'!r})]\nshoal.get(refs)",
        started,
    )
    err = error(cell)
    assert err is not None and err["ename"] == "KeyboardInterrupt", err
    assert took < 3.0, f"the cell ended {took:.2f}s after the interrupt"
    assert "Shoal cancelled 2 unfinished tasks of this cell, with their children." in stream(
        cell, "stderr"
    )
    # The tasks themselves stopped (their `finally` ran), the child too.
    testing.wait_for(lambda: all(os.path.exists(p) for p in stopped), timeout=15)
    cell = nb.run("shoal.get(refs)")
    err = error(cell)
    assert err["ename"] == "TaskCancelledError"
    assert "1 more of the 2 refs failed: 1 TaskCancelledError" in err["traceback"]
    # Nothing runs on the cluster any more: its CPUs come back (idle leases go in 0.5 s).
    cell = no_error(
        nb.run(
            "deadline = time.monotonic() + 10\n"
            "while shoal.available_resources().get('CPU') != 2 and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "shoal.available_resources().get('CPU')"
        )
    )
    assert result(cell) == "2.0"


def test_failed_refs_are_summarized_in_the_error(nb):
    cell = nb.run(
        "@shoal.remote\n"
        "def bad(i):\n"
        "    if i % 2:\n"
        "        raise ValueError(i)\n"
        "    return 1 / 0\n"
        "shoal.get([bad.remote(i) for i in range(5)])"
    )
    err = error(cell)
    assert (err["ename"], err["evalue"]) == ("ZeroDivisionError", "division by zero")
    tb = err["traceback"].rstrip()
    assert tb.endswith(
        "ZeroDivisionError: division by zero\n4 more of the 5 refs failed: "
        "2 ValueError, 2 ZeroDivisionError"
    ), tb[-400:]
    assert tb.count("Task bad failed on node") == 1  # one in full
