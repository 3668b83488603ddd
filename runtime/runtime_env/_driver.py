"""The driver's side: turning a validated env into its wire form, uploading packages once.

    init(runtime_env=...)   set_job_env: resolve, upload, then (eager_install) ask every
                            node to build it now (PREPARE_ENV)
    @remote(runtime_env=..) resolve_onto(inherited env): the task's fields resolved and
                            merged onto what it inherits

A package goes to the head's package store (PACKAGE_UPLOAD, after asking whether it is
there already), from which nodes fetch it. It is made again only when its files changed
(a directory's names, sizes and times are compared first, which is cheap).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import _config
from .._protocol import Message, MsgType
from ..exceptions import RuntimeEnvSetupError
from ._packaging import (
    Package,
    PackageTooLarge,
    package_dir,
    package_module_file,
    package_zip,
    snapshot,
)
from ._registry import PLUGINS
from ._spec import eager, merge
from ._state import EnvState

M = MsgType

UPLOAD_TIMEOUT_SECONDS = 300.0


class _Uploader:
    def __init__(self, core: Any, state: EnvState, excludes: list[str]) -> None:
        self.core = core
        self.state = state
        self.excludes = excludes

    def upload_dir(self, path: str, keep_name: bool) -> str:
        what = ("dir", path, tuple(self.excludes), keep_name)
        snap = snapshot(path, self.excludes)
        return self._cached(what, snap, lambda: (package_dir(path, self.excludes, keep_name), ""))

    def upload_file_module(self, path: str) -> str:
        st = os.stat(path)
        snap = (st.st_size, st.st_mtime_ns)
        return self._cached(("file", path), snap, lambda: (package_module_file(path), ""))

    def upload_zip(self, path: str) -> str:
        """The URI names the zip's single top-level directory when it has one."""
        st = os.stat(path)
        return self._cached(("zip", path), (st.st_size, st.st_mtime_ns), lambda: package_zip(path))

    def _cached(self, what: Any, snap: Any, make: Callable[[], tuple[Package, str]]) -> str:
        with self.state.lock:
            cached = self.state.packages.get(what)
        if cached is not None and cached[0] == snap:
            return cached[1]
        pkg, top = make()
        self._send(pkg)
        uri = pkg.uri + ("/" + top if top else "")
        with self.state.lock:
            self.state.packages[what] = (snap, uri)
        return uri

    def _send(self, pkg: Package) -> None:
        if pkg.uri in self.state.uploaded:
            return
        limit = _config.MAX_FRAME_SIZE - (1 << 20)
        if len(pkg.data) > limit:
            raise PackageTooLarge(
                f"a runtime_env package compresses to {len(pkg.data) / 2**20:.1f} MiB, more "
                f"than one message can carry ({limit / 2**20:.0f} MiB)"
            )
        core = self.core
        reply = core.request(Message(M.PACKAGE_UPLOAD, {"uri": pkg.uri, "probe": True}), 60)
        if not reply.body.get("have"):
            reply = core.request(
                Message(M.PACKAGE_UPLOAD, {"uri": pkg.uri}, [pkg.data]), UPLOAD_TIMEOUT_SECONDS
            )
            if reply.body.get("e"):
                raise RuntimeEnvSetupError(
                    f"could not upload a runtime_env package to the cluster: {reply.body['e']}"
                )
        self.state.uploaded.add(pkg.uri)


def resolve_onto(core: Any, state: EnvState, env: dict[str, Any]) -> dict[str, Any]:
    """``env`` (validated) resolved, merged onto the inherited ``state``: the wire form."""
    excludes = env.get("excludes", state.wire.get("excludes", []))
    uploader = _Uploader(core, state, excludes)
    resolved = {
        name: (PLUGINS[name].resolve(value, uploader) if name in PLUGINS else value)
        for name, value in env.items()
    }
    return merge(state.wire, resolved)


def set_job_env(core: Any, env: dict[str, Any]) -> None:
    """The job's env: resolved now (errors show at ``init``), inherited by all its work."""
    base = EnvState({})
    core.runtime_env = base  # packages uploaded for it are remembered there
    wire = resolve_onto(core, base, env)
    state = EnvState(wire)
    state.packages, state.uploaded = base.packages, base.uploaded
    core.runtime_env = state
    if state.key and eager(wire):
        core.send_head(Message(M.PREPARE_ENV, {"env": wire}))
