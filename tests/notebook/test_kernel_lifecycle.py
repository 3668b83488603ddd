"""A cluster started by a kernel stops with the kernel: on restart (graceful), and on a
shutdown that kills the kernel outright. Driven through jupyter_client's KernelManager, as
a notebook server does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jupyter_client
import psutil
import pytest
from shoal import testing

pytestmark = pytest.mark.timeout(120)

START = (
    "%load_ext shoal\n%cluster start --cpus 1\n"
    "import shoal\nprint('HEAD', shoal._api._cluster.head.pid)"
)


def start_kernel(name: str, directory: Any) -> Iterator[Any]:
    km = jupyter_client.KernelManager(kernel_name=name)
    km.start_kernel(cwd=str(directory))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(kernel_name: str, tmp_path: Any) -> Iterator[Any]:
    yield from start_kernel(kernel_name, tmp_path)


def execute(kc: Any, code: str) -> str:
    """Run ``code``; return its stdout; fail on an error."""
    out: list[str] = []
    errors: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            errors.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
    assert reply["content"]["status"] == "ok", "\n".join(errors)
    return "".join(out)


def cluster_of(kc: Any) -> list[psutil.Process]:
    """The kernel's head and its workers."""
    out = execute(kc, START)
    head_pid = int(next(line for line in out.splitlines() if line.startswith("HEAD")).split()[1])
    head = psutil.Process(head_pid)
    return [head, *head.children(recursive=True)]


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process]) -> None:
    testing.wait_for(
        lambda: all(gone(p) for p in procs),
        timeout=20,
        message=f"still alive: {[p.pid for p in procs if not gone(p)]}",
    )


def test_restart_then_shutdown_leave_nothing(kernel, leak_check):
    km, kc = kernel
    first = cluster_of(kc)
    old_kernel = psutil.Process(km.provisioner.process.pid)
    km.restart_kernel(now=False)  # a graceful shutdown_request, then a new kernel
    wait_gone([old_kernel, *first])
    kc.wait_for_ready(timeout=60)
    second = cluster_of(kc)
    assert second[0].pid != first[0].pid
    kernel_proc = psutil.Process(km.provisioner.process.pid)
    km.shutdown_kernel(now=True)  # SIGKILL: no atexit, no shutdown(); the head notices
    wait_gone([kernel_proc, *second])
    leak_check("after the kernel's restart and shutdown")


def test_extension_from_the_kernel_config(kernel_name_with_extension, tmp_path):
    """The documented ipython_kernel_config.py line gives every kernel the magics."""
    for _km, kc in start_kernel(kernel_name_with_extension, tmp_path):
        out = execute(kc, "print(sorted(get_ipython().magics_manager.magics['cell']))")
        assert "'remote'" in out
        out = execute(kc, "%cluster status")
        assert out == ""  # displayed, not printed; and no error


def test_interrupt_cancels_the_remote_cell(kernel):
    """The stop button (an interrupt) during a %%remote cell cancels the cell's task: on a
    one-CPU cluster, the next cell runs at once."""
    km, kc = kernel
    execute(kc, "%load_ext shoal\n%cluster start --cpus 1")
    msg_id = kc.execute(
        "%%remote\nimport time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.01)"
    )
    deadline = time.monotonic() + 30
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "stream" and "started" in msg["content"]["text"]:
            break
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")
    # ipykernel aborts requests that reach it just after an error: ask until one runs.
    testing.wait_for(
        lambda: kc.execute_interactive("0", timeout=30)["content"]["status"] == "ok", timeout=30
    )
    assert "free" in execute(kc, "%%remote\nprint('free')")
