"""Authenticated connections: a ``Listener`` that accepts peers and a ``Connection`` to one.

The transport moves frames and enforces the protocol's rules before anything reaches the
application: size and frame-count bounds, the HMAC signature, the HELLO/WELCOME handshake
with version checks, and rising sequence numbers. A peer that breaks a rule is dropped
(forgotten, and its socket closed) and logged at a bounded rate; the process keeps serving
everyone else.

One carrier, ``_local_transport.py`` (our own framing over non-blocking stream sockets),
over two kinds of socket chosen by address: ``ipc://PATH`` plain Unix stream sockets, and
``tcp://HOST:PORT`` TCP sockets (TCP_NODELAY; connects are non-blocking, what is sent
before one completes is queued). No libzmq socket is on the wire. One Listener may bind
both; it numbers its peers itself (a peer cannot choose its id). Register a Listener or a
Connection with its IO loop through ``attach``; everything is then driven from that loop's
thread. ``ctx`` is accepted for compatibility and unused.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import _config
from . import _local_transport as _local
from ._protocol import Message, MsgType, ProtocolError, Signer

if TYPE_CHECKING:
    from ._ioloop import IOLoop


class LazyContext:
    """Kept for callers that hold a transport context: no carrier needs one any more."""

    def term(self) -> None:
        pass


log = logging.getLogger(__name__)

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
CLOUDPICKLE_VERSION = cloudpickle.__version__


def version_info() -> dict[str, Any]:
    from ._protocol import PROTOCOL_VERSION

    return {"proto": PROTOCOL_VERSION, "py": PYTHON_VERSION, "cp": CLOUDPICKLE_VERSION}


def check_versions(body: dict[str, Any]) -> None:
    """Raise ProtocolError naming the first mismatch between ``body`` and this process."""
    mine = version_info()
    names = {"proto": "protocol", "py": "Python", "cp": "cloudpickle"}
    for field, name in names.items():
        theirs = body.get(field)
        if theirs != mine[field]:
            raise ProtocolError(
                f"{name} version mismatch: peer has {theirs}, this side has {mine[field]}"
            )


class RateLimitedLog:
    """Logs at most ``burst`` lines per ``period`` seconds, then counts what it skipped."""

    def __init__(self, logger: logging.Logger, period: float = 10.0, burst: int = 5) -> None:
        self._log = logger
        self._period = period
        self._burst = burst
        self._window_start = 0.0
        self._count = 0
        self._skipped = 0

    def warning(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start > self._period:
            if self._skipped:
                self._log.warning("%d similar messages were suppressed", self._skipped)
            self._window_start, self._count, self._skipped = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._log.warning(fmt, *args)
        else:
            self._skipped += 1


_reject_log = RateLimitedLog(log)


IPC = "ipc://"
TCP = "tcp://"


def split_tcp(address: str) -> tuple[str, int]:
    """("HOST", PORT) of "tcp://HOST:PORT"; "*" as the host is any address, as the port 0."""
    if not address.startswith(TCP):
        raise ValueError(f"unsupported address {address!r} (ipc:// or tcp:// only)")
    host, sep, port = address[len(TCP) :].rpartition(":")
    if not sep or not host:
        raise ValueError(f"no port in {address!r}")
    host = host.strip("[]")
    if host == "*":
        host = "0.0.0.0"
    return host, 0 if port == "*" else int(port)


# A lending thread refreshes its lend at least every 0.2 s while it waits (see Connection).
LEND_STALE_SECONDS = 1.0


class _PeerState:
    __slots__ = ("conn_id", "info", "recv_seq", "send_seq", "stream")

    def __init__(self, conn_id: bytes, info: dict[str, Any], stream: _local.Stream) -> None:
        self.conn_id = conn_id
        self.info = info
        self.recv_seq = 0
        self.send_seq = 0
        self.stream = stream


# Connection ids accepted by this process. Invariant: a HELLO or WELCOME whose id is in here
# is a replay and is refused.
_seen_conn_ids: set[bytes] = set()


OnHello = Callable[[bytes, dict[str, Any]], dict[str, Any]]
OnMessage = Callable[[bytes, Message], None]


class Listener:
    """Accepts authenticated peers on the addresses it binds (ipc:// and tcp://).

    ``on_hello(peer, body)`` returns the WELCOME body or raises ProtocolError to refuse;
    ``on_message(peer, msg)`` gets every later verified message of an accepted peer.
    """

    def __init__(self, ctx: Any, signer: Signer, on_hello: OnHello, on_message: OnMessage) -> None:
        self._signer = signer
        self._on_hello = on_hello
        self._on_message = on_message
        self.peers: dict[bytes, _PeerState] = {}
        self.endpoints: list[str] = []
        self._loop: IOLoop | None = None
        # Listening sockets, with the path of a unix one ("" for tcp).
        self._servers: list[tuple[Any, str]] = []
        self._streams: dict[bytes, _local.Stream] = {}  # every open local connection
        self._ids = itertools.count(1)

    def bind(self, address: str) -> str:
        """Listen on ``address``; the endpoint bound ("tcp://HOST:*" picks a free port)."""
        if address.startswith(IPC):
            path = address[len(IPC) :]
            server = _local.listen(path)
            endpoint = address
        else:
            host, port = split_tcp(address)
            server = _local.listen_tcp(host, port)
            path = ""
            endpoint = f"{TCP}{host}:{server.getsockname()[1]}"
        self._servers.append((server, path))
        if self._loop is not None:
            self._loop.add_reader(server.fileno(), lambda: self._accept_all(server))
        self.endpoints.append(endpoint)
        return endpoint

    def attach(self, loop: IOLoop) -> None:
        """Serve from ``loop``: accept, read and flush in its thread from now on."""
        self._loop = loop
        for server, _ in self._servers:
            loop.add_reader(server.fileno(), lambda server=server: self._accept_all(server))
        for peer, stream in self._streams.items():
            self._watch(peer, stream)

    def forget(self, peer: bytes) -> None:
        """Drop ``peer``: its state and its connection."""
        self.peers.pop(peer, None)
        stream = self._streams.pop(peer, None)
        if stream is not None:
            stream.close()

    def send(self, peer: bytes, msg: Message) -> bool:
        """Send to an accepted peer; False when that peer is gone."""
        state = self.peers.get(peer)
        if state is None:
            return False
        stream = state.stream
        if stream.eof or stream.closed:
            self.forget(peer)
            return False
        state.send_seq += 1
        stream.write(self._signer.encode(msg, state.send_seq))
        return True

    def handle_readable(self, budget: int = 1000) -> None:
        """Read and dispatch what every peer has sent (a blocked worker uses this to see
        what is queued for it); the loop calls the per-connection readers instead."""
        for peer, stream in list(self._streams.items()):
            if not stream.closed:
                self._read_stream(peer, stream, budget)

    # -- connections -------------------------------------------------------------------
    def _accept_all(self, server: Any) -> None:
        while True:
            try:
                sock = _local.accept(server)
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of file descriptors, most likely: stop accepting for a moment rather
                # than spin on a listening socket that stays readable.
                _reject_log.warning("could not accept a connection: %s", exc)
                if self._loop is not None:
                    self._loop.remove_reader(server.fileno())
                    self._loop.call_later(0.1, self._resume_accepting, server)
                return
            peer = b"\x01" + (next(self._ids) & 0xFFFFFFFF).to_bytes(4, "big")
            stream = _local.Stream(sock, _config.MAX_FRAMES, _config.MAX_FRAME_SIZE)
            self._streams[peer] = stream
            self._watch(peer, stream)

    def _resume_accepting(self, server: Any) -> None:
        if self._loop is not None and any(s is server for s, _ in self._servers):
            self._loop.add_reader(server.fileno(), lambda: self._accept_all(server))

    def _watch(self, peer: bytes, stream: _local.Stream) -> None:
        if self._loop is not None:
            stream.attach(self._loop, lambda: self._read_stream(peer, stream, 1000))

    def _read_stream(self, peer: bytes, stream: _local.Stream, budget: int) -> None:
        # One message at a time: a message is dispatched (and, if it is the HELLO, the stream
        # marked verified) before the next one is parsed. A message may block in a task that
        # reads this stream again (a worker bouncing queued tasks); order is kept because
        # nothing is held between messages.
        for _ in range(budget):
            try:
                frames = stream.next_message()
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from peer %s: %s", peer.hex(), exc)
                self.forget(peer)
                return
            if frames is None:
                if stream.eof:
                    if stream.mid_message:
                        _reject_log.warning("peer %s closed in the middle of a message", peer.hex())
                    self.forget(peer)
                return
            self._dispatch(peer, frames)
            if stream.closed:
                return
        stream.continue_soon()

    def _dispatch(self, peer: bytes, frames: list[Any]) -> None:
        try:
            msg, seq = self._signer.decode(frames)
        except ProtocolError as exc:
            _reject_log.warning("dropped a message from peer %s: %s", peer.hex(), exc)
            self.forget(peer)
            return
        state = self.peers.get(peer)
        if state is None:
            self._accept(peer, msg, seq)
            return
        if seq <= state.recv_seq:
            _reject_log.warning("dropped a replayed or reordered message from peer %s", peer.hex())
            self.forget(peer)
            return
        state.recv_seq = seq
        self._on_message(peer, msg)

    def _accept(self, peer: bytes, msg: Message, seq: int) -> None:
        stream = self._streams.get(peer)
        try:
            if msg.type != MsgType.HELLO or not isinstance(msg.body, dict):
                raise ProtocolError("the first message must be HELLO")
            conn_id = msg.body.get("conn")
            if not isinstance(conn_id, bytes) or len(conn_id) != 16:
                raise ProtocolError("HELLO without a connection id")
            if conn_id in _seen_conn_ids:
                raise ProtocolError("replayed HELLO")
            check_versions(msg.body)
            _seen_conn_ids.add(conn_id)
            welcome = self._on_hello(peer, msg.body)
        except ProtocolError as exc:
            _reject_log.warning("refused peer %s: %s", peer.hex(), exc)
            refusal = self._signer.encode(
                Message(MsgType.REFUSED, {"reason": str(exc), **version_info()}), 1
            )
            if stream is not None:
                # The peer gets the refusal (if its socket takes it now: the loop never
                # waits on a peer), then the end of the stream.
                stream.write(refusal)
                stream.close()
                self._streams.pop(peer, None)
            return
        if stream is None:
            return  # dropped while the HELLO was handled
        stream.verified = True  # a HELLO signed with the key: larger messages may follow
        state = _PeerState(conn_id, msg.body, stream)
        state.recv_seq = seq
        self.peers[peer] = state
        my_conn = os.urandom(16)
        self.send(peer, Message(MsgType.WELCOME, {"conn": my_conn, **version_info(), **welcome}))

    def close(self) -> None:
        for peer in list(self._streams):
            self.forget(peer)
        for server, path in self._servers:
            if self._loop is not None:
                self._loop.remove_reader(server.fileno())
            server.close()
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._servers.clear()


class Connection:
    """A connection to one Listener. Sends HELLO at once; expects WELCOME first.

    An address that cannot be connected to leaves the connection closed, with the reason
    in ``error``; ``on_refused`` hears it once the connection is attached to a loop (a tcp
    connect fails later, when the loop sees it: the same then happens). A connection that
    ends before its WELCOME without a REFUSED is closed with ``error`` set, but
    ``on_refused`` is not called (a peer with another key drops us unread: no answer).

    Lending (ipc:// connections only): a thread that waits for a reply on this connection
    can read it itself instead of being woken by the loop thread (``lend``/``end_lend``).
    While lent, the loop thread stops watching the socket the next time it sees it
    readable ("parks" it), so a run of synchronous calls wakes no thread but the caller.
    Reading is always loop work (under the loop's lock), so which thread reads never
    matters for correctness, only for speed; what matters is that a parked connection is
    watched again when nobody reads it: the lender unparks it when replies are still due,
    and the loop's sweep unparks any parked connection whose lend ended or went stale (a
    lender refreshes ``lend_deadline`` while it waits).
    """

    def __init__(
        self,
        ctx: Any,
        signer: Signer,
        address: str,
        hello: dict[str, Any],
        on_message: Callable[[Message], None],
        on_refused: Callable[[str], None] | None = None,
        linger_ms: int = 0,
    ) -> None:
        self.address = address
        self._signer = signer
        self._on_message = on_message
        self._on_refused = on_refused
        self._linger_ms = linger_ms
        self._send_seq = 0
        self._recv_seq = 0
        self._loop: IOLoop | None = None
        self.welcome: dict[str, Any] | None = None
        self.error = ""
        self.lent_to: int | None = None  # the thread reading this connection itself
        self.lend_deadline = 0.0  # a lend not refreshed by then is stale
        self.parked = False  # not watched by the loop thread
        self._on_readable: Callable[[], None] = self.handle_readable
        self._poll: Any = None  # a select.poll on the socket, for a lending thread
        self._stream: _local.Stream | None = None
        self._told_refused = False
        self.local = address.startswith(IPC)
        self.sock: Any = None  # the socket; None when it could never be made
        connecting = False
        try:
            if self.local:
                sock = _local.connect(address[len(IPC) :])
            else:
                sock, connecting = _local.connect_tcp(*split_tcp(address))
        except (OSError, ValueError) as exc:
            self.error = f"cannot connect to {address}: {exc}"
            log.warning("%s", self.error)
        else:
            self._stream = _local.Stream(
                sock, _config.MAX_FRAMES, _config.MAX_FRAME_SIZE, connecting
            )
            self.sock = sock
        self.send(Message(MsgType.HELLO, {"conn": os.urandom(16), **version_info(), **hello}))

    @property
    def closed(self) -> bool:
        return self._stream is None or self._stream.closed

    @property
    def broken(self) -> bool:
        """Nothing sent now can arrive: the stream ended (the peer is gone), or never was."""
        stream = self._stream
        return stream is None or stream.closed or stream.eof

    def attach(self, loop: IOLoop, on_readable: Callable[[], None] | None = None) -> None:
        """Read (calling ``on_readable``, by default ``handle_readable``) and flush from
        ``loop``'s thread from now on."""
        self._loop = loop
        callback = on_readable or self.handle_readable
        if self._stream is not None:
            self._on_readable = callback
            self._stream.attach(loop, self._loop_readable)
        else:
            loop.call_soon(self._refused, self.error)

    def _refused(self, reason: str) -> None:
        if not self._told_refused and self._on_refused is not None:
            self._told_refused = True
            self._on_refused(reason)

    def pump(self, timeout: float) -> None:
        """Before ``attach`` (no loop yet): wait up to ``timeout`` seconds for the socket,
        then finish a connect, flush, and read what came (``handle_readable``)."""
        stream = self._stream
        if stream is None or stream.closed:
            return
        if stream.leftover:
            self.handle_readable()
            return
        poller = select.poll()
        poller.register(stream.fd, select.POLLIN | (select.POLLOUT if stream.wants_write else 0))
        for _, events in poller.poll(timeout * 1000):
            if events & select.POLLOUT:
                stream.on_writable()
            if events & ~select.POLLOUT or stream.eof:
                self.handle_readable()

    # -- lending -----------------------------------------------------------------------
    @property
    def lendable(self) -> bool:
        if not self.local or self._stream is None or self._stream.closed:
            return False
        # Not lent, or lent by this very thread (a wait it left by an exception), or stale.
        lender = self.lent_to
        return (
            lender is None
            or lender == threading.get_ident()
            or time.monotonic() > self.lend_deadline
        )

    def lend_is_live(self) -> bool:
        return self.lent_to is not None and time.monotonic() <= self.lend_deadline

    def _loop_readable(self) -> None:
        if self.lend_is_live():
            self.park()  # the lending thread reads it; polling it too would wake us for nothing
            return
        self._on_readable()

    def park(self) -> None:
        """Loop work: stop watching the socket in the loop thread."""
        if not self.parked and self._stream is not None and self._loop is not None:
            self._loop.remove_reader(self._stream.fd)
            self.parked = True

    def unpark(self) -> None:
        """Loop work: watch the socket in the loop thread again."""
        if self.parked and self._stream is not None and self._loop is not None:
            self.parked = False
            if not self._stream.closed:
                self._loop.add_reader(self._stream.fd, self._loop_readable)
                self._stream.continue_soon()

    def lend(self) -> None:
        """Loop work: the calling thread reads this connection itself from now on."""
        self.lent_to = threading.get_ident()
        self.lend_deadline = time.monotonic() + LEND_STALE_SECONDS

    def end_lend(self) -> None:
        self.lent_to = None

    def wait_readable(self, timeout: float) -> bool:
        """For the lending thread, without holding the loop: wait until the socket has data
        (or the stream has complete data already read). False after ``timeout`` seconds."""
        stream = self._stream
        if stream is None or stream.closed:
            return False
        if stream.leftover:
            return True  # already read into the buffer: poll would not report it
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(stream.fd, select.POLLIN)
        return bool(self._poll.poll(timeout * 1000))

    def send(self, msg: Message) -> None:
        stream = self._stream
        if stream is not None:
            if stream.closed or stream.eof:
                return  # gone; the runtime learns of a dead peer from the head
            self._send_seq += 1
            stream.write(self._signer.encode(msg, self._send_seq))

    def handle_readable(self, budget: int = 1000) -> None:
        stream = self._stream
        if stream is None or stream.closed:
            return
        for _ in range(budget):
            try:
                frames = stream.next_message()
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from %s: %s", self.address, exc)
                self.close(0)  # no lingering for a peer that breaks the rules
                return
            if frames is None:
                if stream.eof:
                    # The peer closed or died. What that means (a dead worker, a lost head)
                    # the runtime learns from the head or a pidfd; here only clean up.
                    log.debug("%s closed the connection", self.address)
                    self._ended(stream)
                return
            if not self._receive(frames):
                self.close(0)
                return
            stream.verified = True
            if stream.closed:
                return
        stream.continue_soon()

    def _ended(self, stream: _local.Stream) -> None:
        self.close(0)
        if self.welcome is None and not self.error:
            if stream.error:  # the connect failed: as a failed ipc connect, a refusal
                self.error = f"cannot connect to {self.address}: {stream.error}"
                log.warning("%s", self.error)
                self._refused(self.error)
            else:
                self.error = f"{self.address} closed the connection before a WELCOME"

    def _receive(self, frames: list[Any]) -> bool:
        """Verify and deliver one message; False when it broke the rules (and was dropped)."""
        try:
            msg, seq = self._signer.decode(frames)
        except ProtocolError as exc:
            _reject_log.warning("dropped a message from %s: %s", self.address, exc)
            return False
        if seq <= self._recv_seq:
            _reject_log.warning("dropped a replayed message from %s", self.address)
            return False
        self._recv_seq = seq
        if self.welcome is None:
            if msg.type == MsgType.WELCOME and isinstance(msg.body, dict):
                conn_id = msg.body.get("conn")
                if not isinstance(conn_id, bytes) or conn_id in _seen_conn_ids:
                    _reject_log.warning("dropped a replayed WELCOME from %s", self.address)
                    return False
                _seen_conn_ids.add(conn_id)
                self.welcome = msg.body
                return True
            if msg.type == MsgType.REFUSED:
                self._refused(str((msg.body or {}).get("reason", "refused")))
            return True
        self._on_message(msg)
        return True

    def close(self, linger_ms: int | None = None) -> None:
        """Close, trying for up to ``linger_ms`` (default: the constructor's) to send what
        is still queued."""
        linger = self._linger_ms if linger_ms is None else linger_ms
        if self._stream is not None:
            self._stream.close(linger)
