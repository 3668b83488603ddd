"""An owner's lineage: the specs of finished tasks, kept to make their results again.

A task result of 100 KiB or more lives in the store of the node where it was made, and dies
with that node. Its owner keeps the task's spec (Ray's lineage) while the result may still
be read, so that the task can run again (``TaskSubmitter.rebuild``) when the directory
finds every copy gone. No IO here, and no locking: the owner calls every method with its
core lock held (reference counts change under that lock, in any thread).

An entry stays while it is *live* (the owner holds a ref to one of the task's returns) or
while entries of later tasks depend on it (an argument of theirs was one of its results:
rebuilding them may need it rebuilt first). Arguments are kept as values when they were
small (inline), as object ids when they were owned store objects (not pinned: their value
may be freed, then it is rebuilt from its own entry), and as refs when they were borrowed
(their own owners rebuild them). When the entries pass ``max_bytes``, the oldest go first.
"""

from __future__ import annotations

from typing import Any

# An argument as kept: (0, SerializedValue) inline; (1, object id) an owned stored object;
# (2, ObjectRef) a borrowed object.
Arg = tuple[int, Any]

# Bytes an entry costs besides its inline arguments (the spec object, dict slots, ids).
ENTRY_OVERHEAD = 256


class LineageEntry:
    __slots__ = (
        "args",
        "dependents",
        "deps",
        "live",
        "pins",
        "rebuilds",
        "size",
        "spec",
        "task_id",
    )

    def __init__(
        self, task_id: bytes, spec: Any, args: list[Arg], pins: list[Any], size: int, live: int
    ) -> None:
        self.task_id = task_id
        self.spec = spec  # the TaskSpec (its own args are cleared once it finished)
        self.args = args
        self.pins = pins  # refs found inside the arguments, kept alive with the entry
        self.size = size
        self.live = live  # how many of its returns the owner holds refs to
        self.dependents = 0  # entries whose arguments include one of its returns
        self.deps: list[bytes] = []  # task ids of entries it depends on (counted there)
        self.rebuilds = 0  # times it was run again to make a lost result


class Lineage:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[bytes, LineageEntry] = {}  # oldest first
        self.bytes = 0
        self.evicted = 0  # entries dropped for room while still wanted

    def record(
        self,
        task_id: bytes,
        spec: Any,
        args: list[Arg],
        pins: list[Any],
        size: int,
        live: int,
        dep_tasks: list[bytes],
    ) -> bool:
        """Keep a finished task's spec; ``live`` counts the returns the owner holds.
        ``dep_tasks`` are the task ids behind its owned stored arguments. False when
        nothing was kept (nobody holds a result, or it is kept already)."""
        if live <= 0 or task_id in self.entries:
            return False
        entry = LineageEntry(task_id, spec, args, pins, size, live)
        for dep_id in dict.fromkeys(dep_tasks):
            dep = self.entries.get(dep_id)
            if dep is not None and dep_id != task_id:
                dep.dependents += 1
                entry.deps.append(dep_id)
        self.entries[task_id] = entry
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            oldest = next(iter(self.entries.values()))
            self.evicted += 1
            self._drop(oldest)
        return task_id in self.entries

    def acquire(self, oid: bytes) -> None:
        """The owner took its first ref to ``oid`` (again)."""
        entry = self.entries.get(oid[:16])
        if entry is not None:
            entry.live += 1

    def release(self, oid: bytes) -> None:
        """The owner let go of its last ref to ``oid``."""
        entry = self.entries.get(oid[:16])
        if entry is not None:
            entry.live -= 1
            if entry.live <= 0 and entry.dependents <= 0:
                self._drop(entry)

    def get(self, task_id: bytes) -> LineageEntry | None:
        return self.entries.get(task_id)

    def _drop(self, entry: LineageEntry) -> None:
        stack = [entry]
        while stack:
            e = stack.pop()
            if self.entries.pop(e.task_id, None) is None:
                continue
            self.bytes -= e.size
            e.pins = []  # their releases go through the owner's queue, never inline
            for dep_id in e.deps:
                dep = self.entries.get(dep_id)
                if dep is not None:
                    dep.dependents -= 1
                    if dep.live <= 0 and dep.dependents <= 0:
                        stack.append(dep)
            e.deps = []
