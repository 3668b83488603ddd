"""Authenticated connections: a ``Listener`` that accepts peers and a ``Connection`` to one.

The transport moves frames and enforces the protocol's rules before anything reaches the
application: size and frame-count bounds, the HMAC signature (ipc, and every handshake)
or the AES-GCM seal (tcp, after the handshake: ``_sealing.py``), the HELLO/WELCOME
handshake with version checks, and rising sequence numbers. Sessions the application
marks resumable survive a broken connection (``_Session``). A peer that breaks a rule is dropped
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

import collections
import hmac
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
from ._sealing import TAG, Sealer, Sink, resume_proof, session_keys

if TYPE_CHECKING:
    from ._ioloop import IOLoop, TimerHandle


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

# Resumable sessions (see ``_Session``). A receiver acknowledges what it got after this many
# messages or bytes, or this long after the first one it has not acknowledged yet: that
# bounds what a sender keeps for resending.
ACK_EVERY = 256
ACK_BYTES = 16 * 1024 * 1024
ACK_DELAY = 0.2
# A broken connection is dialled again after this long, doubling up to the maximum; an
# attempt that got no WELCOME after ATTEMPT_SECONDS is abandoned for the next one.
RESUME_FIRST_DELAY = 0.05
RESUME_MAX_DELAY = 1.0
ATTEMPT_SECONDS = 3.0


class _Session:
    """What lets a peer whose connection broke (a reset, a proxy that restarted) pick up
    where it was, on a new connection, within the application's grace period.

    Each side numbers the messages it sends in the session (1, 2, ...) and keeps those the
    other side has not acknowledged yet (``outbox``: message number ``acked + 1`` first);
    each side counts the messages it delivered to its application (``delivered``). Both
    counts travel in the handshake of a resuming connection, so each side resends exactly
    what the other did not get, in order, sealed anew under the new connection's keys:
    nothing is lost and nothing is delivered twice. Acknowledgements (ACK) go now and then
    (``ACK_EVERY``, ``ACK_BYTES``, ``ACK_DELAY``); they are the transport's own messages:
    neither numbered nor kept.
    """

    __slots__ = (
        "ack_sent",
        "ack_timer",
        "acked",
        "delivered",
        "outbox",
        "secret",
        "sent",
        "sid",
        "unacked_bytes",
    )

    def __init__(self, sid: bytes, secret: bytes) -> None:
        self.sid = sid
        self.secret = secret  # proves a resuming HELLO comes from this session's peer
        self.outbox: collections.deque[Message] = collections.deque()
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self.ack_sent = 0
        self.unacked_bytes = 0
        self.ack_timer: TimerHandle | None = None

    def record(self, msg: Message) -> None:
        self.sent += 1
        self.outbox.append(msg)

    def acknowledge(self, n: Any) -> bool:
        """The peer got messages up to ``n``: forget them. False (and nothing changes) when
        ``n`` is not a number between what was acknowledged before and what was sent."""
        if not isinstance(n, int) or not self.acked <= n <= self.sent:
            return False
        for _ in range(n - self.acked):
            self.outbox.popleft()
        self.acked = n
        return True

    def received(self, frames: list[Any]) -> bool:
        """One more message delivered; True when an acknowledgement is due now."""
        self.delivered += 1
        for f in frames:
            self.unacked_bytes += len(f)
        return self.delivered - self.ack_sent >= ACK_EVERY or self.unacked_bytes >= ACK_BYTES

    def ack(self) -> Message:
        self.ack_sent = self.delivered
        self.unacked_bytes = 0
        return Message(MsgType.ACK, {"n": self.delivered})

    def stop_timer(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None


class _PeerState:
    __slots__ = (
        "conn_id",
        "info",
        "opener",
        "recv_seq",
        "sealer",
        "send_seq",
        "session",
        "stream",
    )

    def __init__(self, conn_id: bytes, info: dict[str, Any], stream: _local.Stream) -> None:
        self.conn_id = conn_id
        self.info = info
        self.recv_seq = 0
        self.send_seq = 0
        self.stream: _local.Stream | None = stream  # None while a session waits to resume
        self.sealer: Sealer | None = None  # tcp: seals what we send (after the WELCOME)
        self.opener: Sealer | None = None  # tcp: opens what the peer sends
        self.session: _Session | None = None


# Connection ids accepted by this process. Invariant: a HELLO or WELCOME whose id is in here
# is a replay and is refused.
_seen_conn_ids: set[bytes] = set()


OnHello = Callable[[bytes, dict[str, Any]], dict[str, Any]]
OnMessage = Callable[[bytes, Message], None]


def _stream_for(sock: Any, connecting: bool = False) -> _local.Stream:
    stream = _local.Stream(sock, _config.MAX_FRAMES, _config.MAX_FRAME_SIZE, connecting)
    if stream.tcp:
        stream.max_frame_size += TAG  # a sealed frame carries its tag
    return stream


class Listener:
    """Accepts authenticated peers on the addresses it binds (ipc:// and tcp://).

    ``on_hello(peer, body)`` returns the WELCOME body or raises ProtocolError to refuse;
    ``on_message(peer, msg)`` gets every later verified message of an accepted peer.

    A WELCOME body with ``"resumable": True``, for a HELLO that asked for it (``"rs"``),
    makes the peer's session resumable (``_Session``): when its connection breaks, the peer
    stays (same id, what is sent to it is kept) until it comes back with a resuming HELLO,
    or until the application ``forget``s it (its grace period ran out). The application
    never sees the break.
    """

    def __init__(
        self,
        ctx: Any,
        signer: Signer,
        on_hello: OnHello,
        on_message: OnMessage,
        sink: Sink | None = None,
    ) -> None:
        self._signer = signer
        self._sink = sink  # where large frames of sealed messages may be opened (_sealing)
        self._on_hello = on_hello
        self._on_message = on_message
        self.peers: dict[bytes, _PeerState] = {}
        self.endpoints: list[str] = []
        self._loop: IOLoop | None = None
        # Listening sockets, with the path of a unix one ("" for tcp).
        self._servers: list[tuple[Any, str]] = []
        self._streams: dict[bytes, _local.Stream] = {}  # every open local connection
        self._sessions: dict[bytes, bytes] = {}  # resumable session id -> peer
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
        """Drop ``peer``: its state, its session and its connection."""
        state = self.peers.pop(peer, None)
        if state is not None and state.session is not None:
            state.session.stop_timer()
            self._sessions.pop(state.session.sid, None)
        stream = self._streams.pop(peer, None)
        if stream is not None:
            stream.close()

    def send(self, peer: bytes, msg: Message) -> bool:
        """Send to an accepted peer; False when that peer is gone. A resumable peer whose
        connection broke gets the message when it resumes."""
        state = self.peers.get(peer)
        if state is None:
            return False
        session = state.session
        stream = state.stream
        if session is not None:
            session.record(msg)
            if stream is None or stream.closed or stream.eof:
                return True  # kept for the resume
        elif stream is None or stream.eof or stream.closed:
            self.forget(peer)
            return False
        state.send_seq += 1
        sealer = state.sealer
        if sealer is not None:
            stream.write(sealer.seal(msg, state.send_seq))
        else:
            stream.write(self._signer.encode(msg, state.send_seq))
        return True

    def _write(self, state: _PeerState, msg: Message) -> None:
        """Send a message that is not the application's (never kept for a resume)."""
        if state.stream is not None:
            state.send_seq += 1
            if state.sealer is not None:
                state.stream.write(state.sealer.seal(msg, state.send_seq))
            else:
                state.stream.write(self._signer.encode(msg, state.send_seq))

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
            stream = _stream_for(sock)
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
                self._drop(peer)
                return
            if frames is None:
                if stream.eof:
                    if stream.mid_message:
                        _reject_log.warning("peer %s closed in the middle of a message", peer.hex())
                    self._drop(peer)
                return
            self._dispatch(peer, frames)
            if stream.closed:
                return
            if self._streams.get(peer) is not stream:
                # A resuming HELLO moved this stream to the peer it resumes (which reads it
                # from now on, under its own id).
                stream.continue_soon()
                return
        stream.continue_soon()

    def _drop(self, peer: bytes) -> None:
        """``peer``'s connection broke or broke a rule: forget the peer, or, when its
        session is resumable, keep it waiting for the resume."""
        state = self.peers.get(peer)
        if state is None or state.session is None:
            self.forget(peer)
            return
        stream = self._streams.pop(peer, None)
        if stream is not None:
            stream.close()
        state.stream = None
        state.sealer = state.opener = None
        state.session.stop_timer()
        log.info("the connection of peer %s broke; its session waits to be resumed", peer.hex())

    def _dispatch(self, peer: bytes, frames: list[Any]) -> None:
        state = self.peers.get(peer)
        if state is None:
            try:
                msg, seq = self._signer.decode(frames)
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from peer %s: %s", peer.hex(), exc)
                self.forget(peer)
                return
            self._accept(peer, msg, seq)
            return
        opener = state.opener
        try:
            if opener is not None:
                seq = state.recv_seq + 1
                msg = opener.open(frames, seq, self._sink)
            else:
                msg, seq = self._signer.decode(frames)
                if seq <= state.recv_seq:
                    raise ProtocolError("a replayed or reordered message")
        except ProtocolError as exc:
            _reject_log.warning("dropped a message from peer %s: %s", peer.hex(), exc)
            self._drop(peer)
            return
        state.recv_seq = seq
        session = state.session
        if session is not None:
            if msg.type == MsgType.ACK:
                if not session.acknowledge((msg.body or {}).get("n")):
                    _reject_log.warning(
                        "dropped peer %s: an acknowledgement out of step", peer.hex()
                    )
                    self.forget(peer)
                return
            if session.received(frames):
                self._write(state, session.ack())
            elif session.ack_timer is None and self._loop is not None:
                session.ack_timer = self._loop.call_later(ACK_DELAY, self._ack_due, peer)
        self._on_message(peer, msg)

    def _ack_due(self, peer: bytes) -> None:
        state = self.peers.get(peer)
        if state is not None and state.session is not None:
            session = state.session
            session.ack_timer = None
            if session.delivered > session.ack_sent and state.stream is not None:
                self._write(state, session.ack())

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
            if "resume" in msg.body:
                self._resume(peer, conn_id, msg.body["resume"], seq)
                return
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
        body = {"conn": my_conn, **version_info(), **welcome}
        resumable = bool(body.pop("resumable", False)) and bool(msg.body.get("rs"))
        keys = session_keys(self._signer.key, conn_id, my_conn) if stream.tcp or resumable else None
        if resumable and keys is not None:
            sid = os.urandom(16)
            state.session = _Session(sid, keys.resume)
            self._sessions[sid] = peer
            body["sid"] = sid
        self._write(state, Message(MsgType.WELCOME, body))
        if stream.tcp and keys is not None:  # everything after the WELCOME is sealed
            state.sealer, state.opener = keys.incoming, keys.outgoing
            stream.scratch = []

    def _resume(self, peer: bytes, conn_id: bytes, resume: Any, seq: int) -> None:
        """A HELLO that resumes a session on the new connection ``peer`` (raises
        ProtocolError to refuse it): the session's peer takes the connection over."""
        stream = self._streams.get(peer)
        if stream is None:
            return
        sid = resume.get("sid") if isinstance(resume, dict) else None
        owner = self._sessions.get(sid) if isinstance(sid, bytes) else None
        state = self.peers.get(owner) if owner is not None else None
        session = state.session if state is not None else None
        if owner is None or state is None or session is None:
            raise ProtocolError(
                "no such session to resume: it ended (its grace period ran out, or this "
                "process restarted)"
            )
        proof = resume.get("proof")
        if not isinstance(proof, bytes) or not hmac.compare_digest(
            proof, resume_proof(session.secret, conn_id)
        ):
            raise ProtocolError("a resuming HELLO without a valid proof")
        if not session.acknowledge(resume.get("ack")):
            raise ProtocolError("a resuming HELLO out of step with its session")
        # The old connection, if this end has not noticed yet that it broke, goes.
        old = self._streams.pop(owner, None)
        if old is not None and old is not stream:
            old.close()
        del self._streams[peer]
        self._streams[owner] = stream
        stream.verified = True
        state.stream = stream
        state.conn_id = conn_id
        state.recv_seq = seq
        state.send_seq = 0
        state.sealer = state.opener = None
        session.stop_timer()
        my_conn = os.urandom(16)
        welcome = {"conn": my_conn, **version_info(), "resumed": True, "ack": session.delivered}
        session.ack_sent, session.unacked_bytes = session.delivered, 0
        self._write(state, Message(MsgType.WELCOME, welcome))
        if stream.tcp:
            keys = session_keys(self._signer.key, conn_id, my_conn)
            state.sealer, state.opener = keys.incoming, keys.outgoing
            stream.scratch = []
        self._watch(owner, stream)
        for msg in session.outbox:  # what the peer did not get, sealed anew
            self._write(state, msg)
        log.info(
            "peer %s resumed its session (%d messages resent)", owner.hex(), len(session.outbox)
        )

    def close(self) -> None:
        for peer in {*self._streams, *self.peers}:
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

    On tcp, messages sent before the WELCOME wait for it: they are sealed with keys that
    take both connection ids (see ``_sealing.py``).

    ``resumable``: ask the listener for a resumable session (``_Session``). When the
    connection then breaks, it is dialled again (with backoff) and resumed, transparently
    for the application, until ``close`` (the application's grace period ran out) or until
    the listener refuses the resume (the session is gone there): ``on_lost(reason)`` then.

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
        resumable: bool = False,
        on_lost: Callable[[str], None] | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.address = address
        self._sink = sink  # where large frames of sealed messages may be opened (_sealing)
        self._signer = signer
        self._on_message = on_message
        self._on_refused = on_refused
        self._on_lost = on_lost
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
        self._hello_conn = b""
        self._handshaken = False  # the current stream got its WELCOME
        self._sealer: Sealer | None = None
        self._opener: Sealer | None = None
        self._pending: list[Message] = []  # tcp: sent before the WELCOME
        self.session: _Session | None = None
        self._gone = False  # a session ended for good: closed, or its resume refused
        self._finishing = False  # the application said goodbye: an end is not a break
        self._retry: TimerHandle | None = None
        self._retry_delay = RESUME_FIRST_DELAY
        self.received = 0  # verified messages, handshakes included
        if not self._open({**hello, "rs": True} if resumable else hello):
            log.warning("%s", self.error)

    def _open(self, hello: dict[str, Any]) -> bool:
        """A new socket and stream, with the HELLO (plus ``hello``) queued on it."""
        connecting = False
        try:
            if self.local:
                sock = _local.connect(self.address[len(IPC) :])
            else:
                sock, connecting = _local.connect_tcp(*split_tcp(self.address))
        except (OSError, ValueError) as exc:
            self.error = f"cannot connect to {self.address}: {exc}"
            return False
        self._stream = _stream_for(sock, connecting)
        self.sock = sock
        self._poll = None
        self._send_seq = self._recv_seq = 0
        self._handshaken = False
        self._sealer = self._opener = None
        self._hello_conn = hello.get("conn") or os.urandom(16)
        self._write(Message(MsgType.HELLO, {"conn": self._hello_conn, **version_info(), **hello}))
        return True

    @property
    def closed(self) -> bool:
        if self.session is not None:
            return self._gone  # between two connections a session is still open
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
        self._on_readable = callback
        if self._stream is not None:
            self._stream.attach(loop, self._loop_readable)
        elif self.session is not None and not self._gone:
            self._lost_link(self.error or "the connection broke")  # before attach: dial now
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

    # -- sending -----------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        session = self.session
        if session is not None:
            if not self._gone:
                session.record(msg)  # sent now if connected, else when resumed
                if self._handshaken:
                    self._write(msg)
            return
        stream = self._stream
        if stream is None or stream.closed or stream.eof:
            return  # gone; the runtime learns of a dead peer from the head
        if not self._handshaken and not self.local:
            self._pending.append(msg)  # sealed once the WELCOME brings the keys
            return
        self._write(msg)

    def _write(self, msg: Message) -> None:
        stream = self._stream
        if stream is not None:
            self._send_seq += 1
            sealer = self._sealer
            if sealer is not None:
                stream.write(sealer.seal(msg, self._send_seq))
            else:
                stream.write(self._signer.encode(msg, self._send_seq))

    # -- receiving ---------------------------------------------------------------------
    def handle_readable(self, budget: int = 1000) -> None:
        stream = self._stream
        if stream is None or stream.closed:
            return
        for _ in range(budget):
            try:
                frames = stream.next_message()
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from %s: %s", self.address, exc)
                self._broken(f"a message broke the protocol: {exc}")
                return
            if frames is None:
                if stream.eof:
                    # The peer closed or died. What that means (a dead worker, a lost head)
                    # the runtime learns from the head or a pidfd; here only clean up.
                    log.debug("%s closed the connection", self.address)
                    self._ended(stream)
                return
            if not self._receive(frames):
                self._broken("a message broke the protocol")
                return
            if stream.closed:
                return
            stream.verified = True
        stream.continue_soon()

    def finish(self) -> None:
        """The application ends its session (it said goodbye): when the connection ends
        from now on, that is the end, not a break to resume."""
        self._finishing = True

    def _broken(self, reason: str) -> None:
        if self.session is not None and not self._gone and not self._finishing:
            self._lost_link(reason)
        else:
            self.close(0)  # no lingering for a peer that breaks the rules

    def _ended(self, stream: _local.Stream) -> None:
        if self.session is not None and not self._gone and not self._finishing:
            self._lost_link(stream.error or "the connection was closed")
            return
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
        if not self._handshaken:
            return self._receive_handshake(frames)
        opener = self._opener
        try:
            if opener is not None:
                seq = self._recv_seq + 1
                msg = opener.open(frames, seq, self._sink)
            else:
                msg, seq = self._signer.decode(frames)
                if seq <= self._recv_seq:
                    raise ProtocolError("a replayed message")
        except ProtocolError as exc:
            _reject_log.warning("dropped a message from %s: %s", self.address, exc)
            return False
        self._recv_seq = seq
        self.received += 1
        session = self.session
        if session is not None:
            if msg.type == MsgType.ACK:
                if session.acknowledge((msg.body or {}).get("n")):
                    return True
                _reject_log.warning("dropped %s: an acknowledgement out of step", self.address)
                return False
            if session.received(frames):
                self._write(session.ack())
            elif session.ack_timer is None and self._loop is not None:
                session.ack_timer = self._loop.call_later(ACK_DELAY, self._ack_due)
        self._on_message(msg)
        return True

    def _ack_due(self) -> None:
        session = self.session
        if session is not None:
            session.ack_timer = None
            if session.delivered > session.ack_sent and self._handshaken:
                self._write(session.ack())

    def _receive_handshake(self, frames: list[Any]) -> bool:
        try:
            msg, seq = self._signer.decode(frames)
        except ProtocolError as exc:
            _reject_log.warning("dropped a message from %s: %s", self.address, exc)
            return False
        if seq <= self._recv_seq:
            _reject_log.warning("dropped a replayed message from %s", self.address)
            return False
        self._recv_seq = seq
        self.received += 1
        if msg.type == MsgType.WELCOME and isinstance(msg.body, dict):
            conn_id = msg.body.get("conn")
            if not isinstance(conn_id, bytes) or conn_id in _seen_conn_ids:
                _reject_log.warning("dropped a replayed WELCOME from %s", self.address)
                return False
            _seen_conn_ids.add(conn_id)
            return self._welcomed(msg.body, conn_id)
        if msg.type == MsgType.REFUSED:
            reason = str((msg.body or {}).get("reason", "refused"))
            if self.session is not None:
                self._give_up(f"the cluster refused to resume this connection: {reason}")
            else:
                self._refused(reason)
        return True

    def _welcomed(self, body: dict[str, Any], conn_id: bytes) -> bool:
        session = self.session
        resumed = session is not None
        keys = None
        if not self.local or "sid" in body:
            keys = session_keys(self._signer.key, self._hello_conn, conn_id)
        if session is None:
            self.welcome = body
            sid = body.get("sid")
            if isinstance(sid, bytes) and keys is not None:
                session = self.session = _Session(sid, keys.resume)
        elif not body.get("resumed") or not session.acknowledge(body.get("ack")):
            _reject_log.warning("%s answered a resume out of step", self.address)
            self._give_up(f"{self.address} answered a resume out of step with this session")
            return True
        else:
            session.ack_sent, session.unacked_bytes = session.delivered, 0
        self._handshaken = True
        self._retry_delay = RESUME_FIRST_DELAY
        if keys is not None and not self.local and self._stream is not None:
            self._sealer, self._opener = keys.outgoing, keys.incoming
            self._stream.scratch = []
        if resumed and session is not None:
            for msg in session.outbox:  # what the listener did not get, sealed anew
                self._write(msg)
            log.warning(
                "resumed the connection to %s (%d messages resent)",
                self.address,
                len(session.outbox),
            )
            return True
        pending, self._pending = self._pending, []
        for msg in pending:
            if session is not None:
                session.record(msg)
            self._write(msg)
        return True

    # -- a resumable session whose connection broke ---------------------------------------
    def _lost_link(self, reason: str) -> None:
        stream = self._stream
        first = self._handshaken
        if stream is not None:
            stream.close()
        self._stream = None
        self._handshaken = False
        self._sealer = self._opener = None
        if self.session is not None:
            self.session.stop_timer()
        if first:
            log.warning("the connection to %s broke (%s): resuming", self.address, reason)
        else:
            log.info("resuming %s failed (%s): trying again", self.address, reason)
        if self._loop is not None and self._retry is None:
            self._retry = self._loop.call_later(self._retry_delay, self._reconnect)
            self._retry_delay = min(self._retry_delay * 2, RESUME_MAX_DELAY)

    def _reconnect(self) -> None:
        self._retry = None
        session = self.session
        if session is None or self._gone or self._loop is None:
            return
        conn = os.urandom(16)
        hello = {
            "conn": conn,
            "resume": {
                "sid": session.sid,
                "ack": session.delivered,
                "proof": resume_proof(session.secret, conn),
            },
        }
        if not self._open(hello) or self._stream is None:
            self._lost_link(self.error)
            return
        stream = self._stream
        stream.attach(self._loop, self._loop_readable)
        self._loop.call_later(ATTEMPT_SECONDS, self._attempt_over, stream)

    def _attempt_over(self, stream: _local.Stream) -> None:
        if self._stream is stream and not self._handshaken and not self._gone:
            self._lost_link(f"no answer within {ATTEMPT_SECONDS:.0f} s")

    def _give_up(self, reason: str) -> None:
        log.warning("%s", reason)
        self.close(0)
        if self._on_lost is not None:
            self._on_lost(reason)

    def close(self, linger_ms: int | None = None) -> None:
        """Close, trying for up to ``linger_ms`` (default: the constructor's) to send what
        is still queued."""
        linger = self._linger_ms if linger_ms is None else linger_ms
        self._gone = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.session is not None:
            self.session.stop_timer()
        stream = self._stream
        if stream is None:
            return
        if self._pending and linger > 0 and not stream.closed:
            # Messages wait for the WELCOME (tcp): wait for it too, within the linger.
            deadline = time.monotonic() + linger / 1000
            while self._pending and not stream.closed and not stream.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.pump(left)
            linger = max(0, int((deadline - time.monotonic()) * 1000))
        stream.close(linger)
