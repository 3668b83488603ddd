"""Checking a user's runtime_env, and merging envs as Ray does.

validate(user env) -> a normalized dict (at the decorator, ``.options()`` or ``init``)
merge(parent, child): the child's fields replace the parent's, except ``env_vars``,
    which merge key by key (the child's value wins), as Ray documents
"""

from __future__ import annotations

from typing import Any

from ._registry import PLUGINS

# Ray fields that Shoal does not implement: named as such, not as unknown.
NOT_SUPPORTED = {
    "conda",
    "container",
    "image_uri",
    "uv",
    "py_executable",
    "java_jars",
    "worker_process_setup_hook",
    "nsight",
    "rocprof_sys",
}
CONFIG_FIELDS = {"setup_timeout_seconds", "eager_install"}
DEFAULT_SETUP_TIMEOUT_SECONDS = 600
FIELDS = sorted([*PLUGINS, "excludes", "config"])


def validate(env: Any) -> dict[str, Any]:
    """A user's runtime_env, checked field by field; TypeError or ValueError otherwise."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise TypeError(f"runtime_env must be a dict, got {type(env).__name__}")
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not isinstance(name, str):
            raise TypeError(f"runtime_env field names are strings, got {name!r}")
        if value is None:
            continue  # as in Ray: a field set to None is not set
        plugin = PLUGINS.get(name)
        if plugin is not None:
            out[name] = plugin.validate(value)
        elif name == "excludes":
            out[name] = validate_excludes(value)
        elif name == "config":
            out[name] = validate_config(value)
        elif name in NOT_SUPPORTED:
            raise ValueError(
                f"runtime_env field {name!r} is not supported by Shoal yet; "
                f"the supported fields are: {', '.join(FIELDS)}"
            )
        else:
            raise ValueError(
                f"runtime_env has an unknown field {name!r}; its fields are: {', '.join(FIELDS)}"
            )
    return out


def validate_excludes(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"runtime_env excludes must be a list of gitignore-style patterns, got {type(value).__name__}"
        )
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"runtime_env excludes holds a {type(pattern).__name__}: {pattern!r}")
    return list(value)


def validate_config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"runtime_env config must be a dict, got {type(value).__name__}")
    for name in value:
        if name not in CONFIG_FIELDS:
            raise ValueError(
                f"runtime_env config has an unknown field {name!r}; its fields are: "
                f"{', '.join(sorted(CONFIG_FIELDS))}"
            )
    out = dict(value)
    timeout = out.get("setup_timeout_seconds", DEFAULT_SETUP_TIMEOUT_SECONDS)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or (timeout <= 0 and timeout != -1)
    ):
        raise ValueError(
            f"runtime_env config setup_timeout_seconds must be an int > 0 (or -1: no limit), got {timeout!r}"
        )
    if not isinstance(out.get("eager_install", True), bool):
        raise TypeError(
            f"runtime_env config eager_install must be a bool, got {out['eager_install']!r}"
        )
    return out


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for name, value in child.items():
        if name == "env_vars":
            out[name] = {**parent.get("env_vars", {}), **value}
        else:
            out[name] = value
    return out


def setup_timeout(wire: dict[str, Any]) -> float | None:
    """Seconds a node may take to set the environment up; None: no limit."""
    t = (wire.get("config") or {}).get("setup_timeout_seconds", DEFAULT_SETUP_TIMEOUT_SECONDS)
    return None if t == -1 else float(t)


def eager(wire: dict[str, Any]) -> bool:
    return bool((wire.get("config") or {}).get("eager_install", True))


def describe(wire: dict[str, Any]) -> str:
    """A few words per field, for `shoal status` and error messages."""
    parts = [
        plugin.describe(wire[name])
        for name, plugin in sorted(PLUGINS.items(), key=lambda p: p[1].order)
        if name in wire
    ]
    return ", ".join(parts) or "default"


def check_wire(wire: Any) -> dict[str, Any]:
    """An env as a node receives it, checked for shape (the driver validated it; this keeps
    a malformed message from going further): ValueError with the reason."""
    if not isinstance(wire, dict):
        raise ValueError("a runtime env must be a dict")
    for name, value in wire.items():
        plugin = PLUGINS.get(name)
        if plugin is not None:
            plugin.check(value)
        elif name == "config":
            validate_config(value)
        elif name == "excludes":
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError("excludes must be a list of str")
        else:
            raise ValueError(f"this node has no plugin for the runtime_env field {name!r}")
    return wire
