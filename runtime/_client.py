"""Client-server mode: a driver on a machine outside the cluster, over one connection.

    client core --(tcp, one Connection)--> the head's node manager
        RELAY {a: worker address, t, b}     a task push or actor call, sent on to the worker
        RELAYED {a, t, b} <--               the worker's answer, sent back
        CREATE_OBJECT {stream} + PUSH_CHUNK a large put streamed into the head's store
        GET_OBJECTS, then PULL {clamp}      a large get: the head's node fetches the object
                                            if needed, then serves it in chunks
        PING / PONG                         liveness both ways (_config.CLIENT_TIMEOUT_SECONDS)

Nothing on the client needs shared memory with the cluster, nor a route to its workers.
Chunks move in a window (a few in flight), so a large object is never buffered whole in a
queue: the sender waits for acknowledgements, the receiver asks for the next chunks.

The connection is a resumable session (``_transport._Session``): when it breaks, it is
dialled again and what either side did not get is resent, so work in flight, and a put or
get in the middle of its chunks, carries on; past CLIENT_TIMEOUT_SECONDS both sides give
up (the client's waits fail with "disconnected", the head frees what the client held).
"""

from __future__ import annotations

import itertools
import mmap
import threading
from typing import TYPE_CHECKING, Any

from . import _shm
from ._protocol import Message, MsgType
from ._serialization import SerializedValue
from .exceptions import ObjectLostError, ObjectStoreFullError

if TYPE_CHECKING:
    from ._core import CoreWorker

M = MsgType

CHUNK_SIZE = 8 << 20
WINDOW = 6


class RelayConnection:
    """Stands in for a connection to a worker: messages go through the head."""

    sock = None  # nothing to poll: answers arrive on the head connection
    # Never read by a waiting thread itself (see _transport.Connection's lending).
    parked = False
    lendable = False
    closed = False

    def __init__(self, core: CoreWorker, address: str) -> None:
        self.core = core
        self.address = address

    @property
    def broken(self) -> bool:
        return self.closed

    def lend_is_live(self) -> bool:
        return False

    def unpark(self) -> None:
        pass

    def send(self, msg: Message) -> None:
        self.core.head.send(
            Message(M.RELAY, {"a": self.address, "t": int(msg.type), "b": msg.body}, msg.frames)
        )

    def close(self, linger_ms: int | None = None) -> None:
        if not self.closed and not self.core.head.closed:
            self.core.head.send(Message(M.RELAY_CLOSE, {"a": self.address}))
        self.closed = True


class _Upload:
    def __init__(self) -> None:
        self.window = threading.Semaphore(WINDOW)
        self.error: str | None = None


class _Download:
    def __init__(self, oid: bytes) -> None:
        self.oid = oid
        self.buf: mmap.mmap | None = None
        self.size = 0
        self.next_off = 0
        self.pending = 0
        self.error: str | None = None
        self.done = threading.Event()


def _allocate(dl: _Download, size: int) -> None:
    dl.size = size
    # Anonymous memory, zeroed by the kernel as the chunks land (a bytearray would write
    # the whole size once more just to zero it), in huge pages where the kernel has them:
    # on a VM, a fault per 4 KiB page held a large get to ~0.5 GB/s.
    # Private: a shared anonymous mapping is shmem, which gets no huge pages.
    dl.buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        dl.buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass


