"""Exceptions that Shoal raises. Import them from here: ``from shoal.exceptions import ...``.

Application errors raised inside a task arrive as a ``TaskError``; when the original
exception class can be subclassed, the error is also an instance of it, so that
``except ZeroDivisionError:`` catches a remote ZeroDivisionError.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorDiedError",
    "ActorError",
    "ActorUnavailableError",
    "ClusterGoneError",
    "GetTimeoutError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "OutOfMemoryError",
    "OwnerDiedError",
    "RuntimeEnvSetupError",
    "ShoalError",
    "TaskCancelledError",
    "TaskError",
    "TaskUnschedulableError",
    "WorkerCrashedError",
]


class ShoalError(Exception):
    """Base class of every error raised by Shoal itself."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows these lines instead of its own traceback: the original error of a
        task with its remote frames and where it ran, and no runtime frames (see
        shoal.jupyter_ext._tracebacks; only IPython calls this)."""
        from .jupyter_ext._tracebacks import render

        return render(self)


class TaskError(ShoalError):
    """An exception raised by user code in a task or actor method.

    Attributes: ``cause`` (the original exception, or None when it could not be
    unpickled), ``cause_type_name``, ``remote_traceback`` (text, runtime frames removed),
    ``task_name``, ``pid``, ``node_id`` (hex) and ``worker_id`` (hex).
    """

    cause: BaseException | None
    cause_type_name: str
    remote_traceback: str
    task_name: str
    pid: int
    node_id: str
    worker_id: str

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message)
        self._message = message
        self.cause = fields.get("cause")
        self.cause_type_name = fields.get("cause_type_name", "")
        self.remote_traceback = fields.get("remote_traceback", "")
        self.task_name = fields.get("task_name", "")
        self.pid = fields.get("pid", 0)
        self.node_id = fields.get("node_id", "")
        self.worker_id = fields.get("worker_id", "")

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> Any:
        return (_rebuild_task_error, (self._message, self._fields()))

    def _fields(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "cause_type_name": self.cause_type_name,
            "remote_traceback": self.remote_traceback,
            "task_name": self.task_name,
            "pid": self.pid,
            "node_id": self.node_id,
            "worker_id": self.worker_id,
        }

    def as_instanceof_cause(self) -> TaskError:
        """This error as an instance of both TaskError and the cause's class, when possible."""
        cause = self.cause
        if cause is None:
            return self
        cause_cls = type(cause)
        try:
            # A task that failed because a task it waited on failed: keep the innermost
            # class, so that ``except ZeroDivisionError`` still works two levels up.
            dual = cause_cls if isinstance(cause, TaskError) else _dual_class(cause_cls)
            err: TaskError = Exception.__new__(dual)
            # Copy the cause's state first (its args, attributes), then ours on top.
            err.__dict__.update(getattr(cause, "__dict__", {}))
            err.args = cause.args
            TaskError.__init__(err, self._message, **self._fields())
            err.args = cause.args
            return err
        except Exception:
            return self


_dual_classes: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    dual = _dual_classes.get(cause_cls)
    if dual is None:
        dual = type(
            f"TaskError({cause_cls.__name__})",
            (TaskError, cause_cls),
            {"__str__": TaskError.__str__, "__reduce__": TaskError.__reduce__},
        )
        dual.__module__ = cause_cls.__module__
        dual.__qualname__ = cause_cls.__qualname__
        _dual_classes[cause_cls] = dual
    return dual


def _rebuild_task_error(message: str, fields: dict[str, Any]) -> TaskError:
    return TaskError(message, **fields).as_instanceof_cause()


class WorkerCrashedError(ShoalError):
    """The worker process running a task died, and the task has no retries left.

    Attributes: ``task_name``, ``pid`` and ``worker_id`` (hex) of the last worker that ran
    it, ``reason`` (how that worker ended: "killed by signal SIGKILL (9)", "exit code 1")
    and ``attempts``.
    """

    def __init__(
        self,
        message: str = "",
        task_name: str = "",
        pid: int = 0,
        worker_id: str = "",
        reason: str = "",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.task_name = task_name
        self.pid = pid
        self.worker_id = worker_id
        self.reason = reason
        self.attempts = attempts

    def __reduce__(self) -> Any:
        return (
            type(self),
            (str(self), self.task_name, self.pid, self.worker_id, self.reason, self.attempts),
        )


class ActorError(ShoalError):
    """Base class of ActorDiedError and ActorUnavailableError (Ray's RayActorError)."""

    def __init__(self, message: str = "", actor_id: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.actor_id = actor_id
        self.reason = reason

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.actor_id, self.reason))


class ActorDiedError(ActorError):
    """The actor is dead for good: killed, its process or node died with no restarts left,
    its constructor raised, or its owner exited. ``reason`` says which."""


class ActorUnavailableError(ActorError):
    """The actor is being restarted: a call that was running or sent when its worker died,
    and that may not be retried (``max_task_retries``), fails with this error. It may or
    may not have run. Calls made from now on wait for the restarted actor."""


class GetTimeoutError(ShoalError, TimeoutError):
    """``get`` waited longer than its ``timeout``."""


class TaskCancelledError(ShoalError):
    """The task was cancelled with ``shoal.cancel``."""


class ObjectLostError(ShoalError):
    """The object's value was lost and cannot be rebuilt."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object died, so its value can no longer be found."""


class ClusterGoneError(ShoalError):
    """The cluster cannot be reached any more: its head died, this process's node was cut
    off from it (or declared dead), or a client heard nothing from it for
    SHOAL_CLIENT_TIMEOUT. What was waiting fails with it, and so does every later call."""


class ObjectStoreFullError(ShoalError, MemoryError):
    """Neither the shared-memory store nor the spill directory can take the object."""


class OutOfMemoryError(ShoalError, MemoryError):
    """The node ran low on memory and the task's worker was stopped to protect it.

    Attributes (bytes, and a fraction for the threshold): ``used`` and ``total`` memory of
    the node when the monitor acted, ``threshold``, ``rss`` of the worker it stopped,
    ``task_name`` and ``node_id`` (hex).
    """

    def __init__(self, message: str = "", **figures: Any) -> None:
        super().__init__(message)
        self.used = int(figures.get("used", 0))
        self.total = int(figures.get("total", 0))
        self.threshold = float(figures.get("threshold", 0.0))
        self.rss = int(figures.get("rss", 0))
        self.task_name = str(figures.get("task_name", ""))
        self.node_id = str(figures.get("node_id", ""))

    def __reduce__(self) -> Any:
        figures = {
            "used": self.used,
            "total": self.total,
            "threshold": self.threshold,
            "rss": self.rss,
            "task_name": self.task_name,
            "node_id": self.node_id,
        }
        return (_rebuild_oom, (str(self), figures))


def _rebuild_oom(message: str, figures: dict[str, Any]) -> OutOfMemoryError:
    return OutOfMemoryError(message, **figures)


class TaskUnschedulableError(ShoalError):
    """No node in the cluster can ever provide the resources the task or actor asks for."""


class RuntimeEnvSetupError(ShoalError):
    """The runtime environment of a task or actor could not be set up on a node (a
    requirement that pip cannot install, a package that cannot be fetched, a setup that
    took longer than ``setup_timeout_seconds``). The message carries the node's reason,
    with the end of pip's output."""


class ActorRuntimeEnvSetupError(RuntimeEnvSetupError, ActorDiedError):
    """What calls on an actor whose runtime environment could not be set up raise: both a
    RuntimeEnvSetupError and an ActorDiedError (the actor never started)."""
