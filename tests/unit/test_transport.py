"""Listener and Connection over real zmq sockets (ipc:// in a temporary directory).

Every attack is followed by proof that it was read and refused (the transport's rejection
log), and that the listener still serves a good client. Nothing sleeps: the test pumps the
sockets itself until a condition holds or a deadline passes.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from shoal import _config, _protocol, _transport
from shoal._protocol import MAGIC, Message, MsgType, Signer
from shoal._serialization import deserialize
from shoal._transport import Connection, Listener

pytestmark = pytest.mark.timeout(30)

KEY = b"K" * 32
OTHER_KEY = b"O" * 32
DEADLINE = 5.0


class RejectLog:
    """Stands in for the transport's rate-limited log, so that every rejection is seen."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)

    def count(self, text: str = "") -> int:
        return sum(text in line for line in self.lines)


class RecordingSigner(Signer):
    """A Signer that keeps a copy of every frame list it encodes: exactly what was sent."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.sent: list[list[bytes]] = []

    def encode(self, msg: Message, seq: int) -> list[Any]:
        frames = super().encode(msg, seq)
        self.sent.append([bytes(f) for f in frames])
        return frames


class RawPeer:
    """A bare DEALER: sends whatever frames it is given, keeps whatever comes back."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.received: list[list[bytes]] = []

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def handle_readable(self) -> None:
        while self.sock.poll(0):
            self.received.append(self.sock.recv_multipart())


class Server:
    """A Listener whose application echoes PUSH_TASK and, like the runtime, unpickles frames."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.hellos: list[dict[str, Any]] = []
        self.messages: list[Message] = []
        self.listener = Listener(ctx, Signer(KEY), self._on_hello, self._on_message)
        self.address = self.listener.bind(address)

    def _on_hello(self, peer: bytes, body: dict[str, Any]) -> dict[str, Any]:
        self.hellos.append(body)
        return {"greeting": "welcome"}

    def _on_message(self, peer: bytes, msg: Message) -> None:
        self.messages.append(msg)
        if msg.frames:
            deserialize(msg.frames[0], list(msg.frames[1:]))
        if msg.type == MsgType.PUSH_TASK:
            self.listener.send(peer, Message(MsgType.TASK_DONE, {"echo": msg.body}))

    def payloads(self) -> list[Any]:
        return [m.body.get("p") for m in self.messages if isinstance(m.body, dict)]


class Env:
    """One server and the clients of a test; ``pump`` drives all their sockets."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.ctx = ctx
        self.server = Server(ctx, address)
        self.address = self.server.address
        self.peers: list[Any] = []
        self.rejects = RejectLog()

    def connect(
        self, key: bytes = KEY, signer: Signer | None = None
    ) -> tuple[Connection, list[Message]]:
        got: list[Message] = []
        conn = Connection(
            self.ctx, signer or Signer(key), self.address, {"role": "test"}, got.append
        )
        self.peers.append(conn)
        return conn, got

    def raw(self) -> RawPeer:
        peer = RawPeer(self.ctx, self.address)
        self.peers.append(peer)
        return peer

    def pump(self, until: Callable[[], Any], timeout: float = DEADLINE) -> None:
        poller = zmq.Poller()
        poller.register(self.server.listener.sock, zmq.POLLIN)
        by_sock = {}
        for peer in self.peers:
            poller.register(peer.sock, zmq.POLLIN)
            by_sock[peer.sock] = peer
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"condition not met within {timeout}s; rejections: {self.rejects.lines}"
                )
            for sock, _ in poller.poll(min(remaining, 0.05) * 1000):
                if sock is self.server.listener.sock:
                    self.server.listener.handle_readable()
                else:
                    by_sock[sock].handle_readable()

    def handshake(self, conn: Connection) -> None:
        self.pump(lambda: conn.welcome is not None)

    def round_trip(self, conn: Connection, got: list[Message], payload: Any) -> None:
        """Send ``payload`` from ``conn``; wait for the server to get it and echo it back."""
        conn.send(Message(MsgType.PUSH_TASK, {"p": payload}))
        self.pump(lambda: any(m.body == {"echo": {"p": payload}} for m in got))
        assert payload in self.server.payloads()

    def assert_still_serving(self) -> None:
        conn, got = self.connect()
        self.handshake(conn)
        self.round_trip(conn, got, f"still serving {len(self.server.hellos)}")

    def wait_rejections(self, count: int, text: str = "") -> None:
        self.pump(lambda: self.rejects.count(text) >= count)

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.server.listener.close()


