"""Runtime environments: what a job, task or actor needs around it, set in code.

    shoal.init(runtime_env={"env_vars": {"MODE": "fast"}, "working_dir": "."})
    @shoal.remote(runtime_env={"pip": ["requests==2.31"]})
    f.options(runtime_env={"env_vars": {"MODE": "slow"}}).remote()

Fields: ``env_vars``, ``working_dir``, ``py_modules``, ``pip``, ``excludes`` and ``config``
(``setup_timeout_seconds``, ``eager_install``). A task's fields replace the job's, except
``env_vars``, which merge key by key, as in Ray. See docs/runtime_env.md; each field is a
``RuntimeEnvPlugin`` (``_plugin.py``).
"""

from __future__ import annotations

import json
from typing import Any

from ._plugin import RuntimeEnvPlugin as RuntimeEnvPlugin
from ._plugin import WorkerLaunch as WorkerLaunch

__all__ = ["RuntimeEnv", "RuntimeEnvConfig", "RuntimeEnvPlugin", "WorkerLaunch"]


class RuntimeEnvConfig(dict[str, Any]):
    """``config`` of a runtime_env: ``setup_timeout_seconds`` (600; -1: no limit) and
    ``eager_install`` (True: a job's env is built on every node at ``init``)."""

    def __init__(self, setup_timeout_seconds: int = 600, eager_install: bool = True) -> None:
        super().__init__(setup_timeout_seconds=setup_timeout_seconds, eager_install=eager_install)
        from ._spec import validate_config

        validate_config(dict(self))


class RuntimeEnv(dict[str, Any]):
    """A runtime_env as a dict (Ray's class of that name): checked when made."""

    def __init__(
        self,
        *,
        py_modules: list[Any] | None = None,
        working_dir: str | None = None,
        pip: Any = None,
        env_vars: dict[str, str] | None = None,
        excludes: list[str] | None = None,
        config: dict[str, Any] | None = None,
        **other: Any,
    ) -> None:
        fields = dict(
            py_modules=py_modules,
            working_dir=working_dir,
            pip=pip,
            env_vars=env_vars,
            excludes=excludes,
            config=config,
            **other,
        )
        super().__init__({k: v for k, v in fields.items() if v is not None})
        from ._spec import validate

        validate(dict(self))

    @classmethod
    def _from_wire(cls, wire: dict[str, Any]) -> RuntimeEnv:
        env = cls.__new__(cls)
        dict.__init__(env, json.loads(json.dumps(wire)))  # a deep copy
        return env

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True)
