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


@dataclass
class RenameSegment:
    src: str
    dst: str


@dataclass
class RebuildObject:
    """Directory: every copy of ``oid`` is gone; its owner is asked to make it again (run
    again the task that made it). Readers wait until it is sealed again, or lost for good."""

    owner: bytes
    oid: bytes


@dataclass
class FreeCopies:
    """The directory freed an object: every node in ``nodes`` drops its copy."""

    oid: bytes
    nodes: list[bytes]


Action = ReplyObjects | UnlinkSegment | RenameSegment | FreeCopies | RebuildObject

# Freed segments of at least this size are kept for a moment and reused by the next object
# that fits: writing into pages that are already mapped runs at memory speed, while fresh
# tmpfs pages must be faulted in and zeroed first (3-4x slower).
POOL_MIN_SIZE = 1 << 20
POOL_SECONDS = 1.0


@dataclass
class LostObject:
    kind: str  # "owner_died" | "lost"
    message: str


class ObjectEntry:
    __slots__ = (
        "call_site",
        "containers",
        "contained",
        "flags",
        "frames",
        "holders",
        "last_access",
        "lost",
        "nodes",
        "oid",
        "path",
        "rebuilding",
        "sealed",
        "size",
        "spilled",
        "waiters",
        "writer",
    )

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
        self.spilled = False  # the file is in the spill directory, not in shared memory
        self.last_access = 0
        self.call_site = ""
        self.writer = b""  # the process writing the segment, until it is sealed
        # In the cluster's directory: the nodes whose stores hold a copy (no path here).
        self.nodes: set[bytes] | None = None
        # Directory: every copy was lost with its node and the owner is making it again
        # (unsealed meanwhile: readers wait); or why it cannot be had any more.
        self.rebuilding = False
        self.lost = ""


class StoreFull(Exception):
    """No room. ``actions`` holds what was done on the way (spilled segments to unlink)."""

    def __init__(self, message: str, actions: list[Any] | None = None) -> None:
        super().__init__(message)
        self.actions: list[Any] = actions or []


# Spilling starts when shared memory would pass this fraction of the capacity.
SPILL_THRESHOLD = 0.8