@pytest.fixture
def ipc_dir(tmp_path: Path) -> Iterator[Path]:
    # A unix socket path must stay below ~107 bytes; pytest's tmp_path usually does.
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="shoal-ut-", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def env(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    ctx = zmq.Context()
    environment = Env(ctx, f"ipc://{ipc_dir}/listener.sock")
    monkeypatch.setattr(_transport, "_reject_log", environment.rejects)
    try:
        yield environment
    finally:
        environment.close()
        ctx.term()


@pytest.fixture
def good(env: Env) -> tuple[Connection, list[Message]]:
    conn, got = env.connect()
    env.handshake(conn)
    return conn, got


# -- the good path --------------------------------------------------------------------------


def test_handshake_then_messages_both_ways(env):
    conn, got = env.connect()
    env.handshake(conn)
    assert conn.welcome["greeting"] == "welcome"
    assert conn.welcome["proto"] == _transport.version_info()["proto"]
    (hello,) = env.server.hellos
    assert hello["role"] == "test" and len(hello["conn"]) == 16
    assert len(env.server.listener.peers) == 1

    for n in range(3):
        env.round_trip(conn, got, n)
    assert env.server.payloads() == [0, 1, 2]
    assert env.rejects.lines == []


def test_buffers_arrive_intact(env, good):
    conn, _ = good
    data = pickle.dumps(("value", 1), protocol=5)
    conn.send(Message(MsgType.PUT_OBJECT, {"p": "buffers"}, [data, b"\x00" * 100_000, b""]))
    env.pump(lambda: "buffers" in env.server.payloads())
    (msg,) = [m for m in env.server.messages if m.body == {"p": "buffers"}]
    assert [bytes(f) for f in msg.frames] == [data, b"\x00" * 100_000, b""]


# -- peers without the key ------------------------------------------------------------------


def test_a_connection_with_another_key_is_never_accepted(env, good):
    bad, bad_got = env.connect(OTHER_KEY)
    bad.send(Message(MsgType.PUSH_TASK, {"p": "from the wrong key"}))
    env.wait_rejections(2, "signature mismatch")  # its HELLO and its message
    assert len(env.server.hellos) == 1  # only the good client's
    assert "from the wrong key" not in env.server.payloads()
    assert bad.welcome is None and bad_got == []
    assert bad.sock.poll(0) == 0  # it is told nothing either

    env.round_trip(*good, "good client after a wrong key")
    env.assert_still_serving()


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\n\r\n"


def _garbage(how: str, captured: list[bytes]) -> list[bytes]:
    if how == "random bytes":
        return [os.urandom(200)]
    if how == "random frames":
        return [os.urandom(n) for n in (4, 32, 40, 1000)]
    if how == "http request":
        return [HTTP_REQUEST]
    if how == "http request in three frames":
        return HTTP_REQUEST.split(b"\r\n", 2)
    if how == "magic only":
        return [MAGIC]
    # The first frame is MAGIC | signature (32 bytes) | header.
    head = captured[0]
    if how == "truncated signature":
        return [head[: len(MAGIC) + 20], *captured[1:]]
    if how == "truncated header":
        return [head[:-1], *captured[1:]]
    if how == "zero signature":
        return [MAGIC + b"\x00" * 32 + head[len(MAGIC) + 32 :], *captured[1:]]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "random bytes",
        "random frames",
        "http request",
        "http request in three frames",
        "magic only",
        "truncated signature",
        "truncated header",
        "zero signature",
    ],
)
def test_garbage_from_a_raw_socket_is_refused_and_the_listener_keeps_serving(env, how):
    recorder = RecordingSigner(KEY)
    conn, got = env.connect(signer=recorder)
    env.handshake(conn)
    captured_hello = recorder.sent[0]

    raw = env.raw()
    raw.send(_garbage(how, captured_hello))
    env.wait_rejections(1, "dropped a message from peer")
    assert len(env.server.hellos) == 1 and env.server.messages == []
    assert raw.received == []

    env.round_trip(conn, got, f"after {how}")
    env.assert_still_serving()


def test_a_plain_unix_socket_speaking_http_does_not_disturb_the_listener(env, ipc_dir, good):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(ipc_dir / "listener.sock"))
        sock.sendall(HTTP_REQUEST + os.urandom(512))
    env.round_trip(*good, "after plain http")
    env.assert_still_serving()
    assert len(env.server.hellos) == 2


# -- replay ---------------------------------------------------------------------------------