class ClientObjects:
    """Streams large objects to and from the head's store for a client core."""

    def __init__(self, core: CoreWorker) -> None:
        self.core = core
        self.uploads: dict[bytes, _Upload] = {}
        self.downloads: dict[int, _Download] = {}
        self.tokens = itertools.count(1)

    # -- put (user thread) -------------------------------------------------------------
    def upload(self, oid: bytes, sv: SerializedValue, holder: bytes, call_site: str) -> str:
        core = self.core
        size = _shm.layout_size(sv)
        reply = core.request(
            Message(M.CREATE_OBJECT, {"o": oid, "s": size, "cs": call_site, "stream": True})
        )
        if "e" in reply.body:
            raise ObjectStoreFullError(reply.body["e"])
        up = self.uploads[oid] = _Upload()
        try:
            for off, piece in _shm.layout_chunks(sv, CHUNK_SIZE):
                if not core._wait_event_sem(up.window) or up.error:
                    break
                core.post(core.head.send, Message(M.PUSH_CHUNK, {"o": oid, "off": off}, [piece]))
            for _ in range(WINDOW):  # every chunk acknowledged
                core._wait_event_sem(up.window)
        finally:
            self.uploads.pop(oid, None)
        if up.error or core.closed:
            core.send_head(Message(M.SEAL_OBJECT, {"o": oid, "abort": True}))
            raise ObjectStoreFullError(
                f"could not send an object of {size:,} bytes to the cluster: "
                f"{up.error or core.lost_reason or 'disconnected'}"
            )
        core.request(
            Message(M.SEAL_OBJECT, {"o": oid, "f": sv.flags, "c": sv.contained, "h": holder})
        )
        return str(reply.body["p"])

    def on_ack(self, body: Any) -> None:  # IO thread
        up = self.uploads.get(body.get("o"))
        if up is not None:
            if body.get("e"):
                up.error = str(body["e"])
            up.window.release()

    # -- get (user thread) -------------------------------------------------------------
    def download(self, oid: bytes) -> memoryview:
        """The bytes of a stored object, fetched in chunks from the head's node (which
        pulls it from the node that has it first, if needed)."""
        core = self.core
        core.relocate(oid, "")  # GET_OBJECTS: answered once the head's node has it
        token = next(self.tokens)
        dl = self.downloads[token] = _Download(oid)
        core.post(self._request, token, 0, CHUNK_SIZE)
        try:
            core._wait_event(dl.done, None)
        finally:
            self.downloads.pop(token, None)
        if dl.error or dl.buf is None:
            raise ObjectLostError(
                f"could not fetch object {oid.hex()} from the cluster: "
                f"{dl.error or core.lost_reason or 'disconnected'}"
            )
        return memoryview(dl.buf)[: dl.size]

    def _request(self, token: int, off: int, n: int) -> None:  # IO thread
        dl = self.downloads.get(token)
        if dl is None:
            return
        dl.pending += 1
        body = {"o": dl.oid, "off": off, "n": n, "clamp": True, "t": token}
        self.core.head.send(Message(M.PULL, body))

    def sink(self, mtype: MsgType, body: Any, index: int, n: int) -> Any:  # IO thread
        """Where a chunk of a download is decrypted: its place in the download's buffer
        (see _sealing.Sealer.open), so that it is never copied."""
        if mtype != M.CHUNK or index != 0 or body.get("e"):
            return None
        dl = self.downloads.get(body.get("t"))
        if dl is None:
            return None
        off = int(body["off"])
        if dl.buf is None:
            _allocate(dl, int(body["size"]))
        if dl.buf is None or off < 0 or off + n > dl.size:
            return None
        return memoryview(dl.buf)[off : off + n]

    def on_chunk(self, body: Any, frames: Any) -> None:  # IO thread
        dl = self.downloads.get(body.get("t"))
        if dl is None:
            return
        dl.pending -= 1
        if body.get("e") or len(frames) != 1:
            dl.error = str(body.get("e") or "an empty chunk")
            dl.done.set()
            return
        data = memoryview(frames[0])
        off = int(body["off"])
        if dl.buf is None:
            _allocate(dl, int(body["size"]))
        if dl.next_off == 0:
            dl.next_off = data.nbytes
        # Ask for the next chunks first, so that the head works while we copy.
        while dl.next_off < dl.size and dl.pending < WINDOW:
            n = min(CHUNK_SIZE, dl.size - dl.next_off)
            self._request(body["t"], dl.next_off, n)
            dl.next_off += n
        if dl.buf is not None and data.obj is not dl.buf:  # not opened in place (ipc)
            dl.buf[off : off + data.nbytes] = data
        if dl.pending == 0 and dl.next_off >= dl.size:
            dl.done.set()

    def fail_all(self, reason: str) -> None:  # IO thread, when the cluster is lost
        for up in self.uploads.values():
            up.error = reason
            for _ in range(WINDOW):
                up.window.release()
        for dl in self.downloads.values():
            dl.error = reason
            dl.done.set()