class ObjectStore:
    """Bookkeeping of one node's objects.

    ``spill(src, dst)`` copies a file and returns an error text or None; ``spill_path(oid)``
    names the file an object spills to; ``disk_free()`` is the spill directory's free space.
    All three are injected, so that this class does no IO itself.
    """

    def __init__(
        self,
        capacity: int,
        segment_path: Callable[[bytes], str],
        is_alive: Callable[[bytes], bool],
        spill: Callable[[str, str], str | None] | None = None,
        spill_path: Callable[[bytes], str] | None = None,
        disk_free: Callable[[], int] | None = None,
    ) -> None:
        self.capacity = capacity
        self.used = 0  # bytes in shared memory, reserved or sealed
        self.spilled_bytes = 0
        self.segment_path = segment_path
        self.is_alive = is_alive
        self.spill = spill
        self.spill_path = spill_path
        self.disk_free = disk_free or (lambda: 0)
        self.objects: dict[bytes, ObjectEntry] = {}
        self._clock = 0  # an access counter: least recently used objects spill first
        # Freed segments kept for reuse: [size, path, time freed]. Their bytes count in
        # `used` (the memory is taken) until they are reused or expire.
        self.pool: list[list[Any]] = []
        self.pool_max = min(capacity // 4, 2 << 30)
        self._pool_names = 0
        self.now: Callable[[], float] = lambda: 0.0
        # Safe because a process that maps an object holds a ref to it for as long as the
        # mapping lives (see _shm._Mapping): a freed object is mapped by nobody.
        self.recycle = True

    # -- writes ------------------------------------------------------------------------
    def put_inline(
        self,
        oid: bytes,
        flags: int,
        frames: list[Any],
        contained: list[bytes],
        holder: bytes | None,
    ) -> list[Action]:
        entry = self._entry(oid)
        if entry.sealed:
            return []  # a second put of the same value (a retried promotion) changes nothing
        entry.nodes = None  # a rebuilt value may come back inline (an error, say)
        entry.frames = frames
        entry.size = sum(memoryview(f).nbytes for f in frames)
        return self._seal(entry, flags, contained, holder)

    def reserve(
        self, oid: bytes, size: int, call_site: str = "", writer: bytes | None = None
    ) -> tuple[str, list[Action]]:
        """Room for a new object of ``size`` bytes: returns the file to write, and actions.

        Past the spill threshold, the least recently used sealed objects move to the spill
        directory first. An object that cannot fit in shared memory even then is written
        to the spill directory directly, if the disk can take it.
        """
        existing = self.objects.get(oid)
        if existing is not None and (existing.sealed or existing.path is not None):
            raise StoreFull(f"object {oid.hex()} already exists")
        actions: list[Action] = []
        entry = self._entry(oid)
        entry.call_site = call_site
        entry.writer = writer or owner_of(oid)
        self._touch(entry)
        reused = self._take_pooled(size)
        if reused is not None:
            pooled_size, pooled_path = reused
            entry.path = self.segment_path(oid)
            entry.size = pooled_size
            actions.append(RenameSegment(pooled_path, entry.path))
            return entry.path, actions
        limit = int(self.capacity * SPILL_THRESHOLD)
        if self.used + size > limit:
            self._drop_pool(actions)
            self._spill_until(limit - size, actions)
        entry.size = size
        if self.used + size <= self.capacity:
            entry.path = self.segment_path(oid)
            self.used += size
            return entry.path, actions
        if self.spill_path is not None and self.disk_free() > size:
            entry.path = self.spill_path(oid)
            entry.spilled = True
            self.spilled_bytes += size
            return entry.path, actions
        self._maybe_free(entry, actions)
        raise StoreFull(
            f"the object store cannot take an object of {size:,} bytes: {self.used:,} of {self.capacity:,} bytes "
            f"of shared memory are in use by objects that cannot be spilled, and the spill directory has "
            f"{self.disk_free():,} bytes free",
            actions,
        )

    def _spill_until(self, target: int, actions: list[Action]) -> None:
        if self.spill is None or self.spill_path is None:
            return
        candidates = sorted(
            (e for e in self.objects.values() if e.sealed and e.path is not None and not e.spilled),
            key=lambda e: e.last_access,
        )
        for e in candidates:
            if self.used <= target:
                return
            if self.disk_free() <= e.size:
                return
            assert e.path is not None
            dst = self.spill_path(e.oid)
            error = self.spill(e.path, dst)
            if error is not None:
                return
            actions.append(UnlinkSegment(e.path))
            e.path = dst
            e.spilled = True
            self.used -= e.size
            self.spilled_bytes += e.size

    def _take_pooled(self, size: int) -> tuple[int, str] | None:
        best = None
        for item in self.pool:
            if size <= item[0] <= size + size // 4 + 4096 and (best is None or item[0] < best[0]):
                best = item
        if best is None:
            return None
        self.pool.remove(best)
        return best[0], best[1]

    def _drop_pool(self, actions: list[Action]) -> None:
        for size, path, _ in self.pool:
            self.used -= size
            actions.append(UnlinkSegment(path))
        self.pool = []

    def expire_pool(self) -> list[Action]:
        """Unlink pooled segments nobody reused in time (called a few times a second)."""
        now = self.now()
        actions: list[Action] = []
        keep = []
        for item in self.pool:
            if now - item[2] > POOL_SECONDS:
                self.used -= item[0]
                actions.append(UnlinkSegment(item[1]))
            else:
                keep.append(item)
        self.pool = keep
        return actions

    def _touch(self, entry: ObjectEntry) -> None:
        self._clock += 1
        entry.last_access = self._clock

    def abort(self, oid: bytes) -> list[Action]:
        entry = self.objects.get(oid)
        if entry is None or entry.sealed or entry.path is None:
            return []
        self._release_space(entry)
        path, entry.path = entry.path, None
        actions: list[Action] = [UnlinkSegment(path)]
        self._maybe_free(entry, actions)
        return actions

    def seal(
        self, oid: bytes, flags: int, contained: list[bytes], holder: bytes | None
    ) -> list[Action]:
        entry = self.objects.get(oid)
        if entry is None or entry.path is None or entry.sealed:
            return []
        return self._seal(entry, flags, contained, holder)

    def seal_at(
        self,
        oid: bytes,
        node: bytes,
        size: int,
        flags: int,
        contained: list[bytes],
        holder: bytes | None,
        call_site: str = "",
    ) -> list[Action]:
        """Directory: ``oid`` was sealed in the store of ``node`` (its first copy)."""
        entry = self._entry(oid)
        if entry.sealed:
            return self.add_copy(oid, node)
        entry.nodes = {node}
        entry.size = size
        entry.call_site = call_site or entry.call_site
        return self._seal(entry, flags, contained, holder)

    def add_copy(self, oid: bytes, node: bytes) -> list[Action]:
        """Directory: ``node`` made a copy of ``oid``. A copy of a freed object is dropped."""
        entry = self.objects.get(oid)
        if entry is None or not entry.sealed or entry.nodes is None:
            return [FreeCopies(oid, [node])]
        entry.nodes.add(node)
        return []

    def node_gone(self, node: bytes) -> list[bytes]:
        """Directory: a node left; its copies are gone. Objects left without a copy stay
        known: the next read asks their owner to rebuild them (see ``get``). Returns the
        objects that lost their last copy."""
        lost = []
        for entry in self.objects.values():
            if entry.nodes is not None and node in entry.nodes:
                entry.nodes.discard(node)
                if not entry.nodes and entry.sealed and entry.frames is None:
                    lost.append(entry.oid)
        return lost

    def rebuild_failed(self, oid: bytes, message: str) -> list[Action]:
        """Directory: the owner cannot make ``oid`` again; its readers get ObjectLostError
        now and from now on."""
        entry = self.objects.get(oid)
        if entry is None or not entry.rebuilding:
            return []
        entry.rebuilding = False
        entry.sealed = True
        entry.lost = message
        lost = LostObject("lost", message)
        actions: list[Action] = [
            ReplyObjects(process, req_id, [(oid, lost)]) for process, req_id in entry.waiters
        ]
        entry.waiters = []
        self._maybe_free(entry, actions)
        return actions

    def _lost_copy(
        self, entry: ObjectEntry, process: bytes, req_id: int, actions: list[Action]
    ) -> LostObject | None:
        """A read of a directory entry whose every copy is gone: the error to answer with,
        or None when the owner was asked to rebuild it (the reader waits)."""
        if entry.lost:
            return LostObject("lost", entry.lost)
        owner = owner_of(entry.oid)
        if not self.is_alive(owner):
            made = "made with put() by" if entry.oid[16:] == b"\0\0\0\0" else "owned by"
            return LostObject(
                "owner_died",
                f"object {entry.oid.hex()} was lost with the node that held it, and the "
                f"process that {made} it ({owner.hex()}) died too: nobody can make it again",
            )
        entry.waiters.append((process, req_id))
        if not entry.rebuilding:
            entry.rebuilding = True
            entry.sealed = False
            actions.append(RebuildObject(owner, entry.oid))
        return None

    def _seal(
        self, entry: ObjectEntry, flags: int, contained: list[bytes], holder: bytes | None
    ) -> list[Action]:
        entry.sealed = True
        entry.flags = flags
        entry.lost = ""
        if entry.rebuilding:
            # Made again: the same value, so the same refs inside, already counted.
            entry.rebuilding = False
        else:
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
        rebuilds: list[Action] = []
        for oid in oids:
            entry = self.objects.get(oid)
            if entry is not None and entry.sealed:
                if entry.nodes is not None and not entry.nodes and entry.frames is None:
                    lost = self._lost_copy(entry, process, req_id, rebuilds)
                    if lost is not None:
                        ready.append((oid, lost))
                    continue
                self._touch(entry)
                ready.append((oid, entry))
                continue
            owner = owner_of(oid)
            if not self.is_alive(owner):
                ready.append(
                    (
                        oid,
                        LostObject(
                            "owner_died", f"the owner {owner.hex()} of object {oid.hex()} died"
                        ),
                    )
                )
                continue
            self._entry(oid).waiters.append((process, req_id))
        if ready:
            rebuilds.insert(0, ReplyObjects(process, req_id, ready))
        return rebuilds

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
            if not entry.sealed and entry.path is not None and entry.writer == process:
                actions.extend(self.abort(entry.oid))  # died while writing it
                if entry.oid not in self.objects:
                    continue
            if entry.waiters:
                entry.waiters = [w for w in entry.waiters if w[0] != process]
            entry.holders.discard(process)
            if not entry.sealed and owner_of(entry.oid) == process and entry.waiters:
                lost = LostObject(
                    "owner_died", f"the owner {process.hex()} of object {entry.oid.hex()} died"
                )
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
            if e.nodes:
                actions.append(FreeCopies(e.oid, sorted(e.nodes)))
            if e.path is not None:
                if (
                    self.recycle
                    and not e.spilled
                    and e.size >= POOL_MIN_SIZE
                    and (sum(item[0] for item in self.pool) + e.size <= self.pool_max)
                ):
                    self._pool_names += 1
                    pool_path = self.segment_path(b"pool" + self._pool_names.to_bytes(8, "big"))
                    actions.append(RenameSegment(e.path, pool_path))
                    self.pool.append([e.size, pool_path, self.now()])
                else:
                    self._release_space(e)
                    actions.append(UnlinkSegment(e.path))
            for cid in e.contained:
                child = self.objects.get(cid)
                if child is not None:
                    child.containers -= 1
                    stack.append(child)

    def _release_space(self, entry: ObjectEntry) -> None:
        if entry.spilled:
            self.spilled_bytes -= entry.size
        else:
            self.used -= entry.size

    def stats(self) -> dict[str, int]:
        return {
            "objects": sum(1 for e in self.objects.values() if e.sealed),
            "used": self.used,
            "capacity": self.capacity,
            "spilled": self.spilled_bytes,
            "pooled": sum(item[0] for item in self.pool),
        }

    def listing(self) -> list[dict[str, Any]]:
        """One record per stored object, for ``shoal memory`` and the state API."""
        out = []
        for e in self.objects.values():
            if not e.sealed:
                continue
            if e.frames is not None:
                place = "inline"
            elif e.nodes is not None:
                place = "node"
            else:
                place = "spilled" if e.spilled else "shared_memory"
            out.append(
                {
                    "object_id": e.oid.hex(),
                    "size": e.size,
                    "place": place,
                    "holders": sorted(h.hex() for h in e.holders),
                    "contained_in": e.containers,
                    "owner": owner_of(e.oid).hex(),
                    "call_site": e.call_site,
                    "nodes": sorted(n.hex() for n in e.nodes or ()),
                }
            )
        return out
