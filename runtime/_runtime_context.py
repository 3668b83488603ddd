"""``shoal.get_runtime_context()``: where the calling code runs, and with what."""

from __future__ import annotations

import os
from typing import Any

from . import _worker_context


class RuntimeContext:
    """Ids and resources of the current driver, task or actor (hex strings, as in Ray)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def get_job_id(self) -> str:
        return f"{self._core.job_id:08x}"

    def get_node_id(self) -> str:
        return str(self._core.node_id.hex())

    def get_worker_id(self) -> str:
        return str(self._core.worker_id.hex())

    def get_task_id(self) -> str | None:
        tid = _worker_context.current.task_id
        return tid.hex() if tid is not None else None

    def get_actor_id(self) -> str | None:
        aid = _worker_context.current.actor_id
        return aid.hex() if aid is not None else None

    def get_task_name(self) -> str | None:
        return _worker_context.current.task_name or None

    def get_assigned_resources(self) -> dict[str, float]:
        return dict(_worker_context.current.resources or {})

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        return {"GPU": [str(i) for i in (_worker_context.current.gpu_ids or [])]}

    def get_gpu_ids(self) -> list[int]:
        return list(_worker_context.current.gpu_ids or [])

    @property
    def runtime_env(self) -> Any:
        """The runtime env this driver's work, or this task or actor, runs with (a
        ``shoal.runtime_env.RuntimeEnv``; packages appear as their ``pkg://`` URIs)."""
        from .runtime_env import RuntimeEnv
        from .runtime_env._state import state_of

        return RuntimeEnv._from_wire(state_of(self._core).wire)

    def get_runtime_env_string(self) -> str:
        return str(self.runtime_env.to_json())

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """In an actor: whether this is a restart of it (``max_restarts``), i.e. its
        constructor ran before in another worker. False in its first life and outside
        actors."""
        return _worker_context.actor_restarts > 0

    @property
    def namespace(self) -> str:
        return str(self._core.namespace)

    @property
    def worker_mode(self) -> str:
        return "driver" if self._core.role == "driver" else "worker"

    @property
    def pid(self) -> int:
        return os.getpid()

    def __repr__(self) -> str:
        return f"RuntimeContext(job={self.get_job_id()}, node={self.get_node_id()[:12]}, task={self.get_task_id()})"
