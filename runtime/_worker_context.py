"""The process's one CoreWorker, and what the current thread is running.

Kept apart from the API so that low-level modules (refs, serialization) can find the
runtime without importing everything above them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import CoreWorker

_core: CoreWorker | None = None


class _TaskContext(threading.local):
    task_id: bytes | None = None
    task_name: str = ""
    actor_id: bytes | None = None
    resources: dict[str, float] | None = None
    gpu_ids: list[int] | None = None
    fixed_resources: dict[str, int] | None = None  # the same, in fixed point
    inline_depth: int = 0


def current_gpu_ids() -> list[int]:
    return list(current.gpu_ids or [])


current = _TaskContext()


def core() -> CoreWorker:
    if _core is None:
        raise RuntimeError("Shoal is not initialized: call shoal.init() first")
    return _core


def maybe_core() -> CoreWorker | None:
    return _core


def set_core(core: Any) -> None:
    global _core
    _core = core
