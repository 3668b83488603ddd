"""The Binder configuration, checked the way Binder uses it.

repo2docker (what Binder runs) builds an environment from ``binder/``: it installs
``binder/requirements.txt`` with pip from the repository root, then runs
``binder/postBuild`` there, as the notebook user. We do the same in a fresh virtual
environment, with a temporary HOME, and then run tutorial 01 there, in a kernel of that
environment, with the extension loaded by postBuild's configuration (tutorial 01 has no
``%load_ext``; a probe cell checks the magics are there before anything imports Shoal).

The environment is made with ``--system-site-packages`` on the base interpreter: pip still
resolves and installs every requirement of ``binder/requirements.txt`` into it (Shoal
itself, editable, from this checkout; anything the base interpreter lacks, from the
registry), but what the base interpreter already has (CI installs the test extra there,
which includes the tutorials' scikit-learn) is not downloaded again. A full install of
JupyterLab and scikit-learn from scratch would cost minutes of CI for no more coverage.
Binder uses Python 3.12 (``runtime.txt``); this check runs the machine's Python.

repo2docker itself (``--no-build --no-run``) checks that it accepts the repository and
plans the steps above; it is skipped, with the reason, when it cannot be installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbformat
import pytest
from tutorial_expectations import EXPECTED, REPO
from tutorial_runner import cell_with, output_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BINDER = REPO / "binder"
RUNNER = Path(__file__).with_name("tutorial_runner.py")
EXTENSION_LINE = 'c.InteractiveShellApp.extensions = ["shoal"]'

# Runs first in the Binder kernel: the magics must be there before anything imports shoal.
PROBE = """\
import sys
magics = get_ipython().magics_manager.magics
assert "cluster" in magics["line"] and "remote" in magics["cell"], "extension not loaded"
import shoal
print("prefix:", sys.prefix)
print("shoal:", shoal.__file__)
"""

# Variables of this process that would point the Binder environment at other places.
ISOLATE = (
    "IPYTHONDIR",
    "JUPYTER_PATH",
    "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR",
    "JUPYTER_RUNTIME_DIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "PIP_USER",
)


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
    )
    assert result.returncode == 0, (
        f"`{' '.join(map(str, cmd))}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def _venv(path: Path, system_site_packages: bool) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    flags = ["--system-site-packages"] if system_site_packages else []
    _run([base, "-m", "venv", *flags, str(path)], timeout=120)
    return path / "bin" / "python"


def _binder_environ(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ISOLATE}
    env["HOME"] = str(home)
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A fresh environment built from binder/ as repo2docker builds it."""
    root = tmp_path_factory.mktemp("binder")
    home = root / "home"
    home.mkdir()
    venv = root / "venv"
    python = _venv(venv, system_site_packages=True)
    env = _binder_environ(venv, home)
    installed = _run(
        [str(python), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"],
        timeout=480,
        cwd=REPO,
        env=env,
    )
    _run([str(BINDER / "postBuild")], timeout=60, cwd=REPO, env=env)
    return SimpleNamespace(
        root=root, home=home, venv=venv, python=python, env=env, pip=installed.stdout
    )


def test_binder_files() -> None:
    requirements = (BINDER / "requirements.txt").read_text().split()
    assert requirements == ["-e", ".[jupyter,tutorials]"]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"jupyter", "tutorials"} <= set(extras)
    assert any(r.startswith("scikit-learn") for r in extras["tutorials"])
    version = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.1[2-9]", version), version
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    lines = post_build.read_text().splitlines()
    assert lines[0].startswith("#!") and any(line.startswith("set -e") for line in lines)


def test_post_build_enables_the_extension_once(binder_env: SimpleNamespace) -> None:
    config = binder_env.home / ".ipython" / "profile_default" / "ipython_kernel_config.py"
    assert EXTENSION_LINE in config.read_text()
    _run([str(BINDER / "postBuild")], timeout=60, cwd=REPO, env=binder_env.env)
    assert config.read_text().count(EXTENSION_LINE) == 1, config.read_text()


def test_first_tutorial_runs_on_binder(
    binder_env: SimpleNamespace, leak_check: Callable[..., None]
) -> None:
    out = binder_env.root / "01_executed.ipynb"
    cwd = binder_env.root / "work"
    cwd.mkdir(exist_ok=True)
    run = subprocess.run(
        [
            str(binder_env.python),
            str(RUNNER),
            str(REPO / "tutorials" / "01_first_tasks.ipynb"),
            str(out),
            "--kernel-python",
            str(binder_env.python),
            "--cwd",
            str(cwd),
            "--probe",
            PROBE,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=binder_env.env,
    )
    assert out.exists(), run.stdout + run.stderr
    nb = nbformat.read(out, as_version=4)
    probe = output_text(nb.cells[0])
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\nprobe: {probe}"
    print(run.stdout.strip())
    # The kernel ran in the Binder environment, with Shoal from this checkout.
    assert f"prefix: {binder_env.venv}" in probe, probe
    assert f"shoal: {REPO / 'runtime'}" in probe, probe
    for fragment, text in EXPECTED["01_first_tasks"]:
        shown = output_text(cell_with(nb, fragment))
        assert text in shown, f"the cell with {fragment!r} showed:\n{shown}"
    leak_check("after tutorial 01 in the Binder environment")


def test_repo2docker_accepts_the_repository(tmp_path: Path) -> None:
    python = _venv(tmp_path / "r2d", system_site_packages=False)
    try:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "jupyter-repo2docker"],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or ""
        pytest.skip(f"jupyter-repo2docker could not be installed here: {output[-500:]}")
    result = _run(
        [str(python.with_name("repo2docker")), "--no-build", "--no-run", "--debug", str(REPO)],
        timeout=120,
    )
    plan = result.stdout + result.stderr
    assert "python=3.12" in plan, plan
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in plan, plan
    assert "./binder/postBuild" in plan, plan
