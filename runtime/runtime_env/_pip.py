"""``pip``: requirements installed into a virtual environment, one per distinct requirement
set on each node; workers of the env run that environment's interpreter.

    <cache>/venvs/<key>/        python -m venv --without-pip, then pip --python ... install
    <cache>/venvs/<key>.log     pip's output, one section per build ("=== build ...")

The virtual environment sees the node's own packages (Shoal, numpy ...) behind its own,
like ``--system-site-packages`` would, but it is the node interpreter's site directories
that it gets (through a .pth file), so this works when the node itself runs in a virtual
environment, whose packages ``--system-site-packages`` would not include. pip runs from the
node's interpreter against the new environment (``pip --python``), so that no copy of pip is
installed into each environment (seconds saved per build).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import site
import socket
import sys
import time
from typing import Any

from ..exceptions import RuntimeEnvSetupError
from ._plugin import RuntimeEnvPlugin, SetupContext, WorkerLaunch, is_str_list, require, value_key

_DICT_FIELDS = {"packages", "pip_check", "pip_install_options", "pip_version", "hashes"}


class PipPlugin(RuntimeEnvPlugin):
    name = "pip"
    order = 30

    def validate(self, value: Any) -> dict[str, Any]:
        options: list[str] = []
        check = False
        hashes: dict[str, str] = {}
        if isinstance(value, dict):
            for name in value:
                if name not in _DICT_FIELDS:
                    raise ValueError(
                        f"runtime_env pip has an unknown field {name!r}; its fields are: "
                        "packages, pip_check, pip_install_options"
                    )
            if value.get("pip_version"):
                raise ValueError(
                    "runtime_env pip_version is not supported: the node's pip installs the packages"
                )
            if "packages" not in value:
                raise ValueError(
                    "runtime_env pip needs 'packages' (a list, or a requirements file)"
                )
            packages = _packages(value["packages"])
            check = value.get("pip_check", False)
            if not isinstance(check, bool):
                raise TypeError(f"runtime_env pip_check must be a bool, got {check!r}")
            options = value.get("pip_install_options") or []
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise TypeError(
                    f"runtime_env pip_install_options must be a list of str, got {options!r}"
                )
            hashes = dict(value.get("hashes") or {})
        else:
            packages = _packages(value)
        # Local files named as requirements (a wheel built here): absolute paths, and their
        # content in the key, so that a rebuilt wheel makes a new environment.
        resolved = []
        for req in packages:
            path = os.path.abspath(os.path.expanduser(req))
            if _names_a_file(req) and os.path.isfile(path):
                req = path
                hashes[path] = _file_hash(path)
            resolved.append(req)
        out: dict[str, Any] = {
            "packages": resolved,
            "pip_check": check,
            "pip_install_options": list(options),
        }
        if hashes:
            out["hashes"] = hashes
        return out

    def check(self, value: Any) -> None:
        require(
            isinstance(value, dict)
            and set(value) <= {"packages", "pip_check", "pip_install_options", "hashes"}
            and is_str_list(value.get("packages"))
            and all("\n" not in p for p in value["packages"])
            and is_str_list(value.get("pip_install_options", []))
            and isinstance(value.get("pip_check", False), bool),
            "pip must be a dict of packages (a list of str), pip_install_options and pip_check",
        )

    def key(self, value: dict[str, Any]) -> str:
        return value_key(value)

    def create(self, value: dict[str, Any], ctx: SetupContext) -> str:
        with ctx.entry("venvs", self.key(value)) as entry:
            if entry.ready:
                return entry.path
            log_path = entry.path + ".log"
            with open(log_path, "a") as log:
                log.write(
                    f"=== build {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} "
                    f"(pid {os.getpid()}) for the environment {ctx.key}\n"
                )
                since = log.tell()
            shutil.rmtree(entry.path, ignore_errors=True)  # a build that was cut short
            try:
                _build(value, ctx, entry.path, log_path, since)
            except BaseException:
                shutil.rmtree(entry.path, ignore_errors=True)
                raise
            entry.mark_ready()
            return entry.path

    def apply(self, value: dict[str, Any], state: str, launch: WorkerLaunch) -> None:
        launch.python = os.path.join(state, "bin", "python")
        launch.env["VIRTUAL_ENV"] = state
        launch.env["PATH"] = os.path.join(state, "bin") + os.pathsep + os.environ.get("PATH", "")

    def describe(self, value: dict[str, Any]) -> str:
        reqs = [p for p in value["packages"] if not p.startswith("-")]
        names = ", ".join(os.path.basename(p) for p in reqs[:3])
        more = f" +{len(reqs) - 3}" if len(reqs) > 3 else ""
        return f"pip ({names}{more})"


def _packages(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return _read_requirements(str(os.fspath(value)))
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"runtime_env pip must be a list of requirements, a requirements file or a dict, got {type(value).__name__}"
        )
    out = []
    for req in value:
        if not isinstance(req, str) or not req.strip() or "\n" in req or "\x00" in req:
            raise ValueError(f"runtime_env pip has an invalid requirement {req!r}")
        out.append(req.strip())
    return out


def _names_a_file(req: str) -> bool:
    """Whether a requirement names a local file rather than a project ("numpy")."""
    if req.startswith("-"):
        return False
    return os.sep in req or req.endswith((".whl", ".tar.gz", ".tgz", ".zip"))


def _read_requirements(path: str) -> list[str]:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(f"runtime_env pip requirements file {path!r} does not exist")
    out = []
    with open(full) as f:
        for line in f:
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:32]


def _build(value: dict[str, Any], ctx: SetupContext, venv: str, log_path: str, since: int) -> None:
    python = ctx.node_python
    own_pip = importlib.util.find_spec("pip") is not None
    argv = [python, "-m", "venv", *(["--without-pip"] if own_pip else []), venv]
    if ctx.run(argv, log_path) != 0:
        _fail("could not create a virtual environment", value, ctx, log_path, since)
    _see_node_packages(venv)
    requirements = os.path.join(venv, "shoal-requirements.txt")
    with open(requirements, "w") as f:
        f.write("\n".join(value["packages"]) + "\n")
    venv_python = os.path.join(venv, "bin", "python")
    pip = [python, "-m", "pip", "--python", venv_python] if own_pip else [venv_python, "-m", "pip"]
    env = dict(os.environ)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    install = [*pip, "install", *value["pip_install_options"], "-r", requirements]
    code = ctx.run(install, log_path, env)
    if code != 0:
        _fail(f"pip install failed (exit code {code})", value, ctx, log_path, since)
    if value.get("pip_check"):
        code = ctx.run([*pip, "check"], log_path, env)
        if code != 0:
            _fail(f"pip check failed (exit code {code})", value, ctx, log_path, since)


def _see_node_packages(venv: str) -> None:
    """Put the node's site directories behind the environment's own (see the module doc)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = os.path.join(venv, "lib", version, "site-packages")
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else ""
    if user and os.path.isdir(user):
        dirs.append(user)
    os.makedirs(own, exist_ok=True)
    with open(os.path.join(own, "_shoal_node_packages.pth"), "w") as f:
        # One line that starts with "import": site runs it (addsitedir also reads the .pth
        # files of those directories: editable installs, Shoal's own among them).
        f.write(f"import site; list(map(site.addsitedir, {dirs!r}))\n")


def _fail(what: str, value: dict[str, Any], ctx: SetupContext, log_path: str, since: int) -> None:
    reqs = " ".join(value["packages"])
    tail = ctx.log_tail(log_path, since)
    raise RuntimeEnvSetupError(
        f"{what} for the requirements: {reqs}\n--- pip output (end) ---\n{tail}\n"
        f"--- the full output is in {log_path} (on host {socket.gethostname()}) ---"
    )
