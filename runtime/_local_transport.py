"""Messages over non-blocking stream sockets: the carrier for ipc:// (Unix stream sockets)
and tcp:// (TCP sockets with TCP_NODELAY) addresses alike.

Why not zmq: a pyzmq round trip between two local processes costs 65-100 us on a small
VM, because every message crosses zmq's IO threads on both sides (two extra thread
wake-ups per message); over a Unix socket it costs about 15-20 us. And a libzmq ROUTER on a
tcp port let any unauthenticated peer abort the process (a routing-id collision trips an
assertion in libzmq); here the listener numbers its peers itself and a peer has no say.

This module only moves frame lists; it never looks inside them (the frames are MAGIC |
signature | header, then large buffers, or their sealed forms on tcp), and
``_transport.py`` verifies them. One message
on the wire, little-endian:

    frame count (u32) | each frame's length (count x u32) | the frames' bytes, in order

Bounds are checked before anything is allocated for a message: the frame count, each
frame's size, and, until the owner marks the stream ``verified`` (after the first message
that passed the signature check), the size of the whole message. So a peer without the
cluster key can make this process hold at most ``MAX_UNVERIFIED`` bytes for it. A stream that
breaks a bound raises ProtocolError; its owner closes it, since after a framing error the
stream cannot be resynchronized.

Writes never block: what the socket does not take at once is queued (never dropped: flow
control is the runtime's) and the stream asks its loop for POLLOUT until the queue is empty.
Large frames are sent with ``sendmsg`` straight from their buffers and read with
``recv_into`` straight into a buffer of their own, so a big value is copied once each way by
the kernel and never by Python.
"""

from __future__ import annotations

# The C module under ``socket``: socket.py's enum set-up costs 2 ms of import time in every
# process (cold start is a target), and nothing here needs its wrappers.
import _socket
import collections
import errno
import itertools
import logging
import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._protocol import ProtocolError

if TYPE_CHECKING:
    from socket import socket as Socket

    from ._ioloop import IOLoop

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
_ONE = struct.Struct("<II")  # count 1 and the frame's length: the prefix of most messages

# Bytes a message may have before its stream is verified. A HELLO, WELCOME or REFUSED is
# under 1 KiB; nothing else may come first.
MAX_UNVERIFIED = 64 * 1024
# Each stream's read buffer. Several small messages arrive in one recv; a message's length
# table (at most 4 + 4 x MAX_FRAMES bytes) always fits.
READ_BUFFER = 64 * 1024
# Frames up to this size are copied out of the read buffer; a bigger one is read straight
# into a buffer of its own.
COPY_LIMIT = 16 * 1024
# The largest frame read into a stream's reusable scratch buffers (see ``Stream.scratch``):
# chunks of large objects (8 MiB) are; the rare larger frame gets a buffer of its own.
SCRATCH_LIMIT = 16 * 1024 * 1024 + 64
# Only a message's first frames (its header and first buffer: all a chunk has) use them, so
# that a message of many large buffers leaves no more than this many behind.
SCRATCH_FRAMES = 2
# A message up to this size is joined into one bytes object and sent with one send(): for
# small messages that is cheaper than building an iovec.
JOIN_LIMIT = 64 * 1024
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers in one call.
IOV_BATCH = 512
# The kernel's send buffer bounds how much is in flight before a write would block. The
# default (~200 KiB, which a few hundred small messages fill because each costs its own
# kernel buffer) makes a burst of calls wait on POLLOUT; a bigger one costs memory only
# while it is used. Linux caps it at net.core.wmem_max.
SEND_BUFFER = 1024 * 1024

_NOSIGNAL = _socket.MSG_NOSIGNAL


def listen(path: str) -> Any:
    """A non-blocking listening socket at ``path`` (which must not exist), mode 0600."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # The session directory is 0700 already; this is defence in depth.
        os.chmod(path, 0o600)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_tcp(host: str, port: int) -> Any:
    """A non-blocking listening TCP socket on ``host``:``port`` (0: any free port)."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(server: Any) -> Any:
    """A connection waiting on ``server``; BlockingIOError when there is none."""
    fd, _ = server._accept()
    sock = _socket.socket(server.family, _socket.SOCK_STREAM, 0, fd)
    if server.family == _socket.AF_INET:
        _nodelay(sock)
    return sock