def test_a_replayed_hello_from_a_new_socket_is_refused(env):
    recorder = RecordingSigner(KEY)
    conn, got = env.connect(signer=recorder)
    env.handshake(conn)
    env.round_trip(conn, got, "original")
    hello, data = recorder.sent[0], recorder.sent[1]

    raw = env.raw()
    raw.send(hello)
    raw.send(data)
    env.wait_rejections(1, "replayed HELLO")
    env.wait_rejections(1, "the first message must be HELLO")
    assert len(env.server.hellos) == 1
    assert env.server.payloads() == ["original"]
    assert len(env.server.listener.peers) == 1
    # The answer to the replay is a refusal, never a WELCOME.
    env.pump(lambda: raw.received)
    reply, _ = Signer(KEY).decode(raw.received[0])
    assert reply.type == MsgType.REFUSED and "replayed" in reply.body["reason"]

    env.round_trip(conn, got, "good client after replay")
    env.assert_still_serving()


def test_a_replayed_message_on_its_own_connection_is_dropped(env):
    recorder = RecordingSigner(KEY)
    conn, got = env.connect(signer=recorder)
    env.handshake(conn)
    env.round_trip(conn, got, "once")
    replay = recorder.sent[1]

    conn.sock.send_multipart(replay)
    env.wait_rejections(1, "replayed or reordered")
    assert env.server.payloads() == ["once"]
    # A peer that breaks the rules is forgotten, and the listener serves everyone else.
    assert env.server.listener.peers == {}
    env.assert_still_serving()


# -- size limits ----------------------------------------------------------------------------


def test_a_message_with_more_than_max_frames_is_refused_and_drained(env, good):
    raw = env.raw()
    raw.send([b"x"] * (_config.MAX_FRAMES + 1))
    env.wait_rejections(1, f"more than {_config.MAX_FRAMES + 1} frames")
    assert env.server.messages == []
    env.round_trip(*good, "after too many frames")
    env.assert_still_serving()


def test_even_a_signed_message_may_not_exceed_max_frames(env, good, monkeypatch):
    conn, got = good
    # Every buffer its own frame (small ones normally ride inside the header).
    monkeypatch.setattr(_protocol, "SMALL_BUFFER", -1)
    too_many = Message(MsgType.PUT_OBJECT, {"p": "too many"}, [b"b"] * _config.MAX_FRAMES)
    conn.send(too_many)  # header frame + buffers = MAX_FRAMES + 1
    env.wait_rejections(1, "frames in one message")
    assert "too many" not in env.server.payloads()

    at_limit = Message(
        MsgType.PUT_OBJECT,
        {"p": "at the limit"},
        [pickle.dumps(0)] + [b"b"] * (_config.MAX_FRAMES - 2),
    )
    conn.send(at_limit)
    env.pump(lambda: "at the limit" in env.server.payloads())
    (msg,) = [m for m in env.server.messages if m.body == {"p": "at the limit"}]
    assert len(msg.frames) == _config.MAX_FRAMES - 1
    env.round_trip(conn, got, "after the limits")


# -- no unpickling of unauthenticated data --------------------------------------------------


class WritesAFile:
    """Unpickling this creates ``path``: what an attacker's payload would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_a_pickle_in_an_unauthenticated_message_is_never_loaded(env, good, tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFile(str(target)), protocol=5)

    # Signed with another key.
    bad, _ = env.connect(OTHER_KEY)
    bad.send(Message(MsgType.PUT_OBJECT, {"p": "evil"}, [payload]))
    # Not signed at all, from a raw socket, both as a first message and after a HELLO.
    header = msgpack.packb(
        (int(MsgType.PUT_OBJECT), 2, {"p": "evil"}, [payload]), use_bin_type=True
    )
    raw = env.raw()
    raw.send([MAGIC + os.urandom(32) + header, payload])
    raw.send([MAGIC + b"\x00" * 32 + header])
    env.wait_rejections(4, "signature mismatch")
    assert not target.exists()
    assert "evil" not in env.server.payloads()

    # The control: the same payload from the good client IS loaded by the application, so
    # the checks above would have seen a file.
    control = tmp_path / "control"
    conn, _ = good
    conn.send(
        Message(
            MsgType.PUT_OBJECT,
            {"p": "control"},
            [pickle.dumps(WritesAFile(str(control)), protocol=5)],
        )
    )
    env.pump(lambda: "control" in env.server.payloads())
    assert control.exists()
    assert not target.exists()
