"""The process's one CoreWorker, and what the current thread is running.

Kept apart from the API so that low-level modules (refs, serialization) can find the
runtime without importing everything above them.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
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

# In an actor's worker: how many times the actor had been restarted when this worker
# became it (0 in its first life, and outside actors).
actor_restarts = 0

# The notebook cell that work started here belongs to (an "output tag", a small int): what
# tasks print goes to that cell, and interrupting it cancels them (jupyter_ext/_output.py).
# In a worker it is the running task's, set per task from its spec: a ContextVar rather
# than a thread-local, so that concurrent calls of an async actor each keep their own.
output_tag: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "shoal_output_tag", default=None
)

# In a driver inside IPython, the notebook layer's function that names the current cell.
cell_tagger: Callable[[], int | None] | None = None


def current_output_tag() -> int | None:
    """The tag that a task or actor call submitted from here now carries (None: none)."""
    tag = output_tag.get()
    if tag is None and cell_tagger is not None:
        tag = cell_tagger()
    return tag


def core() -> CoreWorker:
    if _core is None:
        raise RuntimeError("Shoal is not initialized: call shoal.init() first")
    return _core


def maybe_core() -> CoreWorker | None:
    return _core


def set_core(core: Any) -> None:
    global _core
    _core = core
