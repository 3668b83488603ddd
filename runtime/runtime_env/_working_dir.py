"""``working_dir``: a local directory (or zip) shipped to the nodes, made the worker's
working directory and the first entry of its import path."""

from __future__ import annotations

import os
import zipfile
from typing import Any

from ..exceptions import RuntimeEnvSetupError
from ._packaging import is_uri, split_uri
from ._plugin import RuntimeEnvPlugin, SetupContext, Uploader, WorkerLaunch, require


def local_path(value: Any, what: str) -> str:
    """An existing local path from a str or PathLike, made absolute; errors name ``what``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str path, got bytes")
    if "://" in text:
        raise ValueError(
            f"{what} {text!r} is a remote URI; Shoal ships local directories, files and "
            ".zip files only"
        )
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise ValueError(f"{what} {text!r} does not exist (looked for {path})")
    return path


class WorkingDirPlugin(RuntimeEnvPlugin):
    name = "working_dir"
    order = 10

    def validate(self, value: Any) -> str:
        if is_uri(value):
            return str(value)
        path = local_path(value, "runtime_env working_dir")
        if os.path.isdir(path):
            return path
        if os.path.isfile(path) and zipfile.is_zipfile(path):
            return path
        raise ValueError(f"runtime_env working_dir {path!r} is neither a directory nor a .zip file")

    def check(self, value: Any) -> None:
        require(is_uri(value), "working_dir must be a package URI")

    def resolve(self, value: str, uploader: Uploader) -> str:
        if is_uri(value):
            return value
        if os.path.isdir(value):
            return uploader.upload_dir(value, keep_name=False)
        return uploader.upload_zip(value)

    def create(self, value: str, ctx: SetupContext) -> str:
        base, sub = split_uri(value)
        path = ctx.package(base)
        full = os.path.join(path, *sub.split("/")) if sub else path
        if not os.path.isdir(full):
            raise RuntimeEnvSetupError(f"the working_dir package {value} has no directory {sub!r}")
        return full

    def apply(self, value: str, state: str, launch: WorkerLaunch) -> None:
        launch.cwd = state
        launch.path.insert(0, state)

    def describe(self, value: str) -> str:
        return "working_dir"