def _nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except OSError:
        pass


def connect_tcp(host: str, port: int) -> tuple[Any, bool]:
    """A non-blocking TCP socket connecting to ``host``:``port``, and whether the connect is
    still in progress (the socket then turns writable when it completes or fails: see
    ``Stream``'s ``connecting``). Raises OSError when it failed at once."""
    infos = _socket.getaddrinfo(host, port, _socket.AF_INET, _socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no IPv4 address for {host}")
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        _nodelay(sock)
        err = sock.connect_ex(infos[0][4])
    except BaseException:
        sock.close()
        raise
    if err in (0, errno.EISCONN):
        return sock, False
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        return sock, True
    sock.close()
    raise OSError(err, os.strerror(err))


def connect(path: str, timeout: float = 5.0) -> Any:
    """A connected socket to the listener at ``path``.

    Connecting is done blocking: a local connect completes at once unless the listener's
    backlog is full, and a non-blocking connect would then fail with EAGAIN instead of
    waiting for a slot.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Stream:
    """One connected socket carrying whole messages (frame lists) both ways.

    Used by one thread only (its IO loop's). ``next_message`` returns one message at a time,
    so the owner can mark the stream verified between the first message and the next.
    """

    __slots__ = (
        "_big",
        "_big_got",
        "_big_view",
        "_buf",
        "_drained",
        "_end",
        "_frames",
        "_lens",
        "_loop",
        "_on_readable",
        "_out",
        "_start",
        "_view",
        "_writing",
        "closed",
        "connecting",
        "eof",
        "error",
        "fd",
        "leftover",
        "max_frame_size",
        "max_frames",
        "scratch",
        "sock",
        "tcp",
        "verified",
    )

    def __init__(
        self, sock: Socket, max_frames: int, max_frame_size: int, connecting: bool = False
    ) -> None:
        sock.setblocking(False)
        if sock.family == _socket.AF_UNIX:
            # TCP sizes its buffers itself (autotuning, up to net.ipv4.tcp_wmem's maximum),
            # and setting SO_SNDBUF would turn that off: a fixed 1 MiB took a third off
            # object transfer between nodes.
            try:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
        self.sock = sock
        self.tcp = sock.family == _socket.AF_INET  # its messages are sealed (_sealing.py)
        # Buffers to read large frames into, by their place in a message, used again for
        # each message: set by an owner that copies every large frame out of a message
        # before it asks for the next one (it decrypts them). None: each large frame gets
        # a buffer of its own, handed on.
        self.scratch: list[bytearray] | None = None
        self.fd = sock.fileno()
        self.max_frames = max_frames
        self.max_frame_size = max_frame_size
        self.verified = False
        self.eof = False  # the peer closed its end, or the socket failed
        # A non-blocking connect in progress: writes are queued until it completes.
        self.connecting = connecting
        self.error = ""  # why the connect failed
        self.closed = False
        # A reader stopped (its budget ran out) with bytes read that may hold whole messages.
        self.leftover = False
        self._loop: IOLoop | None = None
        self._on_readable: Callable[[], None] | None = None
        self._writing = False  # registered for POLLOUT
        self._out: collections.deque[Any] = collections.deque()  # bytes / memoryviews
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unparsed bytes are _buf[_start:_end]
        self._end = 0
        self._drained = False  # the last read took less than it asked for
        self._lens: tuple[int, ...] | None = None  # frame lengths of the message being read
        self._frames: list[Any] = []
        self._big: memoryview | None = None  # a large frame being read straight into place
        self._big_view: memoryview | None = None
        self._big_got = 0

    def attach(self, loop: IOLoop, on_readable: Callable[[], None]) -> None:
        """Have ``loop`` call ``on_readable`` when data (or the end) arrives, and flush."""
        self._loop = loop
        self._on_readable = on_readable
        loop.add_reader(self.fd, on_readable)
        if self._out or self.connecting:
            self._want_write()

    @property
    def wants_write(self) -> bool:
        """Output is queued, or the connect is in progress (POLLOUT will tell its end)."""
        return bool(self._out) or self.connecting

    @property
    def mid_message(self) -> bool:
        return self._lens is not None or self._end > self._start

    def continue_soon(self) -> None:
        """The owner stopped reading before the buffer was empty (its budget ran out): poll
        will not report bytes already read, so have the loop call the reader again."""
        if self._end > self._start:
            self.leftover = True
            if self._loop is not None and self._on_readable is not None:
                self._loop.call_soon(self._on_readable)

    # -- writing -----------------------------------------------------------------------
    def write(self, frames: Sequence[Any]) -> None:
        """Send one message, or queue what the socket does not take now."""
        if self.closed or self.eof:
            return  # the peer is gone; its owner learns it from the reader
        if len(frames) == 1:
            frame = frames[0]
            n = len(frame) if isinstance(frame, bytes) else memoryview(frame).nbytes
            if n <= JOIN_LIMIT:
                data = _ONE.pack(1, n) + bytes(frame)
                if self._out or self.connecting:
                    self._out.append(data)
                    self._want_write()
                    return
                try:
                    sent = self.sock.send(data, _NOSIGNAL)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._broken()
                    return
                if sent < len(data):
                    self._out.append(memoryview(data)[sent:])
                    self._want_write()
                return
        views = [memoryview(f).cast("B") for f in frames]
        lens = [v.nbytes for v in views]
        prefix = struct.pack(f"<{len(lens) + 1}I", len(lens), *lens)
        if sum(lens) <= JOIN_LIMIT:
            self._out.append(b"".join([prefix, *views]))
        else:
            self._out.append(prefix)
            self._out.extend(v for v in views if v.nbytes)
        if self.flush():
            self._want_write()

    def flush(self) -> bool:
        """Send queued output until the socket is full; True when some is still queued."""
        out = self._out
        if self.connecting:
            return bool(out)  # sent once connected (``on_writable``)
        sock = self.sock
        try:
            while out:
                if len(out) == 1:
                    want = len(out[0])
                    sent = sock.send(out[0], _NOSIGNAL)
                else:
                    batch = list(itertools.islice(out, IOV_BATCH))
                    want = sum(len(b) for b in batch)
                    sent = sock.sendmsg(batch, (), _NOSIGNAL)
                done = sent
                while done:
                    first = out[0]
                    n = len(first)
                    if done >= n:
                        out.popleft()
                        done -= n
                    else:
                        out[0] = memoryview(first)[done:]
                        done = 0
                if sent < want:
                    break  # the socket is full: wait for POLLOUT
        except BlockingIOError:
            pass
        except OSError:
            self._broken()
        return bool(out)

    def _want_write(self) -> None:
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _connected(self) -> bool:
        """After POLLOUT during a connect: True when it succeeded; else the stream ends."""
        err = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            self.error = os.strerror(err)
            self._broken()
            return False
        self.connecting = False
        return True

    def _on_writable(self) -> None:
        if self.connecting and not self._connected():
            if self._writing and self._loop is not None:
                self._writing = False
                self._loop.remove_writer(self.fd)
            if self._loop is not None and self._on_readable is not None:
                self._loop.call_soon(self._on_readable)  # the owner sees the end
            return
        if not self.flush() and self._writing:
            self._writing = False
            if self._loop is not None:
                self._loop.remove_writer(self.fd)

    def _broken(self) -> None:
        # EPIPE or ECONNRESET: nothing more can be sent. The socket is readable (end of
        # stream), so the reader notices and the owner cleans up.
        self.eof = True
        self.connecting = False
        self._out.clear()

    on_writable = _on_writable  # for an owner that polls the socket itself (no loop yet)

    # -- reading -----------------------------------------------------------------------
    def next_message(self) -> list[Any] | None:
        """The next whole message, reading from the socket as needed; None when none is
        complete yet (or the stream ended: see ``eof``). Raises ProtocolError."""
        while True:
            msg = self._parse()
            if msg is not None:
                return msg
            if self._drained:
                # The socket was empty after the last read: rather than a read that fails
                # with EAGAIN (a system call and an exception), wait for poll to say more came.
                self._drained = False
                self.leftover = False
                return None
            if not self._receive():
                self.leftover = False
                return None

    def _receive(self) -> bool:
        """Read what the socket has; False when nothing came (would block, or the end)."""
        if self.eof or self.closed or self.connecting:
            return False
        try:
            big = self._big_view
            if big is not None:
                want = len(big) - self._big_got
                n = self.sock.recv_into(big[self._big_got :])
                self._big_got += n
            else:
                want = READ_BUFFER - self._end
                n = self.sock.recv_into(self._view[self._end :])
                self._end += n
            self._drained = n < want
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if n == 0:
            self.eof = True
            return False
        return True

    def _make_room(self, need: int) -> None:
        # Called when fewer than ``need`` (<= READ_BUFFER) bytes are buffered: make sure they
        # will fit, moving the unparsed tail to the front.
        start = self._start
        if start + need > READ_BUFFER or start == self._end:
            tail = self._end - start
            if tail:
                self._buf[:tail] = self._view[start : self._end]
            self._start, self._end = 0, tail

    def _parse(self) -> list[Any] | None:
        buf = self._buf
        while True:
            start = self._start
            avail = self._end - start
            lens = self._lens
            if lens is None:
                # Fast path: a whole one-frame message is buffered.
                if avail >= 8:
                    count, n = _ONE.unpack_from(buf, start)
                    if count == 1 and n <= COPY_LIMIT and avail >= 8 + n:
                        if not self.verified and n + 8 > MAX_UNVERIFIED:
                            raise ProtocolError(f"a message of {n + 8} bytes before authentication")
                        self._start = start + 8 + n
                        return [bytes(self._view[start + 8 : start + 8 + n])]
                if avail < 4:
                    self._make_room(4)
                    return None
                (count,) = _COUNT.unpack_from(buf, start)
                if not 1 <= count <= self.max_frames:
                    raise ProtocolError(f"a message of {count} frames (at most {self.max_frames})")
                size = 4 + 4 * count
                if avail < size:
                    if not self.verified and size > MAX_UNVERIFIED:
                        raise ProtocolError(f"{count} frames before authentication")
                    self._make_room(size)
                    return None
                lens = struct.unpack_from(f"<{count}I", buf, start + 4)
                largest = max(lens)
                if largest > self.max_frame_size:
                    raise ProtocolError(
                        f"a frame of {largest} bytes (at most {self.max_frame_size})"
                    )
                if not self.verified and size + sum(lens) > MAX_UNVERIFIED:
                    raise ProtocolError(
                        f"a message of {size + sum(lens)} bytes before authentication"
                    )
                self._start = start + size
                self._lens = lens
                self._frames = []
                continue
            frames = self._frames
            i = len(frames)
            if i == len(lens):
                self._lens = None
                self._frames = []
                return frames
            n = lens[i]
            if self._big is not None:
                if self._big_got < n:
                    return None
                # Read-only, as a value in shared memory is: the receiver must not write it.
                frames.append(self._big.toreadonly())
                self._big = self._big_view = None
                continue
            if n <= COPY_LIMIT:
                if avail < n:
                    self._make_room(n)
                    return None
                frames.append(bytes(self._view[start : start + n]))
                self._start = start + n
                continue
            # A large frame: its own buffer, filled first from what is buffered.
            scratch = self.scratch
            if scratch is not None and n <= SCRATCH_LIMIT and i < SCRATCH_FRAMES:
                # Sealed: the owner opens (decrypts) the frame into a buffer of its own
                # before it reads the next message, so this buffer is used again.
                while len(scratch) <= i:
                    scratch.append(bytearray(0))
                if len(scratch[i]) < n:
                    scratch[i] = bytearray(n)
                big = memoryview(scratch[i])[:n]
            else:
                big = memoryview(bytearray(n))
            take = min(avail, n)
            big[:take] = self._view[start : start + take]
            self._start = start + take
            if self._start == self._end:
                self._start = self._end = 0
            self._big = big
            self._big_view = big
            self._big_got = take

    # -- closing -----------------------------------------------------------------------
    def close(self, linger_ms: int = 0) -> None:
        """Close at once, after trying for up to ``linger_ms`` to send what is queued."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            if self._writing:
                self._loop.remove_writer(self.fd)
            self._writing = False
        if self._out and linger_ms > 0 and not self.eof:
            deadline = time.monotonic() + linger_ms / 1000
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            while self._out and not self.eof:
                if not self.connecting and not self.flush():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof or not poller.poll(remaining * 1000):
                    break
                if self.connecting and not self._connected():
                    break
        self._out.clear()
        self._big = self._big_view = None
        try:
            self.sock.close()
        except OSError:
            pass
