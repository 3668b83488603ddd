"""Authenticated connections over zmq: a ``Listener`` (ROUTER) and a ``Connection`` (DEALER).

The transport moves frames and enforces the protocol's rules before anything reaches the
application: size and frame-count bounds, the HMAC signature, the HELLO/WELCOME handshake
with version checks, and rising sequence numbers. A peer that breaks a rule is dropped
(forgotten) and logged at a bounded rate; the process keeps serving everyone else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import zmq

from . import _config
from ._protocol import Message, MsgType, ProtocolError, Signer

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


def configure_socket(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, _config.MAX_FRAME_SIZE)
    # No high-water marks: a ROUTER silently drops at its HWM, which would lose results.
    # Flow control is ours (bounded tasks in flight), so memory stays bounded anyway.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)


_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def recv_frames(sock: zmq.Socket[Any], max_frames: int, small: int = 1) -> list[Any] | None:
    """One multipart message without blocking, or None when none is waiting.

    The first ``small`` frames (routing id, header) come as bytes, which is cheaper for
    small frames; later ones (buffers) as zero-copy zmq Frames. Reads frame by frame so
    that a message with too many frames is drained and refused without holding all of
    them. Raises ProtocolError for such a message.
    """
    try:
        first = sock.recv(_NOBLOCK)
    except zmq.Again:
        return None
    frames: list[Any] = [first]
    too_many = False
    more = sock.getsockopt(_RCVMORE)
    while more:
        if len(frames) < small:
            frame: Any = sock.recv()
            more = sock.getsockopt(_RCVMORE)
        else:
            frame = sock.recv(copy=False)
            more = frame.more
        if len(frames) < max_frames:
            frames.append(frame)
        else:
            too_many = True
    if too_many:
        raise ProtocolError(f"more than {max_frames} frames in one message")
    return frames


class _PeerState:
    __slots__ = ("conn_id", "info", "recv_seq", "send_seq")

    def __init__(self, conn_id: bytes, info: dict[str, Any]) -> None:
        self.conn_id = conn_id
        self.info = info
        self.recv_seq = 0
        self.send_seq = 0


# Connection ids accepted by this process. Invariant: a HELLO or WELCOME whose id is in here
# is a replay and is refused.
_seen_conn_ids: set[bytes] = set()


OnHello = Callable[[bytes, dict[str, Any]], dict[str, Any]]
OnMessage = Callable[[bytes, Message], None]


class Listener:
    """A ROUTER socket that accepts authenticated peers.

    ``on_hello(peer, body)`` returns the WELCOME body or raises ProtocolError to refuse;
    ``on_message(peer, msg)`` gets every later verified message of an accepted peer.
    """

    def __init__(
        self, ctx: zmq.Context[Any], signer: Signer, on_hello: OnHello, on_message: OnMessage
    ) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        configure_socket(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._signer = signer
        self._on_hello = on_hello
        self._on_message = on_message
        self.peers: dict[bytes, _PeerState] = {}
        self.endpoints: list[str] = []

    def bind(self, address: str) -> str:
        self.sock.bind(address)
        endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoints.append(endpoint)
        return endpoint

    def forget(self, peer: bytes) -> None:
        self.peers.pop(peer, None)

    def send(self, peer: bytes, msg: Message) -> bool:
        """Send to an accepted peer; False when that peer is gone."""
        state = self.peers.get(peer)
        if state is None:
            return False
        state.send_seq += 1
        try:
            frames = self._signer.encode(msg, state.send_seq)
            # Copying is cheaper than zero-copy bookkeeping for a lone small frame.
            self.sock.send_multipart([peer, *frames], copy=len(frames) == 1)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.forget(peer)
                return False
            raise
        return True

    def handle_readable(self, budget: int = 1000) -> None:
        """Read and dispatch up to ``budget`` messages (fairness to other sockets)."""
        for _ in range(budget):
            try:
                frames = recv_frames(self.sock, _config.MAX_FRAMES + 1, small=2)
            except ProtocolError as exc:
                _reject_log.warning("dropped a message: %s", exc)
                continue
            if frames is None:
                return
            peer = frames[0]
            self._dispatch(peer, frames[1:])

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
            refusal = Message(MsgType.REFUSED, {"reason": str(exc), **version_info()})
            try:
                self.sock.send_multipart([peer, *self._signer.encode(refusal, 1)], copy=False)
            except zmq.ZMQError:
                pass
            return
        state = _PeerState(conn_id, msg.body)
        state.recv_seq = seq
        self.peers[peer] = state
        my_conn = os.urandom(16)
        self.send(peer, Message(MsgType.WELCOME, {"conn": my_conn, **version_info(), **welcome}))

    def close(self) -> None:
        self.sock.close(linger=0)


class Connection:
    """A DEALER socket to one Listener. Sends HELLO at once; expects WELCOME first."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        signer: Signer,
        address: str,
        hello: dict[str, Any],
        on_message: Callable[[Message], None],
        on_refused: Callable[[str], None] | None = None,
        linger_ms: int = 0,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        configure_socket(self.sock)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.address = address
        self._signer = signer
        self._on_message = on_message
        self._on_refused = on_refused
        self._send_seq = 0
        self._recv_seq = 0
        self.welcome: dict[str, Any] | None = None
        self.sock.connect(address)
        self.send(Message(MsgType.HELLO, {"conn": os.urandom(16), **version_info(), **hello}))

    def send(self, msg: Message) -> None:
        self._send_seq += 1
        frames = self._signer.encode(msg, self._send_seq)
        self.sock.send_multipart(frames, copy=len(frames) == 1)

    def handle_readable(self, budget: int = 1000) -> None:
        for _ in range(budget):
            try:
                frames = recv_frames(self.sock, _config.MAX_FRAMES)
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from %s: %s", self.address, exc)
                continue
            if frames is None:
                return
            try:
                msg, seq = self._signer.decode(frames)
            except ProtocolError as exc:
                _reject_log.warning("dropped a message from %s: %s", self.address, exc)
                continue
            if seq <= self._recv_seq:
                _reject_log.warning("dropped a replayed message from %s", self.address)
                continue
            self._recv_seq = seq
            if self.welcome is None:
                if msg.type == MsgType.WELCOME and isinstance(msg.body, dict):
                    conn_id = msg.body.get("conn")
                    if not isinstance(conn_id, bytes) or conn_id in _seen_conn_ids:
                        continue
                    _seen_conn_ids.add(conn_id)
                    self.welcome = msg.body
                    continue
                if msg.type == MsgType.REFUSED and self._on_refused is not None:
                    self._on_refused(str((msg.body or {}).get("reason", "refused")))
                continue
            self._on_message(msg)

    def close(self) -> None:
        self.sock.close()
