"""Every tutorial runs top to bottom in a real kernel (nbclient), says what it promises,
and leaves nothing running.

Each notebook is executed cell by cell; only cells tagged ``raises-exception`` may fail,
and each of those must fail with the error it is there to show. ``EXPECTED`` names, per
notebook, a fragment of a cell's source and text that cell must show: the numbers and
messages the surrounding prose explains. Once the last cell ran, and while the kernel is
still alive, no Shoal process or segment may be left: the notebook's own clean-up cells
must have stopped everything (a kernel's exit would stop a cluster it started anyway).
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from conftest import TUTORIALS
from tutorial_runner import (
    RAISES,
    cell_with,
    code_cells,
    error_of,
    execute,
    kernel_manager,
    output_text,
)

NAMES = sorted(p.stem for p in TUTORIALS.glob("*.ipynb"))

# notebook -> [(fragment of a cell's source, text that cell must show)]
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "01_first_tasks": [
        ("results = [slow_square(i) for i in range(4)]", "[0, 1, 4, 9]"),
        ("ref = slow_square.remote(3)", "ObjectRef("),
        ("shoal.get(ref)", "9"),
        ("refs = [slow_square.remote(i) for i in range(4)]", "[0, 1, 4, 9] in"),
        ("total = combine.remote(a, b)", "1500"),
        ("pending = [measure.remote(i) for i in range(6)]", "finished: 5"),
        ("num_cpus=2).remote(i)", "CPUs in the cluster: 2.0"),
        ("def ratio(a, b):", "ZeroDivisionError: division by zero"),
        ("except ZeroDivisionError", "caught a ZeroDivisionError: ratio() failed"),
    ],
    "02_actors": [
        ("counter = Counter.remote(start=10)", "[11, 12, 13, 14, 15]"),
        ("shoal.get(counter.read.remote())", "15"),
        ("tally = Counter.remote()", "55"),
        ('shoal.get_actor("registry", namespace="tutorial")', "42"),
        ("fetcher = Fetcher.remote()", "10 pages in 0.3 s"),
        ("third = Model.remote()", "the third model ran within a second: False"),
        ("shoal.kill(models[0])", "[-0.5, -0.5, -0.5]"),
        ("account = Account.remote()", "refused: cannot withdraw 500, the balance is 100"),
        ("shoal.kill(account)", "ActorDiedError"),
    ],
    "03_objects_and_numpy": [
        ("view = shoal.get(ref)", "same values: True"),
        ("mine = view.copy()", "writeable: False"),
        ("describe.remote(ref)", "'writeable': False"),
        ('obj["call_site"]', "shared_memory"),
        ("!shoal memory", "15.3 MiB"),
        ("del ref, view", "objects left in the store: 0"),
        ("refs = [shoal.put(", "spilled to disk:"),
        ('obj["object_id"]', "spilled"),
        ("first_value.remote(r)", "[0.0, 1.0, 2.0, 3.0, 4.0]"),
    ],
    "04_remote_cells": [
        ("%cluster start --cpus 2", "1 node, 2 CPUs"),
        ("stats = summarize(measurements)", "'mean': 20.0"),
        ("back in the notebook", "values above 30"),
        ('threshold = limits["medium"]', "KeyError: 'medium'"),
        ("table[12_345], calls", "(152399025, 1)"),
        ("table[99_999], calls", "(9999800001, 2)"),
        ("%%remote --all --pull python_version", "hello from"),
        ("slow_job.get()", "42"),
        ("%cluster status", "%%remote sessions (--actor): lab"),
        ("%cluster stop", "Stopped the Shoal cluster"),
    ],
    "08_many_machines": [
        ("started = !shoal start --head", "Started a Shoal head"),
        ("!shoal start --address", "Started a Shoal node"),
        ('run_line_magic("cluster"', "2 nodes, 2 CPUs"),
        ("%%remote --all", "sees"),
        ("!shoal stop --temp-dir {node_dir}", "Stopped 1 Shoal cluster."),
    ],
    "09_automl_service": [
        ('shoal.init(f"tcp://{address}", key_file=key_file)', "tcp://127.0.0.1:"),
        ("proxy = AutoMLProxy.options(", "[]"),
        ("client = subprocess.Popen(", "'state': 'done', 'done': 7, 'total': 7"),
        ("client = subprocess.Popen(", "best model:"),
        ("client = subprocess.Popen(", "exit code 0 )"),
        ("!shoal stop --temp-dir {work_dir}", "Stopped 1 Shoal cluster."),
    ],
}


def _check_many_machines(nb: nbformat.NotebookNode) -> None:
    """The point of tutorial 08: work ran on two nodes, and data moved between them."""
    spread = output_text(cell_with(nb, "nodes_used = shoal.get("))
    per_node = ast.literal_eval(spread.split("tasks per node:", 1)[1].strip())
    assert len(per_node) == 2 and sum(per_node.values()) == 8, spread
    moved = output_text(cell_with(nb, "NodeAffinitySchedulingStrategy as on_node"))
    made, read = moved.split("made on ", 1)[1].split(":")[0].split(", summed on ")
    assert made != read and moved.strip().endswith(": 1000000.0"), moved
    labels = {
        line.split("@", 1)[1].split()[0]
        for line in output_text(cell_with(nb, "%%remote --all")).splitlines()
        if line.startswith("(%%remote")
    }
    assert len(labels) == 2, labels


def _check_automl(nb: nbformat.NotebookNode) -> None:
    """Tutorial 09: every candidate was trained, by worker tasks, and ranked."""
    rows = output_text(cell_with(nb, 'proxy.result.remote("job-1")')).strip().splitlines()
    assert len(rows) == 7, rows
    accuracies = [float(row.split()[0]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > 0.9, rows


CHECKS: dict[str, Callable[[nbformat.NotebookNode], None]] = {
    "08_many_machines": _check_many_machines,
    "09_automl_service": _check_automl,
}

# Directories the notebooks make with tempfile.mkdtemp and must remove again.
TEMP_PREFIXES = ("shoal-head-", "shoal-node-", "shoal-automl-")


def _temp_dirs() -> set[str]:
    found: set[str] = set()
    for prefix in TEMP_PREFIXES:
        found.update(glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")))
    return found


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)


def test_every_tutorial_has_expectations() -> None:
    assert NAMES, f"no notebooks in {TUTORIALS}"
    assert set(EXPECTED) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_is_stored_clean(name: str) -> None:
    """Stored without outputs, valid, for the standard kernel, and ends by cleaning up."""
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in code_cells(nb):
        assert cell.outputs == [], f"{name}: a cell was stored with outputs:\n{cell.source}"
        assert cell.execution_count is None, f"{name}: stored with an execution count"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    last = code_cells(nb)[-1].source
    assert any(s in last for s in ("shoal.shutdown()", "%cluster stop", "shoal stop")), (
        f"{name}: the last code cell does not stop the cluster:\n{last}"
    )
    for cell in code_cells(nb):
        # Plain Python cells must parse (magics and `!` lines are IPython's, skipped).
        if not any(line.lstrip().startswith(("%", "!")) or "= !" in line
                   for line in cell.source.splitlines()):  # fmt: skip
            ast.parse(cell.source)


def test_first_tutorial_needs_no_load_ext() -> None:
    """Binder opens tutorial 01 with the extension already loaded; it must not load it."""
    assert not any("%load_ext" in c.source for c in code_cells(_load("01_first_tasks")))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs(
    name: str,
    tutorial_kernels: Path,
    tmp_path: Path,
    leak_check: Callable[..., None],
) -> None:
    nb = _load(name)
    temp_before = _temp_dirs()
    seconds = execute(
        nb,
        kernel_manager(tutorial_kernels),
        cwd=tmp_path,
        after_cells=lambda: leak_check(f"after the last cell of {name}, kernel still alive"),
    )
    print(f"{name}: {seconds:.1f} s")
    for cell in code_cells(nb):
        tagged = RAISES in cell.metadata.get("tags", [])
        err = error_of(cell)
        assert tagged == (err is not None), (
            f"{name}: cell {'did not raise' if tagged else 'raised'}:\n{cell.source}\n"
            f"{output_text(cell)}"
        )
    for fragment, text in EXPECTED[name]:
        shown = output_text(cell_with(nb, fragment))
        assert text in shown, f"{name}: the cell with {fragment!r} showed:\n{shown}"
    if name in CHECKS:
        CHECKS[name](nb)
    assert _temp_dirs() <= temp_before, "the notebook left temporary directories behind"
    leak_check(f"after the kernel of {name} stopped")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_tutorials_pass_the_linter(command: list[str]) -> None:
    pytest.importorskip("ruff")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "tutorials"],
        cwd=TUTORIALS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
