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
from tutorial_expectations import CHECKS, EXPECTED, TUTORIALS
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

# Directories the notebooks make with tempfile.mkdtemp and must remove again.
TEMP_PREFIXES = ("shoal-head-", "shoal-node-", "shoal-automl-", "shoal-failing-", "shoal-env-")


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
