"""ObjectRef and ObjectRefGenerator: the user's handles on values that may not exist yet."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from . import _worker_context
from ._serialization import note_contained_ref

if TYPE_CHECKING:
    import concurrent.futures

    from ._core import CoreWorker

# asyncio and concurrent.futures are imported where they are used: together they cost a
# third of `import shoal`, and most programs never await a ref.


class ObjectRef:
    """A reference to a value in the cluster. Pass it to tasks, or ``shoal.get`` it.

    Every live ObjectRef counts as a reference to its object; the object is freed when the
    last one anywhere in the cluster is gone.
    """

    __slots__ = ("__weakref__", "_core", "_id")

    def __init__(
        self, object_id: bytes, core: CoreWorker | None = None, _counted: bool = False
    ) -> None:
        self._id = object_id
        self._core = core or _worker_context.core()
        if not _counted:
            self._core.incref(object_id)

    def __del__(self) -> None:
        core = self._core
        if core is not None:
            core.decref(self._id)

    def __reduce__(self) -> Any:
        note_contained_ref(self._id)
        return (_rebuild_ref, (self._id,))

    def __copy__(self) -> ObjectRef:
        return ObjectRef(self._id, self._core)

    def __deepcopy__(self, memo: Any) -> ObjectRef:
        return ObjectRef(self._id, self._core)

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> bytes:
        return self._id[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def _repr_html_(self) -> str:
        """For notebooks: state, size and place, from what this process knows (never waits)."""
        from .jupyter_ext._reprs import ref_html

        return ref_html(self)

    def future(self) -> concurrent.futures.Future[Any]:
        """A ``concurrent.futures.Future`` that completes with the value (or its error)."""
        import concurrent.futures

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._core.on_ready(self, fut)
        return fut

    def __await__(self) -> Generator[Any, None, Any]:
        import asyncio

        return asyncio.wrap_future(self.future()).__await__()


def _rebuild_ref(object_id: bytes) -> ObjectRef:
    return ObjectRef(object_id)


class ObjectRefGenerator:
    """What a task with ``num_returns="streaming"`` returns: refs, as the task yields them.

    Iterate it (``for ref in gen``) or ``async for`` it; each item is an ObjectRef whose
    value is ready (or raises the task's error when you ``get`` it).
    """

    def __init__(self, task_id: bytes, core: CoreWorker) -> None:
        self._task_id = task_id
        self._core = core
        self._index = 0

    def __iter__(self) -> Iterator[ObjectRef]:
        return self

    def __next__(self) -> ObjectRef:
        ref = self._core.next_stream_item(self._task_id, self._index, None)
        if ref is None:
            raise StopIteration
        self._index += 1
        return ref

    def next_ready(self, timeout: float | None = None) -> ObjectRef:
        """The next ref, waiting at most ``timeout`` seconds (GetTimeoutError after)."""
        ref = self._core.next_stream_item(self._task_id, self._index, timeout)
        if ref is None:
            raise StopIteration
        self._index += 1
        return ref

    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.__next__)
        except StopIteration:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._task_id.hex()})"

    def __del__(self) -> None:
        core = self._core
        if core is not None:
            core.drop_stream(self._task_id)
