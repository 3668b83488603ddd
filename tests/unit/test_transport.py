"""Listener and Connection over real sockets: ipc:// (Unix stream sockets) and tcp:// (TCP
sockets), one framing.

Every attack is followed by proof that it was read and refused (the transport's rejection
log), and that the listener still serves a good client. Nothing sleeps: the test drives an
IOLoop itself until a condition holds or a deadline passes.
"""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from shoal import _config, _local_transport, _protocol, _transport
from shoal._ioloop import IOLoop
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


def record_writes(monkeypatch: pytest.MonkeyPatch, conn: Connection) -> list[list[bytes]]:
    """From now on, a copy of every frame list ``conn`` writes to its socket: exactly what
    goes on the wire (sealed, on tcp), in order."""
    sent: list[list[bytes]] = []
    stream = conn._stream
    real = _local_transport.Stream.write

    def write(self: Any, frames: Any) -> None:
        if self is stream:
            sent.append([bytes(f) for f in frames])
        real(self, frames)

    monkeypatch.setattr(_local_transport.Stream, "write", write)
    return sent


def wire(frames: list[bytes]) -> bytes:
    """``frames`` as the local transport puts them on a Unix socket."""
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames)) + b"".join(frames)


def unwire(data: bytes) -> list[list[bytes]]:
    messages = []
    while data:
        (count,) = struct.unpack_from("<I", data)
        lens = struct.unpack_from(f"<{count}I", data, 4)
        pos = 4 + 4 * count
        frames = []
        for n in lens:
            frames.append(data[pos : pos + n])
            pos += n
        messages.append(frames)
        data = data[pos:]
    return messages


