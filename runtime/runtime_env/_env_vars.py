"""``env_vars``: variables set in the worker's environment before it runs anything."""

from __future__ import annotations

from typing import Any

from ._plugin import RuntimeEnvPlugin, WorkerLaunch, require

# Variables the worker itself lives by: an env may not change them.
RESERVED = {
    "SHOAL_WORKER_ID",
    "SHOAL_SESSION",
    "SHOAL_HEAD",
    "SHOAL_NODE_ID",
    "SHOAL_NODE_IP",
    "SHOAL_SHM_TAG",
    "SHOAL_RUNTIME_ENV",
}

# Variables read when the interpreter or the C library starts: a worker forked from the
# node's pre-started template would not see them, so it gets a fresh interpreter.
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")


class EnvVarsPlugin(RuntimeEnvPlugin):
    name = "env_vars"
    order = 90  # last: the user's variables win over what other fields set

    def validate(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise TypeError(
                f"runtime_env env_vars must be a dict of str to str, got {type(value).__name__}"
            )
        for k, v in value.items():
            if not isinstance(k, str) or not k or "=" in k or "\x00" in k:
                raise ValueError(f"runtime_env env_vars has an invalid variable name {k!r}")
            if k in RESERVED:
                raise ValueError(f"runtime_env env_vars may not set {k}: Shoal's workers use it")
            if not isinstance(v, str):
                raise TypeError(
                    f"runtime_env env_vars[{k!r}] must be a str, got {type(v).__name__} ({v!r})"
                )
            if "\x00" in v:
                raise ValueError(f"runtime_env env_vars[{k!r}] holds a NUL character")
        return dict(value)

    def check(self, value: Any) -> None:
        require(
            isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            and not RESERVED & set(value),
            "env_vars must be a dict of str to str",
        )

    def apply(self, value: dict[str, str], state: Any, launch: WorkerLaunch) -> None:
        if "PYTHONPATH" in value and launch.path:
            value = dict(value)  # the env's own paths stay in front of the user's
            value["PYTHONPATH"] = ":".join([*launch.path, value["PYTHONPATH"]])
        launch.env.update(value)
        if any(k.startswith(STARTUP_PREFIXES) for k in value):
            launch.fresh = True

    def describe(self, value: dict[str, str]) -> str:
        return f"env_vars ({len(value)})"
