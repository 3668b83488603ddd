"""The node's object store bookkeeping: what is stored, who holds it, who waits for it.

    owner --PUT (small, inline frames)---------------> store --> waiters get the value
    owner --CREATE size--> store (reserve) --path--> owner writes /dev/shm file --SEAL--> store
    any   --GET oids--> store: known objects answered at once, the rest when they arrive
    any   --REF_UPDATES add/remove--> holders change; an object with no holder and no
                                      container is freed (its segment unlinked)

Objects enter the store only when they must be found by a process other than their owner:
values too large for a message, and refs that escaped their owner (passed inside another
value). Everything else stays in the owner's memory. No IO here: methods return actions.

Invariant: an entry is freed when it is sealed, has no holders, is contained in no stored
object and nobody waits for it. Freeing an entry releases its contained objects in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._ids import owner_of


@dataclass
class ReplyObjects:
    process: bytes
    req_id: int
    entries: list[tuple[bytes, Any]]  # (oid, entry) where entry is an ObjectEntry or an error


@dataclass
class UnlinkSegment:
    path: str


Action = ReplyObjects | UnlinkSegment


@dataclass
class LostObject:
    kind: str  # "owner_died" | "lost"
    message: str


class ObjectEntry:
    __slots__ = ("containers", "contained", "flags", "frames", "holders", "oid", "path", "sealed", "size", "waiters")

    def __init__(self, oid: bytes) -> None:
        self.oid = oid
        self.sealed = False
        self.size = 0
        self.flags = 0
        self.frames: list[Any] | None = None
        self.path: str | None = None
        self.contained: list[bytes] = []
        self.holders: set[bytes] = set()
        self.containers = 0
        self.waiters: list[tuple[bytes, int]] = []


class StoreFull(Exception):
    pass


class ObjectStore:
    def __init__(self, capacity: int, segment_path: Callable[[bytes], str], is_alive: Callable[[bytes], bool]) -> None:
        self.capacity = capacity
        self.used = 0
        self.segment_path = segment_path
        self.is_alive = is_alive
        self.objects: dict[bytes, ObjectEntry] = {}

    # -- writes ------------------------------------------------------------------------
    def put_inline(self, oid: bytes, flags: int, frames: list[Any], contained: list[bytes], holder: bytes | None) -> list[Action]:
        entry = self._entry(oid)
        if entry.sealed:
            return []  # a second put of the same value (a retried promotion) changes nothing
        entry.frames = frames
        entry.size = sum(memoryview(f).nbytes for f in frames)
        return self._seal(entry, flags, contained, holder)

    def reserve(self, oid: bytes, size: int) -> str:
        if self.used + size > self.capacity:
            raise StoreFull(
                f"the object store cannot take an object of {size:,} bytes: "
                f"{self.used:,} of {self.capacity:,} bytes are in use"
            )
        entry = self._entry(oid)
        if entry.sealed or entry.path is not None:
            raise StoreFull(f"object {oid.hex()} already exists")
        entry.path = self.segment_path(oid)
        entry.size = size
        self.used += size
        return entry.path

    def abort(self, oid: bytes) -> list[Action]:
        entry = self.objects.get(oid)
        if entry is None or entry.sealed or entry.path is None:
            return []
        self.used -= entry.size
        path, entry.path = entry.path, None
        actions: list[Action] = [UnlinkSegment(path)]
        self._maybe_free(entry, actions)
        return actions

    def seal(self, oid: bytes, flags: int, contained: list[bytes], holder: bytes | None) -> list[Action]:
        entry = self.objects.get(oid)
        if entry is None or entry.path is None or entry.sealed:
            return []
        return self._seal(entry, flags, contained, holder)

    def _seal(self, entry: ObjectEntry, flags: int, contained: list[bytes], holder: bytes | None) -> list[Action]:
        entry.sealed = True
        entry.flags = flags
        entry.contained = list(contained)
        for cid in contained:
            self._entry(cid).containers += 1
        if holder is not None and self.is_alive(holder):
            entry.holders.add(holder)
        actions: list[Action] = []
        for process, req_id in entry.waiters:
            actions.append(ReplyObjects(process, req_id, [(entry.oid, entry)]))
        entry.waiters = []
        self._maybe_free(entry, actions)
        return actions

    # -- reads -------------------------------------------------------------------------
    def get(self, process: bytes, req_id: int, oids: list[bytes]) -> list[Action]:
        ready: list[tuple[bytes, Any]] = []
        for oid in oids:
            entry = self.objects.get(oid)
            if entry is not None and entry.sealed:
                ready.append((oid, entry))
                continue
            owner = owner_of(oid)
            if not self.is_alive(owner):
                ready.append((oid, LostObject("owner_died", f"the owner {owner.hex()} of object {oid.hex()} died")))
                continue
            self._entry(oid).waiters.append((process, req_id))
        return [ReplyObjects(process, req_id, ready)] if ready else []

    # -- reference counting ------------------------------------------------------------
    def update_refs(self, process: bytes, add: list[bytes], remove: list[bytes]) -> list[Action]:
        actions: list[Action] = []
        for oid in add:
            self._entry(oid).holders.add(process)
        for oid in remove:
            entry = self.objects.get(oid)
            if entry is not None:
                entry.holders.discard(process)
                self._maybe_free(entry, actions)
        return actions

    def process_gone(self, process: bytes) -> list[Action]:
        actions: list[Action] = []
        for entry in list(self.objects.values()):
            if entry.waiters:
                entry.waiters = [w for w in entry.waiters if w[0] != process]
            entry.holders.discard(process)
            if not entry.sealed and owner_of(entry.oid) == process and entry.waiters:
                lost = LostObject("owner_died", f"the owner {process.hex()} of object {entry.oid.hex()} died")
                for waiter, req_id in entry.waiters:
                    actions.append(ReplyObjects(waiter, req_id, [(entry.oid, lost)]))
                entry.waiters = []
            if entry.oid in self.objects:
                self._maybe_free(entry, actions)
        return actions

    # -- internals ---------------------------------------------------------------------
    def _entry(self, oid: bytes) -> ObjectEntry:
        entry = self.objects.get(oid)
        if entry is None:
            entry = self.objects[oid] = ObjectEntry(oid)
        return entry

    def _maybe_free(self, entry: ObjectEntry, actions: list[Action]) -> None:
        stack = [entry]
        while stack:
            e = stack.pop()
            if e.holders or e.containers or e.waiters:
                continue
            if not e.sealed and e.path is not None:
                continue  # being written
            if self.objects.pop(e.oid, None) is None:
                continue
            if e.path is not None:
                self.used -= e.size
                actions.append(UnlinkSegment(e.path))
            for cid in e.contained:
                child = self.objects.get(cid)
                if child is not None:
                    child.containers -= 1
                    stack.append(child)

    def stats(self) -> dict[str, int]:
        return {"objects": sum(1 for e in self.objects.values() if e.sealed), "used": self.used, "capacity": self.capacity}
