"""Output routing when the notebook is a client of a cluster (`%cluster connect`): a task's
prints still land under the cell that submitted it, after a later cell started, since the
cell's output tag passes through the client relay unchanged; and the stop button cancels
the cell's tasks on the remote cluster."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import NotebookKernel, error, no_error, result, run_and_interrupt, stream
from shoal import testing

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nb(
    kernel_name: str, tmp_path_factory: pytest.TempPathFactory, head: dict[str, str]
) -> Iterator[NotebookKernel]:
    kernel = NotebookKernel(kernel_name, tmp_path_factory.mktemp("nb"), spy=True).start()
    try:
        no_error(
            kernel.run(
                f"%load_ext shoal\n%cluster connect {head['address']} --key-file {head['key_file']}"
            )
        )
        no_error(kernel.run("import os, time, shoal"))
        yield kernel
    finally:
        kernel.stop()


def test_late_output_of_a_client_task_lands_under_its_cell(nb: NotebookKernel, tmp_path: Path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    started = no_error(
        nb.run(
            "@shoal.remote\n"
            "def behind_gate(gate):\n"
            "    print('before the gate', flush=True)\n"
            "    open(gate).read()\n"
            "    print('after the gate')\n"
            "    return 7\n"
            f"late = behind_gate.remote({str(gate)!r})"
        )
    )
    testing.wait_for(lambda: "before the gate" in nb.spied_text(started), timeout=20)
    later = no_error(
        nb.run(
            f"with open({str(gate)!r}, 'w') as f:\n    f.write('go')\nprint('got', shoal.get(late))"
        )
    )
    testing.wait_for(lambda: "after the gate" in nb.spied_text(started), timeout=20)
    assert re.search(r"^\(behind_gate pid=\d+\) after the gate$", nb.spied_text(started), re.M)
    assert stream(later) == "got 7\n"


def test_stop_button_cancels_a_client_cells_tasks(nb: NotebookKernel, tmp_path: Path):
    d = str(tmp_path)
    no_error(
        nb.run(
            "@shoal.remote\n"
            "def spin(path):\n"
            "    try:\n"
            "        open(path + '.started', 'w').close()\n"
            "        time.sleep(3600)\n"
            "    finally:\n"
            "        open(path + '.stopped', 'w').close()"
        )
    )
    started = [os.path.join(d, n + ".started") for n in "ab"]
    stopped = [os.path.join(d, n + ".stopped") for n in "ab"]
    cell, took = run_and_interrupt(
        nb,
        f"shoal.get([spin.remote({d!r} + '/' + n) for n in 'ab'])",
        started,
    )
    err = error(cell)
    assert err is not None and err["ename"] == "KeyboardInterrupt", err
    assert took < 3.0, f"the cell ended {took:.2f}s after the interrupt"
    # The tasks stopped on the remote cluster (their `finally` ran) and its CPUs came back.
    testing.wait_for(lambda: all(os.path.exists(p) for p in stopped), timeout=15)
    cell = no_error(
        nb.run(
            "deadline = time.monotonic() + 10\n"
            "while shoal.available_resources().get('CPU') != 3 and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "shoal.available_resources().get('CPU')"
        )
    )
    assert result(cell) == "3.0"
