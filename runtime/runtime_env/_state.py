"""The runtime env a process's work inherits, and an environment's key. Light: imported by
every ``.remote()``.

    driver: init(runtime_env=...) sets the job's env  --> EnvState on the core
    worker: its own env, from SHOAL_RUNTIME_ENV (set by the node when it started it)
    .remote(): the task's env = merge(inherited, the task's own)  --> (wire, key)

The key names an environment on every node: workers are pooled by it, and it is "" for
the node's default environment (nothing to change), so that plain work costs nothing here.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from ._plugin import value_key

# Fields that do not change what a worker is: they do not make the key.
NOT_IN_KEY = ("config", "excludes")

ENV_VAR = "SHOAL_RUNTIME_ENV"


def env_key(wire: dict[str, Any]) -> str:
    fields = {k: v for k, v in wire.items() if k not in NOT_IN_KEY}
    return value_key(fields) if fields else ""


class EnvState:
    """The env inherited by the work this process submits, and what was uploaded for it."""

    def __init__(self, wire: dict[str, Any]) -> None:
        self.wire = wire
        self.key = env_key(wire)
        self.lock = threading.Lock()
        # Packages made from local paths: (what, path, options) -> (snapshot, uri); a
        # package is made again only when the files changed.
        self.packages: dict[Any, tuple[Any, str]] = {}
        self.uploaded: set[str] = set()


def state_of(core: Any) -> EnvState:
    state: EnvState | None = core.runtime_env
    if state is None:
        wire: dict[str, Any] = {}
        if core.role == "worker":
            try:
                wire = json.loads(os.environ.get(ENV_VAR) or "{}")
            except ValueError:
                wire = {}
        state = core.runtime_env = EnvState(wire if isinstance(wire, dict) else {})
    return state


def call_env(core: Any, options_env: Any, cache: list[Any]) -> tuple[dict[str, Any] | None, str]:
    """The wire env and key of a task or actor: its own env (validated ``options_env``, or
    None) merged onto the inherited one. ``cache`` (a one-item list kept by the remote
    function) saves the work on later calls."""
    state = core.runtime_env or state_of(core)
    cached = cache[0]
    if cached is not None and cached[0] is state:
        return cached[1], cached[2]
    if not options_env:
        wire: dict[str, Any] | None = state.wire if state.key else None
        key = state.key
    else:
        from ._driver import resolve_onto

        merged = resolve_onto(core, state, options_env)
        key = env_key(merged)
        wire = merged if key else None
    cache[0] = (state, wire, key)
    return wire, key
