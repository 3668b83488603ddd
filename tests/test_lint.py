"""The code style gate: ruff (lint and format) on everything, mypy on the runtime."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["runtime", "jupyter_ext", "widgets", "tests", "benchmarks"]

pytestmark = pytest.mark.timeout(300)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_check():
    result = run("ruff", "check", *PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_format():
    result = run("ruff", "format", "--check", *PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_the_runtime():
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy", "runtime")
    assert result.returncode == 0, result.stdout + result.stderr
