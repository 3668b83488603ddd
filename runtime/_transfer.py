"""Object transfer between nodes: a node pulls an object's file in chunks from another.

    puller node --PULL {o, off, n}--> source node (ChunkServer.serve)
    puller node <--CHUNK {o, off} [bytes]--
    ... a window of WINDOW chunks in flight; each is written at its offset in the
    puller's own segment (pwrite), which is sealed in its store when all have arrived.

A source that does not have the object (any more) answers with an error, and the pull
goes on from the next node that has a copy. Chunks are bounded, so a 1 GB object never
sits whole in a message or in memory: the only limit is the stores' capacity.
"""

from __future__ import annotations

import collections
import mmap
import os
import stat
import time
from typing import Any

from ._object_store import ObjectStore
from ._protocol import Message, MsgType

CHUNK_SIZE = 8 << 20
# Chunks in flight per pull: enough to keep a 10 Gb/s link busy across a round trip.
WINDOW = 4
# A pull that received nothing for this long goes on from another copy, or fails.
STALL_SECONDS = 30.0


class ChunkServer:
    """Serves chunks of the sealed objects of one node's store.

    Chunks are views of a read-only mapping of the object's file, sent without a copy (zmq
    keeps the view, and so the mapping, until the bytes are on the wire). The mappings of
    the last few objects served are kept, since a pull asks for many chunks of one object.
    A file that was unlinked meanwhile (freed, spilled) stays readable through its mapping,
    and its bytes are the same: objects never change.
    """

    KEEP = 4

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._maps: collections.OrderedDict[str, memoryview] = collections.OrderedDict()

    def _view(self, path: str, size: int) -> memoryview:
        view = self._maps.get(path)
        if view is not None and view.nbytes >= size:
            self._maps.move_to_end(path)
            return view
        fd = os.open(path, os.O_RDONLY)
        try:
            view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        finally:
            os.close(fd)
        self._maps[path] = view
        while len(self._maps) > self.KEEP:
            self._maps.popitem(last=False)  # in-flight chunks keep their mapping alive
        return view

    def serve(self, body: Any) -> Message:
        oid, off, n = body.get("o"), body.get("off"), body.get("n")
        if not isinstance(oid, bytes) or not isinstance(off, int) or not isinstance(n, int):
            return Message(MsgType.CHUNK, {"o": oid, "off": off, "e": "malformed request"})
        entry = self.store.objects.get(oid)
        if entry is None or not entry.sealed or entry.path is None:
            return Message(MsgType.CHUNK, {"o": oid, "off": off, "e": "not on this node"})
        if body.get("clamp") and 0 <= off < entry.size:
            n = min(n, entry.size - off)  # a client learns the size from the first answer
        if off < 0 or n <= 0 or n > CHUNK_SIZE or off + n > entry.size:
            return Message(MsgType.CHUNK, {"o": oid, "off": off, "e": "bad range"})
        try:
            data = self._view(entry.path, entry.size)[off : off + n]
        except (OSError, ValueError) as exc:
            return Message(MsgType.CHUNK, {"o": oid, "off": off, "e": str(exc)})
        return Message(
            MsgType.CHUNK, {"o": oid, "off": off, "size": entry.size, "t": body.get("t")}, [data]
        )

    def forget(self, path: str) -> None:
        """The file was unlinked or renamed (freed, spilled, pooled): let its pages go."""
        self._maps.pop(path, None)

    def close(self) -> None:
        self._maps.clear()


class Pull:
    """One object being fetched into this node's store."""

    def __init__(
        self,
        oid: bytes,
        path: str,
        size: int,
        flags: int,
        reuse: bool,
        sources: list[str],
    ) -> None:
        self.oid = oid
        self.path = path
        self.size = size
        self.flags = flags
        self.sources = sources
        self.source_index = 0
        self.missing = list(range(0, max(size, 1), CHUNK_SIZE))[::-1]  # offsets, next last
        self.inflight: set[int] = set()
        self.received = 0
        self.fd = open_segment(path, size, reuse, allocate=False)
        self.reused = reuse
        self.last_progress = time.monotonic()

    @property
    def source(self) -> str:
        return self.sources[self.source_index]

    @property
    def done(self) -> bool:
        return not self.missing and not self.inflight

    def allocate(self) -> None:
        """Reserve the pages (after the first requests went out, so the source works
        meanwhile): a full /dev/shm fails here, not with SIGBUS in a reader later."""
        if not self.reused:
            os.posix_fallocate(self.fd, 0, max(self.size, 1))

    def requests(self) -> list[dict[str, Any]]:
        out = []
        while self.missing and len(self.inflight) < WINDOW:
            off = self.missing.pop()
            self.inflight.add(off)
            out.append({"o": self.oid, "off": off, "n": min(CHUNK_SIZE, self.size - off)})
        return out

    def receive(self, body: Any, frames: Any) -> str | None:
        """Write one chunk; an error text when the source refused."""
        off = body.get("off")
        if off not in self.inflight:
            return None  # a late answer from a source we gave up on
        if body.get("e") or len(frames) != 1:
            return str(body.get("e") or "an empty chunk")
        data = frames[0]
        expected = min(CHUNK_SIZE, self.size - off)
        if memoryview(data).nbytes != expected:
            return f"a chunk of {memoryview(data).nbytes} bytes where {expected} were due"
        os.pwrite(self.fd, data, off)
        self.inflight.discard(off)
        self.last_progress = time.monotonic()
        self.received += expected
        return None

    def next_source(self) -> bool:
        """Go on from the next node that has a copy; False when there is none."""
        if self.source_index + 1 >= len(self.sources):
            return False
        self.source_index += 1
        self.missing.extend(sorted(self.inflight, reverse=True))
        self.inflight.clear()
        self.last_progress = time.monotonic()
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()


def open_segment(path: str, size: int, reuse: bool, allocate: bool = True) -> int:
    """The file to write: new (exclusive: /dev/shm is world-writable), or a reused segment
    of ours that the store renamed to ``path``."""
    if reuse:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            raise PermissionError(f"{path} is not a private segment of this user")
        return fd
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    if not allocate:
        return fd
    try:
        # Reserve the pages now: a full /dev/shm fails here, not with SIGBUS in a reader.
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    return fd
