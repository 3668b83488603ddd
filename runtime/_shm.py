"""Objects in shared memory: one file in /dev/shm per object, mapped by every reader.

File layout (little endian), buffers aligned to 64 bytes so numpy data is aligned:

    0   magic  b"SHOALOB1"
    8   flags  u32        (error bit etc., as in SerializedValue.flags)
    12  count  u32        number of out-of-band buffers
    16  data   u64 u64    offset, length of the pickle stream
    32  count x (u64 offset, u64 length)
    ... pickle stream, then the buffers

A reader maps the file read-only, so numpy arrays come back as read-only views and no
process can change an object another is reading. Unlinking a file that is mapped is safe:
the memory lives until the last mapping goes, which is what lets the store free or spill an
object without coordinating with its readers.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import threading
import time
from typing import Any

from ._serialization import SerializedValue

MAGIC = b"SHOALOB1"
_HEAD = struct.Struct("<8sII QQ")
_ENTRY = struct.Struct("<QQ")
ALIGN = 64
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def layout_size(sv: SerializedValue) -> int:
    pos = _align(_HEAD.size + _ENTRY.size * len(sv.buffers))
    pos = _align(pos + len(sv.data))
    for buf in sv.buffers:
        pos = _align(pos + memoryview(buf).nbytes)
    return pos


# How long a writer waits for /dev/shm to have the room the store promised it.
RESERVE_PATIENCE_SECONDS = 1.0


def _reserve(fd: int, size: int, mappings: WriterMappings | None) -> None:
    """Reserve the file's pages now (posix_fallocate), so that a full /dev/shm fails here
    with ENOSPC instead of killing the writer with SIGBUS later.

    The store counts a segment's room as free once it has unlinked it (spilled, freed or
    trimmed from its pool), but processes that still map the file hold its pages until
    they drop their mappings: ours at once (``sweep``), other processes' within their
    periodic sweep (0.1 s). On a /dev/shm about the size of the store that is exactly the
    room asked for, so ENOSPC is retried for a short while before it is an error.
    """
    deadline = time.monotonic() + RESERVE_PATIENCE_SECONDS
    pause = 0.005
    while True:
        if mappings is not None:
            mappings.sweep()
        try:
            os.posix_fallocate(fd, 0, max(size, 1))
            return
        except OSError as exc:
            if exc.errno != errno.ENOSPC or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class WriterMappings:
    """A writer's mappings of the large segments it wrote, kept to be written again.

    When the store hands a freed segment back to the same writer (see the store's segment
    pool), writing through the mapping it already has costs a memcpy; mapping the file
    again costs a page-table entry per 4 KiB page, which is most of a large put. A mapping
    is dropped as soon as its file is unlinked (``sweep``), so that its memory goes back.
    """

    MIN_SIZE = 1 << 20
    MAX_ENTRIES = 4

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}  # (dev, ino) -> fd, map
        # Writers are user threads; the sweep runs on the IO thread.
        self._lock = threading.Lock()

    def mapping(self, fd: int, size: int) -> mmap.mmap:
        with self._lock:
            return self._mapping(fd, size)

    def _mapping(self, fd: int, size: int) -> mmap.mmap:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        cached = self._maps.get(key)
        if cached is not None and len(cached[1]) >= size:
            return cached[1]
        # MAP_POPULATE maps every page in one call instead of one fault per page.
        mm = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | _POPULATE)
        if size >= self.MIN_SIZE:
            self._sweep()
            if len(self._maps) >= self.MAX_ENTRIES:
                self._drop(next(iter(self._maps)))
            self._maps[key] = (os.dup(fd), mm)
        return mm

    def owns(self, mm: mmap.mmap) -> bool:
        with self._lock:
            return any(m is mm for _, m in self._maps.values())

    def sweep(self) -> None:
        """Drop mappings whose file the store unlinked."""
        with self._lock:
            self._sweep()

    def _sweep(self) -> None:
        for key, (fd, _) in list(self._maps.items()):
            try:
                gone = os.fstat(fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        fd, mm = self._maps.pop(key)
        try:
            mm.close()
        except BufferError:
            pass  # still exported somewhere; it goes with its last view
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            for key in list(self._maps):
                self._drop(key)


def write(
    path: str,
    sv: SerializedValue,
    size: int,
    reuse: bool = False,
    mappings: WriterMappings | None = None,
) -> None:
    """Write ``sv`` (``size`` from layout_size) to a new file ``path``, created 0600.

    Exclusive creation matters: /dev/shm is world-writable and segment names can be
    guessed, so a file that is already there may have been planted by someone else. With
    ``reuse`` (the store renamed one of its freed segments to ``path``), the existing file
    is written over, after checking that it is a private regular file of ours.
    """
    if reuse:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & 0o077
            or st.st_size < size
        ):
            os.close(fd)
            raise PermissionError(
                f"{path} is not a private segment of this user; refusing to write it"
            )
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    mm: mmap.mmap | None = None
    try:
        if not reuse:
            _reserve(fd, size, mappings)
        if mappings is not None:
            mm = mappings.mapping(fd, size)
        else:
            mm = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | _POPULATE)
        entries = []
        pos = _align(_HEAD.size + _ENTRY.size * len(sv.buffers))
        data_off = pos
        mm[pos : pos + len(sv.data)] = sv.data
        pos = _align(pos + len(sv.data))
        for buf in sv.buffers:
            view = memoryview(buf).cast("B")
            mm[pos : pos + view.nbytes] = view
            entries.append((pos, view.nbytes))
            pos = _align(pos + view.nbytes)
        _HEAD.pack_into(mm, 0, MAGIC, sv.flags, len(sv.buffers), data_off, len(sv.data))
        for i, (off, length) in enumerate(entries):
            _ENTRY.pack_into(mm, _HEAD.size + i * _ENTRY.size, off, length)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    finally:
        if mm is not None and (mappings is None or not mappings.owns(mm)):
            mm.close()
    os.close(fd)


class _Mapping(mmap.mmap):
    """A read-only mapping that keeps ``keepalive`` (the object's ObjectRef) while mapped.

    Zero-copy values (numpy arrays ...) hold the mapping, so the object stays referenced,
    and its pages untouched, for as long as anything in this process can read them.
    """

    keepalive: Any = None


def read(path: str, keepalive: Any = None) -> tuple[memoryview, list[memoryview], int]:
    """Map ``path`` read-only; returns (pickle stream, buffers, flags) as views into it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mm = _Mapping(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    mm.keepalive = keepalive
    return parse(memoryview(mm), path)


def parse(view: memoryview, where: str = "the data") -> tuple[memoryview, list[memoryview], int]:
    """(pickle stream, buffers, flags) of an object laid out as above, as views into it."""
    magic, flags, count, data_off, data_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"{where} is not a Shoal object")
    buffers = []
    for i in range(count):
        off, length = _ENTRY.unpack_from(view, _HEAD.size + i * _ENTRY.size)
        buffers.append(view[off : off + length])
    return view[data_off : data_off + data_len], buffers, flags


def layout_chunks(sv: SerializedValue, chunk_size: int) -> list[tuple[int, memoryview]]:
    """The file of ``sv`` as (offset, bytes) pieces of at most ``chunk_size``, without
    copying its buffers: what a client streams to the store instead of mapping a file.
    The gaps (alignment) are zeros in a fresh segment."""
    parts: list[tuple[int, memoryview]] = []
    entries = []
    pos = _align(_HEAD.size + _ENTRY.size * len(sv.buffers))
    data_off = pos
    parts.append((pos, memoryview(sv.data).cast("B")))
    pos = _align(pos + len(sv.data))
    for buf in sv.buffers:
        view = memoryview(buf).cast("B")
        parts.append((pos, view))
        entries.append((pos, view.nbytes))
        pos = _align(pos + view.nbytes)
    head = bytearray(_HEAD.size + _ENTRY.size * len(entries))
    _HEAD.pack_into(head, 0, MAGIC, sv.flags, len(entries), data_off, len(sv.data))
    for i, (off, length) in enumerate(entries):
        _ENTRY.pack_into(head, _HEAD.size + i * _ENTRY.size, off, length)
    out: list[tuple[int, memoryview]] = [(0, memoryview(head))]
    for off, view in parts:
        for start in range(0, view.nbytes, chunk_size):
            out.append((off + start, view[start : start + chunk_size]))
    return out


def copy_file(src: str, dst: str) -> None:
    """Copy an object file (for spilling and restoring) without mapping it whole."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fout:
            while True:
                chunk = fin.read(8 << 20)
                if not chunk:
                    break
                fout.write(chunk)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
