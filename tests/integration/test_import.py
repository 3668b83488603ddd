"""The import surface: `import shoal` stays free of Jupyter packages, and the public API is
pinned."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import shoal

pytestmark = pytest.mark.timeout(60)

PUBLIC_API = [
    "ActorHandle",
    "ObjectRef",
    "ObjectRefGenerator",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "wait",
]

JUPYTER_PACKAGES = ("IPython", "ipywidgets", "jupyter_client", "ipykernel")


def test_import_does_not_load_jupyter_packages(tmp_path):
    code = (
        "import json, sys\n"
        "import shoal\n"
        f"packages = {JUPYTER_PACKAGES!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in packages)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_public_api_is_pinned():
    assert list(shoal.__all__) == PUBLIC_API


def test_every_public_name_exists():
    missing = [name for name in PUBLIC_API if not hasattr(shoal, name)]
    assert missing == []


def test_public_classes_and_modules():
    for name in ("ActorHandle", "ObjectRef", "ObjectRefGenerator"):
        assert inspect.isclass(getattr(shoal, name)), name
    assert inspect.ismodule(shoal.exceptions)
    assert shoal.exceptions.TaskError.__name__ == "TaskError"


def test_widgets_import_without_jupyter_packages_and_pin_their_api(tmp_path):
    # ipywidgets is optional for the core install: `import shoal.widgets` and progress()
    # must work without it; only ClusterMonitor needs it (imported on first use).
    code = (
        "import json, sys\n"
        "import shoal.widgets as w\n"
        f"packages = {JUPYTER_PACKAGES!r}\n"
        "print(json.dumps([w.__all__, sorted(m for m in sys.modules "
        "if m.split('.')[0] in packages)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    exported, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert exported == ["ClusterMonitor", "ProgressBar", "progress"]
    assert loaded == []
