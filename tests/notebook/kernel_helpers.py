"""Helpers for notebook tests: a real kernel driven cell by cell, and readers of outputs.

``NotebookKernel(kernel_name, directory).start()`` starts a kernel through nbclient;
``run(source)`` executes one cell and returns it with its outputs, as a saved notebook would
have them; ``stop()`` shuts the kernel down.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbclient
import nbformat

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class NotebookKernel:
    """A real kernel executing cells one at a time through nbclient."""

    def __init__(
        self,
        kernel_name: str,
        directory: Path,
        timeout: float = 60,
        client_class: type[nbclient.NotebookClient] = nbclient.NotebookClient,
    ) -> None:
        self.nb = nbformat.v4.new_notebook()
        self.client = client_class(
            self.nb,
            kernel_name=kernel_name,
            timeout=timeout,
            allow_errors=True,
            resources={"metadata": {"path": str(directory)}},
        )
        self._context: Any = None

    def start(self) -> NotebookKernel:
        self._context = self.client.setup_kernel()
        self._context.__enter__()
        return self

    def stop(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    @property
    def pid(self) -> int:
        return int(self.client.km.provisioner.process.pid)

    def run(self, source: str) -> Any:
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell


# -- reading a cell's outputs ----------------------------------------------------------
def stream(cell: Any, name: str = "stdout") -> str:
    return "".join(
        o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == name
    )


def result(cell: Any, mime: str = "text/plain") -> str | None:
    for o in cell.outputs:
        if o["output_type"] == "execute_result":
            return o["data"].get(mime)
    return None


def displays(cell: Any, mime: str = "text/plain") -> list[str]:
    return [
        o["data"][mime]
        for o in cell.outputs
        if o["output_type"] == "display_data" and mime in o["data"]
    ]


def error(cell: Any) -> dict[str, Any] | None:
    for o in cell.outputs:
        if o["output_type"] == "error":
            return {
                "ename": o["ename"],
                "evalue": o["evalue"],
                "traceback": strip_ansi("\n".join(o["traceback"])),
            }
    return None


def no_error(cell: Any) -> Any:
    """The cell, after checking that it raised nothing (the error is in the message)."""
    err = error(cell)
    assert err is None, f"cell failed: {err['ename']}: {err['evalue']}\n{err['traceback']}"
    return cell