class RawPeer:
    """A bare Unix or TCP socket: sends framed messages or any bytes, keeps what comes back."""

    def __init__(self, address: str, loop: IOLoop) -> None:
        if address.startswith("ipc://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address[len("ipc://") :])
        else:
            host, port = address[len("tcp://") :].rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)))
        self.sock.setblocking(False)
        self.data = b""
        self.eof = False
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, frames: list[bytes]) -> None:
        self.send_bytes(wire(frames))

    def send_bytes(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    @property
    def received(self) -> list[list[bytes]]:
        return unwire(self.data)

    def _readable(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            self.loop.remove_reader(self.sock.fileno())
        self.data += chunk

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Server:
    """A Listener whose application echoes PUSH_TASK and, like the runtime, unpickles frames."""

    def __init__(self, ctx: Any, address: str, loop: IOLoop) -> None:
        self.hellos: list[dict[str, Any]] = []
        self.messages: list[Message] = []
        self.listener = Listener(ctx, Signer(KEY), self._on_hello, self._on_message)
        self.address = self.listener.bind(address)
        self.listener.attach(loop)

    def _on_hello(self, peer: bytes, body: dict[str, Any]) -> dict[str, Any]:
        self.hellos.append(body)
        # A session is resumable only when the HELLO asked for it too (Connection(resumable)).
        return {"greeting": "welcome", "resumable": True}

    def _on_message(self, peer: bytes, msg: Message) -> None:
        self.messages.append(msg)
        if msg.frames and msg.type != MsgType.LOG_LINES:
            deserialize(msg.frames[0], list(msg.frames[1:]))
        if msg.type == MsgType.PUSH_TASK:
            self.listener.send(peer, Message(MsgType.TASK_DONE, {"echo": msg.body}))
        elif msg.type == MsgType.LOG_LINES:  # echoes the frames too
            self.listener.send(peer, Message(MsgType.LOG_LINES, msg.body, msg.frames))

    def payloads(self) -> list[Any]:
        return [m.body.get("p") for m in self.messages if isinstance(m.body, dict)]


class Env:
    """One server and the clients of a test, all driven by one IOLoop in this thread."""

    def __init__(self, ctx: Any, address: str) -> None:
        self.ctx = ctx
        self.loop = IOLoop()
        # Both carriers frame alike now (tcp no longer uses zmq): a bad message ends the
        # connection on either.
        self.framed = True
        # After the handshake, tcp messages are sealed (AES-GCM), ipc ones signed (HMAC).
        self.tcp = address.startswith("tcp://")
        self.server = Server(ctx, address, self.loop)
        self.address = self.server.address
        self.conns: list[Connection] = []
        self.raws: list[Any] = []
        self.rejects = RejectLog()

    def connect(
        self, key: bytes = KEY, signer: Signer | None = None
    ) -> tuple[Connection, list[Message]]:
        got: list[Message] = []
        conn = Connection(
            self.ctx, signer or Signer(key), self.address, {"role": "test"}, got.append
        )
        conn.attach(self.loop)
        self.conns.append(conn)
        return conn, got

    def raw(self) -> Any:
        peer = RawPeer(self.address, self.loop)
        self.raws.append(peer)
        return peer

    def pump(self, until: Callable[[], Any], timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met within {timeout}s; rejections: {self.rejects.lines}"
                )
            self.loop.run_once(50)

    def settle(self) -> None:
        """Run the loop until nothing more happens for a moment."""
        for _ in range(5):
            self.loop.run_once(10)

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
        for conn in self.conns:
            conn.close()
        for raw in self.raws:
            raw.close()
        self.server.listener.close()
        self.loop.close()


@pytest.fixture
def ipc_dir(tmp_path: Path) -> Iterator[Path]:
    # A unix socket path must stay below ~107 bytes; pytest's tmp_path usually does.
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="shoal-ut-", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


def _make_env(
    request: pytest.FixtureRequest, ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    ctx = None
    address = f"ipc://{ipc_dir}/listener.sock" if request.param == "ipc" else "tcp://127.0.0.1:*"
    environment = Env(ctx, address)
    monkeypatch.setattr(_transport, "_reject_log", environment.rejects)
    try:
        yield environment
    finally:
        environment.close()


@pytest.fixture(params=["ipc", "tcp"])
def env(request: pytest.FixtureRequest, ipc_dir: Path, monkeypatch: pytest.MonkeyPatch):
    yield from _make_env(request, ipc_dir, monkeypatch)


@pytest.fixture(params=["ipc"])
def ipc_env(request: pytest.FixtureRequest, ipc_dir: Path, monkeypatch: pytest.MonkeyPatch):
    yield from _make_env(request, ipc_dir, monkeypatch)


@pytest.fixture(params=["tcp"])
def tcp_env(request: pytest.FixtureRequest, ipc_dir: Path, monkeypatch: pytest.MonkeyPatch):
    yield from _make_env(request, ipc_dir, monkeypatch)


def _good(env: Env) -> tuple[Connection, list[Message]]:
    conn, got = env.connect()
    env.handshake(conn)
    return conn, got


@pytest.fixture
def good(env: Env) -> tuple[Connection, list[Message]]:
    return _good(env)


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


def test_large_messages_both_ways_while_the_loop_serves_both_ends(env, good):
    # Far more than a socket buffer holds: writes are partial, the rest waits for POLLOUT,
    # and the reader fills each large frame in place.
    conn, got = good
    big = [os.urandom(1 << 20) * 24, bytes(range(256)) * 40_000, os.urandom(100)]
    conn.send(Message(MsgType.LOG_LINES, {"p": "big"}, big))
    env.pump(lambda: any(m.type == MsgType.LOG_LINES for m in got), timeout=20)
    (echo,) = [m for m in got if m.type == MsgType.LOG_LINES]
    assert [bytes(f) for f in echo.frames] == big
    env.round_trip(conn, got, "after the big one")


def test_a_burst_of_messages_arrives_complete_and_in_order(env, good):
    conn, got = good
    for n in range(5000):
        conn.send(Message(MsgType.PUSH_TASK, {"p": n}))
    env.pump(lambda: len(got) >= 5000, timeout=20)
    assert [m.body["echo"]["p"] for m in got] == list(range(5000))
    assert env.rejects.lines == []


def test_messages_left_in_the_read_buffer_after_a_budget_are_still_delivered(ipc_env, monkeypatch):
    # One recv takes everything, more messages than one readable call handles (1000): poll
    # does not report bytes already read, so the rest must be picked up without it.
    monkeypatch.setattr(_local_transport, "READ_BUFFER", 1 << 20)
    conn, got = _good(ipc_env)
    for n in range(1500):
        conn.send(Message(MsgType.PUSH_TASK, {"p": n}))
    ipc_env.pump(lambda: len(got) >= 1500)
    assert [m.body["echo"]["p"] for m in got] == list(range(1500))


def test_the_listener_notices_a_closed_local_connection(ipc_env):
    conn, got = _good(ipc_env)
    assert len(ipc_env.server.listener.peers) == 1
    conn.close()
    ipc_env.pump(lambda: not ipc_env.server.listener.peers)
    assert ipc_env.server.listener._streams == {}
    assert ipc_env.rejects.lines == []
    ipc_env.assert_still_serving()


def test_a_connection_notices_its_listener_closed_and_sends_nowhere(ipc_env):
    conn, got = _good(ipc_env)
    ipc_env.server.listener.close()
    ipc_env.pump(lambda: conn.closed)
    conn.send(Message(MsgType.PUSH_TASK, {"p": "into the void"}))  # no error
    assert ipc_env.rejects.lines == []


def test_a_missing_socket_is_reported_to_on_refused(ipc_env, ipc_dir):
    refused: list[str] = []
    conn = Connection(
        ipc_env.ctx,
        Signer(KEY),
        f"ipc://{ipc_dir}/nobody.sock",
        {"role": "test"},
        lambda msg: None,
        refused.append,
    )
    assert conn.closed and "nobody.sock" in conn.error
    conn.attach(ipc_env.loop)
    ipc_env.pump(lambda: refused)
    assert "cannot connect" in refused[0]
    conn.send(Message(MsgType.PUSH_TASK, {"p": 1}))  # dropped, no error


def test_the_socket_file_is_private(ipc_env, ipc_dir):
    mode = os.stat(ipc_dir / "listener.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_one_listener_serves_ipc_and_tcp_at_once(ipc_env):
    tcp = ipc_env.server.listener.bind("tcp://127.0.0.1:*")
    assert tcp.startswith("tcp://127.0.0.1:")
    conns = []
    for address in (ipc_env.address, tcp):
        got: list[Message] = []
        conn = Connection(ipc_env.ctx, Signer(KEY), address, {"role": "test"}, got.append)
        conn.attach(ipc_env.loop)
        ipc_env.conns.append(conn)
        conns.append((conn, got))
    for n, (conn, got) in enumerate(conns):
        ipc_env.handshake(conn)
        ipc_env.round_trip(conn, got, f"over {n}")
    peers = list(ipc_env.server.listener.peers)
    # The listener numbers its peers itself, whatever the carrier.
    assert len(peers) == 2 and {p[0] for p in peers} == {1} and len(set(peers)) == 2


# -- peers without the key ------------------------------------------------------------------


def test_a_connection_with_another_key_is_never_accepted(env, good):
    bad, bad_got = env.connect(OTHER_KEY)
    bad.send(Message(MsgType.PUSH_TASK, {"p": "from the wrong key"}))
    if env.framed:
        # Its HELLO is refused and its connection closed: the message goes nowhere.
        env.wait_rejections(1, "signature mismatch")
        env.pump(lambda: bad.closed)
    else:
        env.wait_rejections(2, "signature mismatch")  # its HELLO and its message
        assert bad.sock.poll(0) == 0  # it is told nothing either
    assert len(env.server.hellos) == 1  # only the good client's
    assert "from the wrong key" not in env.server.payloads()
    assert bad.welcome is None and bad_got == []

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
    if how == "flipped byte":
        flipped = bytearray(head)
        flipped[len(flipped) // 2] ^= 0x01
        return [bytes(flipped), *captured[1:]]
    raise AssertionError(how)


FRAME_GARBAGE = [
    "random bytes",
    "random frames",
    "http request",
    "http request in three frames",
    "magic only",
    "truncated signature",
    "truncated header",
    "zero signature",
    "flipped byte",
]


@pytest.mark.parametrize("how", FRAME_GARBAGE)
def test_garbage_frames_from_a_raw_socket_are_refused_and_the_listener_keeps_serving(env, how):
    # Well-framed for the carrier (zmq frames, or the local length prefixes), bad inside.
    recorder = RecordingSigner(KEY)
    conn, got = env.connect(signer=recorder)
    env.handshake(conn)
    captured_hello = recorder.sent[0]

    raw = env.raw()
    raw.send(_garbage(how, captured_hello))
    env.wait_rejections(1, "dropped a message from peer")
    assert len(env.server.hellos) == 1 and env.server.messages == []
    if env.framed:
        env.pump(lambda: raw.eof)  # dropped: its connection is closed
    assert raw.received == []

    env.round_trip(conn, got, f"after {how}")
    env.assert_still_serving()


def _stream_garbage(how: str) -> bytes:
    if how == "random bytes":
        # The first 4 bytes are a frame count; make sure it is out of range.
        return b"\xff\xff\xff\xff" + os.urandom(300)
    if how == "http request":
        return HTTP_REQUEST + os.urandom(512)
    if how == "2 GiB frame":
        return struct.pack("<II", 1, 2**31) + b"x" * 100
    if how == "4 GiB - 1 frame":
        return struct.pack("<II", 1, 2**32 - 1) + b"x" * 100
    if how == "too many frames":
        count = _config.MAX_FRAMES + 1
        return struct.pack(f"<{count + 1}I", count, *([1] * count)) + b"x" * count
    if how == "zero frames":
        return struct.pack("<I", 0) + b"x" * 10
    if how == "1 MiB before authentication":
        return struct.pack("<II", 1, 1 << 20) + b"x" * 1000
    if how == "many frames before authentication":
        count = _config.MAX_FRAMES  # allowed, but their 16 bytes each are too much
        return struct.pack(f"<{count + 1}I", count, *([16] * count))
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "random bytes",
        "http request",
        "2 GiB frame",
        "4 GiB - 1 frame",
        "too many frames",
        "zero frames",
        "1 MiB before authentication",
        "many frames before authentication",
    ],
)
def test_a_broken_stream_is_closed_before_anything_large_is_allocated(ipc_env, how, monkeypatch):
    env = ipc_env
    conn, got = _good(env)
    allocated: list[int] = []
    real = builtins.bytearray
    monkeypatch.setattr(
        _local_transport, "bytearray", lambda n=0: allocated.append(n) or real(n), raising=False
    )
    raw = env.raw()
    raw.send_bytes(_stream_garbage(how))
    env.wait_rejections(1, "dropped a message from peer")
    env.pump(lambda: raw.eof)
    assert raw.received == [] and env.server.messages == []
    assert allocated and all(n <= _local_transport.READ_BUFFER for n in allocated)

    env.round_trip(conn, got, f"after {how}")
    env.assert_still_serving()


def test_a_truncated_message_then_close_is_logged_and_forgotten(ipc_env):
    env = ipc_env
    raw = env.raw()
    raw.send_bytes(struct.pack("<II", 1, 1000) + b"x" * 10)
    env.settle()
    assert len(env.server.listener._streams) == 1  # waits for the rest, holding 10 bytes
    raw.close()
    env.wait_rejections(1, "closed in the middle of a message")
    env.pump(lambda: not env.server.listener._streams)
    env.assert_still_serving()


def test_rejections_are_logged_at_a_bounded_rate(ipc_env, monkeypatch, caplog):
    env = ipc_env
    # The real rate-limited log this time, with a fresh window.
    monkeypatch.setattr(_transport, "_reject_log", _transport.RateLimitedLog(_transport.log))
    with caplog.at_level("WARNING", logger=_transport.log.name):
        raws = [env.raw() for _ in range(20)]
        for raw in raws:
            raw.send_bytes(HTTP_REQUEST)
        env.pump(lambda: all(raw.eof for raw in raws))
    dropped = [r for r in caplog.records if "dropped a message" in r.getMessage()]
    assert len(dropped) == 5
    env.assert_still_serving()


# -- replay ---------------------------------------------------------------------------------


def test_a_replayed_hello_from_a_new_socket_is_refused(env, monkeypatch):
    recorder = RecordingSigner(KEY)
    conn, got = env.connect(signer=recorder)
    env.handshake(conn)
    writes = record_writes(monkeypatch, conn)
    env.round_trip(conn, got, "original")
    hello, data = recorder.sent[0], writes[0]

    raw = env.raw()
    raw.send(hello)
    raw.send(data)
    env.wait_rejections(1, "replayed HELLO")
    if env.framed:
        env.pump(lambda: raw.eof)  # refused, then closed: the data message is never read
    else:
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


def _inject(conn: Connection, frames: list[bytes]) -> None:
    """Send raw frames on ``conn``'s own socket, behind the transport's back."""
    if conn._stream is not None:
        conn._stream.write(frames)
    else:
        conn.sock.send_multipart(frames)


def test_a_replayed_message_on_its_own_connection_is_dropped(env, monkeypatch):
    conn, got = env.connect()
    env.handshake(conn)
    writes = record_writes(monkeypatch, conn)
    env.round_trip(conn, got, "once")
    replay = writes[0]

    _inject(conn, replay)
    env.wait_rejections(1, "replayed or reordered")
    assert env.server.payloads() == ["once"]
    # A peer that breaks the rules is forgotten, and the listener serves everyone else.
    assert env.server.listener.peers == {}
    if env.framed:
        env.pump(lambda: conn.closed)
    env.assert_still_serving()


def test_a_flipped_byte_in_a_later_message_drops_the_peer(env):
    conn, got = env.connect()
    env.handshake(conn)
    env.round_trip(conn, got, "before")
    msg = Message(MsgType.PUSH_TASK, {"p": "flipped"})
    if env.tcp:  # sealed, as the connection would seal its next message
        good_next = conn._sealer.seal(msg, conn._send_seq + 1)
    else:
        good_next = Signer(KEY).encode(msg, conn._send_seq + 1)
    flipped = bytearray(good_next[0])
    flipped[-2] ^= 0x01
    _inject(conn, [bytes(flipped)])
    env.wait_rejections(1, "authentication failed" if env.tcp else "signature mismatch")
    assert "flipped" not in env.server.payloads()
    assert env.server.listener.peers == {}
    env.assert_still_serving()


# -- size limits ----------------------------------------------------------------------------


def test_a_message_with_more_than_max_frames_is_refused_and_drained(tcp_env):
    env = tcp_env
    conn, got = _good(env)
    raw = env.raw()
    raw.send([b"x"] * (_config.MAX_FRAMES + 1))
    env.wait_rejections(1, f"{_config.MAX_FRAMES + 1} frames (at most {_config.MAX_FRAMES})")
    env.pump(lambda: raw.eof)  # the length table alone is refused: the connection is dropped
    assert env.server.messages == []
    env.round_trip(conn, got, "after too many frames")
    env.assert_still_serving()


def test_even_a_signed_message_may_not_exceed_max_frames(env, monkeypatch):
    conn, got = _good(env)
    # Every buffer its own frame (small ones normally ride inside the header).
    monkeypatch.setattr(_protocol, "SMALL_BUFFER", -1)
    too_many = Message(MsgType.PUT_OBJECT, {"p": "too many"}, [b"b"] * _config.MAX_FRAMES)
    conn.send(too_many)  # header frame + buffers = MAX_FRAMES + 1
    env.wait_rejections(1, "frames")
    assert "too many" not in env.server.payloads()

    if env.framed:  # that connection was closed; a new one may go up to the limit
        env.pump(lambda: conn.closed)
        conn, got = _good(env)
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


def test_an_authenticated_peer_may_send_frames_up_to_max_frame_size(ipc_env, monkeypatch):
    env = ipc_env
    monkeypatch.setattr(_config, "MAX_FRAME_SIZE", 200_000)
    conn, got = _good(env)  # its stream is made with the patched limit
    ok = pickle.dumps(b"y" * 150_000, protocol=5)
    conn.send(Message(MsgType.PUT_OBJECT, {"p": "fits"}, [b"x" * 150_000, ok]))
    env.pump(lambda: "fits" in env.server.payloads())
    conn.send(Message(MsgType.PUT_OBJECT, {"p": "too big"}, [b"x" * 200_001]))
    env.wait_rejections(1, "a frame of 200001 bytes")
    assert "too big" not in env.server.payloads()
    env.assert_still_serving()


# -- the connecting side --------------------------------------------------------------------


def test_a_connection_drops_a_listener_that_sends_garbage(ipc_dir, monkeypatch):
    rejects = RejectLog()
    monkeypatch.setattr(_transport, "_reject_log", rejects)
    path = str(ipc_dir / "fake.sock")
    server = _local_transport.listen(path)
    loop = IOLoop()
    got: list[Message] = []
    conn = Connection(None, Signer(KEY), f"ipc://{path}", {}, got.append)
    conn.attach(loop)
    try:
        server.setblocking(True)
        peer = _local_transport.accept(server)
        peer.sendall(struct.pack("<II", 1, 1 << 20) + os.urandom(100))  # before any WELCOME
        deadline = time.monotonic() + DEADLINE
        while not conn.closed and time.monotonic() < deadline:
            loop.run_once(50)
        assert conn.closed and got == [] and conn.welcome is None
        assert rejects.count("before authentication") == 1
        peer.close()
    finally:
        conn.close()
        server.close()
        loop.close()


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
    # Not signed at all, from a raw socket (a new one each time: a local listener closes
    # the connection of a peer that broke the rules).
    header = msgpack.packb(
        (int(MsgType.PUT_OBJECT), 2, {"p": "evil"}, [payload]), use_bin_type=True
    )
    env.raw().send([MAGIC + os.urandom(32) + header, payload])
    env.raw().send([MAGIC + b"\x00" * 32 + header])
    env.wait_rejections(3, "signature mismatch")
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


# -- tcp: sealed messages --------------------------------------------------------------------


def test_tcp_messages_are_sealed_and_ipc_ones_only_signed(env, monkeypatch):
    conn, got = _good(env)
    writes = record_writes(monkeypatch, conn)
    marker = b"a marker in clear text"
    conn.send(Message(MsgType.LOG_LINES, {"p": "marked"}, [marker * 10, marker * 5000]))
    env.pump(lambda: any(m.type == MsgType.LOG_LINES for m in got))
    (echo,) = [m for m in got if m.type == MsgType.LOG_LINES]
    assert [bytes(f) for f in echo.frames] == [marker * 10, marker * 5000]
    sent = b"".join(b"".join(frames) for frames in writes)
    assert (marker in sent) is (not env.tcp)
    assert (b"marked" in sent) is (not env.tcp)


def test_a_sealed_message_with_a_flipped_byte_in_a_large_frame_is_dropped(tcp_env):
    env = tcp_env
    conn, got = _good(env)
    frames = conn._sealer.seal(
        Message(MsgType.PUT_OBJECT, {"p": "flipped"}, [pickle.dumps(0), os.urandom(100_000)]),
        conn._send_seq + 1,
    )
    assert len(frames) == 2  # the large buffer is a frame of its own
    big = bytearray(frames[1])
    big[50_000] ^= 0x01
    _inject(conn, [frames[0], bytes(big)])
    env.wait_rejections(1, "authentication failed")
    assert "flipped" not in env.server.payloads()
    env.pump(lambda: conn.closed)
    env.assert_still_serving()


# -- resumable sessions ----------------------------------------------------------------------


def _resumable(env: Env) -> tuple[Connection, list[Message], list[str]]:
    got: list[Message] = []
    lost: list[str] = []
    conn = Connection(
        env.ctx,
        Signer(KEY),
        env.address,
        {"role": "resumer"},
        got.append,
        resumable=True,
        on_lost=lost.append,
    )
    conn.attach(env.loop)
    env.conns.append(conn)
    env.handshake(conn)
    assert conn.session is not None
    return conn, got, lost


def _peer_of(env: Env) -> bytes:
    [peer] = [p for p, st in env.server.listener.peers.items() if st.session is not None]
    return peer


def _reset(sock: Any) -> None:
    """Close with an RST: SO_LINGER on, with a zero timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("side", ["listener", "connection"])
def test_a_session_resumes_after_a_reset_without_loss_or_duplicates(tcp_env, side):
    env = tcp_env
    conn, got, lost = _resumable(env)
    peer = _peer_of(env)
    listener = env.server.listener
    for n in range(100):
        conn.send(Message(MsgType.PUSH_TASK, {"p": n}))
    env.pump(lambda: len(got) == 100)

    if side == "listener":  # the listener's end noticed first (and resets the other)
        _reset(listener._streams[peer].sock)
        listener._drop(peer)
    else:  # the connecting end did: the listener learns of it from the resuming HELLO
        _reset(conn._stream.sock)
        conn._lost_link("a test reset")
    assert conn.session is not None and not conn.closed
    # Both sides keep sending meanwhile: nothing is lost.
    for n in range(100, 150):
        conn.send(Message(MsgType.PUSH_TASK, {"p": n}))
    for n in range(10):
        assert listener.send(peer, Message(MsgType.LOG_LINES, {"pushed": n}))

    env.pump(lambda: len([m for m in got if m.type == MsgType.TASK_DONE]) == 150, timeout=10)
    env.pump(lambda: len([m for m in got if m.type == MsgType.LOG_LINES]) == 10)
    assert env.server.payloads() == list(range(150))  # each once, in order
    assert [m.body["echo"]["p"] for m in got if m.type == MsgType.TASK_DONE] == list(range(150))
    assert [m.body["pushed"] for m in got if m.type == MsgType.LOG_LINES] == list(range(10))
    assert _peer_of(env) == peer and len(env.server.hellos) == 1  # the same peer, no new HELLO
    assert lost == []
    # Acknowledgements empty both sides' outboxes.
    state = listener.peers[peer]
    env.pump(lambda: not conn.session.outbox and state.session and not state.session.outbox)


def test_a_session_the_listener_forgot_cannot_resume(tcp_env):
    env = tcp_env
    conn, got, lost = _resumable(env)
    peer = _peer_of(env)
    _reset(env.server.listener._streams[peer].sock)
    env.server.listener._drop(peer)
    env.server.listener.forget(peer)  # the application's grace period ran out
    conn.send(Message(MsgType.PUSH_TASK, {"p": "too late"}))
    env.pump(lambda: lost)
    assert "refused to resume" in lost[0] and "no such session" in lost[0]
    assert conn.closed
    env.wait_rejections(1, "no such session")
    assert "too late" not in env.server.payloads()
    env.assert_still_serving()


def test_a_resume_needs_the_proof_of_its_session(tcp_env):
    env = tcp_env
    conn, got, lost = _resumable(env)
    peer = _peer_of(env)
    session = conn.session
    raw = env.raw()
    forged = {
        "conn": os.urandom(16),
        **_transport.version_info(),
        "resume": {"sid": session.sid, "ack": session.delivered, "proof": os.urandom(32)},
    }
    raw.send(Signer(KEY).encode(Message(MsgType.HELLO, forged), 1))
    env.wait_rejections(1, "without a valid proof")
    env.pump(lambda: raw.eof)
    reply, _ = Signer(KEY).decode(raw.received[0])
    assert reply.type == MsgType.REFUSED
    # The real session is untouched and still works.
    assert env.server.listener._streams[peer] is not None
    conn.send(Message(MsgType.PUSH_TASK, {"p": "still mine"}))
    env.pump(lambda: "still mine" in env.server.payloads())
    assert lost == []


def test_a_burst_of_large_sealed_messages_arrives_intact(tcp_env):
    # Sealed large frames go out from send buffers used again once sent: a burst queues
    # more of them than are kept, and none may be overwritten while it waits.
    env = tcp_env
    conn, got = _good(env)
    chunks = [bytes([i]) * (2 << 20) + os.urandom(64) for i in range(12)]
    for i, chunk in enumerate(chunks):
        conn.send(Message(MsgType.LOG_LINES, {"p": i}, [chunk]))
    env.pump(lambda: len([m for m in got if m.type == MsgType.LOG_LINES]) == 12, timeout=20)
    echoes = [m for m in got if m.type == MsgType.LOG_LINES]
    assert [m.body["p"] for m in echoes] == list(range(12))
    assert [bytes(m.frames[0]) for m in echoes] == chunks
