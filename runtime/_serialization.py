"""Turning values into bytes and back, with protocol-5 out-of-band buffers.

A serialized value is a pickle stream plus zero or more raw buffers (numpy arrays, bytes,
memoryviews ...), which travel as separate frames or shared-memory regions so that nothing
is copied on the way. ObjectRefs and ActorHandles found while pickling are collected, since
a stored value keeps the objects it refers to alive.

Plain data is pickled with the C pickler; anything it refuses (lambdas, classes defined in
``__main__`` or a notebook, closures) goes through cloudpickle, which pickles by value.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import traceback
from typing import Any

import cloudpickle

# Types that the C pickler handles by value with no help, checked on the top-level value
# (and one level into tuples, lists and dicts) to pick the fast path.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})

FLAG_ERROR = 1


class SerializedValue:
    """A pickle stream, its out-of-band buffers, and the ids of refs found inside."""

    __slots__ = ("buffers", "contained", "data", "flags")

    def __init__(
        self, data: bytes, buffers: list[Any], contained: list[bytes], flags: int = 0
    ) -> None:
        self.data = data
        self.buffers = buffers
        self.contained = contained
        self.flags = flags

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def nbytes(self) -> int:
        if not self.buffers:
            return len(self.data)
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)

    def frames(self) -> list[Any]:
        return [self.data, *self.buffers]


class _Context(threading.local):
    contained: list[bytes] | None = None


_context = _Context()


def note_contained_ref(object_id: bytes) -> None:
    """Called by ObjectRef.__reduce__ (and actor handles) while a value is being pickled."""
    contained = _context.contained
    if contained is not None:
        contained.append(object_id)


def _is_plain(value: Any) -> bool:
    t = type(value)
    if t in _PLAIN_TYPES:
        return True
    if t is tuple or t is list:
        return all(type(v) in _PLAIN_TYPES for v in value)
    if t is dict:
        return all(type(k) in _PLAIN_TYPES and type(v) in _PLAIN_TYPES for k, v in value.items())
    return False


def serialize(value: Any, flags: int = 0) -> SerializedValue:
    if _is_plain(value):
        return SerializedValue(pickle.dumps(value, protocol=5), [], [], flags)
    buffers: list[Any] = []
    previous = _context.contained
    contained: list[bytes] = []
    _context.contained = contained
    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=_raw_buffer(buffers))
    finally:
        _context.contained = previous
    return SerializedValue(data, buffers, contained, flags)


def _raw_buffer(buffers: list[Any]) -> Any:
    def callback(buf: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buf.raw())
        except BufferError:
            # Not contiguous: let pickle copy it in-band.
            return True
        return False

    return callback


def deserialize(data: Any, buffers: list[Any]) -> Any:
    return pickle.loads(data, buffers=buffers)


def serialize_error(exc: BaseException, flags: int = FLAG_ERROR) -> SerializedValue:
    """Serialize an exception that ``get`` must raise. Never fails: falls back to text."""
    try:
        return serialize(exc, flags)
    except Exception:
        from .exceptions import TaskError

        text = getattr(exc, "remote_traceback", "") or "".join(
            traceback.format_exception_only(type(exc), exc)
        )
        fallback = TaskError(
            str(exc) or text,
            cause_type_name=getattr(exc, "cause_type_name", type(exc).__name__),
            remote_traceback=text,
            task_name=getattr(exc, "task_name", ""),
            pid=getattr(exc, "pid", 0),
            node_id=getattr(exc, "node_id", ""),
            worker_id=getattr(exc, "worker_id", ""),
        )
        return serialize(fallback, flags)


def pickle_definition(obj: Any) -> tuple[bytes, bytes]:
    """cloudpickle a function or class once; returns (content hash, bytes)."""
    data = cloudpickle.dumps(obj, protocol=5)
    return hashlib.blake2b(data, digest_size=16).digest(), data


def check_picklable(value: Any, what: str) -> SerializedValue:
    """Serialize ``value``, turning any failure into a TypeError that names ``what``."""
    try:
        return serialize(value)
    except Exception as exc:
        raise TypeError(
            f"could not serialize {what} of type {type(value).__name__}: {exc}"
        ) from exc
