"""Run a tutorial notebook in a real kernel, and read what its cells showed.

Imported by the tutorial tests, and run as a script by the Binder check inside the
environment that Binder's configuration built (its own interpreter, where pytest is not
needed)::

    python tutorial_runner.py NOTEBOOK OUTPUT --kernel-python PYTHON --cwd DIR [--probe SOURCE]

The script writes the executed notebook to OUTPUT (even when a cell failed) and exits 1 on
a cell error that the cell's tags did not allow.

Cells tagged ``raises-exception`` may fail (nbclient's convention); every other error stops
the run. ``after_cells`` runs while the kernel is still alive, so a caller can check that
the notebook itself cleaned up, rather than the kernel's exit doing it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

KERNEL_NAME = "shoal-tutorial"
RAISES = "raises-exception"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def write_kernelspec(directory: Path, python: str, env: dict[str, str]) -> Path:
    """A kernelspec (in ``directory/kernels``) that runs ``python`` with ``env`` added."""
    spec_dir = directory / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [
            python,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--HistoryManager.hist_file=:memory:",
        ],
        "display_name": "Python (Shoal tutorials)",
        "language": "python",
        "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1", **env},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return directory / "kernels"


def kernel_manager(kernels_dir: Path) -> KernelManager:
    """A manager that sees only our kernelspec, whatever the machine has installed."""
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(
    nb: Any,
    km: KernelManager,
    cwd: Path,
    cell_timeout: float = 120,
    after_cells: Callable[[], None] | None = None,
) -> float:
    """Execute ``nb`` in place, cell by cell; return the seconds it took."""
    client = nbclient.NotebookClient(
        nb, km=km, timeout=cell_timeout, resources={"metadata": {"path": str(cwd)}}
    )
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        if after_cells is not None:
            after_cells()
    return time.perf_counter() - start


# -- reading outputs -------------------------------------------------------------------
def output_text(cell: Any) -> str:
    """Everything a code cell showed, as text: streams, results, displays and errors."""
    parts = []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            parts.append(out["text"])
        elif kind in ("execute_result", "display_data"):
            parts.append(str(out["data"].get("text/plain", "")))
        elif kind == "error":
            parts.append(f"{out['ename']}: {out['evalue']}\n" + "\n".join(out["traceback"]))
    return _ANSI.sub("", "\n".join(parts))


def error_of(cell: Any) -> dict[str, str] | None:
    for out in cell.get("outputs", []):
        if out["output_type"] == "error":
            return {"ename": out["ename"], "evalue": out["evalue"]}
    return None


def code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_with(nb: Any, fragment: str) -> Any:
    """The code cell whose source is ``fragment``, else the one that contains it."""
    found = [c for c in code_cells(nb) if c.source == fragment]
    found = found or [c for c in code_cells(nb) if fragment in c.source]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} code cells contain {fragment!r}; expected one")
    return found[0]


# -- the script, for the Binder check ----------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook")
    parser.add_argument("output")
    parser.add_argument("--kernel-python", default=sys.executable)
    parser.add_argument("--cwd", required=True)
    parser.add_argument(
        "--probe", default=None, help="source of a cell to run first (it must not fail)"
    )
    args = parser.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    if args.probe:
        nb.cells.insert(0, nbformat.v4.new_code_cell(args.probe))
    with tempfile.TemporaryDirectory(prefix="shoal-kernelspec-") as specs:
        km = kernel_manager(write_kernelspec(Path(specs), args.kernel_python, {}))
        try:
            seconds = execute(nb, km, Path(args.cwd))
            print(f"executed {args.notebook} in {seconds:.1f} s")
            status = 0
        except nbclient.exceptions.CellExecutionError as exc:
            print(f"a cell failed:\n{exc}", file=sys.stderr)
            status = 1
        finally:
            nbformat.write(nb, args.output)
    return status


if __name__ == "__main__":
    sys.exit(main())
