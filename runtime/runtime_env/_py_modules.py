"""``py_modules``: local packages (directories), single-file modules or zips, shipped to the
nodes and importable by name in the worker."""

from __future__ import annotations

import os
import types
import zipfile
from typing import Any

from ._packaging import is_uri, split_uri
from ._plugin import RuntimeEnvPlugin, SetupContext, Uploader, WorkerLaunch, require
from ._working_dir import local_path


class PyModulesPlugin(RuntimeEnvPlugin):
    name = "py_modules"
    order = 20

    def validate(self, value: Any) -> list[str]:
        if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
            raise TypeError(
                f"runtime_env py_modules must be a list of packages, modules or paths, got {type(value).__name__}"
            )
        out = []
        for item in value:
            if isinstance(item, types.ModuleType):
                item = _module_path(item)
            if is_uri(item):
                out.append(str(item))
                continue
            path = local_path(item, "runtime_env py_modules entry")
            if os.path.isdir(path):
                out.append(path)
            elif path.endswith(".whl"):
                raise ValueError(
                    f"runtime_env py_modules entry {path!r} is a wheel: install wheels with "
                    "runtime_env pip"
                )
            elif path.endswith(".py") or (os.path.isfile(path) and zipfile.is_zipfile(path)):
                out.append(path)
            else:
                raise ValueError(
                    f"runtime_env py_modules entry {path!r} is not a package directory, a .py "
                    "file or a .zip file"
                )
        return out

    def check(self, value: Any) -> None:
        require(
            isinstance(value, list) and all(is_uri(v) for v in value),
            "py_modules must be a list of package URIs",
        )

    def resolve(self, value: list[str], uploader: Uploader) -> list[str]:
        out = []
        for item in value:
            if is_uri(item):
                out.append(item)
            elif os.path.isdir(item):
                out.append(uploader.upload_dir(item, keep_name=True))
            elif item.endswith(".py"):
                out.append(uploader.upload_file_module(item))
            else:
                # A zip goes on the path as it is (its top directory is a package).
                out.append(split_uri(uploader.upload_zip(item))[0])
        return out

    def create(self, value: list[str], ctx: SetupContext) -> list[str]:
        return [ctx.package(split_uri(uri)[0]) for uri in value]

    def apply(self, value: list[str], state: list[str], launch: WorkerLaunch) -> None:
        launch.path.extend(state)

    def describe(self, value: list[str]) -> str:
        return f"py_modules ({len(value)})"


def _module_path(module: types.ModuleType) -> str:
    """Where an imported module lives: a package's directory, or a module's file."""
    paths = list(getattr(module, "__path__", None) or [])
    if len(paths) == 1:
        return str(paths[0])
    if paths:
        raise ValueError(
            f"runtime_env py_modules: the namespace package {module.__name__} spans several "
            "directories; give one of them as a path"
        )
    file = getattr(module, "__file__", None)
    if not file:
        raise ValueError(f"runtime_env py_modules: the module {module.__name__} has no file")
    return str(file)
