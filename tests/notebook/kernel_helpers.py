"""Helpers for notebook tests: a real kernel driven cell by cell, and readers of outputs.

``NotebookKernel(kernel_name, directory).start()`` starts a kernel through nbclient;
``run(source)`` executes one cell and returns it with its outputs, as a saved notebook would
have them; ``stop()`` shuts the kernel down.

nbclient keeps only the messages of the cell it is running: output that arrives for a cell
after it finished (a task it started printing later) is dropped. ``IOPubSpy`` is a second
subscriber to the kernel's iopub channel that keeps every message by the cell (parent
message) it belongs to, as JupyterLab shows them: ``NotebookKernel(..., spy=True)``, then
``spied_text(cell)``.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jupyter_client
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
        spy: bool = False,
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
        self.client.on_cell_executed = self._executed
        self._context: Any = None
        self._want_spy = spy
        self.spy: IOPubSpy | None = None
        self.msg_ids: dict[int, str] = {}  # id(cell) -> its execute_request's msg_id

    def start(self) -> NotebookKernel:
        self._context = self.client.setup_kernel()
        self._context.__enter__()
        if self._want_spy:
            self.spy = IOPubSpy(self.client.km.get_connection_info())
            # A new subscriber misses what is published before its subscription is in
            # place: run empty cells until it has seen one of them.
            deadline = time.monotonic() + 30
            while True:
                cell = self.run("pass")
                if self.spy.wait_idle(self.msg_ids[id(cell)], timeout=1):
                    break
                assert time.monotonic() < deadline, "the iopub spy never saw a message"
        return self

    def stop(self) -> None:
        if self.spy is not None:
            self.spy.close()
            self.spy = None
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

    def _executed(self, cell: Any, cell_index: int, execute_reply: Any) -> None:
        self.msg_ids[id(cell)] = execute_reply["parent_header"]["msg_id"]

    def spied(self, cell: Any) -> list[dict[str, Any]]:
        """Every iopub message of ``cell`` so far, late ones included (at least those up
        to the cell's end: the spy reads on its own, and may lag behind nbclient)."""
        assert self.spy is not None, "NotebookKernel(..., spy=True) keeps them"
        msg_id = self.msg_ids[id(cell)]
        assert self.spy.wait_idle(msg_id, timeout=20), "the spy never saw the cell end"
        return self.spy.messages(msg_id)

    def spied_text(self, cell: Any, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"]
            for m in self.spied(cell)
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )


class IOPubSpy:
    """Every iopub message of a kernel, by the msg_id of its parent (a thread reads them)."""

    def __init__(self, connection_info: dict[str, Any]) -> None:
        self.client = jupyter_client.BlockingKernelClient()
        self.client.load_connection_info(connection_info)
        self.client.start_channels(shell=False, iopub=True, stdin=False, hb=False, control=False)
        self._by_parent: dict[str, list[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, name="iopub-spy", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        channel = self.client.iopub_channel
        while not self._stop:
            try:
                msg = channel.get_msg(timeout=0.1)
            except queue.Empty:
                continue
            parent = msg.get("parent_header", {}).get("msg_id", "")
            with self._cond:
                self._by_parent.setdefault(parent, []).append(msg)
                self._cond.notify_all()

    def messages(self, msg_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._by_parent.get(msg_id, ()))

    def wait_idle(self, msg_id: str, timeout: float) -> bool:
        def idle() -> bool:
            return any(
                m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                for m in self._by_parent.get(msg_id, ())
            )

        with self._cond:
            return self._cond.wait_for(idle, timeout)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.client.stop_channels()


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


def in_process_shell() -> Iterator[Any]:
    """A fresh in-process IPython shell with Shoal's extension loaded; at the end its
    cluster (if any) is shut down and the extension unloaded."""
    import shoal
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.run_line_magic("load_ext", "shoal")
    yield sh
    if shoal.is_initialized():
        shoal.shutdown()
    sh.run_line_magic("unload_ext", "shoal")
    InteractiveShell.clear_instance()


def run_and_interrupt(nb: NotebookKernel, source: str, started: list[str]) -> tuple[Any, float]:
    """Run ``source`` and press the stop button (interrupt the kernel) once every path in
    ``started`` exists; returns the cell and how long after the interrupt it ended."""
    import asyncio
    import os

    from shoal import testing

    interrupted_at: list[float] = []

    def interrupt_when_running() -> None:
        testing.wait_for(lambda: all(os.path.exists(p) for p in started), timeout=30)
        interrupted_at.append(time.monotonic())
        asyncio.run(nb.client.km.interrupt_kernel())

    stopper = threading.Thread(target=interrupt_when_running)
    stopper.start()
    try:
        cell = nb.run(source)
        ended_at = time.monotonic()
    finally:
        stopper.join()
    assert interrupted_at, "the cell ended before its work started"
    return cell, ended_at - interrupted_at[0]
