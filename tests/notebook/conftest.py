"""Fixtures for the notebook layer: an in-process IPython shell, and real kernels.

- ``shell``: an ``InteractiveShell`` in this process with the extension loaded (magics run
  in-process, as anywidget tests its magics: no kernel needed). Its cluster, if a test
  starts one, is stopped at teardown.
- ``kernel_name``: a kernelspec that runs *this* interpreter (the machine's ``python3``
  kernelspec may name another ``python``), with a private IPYTHONDIR and no history file.
- ``kernel_helpers.NotebookKernel``: a real kernel driven by nbclient, cell by cell.
- ``head``: a cluster started by the CLI on tcp (a head and a second node on this machine),
  for notebooks that join it with ``%cluster connect``.

Kernels inherit this session's environment (SHOAL_TMPDIR, SHOAL_TEST_SESSION), so the
clusters they start are this session's and the session's leak check covers them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KERNEL_NAME = "shoal-test-python"
KERNEL_NAME_WITH_EXTENSION = "shoal-test-python-ext"


def _kernelspec(root: Path, name: str, ipython_dir: Path) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    ipython_dir.mkdir(exist_ok=True)
    spec = {
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--HistoryManager.hist_file=:memory:",
        ],
        "display_name": f"Python ({name})",
        "language": "python",
        "env": {"IPYTHONDIR": str(ipython_dir), "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="session")
def _kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("jupyter")
    _kernelspec(root, KERNEL_NAME, root / "ipython")
    # The documented way to have the magics in every kernel: the kernel's IPython config.
    profile = root / "ipython-ext" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text(
        'c.InteractiveShellApp.extensions = ["shoal"]\n'
    )
    _kernelspec(root, KERNEL_NAME_WITH_EXTENSION, root / "ipython-ext")
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + previous if previous else "")
    yield root
    if previous is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = previous


@pytest.fixture(scope="session")
def kernel_name(_kernelspecs: Path) -> str:
    """A kernel of this interpreter, with a private IPython directory."""
    return KERNEL_NAME


@pytest.fixture(scope="session")
def kernel_name_with_extension(_kernelspecs: Path) -> str:
    """The same, with ``c.InteractiveShellApp.extensions = ["shoal"]`` in its
    ipython_kernel_config.py."""
    return KERNEL_NAME_WITH_EXTENSION


# -- an in-process shell ---------------------------------------------------------------
@pytest.fixture
def shell() -> Iterator[Any]:
    """A fresh in-process IPython shell with Shoal's extension loaded."""
    from kernel_helpers import in_process_shell

    yield from in_process_shell()


@pytest.fixture(scope="module")
def head(
    shoal_cli: Callable[..., Any],
    leak_check: Callable[..., None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """A head (2 CPUs) and a second node (1 CPU) on this machine, joined over tcp."""
    head_dir = tempfile.mkdtemp(prefix="shoal-nb-h-", dir="/tmp")  # short: ipc paths
    node_dir = tempfile.mkdtemp(prefix="shoal-nb-n-", dir="/tmp")
    key_file = str(tmp_path_factory.mktemp("connect") / "cluster.key")
    try:
        started = shoal_cli(
            "start", "--head", "--port", "0", "--bind", "127.0.0.1", "--key-file", key_file,
            "--num-cpus", "2", "--temp-dir", head_dir,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        address = _head_info(head_dir)["tcp"].removeprefix("tcp://")
        joined = shoal_cli(
            "start", "--address", address, "--key-file", key_file, "--num-cpus", "1",
            "--temp-dir", node_dir,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stdout + joined.stderr
        yield {"address": address, "key_file": key_file}
    finally:
        stopped = [shoal_cli("stop", "--temp-dir", d) for d in (node_dir, head_dir)]
        try:
            leak_check("after the cluster that the notebook connected to")
        finally:
            shutil.rmtree(head_dir, ignore_errors=True)
            shutil.rmtree(node_dir, ignore_errors=True)
        for result in stopped:
            assert result.returncode == 0, result.stdout + result.stderr


def _head_info(directory: str) -> dict[str, Any]:
    [session] = glob.glob(os.path.join(directory, "session_2*"))
    with open(os.path.join(session, "head.json")) as f:
        return dict(json.load(f))
