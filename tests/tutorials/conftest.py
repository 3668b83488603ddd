"""Fixtures for the tutorial tests.

- ``tutorial_kernels``: a kernelspec directory with one kernel that runs *this* interpreter,
  as an activated environment would: its ``bin`` first on PATH (the notebooks run the
  ``shoal`` command with ``!shoal ...``), and a private, empty IPython directory (so a
  profile of the machine's cannot load the extension behind the notebooks' back).

Kernels inherit this session's environment (SHOAL_TMPDIR, SHOAL_TEST_SESSION), so the
clusters the notebooks start, with ``shoal.init`` or the ``shoal`` command, are this
session's, and the session's leak check covers them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tutorial_runner import write_kernelspec


@pytest.fixture(scope="session")
def tutorial_kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tutorial-kernels")
    ipython_dir = root / "ipython"
    ipython_dir.mkdir()
    bindir = os.path.dirname(sys.executable)
    env = {
        "IPYTHONDIR": str(ipython_dir),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    return write_kernelspec(root, sys.executable, env)
