"""Hostile input at every tcp port of a two-machine cluster on loopback.

A head (``shoal start --head --port 0 --bind 127.0.0.1``) and a node that joins it
(``shoal start --address``, another SHOAL_TMPDIR: another machine, as far as Shoal can
tell) listen on tcp, and so does every worker of each (for callers on other nodes). Each
target below gets, at its tcp port:

- raw bytes over a plain socket: random bytes, an HTTP request, a truncated length table,
  a truncated frame (left open, and half-closed), and a frame length claiming 2 GiB
  followed by up to 64 MiB of body;
- messages in Shoal's framing over plain TCP sockets: unsigned ones and ones with a made-up signature that
  carry a pickle whose ``__reduce__`` creates a file, a PUSH_TASK carrying such pickles
  (function and argument) signed with a wrong key (on a new connection and on an
  authenticated one), a genuine HELLO replayed on its own connection and on another one
  (followed there by a genuinely signed PUSH_TASK carrying the pickle), a genuine message
  replayed, a genuine message with one byte flipped in a buffer frame, too many frames,
  an empty frame.

On tcp, every message after the handshake is sealed (AES-GCM, keys derived from the
cluster key and both connection ids): the test's ``Wire`` derives them as a genuine peer
does, so "genuine" messages are sealed ones, and a wrong key's are sealed with keys
derived from the wrong key.

After each attack: the target sent nothing at all (raw attacks) and closed the connection
where it must, or it closed the connection without a word after a message it dropped, or
it sent a REFUSED where a refusal is due (and then closed). The target process is
alive, its RSS grew by less than 50 MB after the 2 GiB claim, and after each target's
attacks real work runs through every tcp link of the cluster (tasks on both nodes, actor
calls across machines, an object pulled from the node). The pickle's file never appears.
Rejections are logged (SHOAL_LOG_LEVEL unset: warnings) at most 5 per 10 s per process,
and what was suppressed is counted in "N similar messages were suppressed" (that test
waits for a 10 s window to pass: most of this module's run time).

The targets are the head's port, the node's port, and the tcp port of an actor's worker on
each machine (a driver in this process, on the head's machine, calls them).

The last test shows a former hole is closed: over ZMTP, a peer that picked its own routing
id could make libzmq abort the process it connected to; now the listener numbers its
peers itself, so whatever a peer sends first, it chooses nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import re
import selectors
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import shoal
from shoal import testing
from shoal._protocol import MAGIC, Message, MsgType, Signer
from shoal._sealing import SessionKeys, session_keys
from shoal._session import read_key_file
from shoal._transport import version_info
from shoal.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(60)

M = MsgType
RSS_SLACK = 50 * 2**20
# How long a raw connection must stay silent (beyond the target's handshake) to pass.
QUIET_SECONDS = 0.3
# The limiter in _transport: this many lines per period, then a count of what it skipped.
LOG_BURST, LOG_PERIOD = 5, 10.0


# --------------------------------------------------------------------------- payloads


class OpensAFile:
    """Unpickling this creates ``path``: the proof that a payload was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class RunsACommand:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def frame(*frames: bytes) -> bytes:
    """Shoal's framing: frame count, each frame's length (u32 little-endian), the frames."""
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames)) + b"".join(frames)


# ---------------------------------------------------------------------------- cluster


@dataclasses.dataclass
class Target:
    name: str
    kind: str  # "machine" (a head or node process) or "worker"
    port: int
    pid: int
    log: Path
    evil_paths: list[Path]
    rejections: int = 0  # rejections this test caused that the process must have counted

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def answers_pull(self) -> bool:
        return self.kind == "machine"  # node managers serve PULL; workers ignore it


@dataclasses.dataclass
class Cluster:
    key: bytes
    signer: Signer
    wrong: Signer
    head_node: str
    node_node: str
    head_tag: str
    actors: dict[str, Any]
    targets: dict[str, Target]
    evil_dir: Path


def _session(base: str) -> tuple[str, dict[str, Any]]:
    [path] = glob.glob(os.path.join(base, "session_2*"))
    with open(os.path.join(path, "head.json")) as f:
        return path, json.load(f)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def _affinity(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


# Module-level names hold the remote wrappers, not the functions: cloudpickle ships the
# functions by value, so workers never import this module.
@shoal.remote(num_cpus=0)
class Probe:
    def __init__(self) -> None:
        self.calls = 0

    def whoami(self) -> tuple[int, str]:
        import os

        return os.getpid(), os.environ["SHOAL_WORKER_ID"]

    def call(self) -> int:
        self.calls += 1
        return self.calls


@shoal.remote
def node_of_task() -> str:
    import shoal

    return shoal.get_runtime_context().get_node_id()


@shoal.remote
def call_actor(actor: Any) -> int:
    import shoal

    return shoal.get(actor.call.remote(), timeout=30)


@shoal.remote
def put_big() -> list[Any]:
    import shoal

    return [shoal.put(b"y" * 300_000)]


@pytest.fixture(scope="module")
def cluster(
    shoal_cli: Callable[..., Any],
    leak_check: Callable[..., None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """A head and a joined node started by the CLI, one driver in this process; both
    machines are stopped at the end whatever happens, and nothing may be left."""
    # Short, under /tmp: ipc socket paths in the session directories must stay short.
    head_dir = tempfile.mkdtemp(prefix="shoal-ht-h-", dir="/tmp")
    node_dir = tempfile.mkdtemp(prefix="shoal-ht-n-", dir="/tmp")
    work = tmp_path_factory.mktemp("hostile-tcp")
    key_file = str(work / "cluster.key")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("SHOAL_LOG_LEVEL", raising=False)  # the default: warnings are logged
            started = shoal_cli(
                "start", "--head", "--port", "0", "--bind", "127.0.0.1", "--key-file", key_file,
                "--num-cpus", "1", "--temp-dir", head_dir,
            )  # fmt: skip
            assert started.returncode == 0, testing.describe_run(started)
            head_session, head_info = _session(head_dir)
            joined = shoal_cli(
                "start", "--address", head_info["tcp"].removeprefix("tcp://"),
                "--key-file", key_file, "--num-cpus", "1", "--temp-dir", node_dir,
            )  # fmt: skip
            assert joined.returncode == 0, testing.describe_run(joined)
        node_session, node_info = _session(node_dir)
        assert node_info["node_tcp"] != head_info["tcp"]

        shoal.init(address=head_session)
        actors = {
            "head": Probe.options(scheduling_strategy=_affinity(head_info["node_id"])).remote(),
            "node": Probe.options(scheduling_strategy=_affinity(node_info["node_id"])).remote(),
        }
        evil_dir = work / "evil"
        evil_dir.mkdir()

        def machine(name: str, info: dict[str, Any], session: str, address: str) -> Target:
            port = _port(address)
            assert _listening_ports(info["pid"]) == {port}
            log = Path(session, "logs", "head.log")
            evil = [evil_dir / f"{name}-open", evil_dir / f"{name}-system"]
            return Target(name, "machine", port, info["pid"], log, evil)

        def worker(name: str, session: str) -> Target:
            pid, wid = shoal.get(actors[name].whoami.remote(), timeout=30)
            [port] = _listening_ports(pid)
            log = Path(session, "logs", f"worker-{wid}.log")
            assert log.exists()
            evil = [evil_dir / f"{name}-worker-open", evil_dir / f"{name}-worker-system"]
            return Target(f"{name} worker", "worker", port, pid, log, evil)

        targets = [
            machine("head", head_info, head_session, head_info["tcp"]),
            machine("node", node_info, node_session, node_info["node_tcp"]),
            worker("head", head_session),
            worker("node", node_session),
        ]
        key = read_key_file(key_file)
        yield Cluster(
            key=key,
            signer=Signer(key),
            wrong=Signer(bytes(b ^ 0x5A for b in key)),
            head_node=head_info["node_id"],
            node_node=node_info["node_id"],
            head_tag=head_info["tag"],
            actors=actors,
            targets={t.name: t for t in targets},
            evil_dir=evil_dir,
        )
    finally:
        if shoal.is_initialized():
            shoal.shutdown()
        # Session directories are named session_<time>_<pid>_<tag>; each machine removes
        # its own when it stops, so note the tags first.
        sessions = glob.glob(f"{head_dir}/session_2*") + glob.glob(f"{node_dir}/session_2*")
        tags = [path.rsplit("_", 1)[1] for path in sessions]
        stopped = [shoal_cli("stop", "--temp-dir", d) for d in (node_dir, head_dir)]
        try:
            _wait_gone((head_dir, node_dir), tags)
            leak_check("after the hostile-tcp cluster")
        finally:
            shutil.rmtree(head_dir, ignore_errors=True)
            shutil.rmtree(node_dir, ignore_errors=True)
        for result in stopped:
            assert result.returncode == 0, testing.describe_run(result)


def _wait_gone(dirs: tuple[str, ...], tags: list[str]) -> None:
    """Wait until no process of these session directories and no segment of these tags
    is left (precise where the session-wide check, with other Shoal sessions running on
    the machine, can only guess what is whose)."""

    def ours() -> tuple[list[str], list[str]]:
        procs = []
        for proc in testing.shoal_processes():
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(d in cmdline for d in dirs):
                procs.append(f"{proc.pid}: {cmdline}")
        prefixes = tuple(f"{testing.SHM_PREFIX}{tag}-" for tag in tags)
        return procs, [s for s in testing.shm_segments() if s.startswith(prefixes)]

    try:
        testing.wait_for(lambda: ours() == ([], []), timeout=15, interval=0.05)
    except TimeoutError:
        procs, segments = ours()
        raise AssertionError(f"left behind: processes {procs}, segments {segments}") from None


def serve_real_work(cluster: Cluster) -> None:
    """Real work through every tcp link: if a port stopped serving, something here hangs."""
    on_node = {"scheduling_strategy": _affinity(cluster.node_node)}
    on_head = {"scheduling_strategy": _affinity(cluster.head_node)}
    # A task on the node: its lease goes through the node's link to the head's port.
    assert shoal.get(node_of_task.options(**on_node).remote(), timeout=30) == cluster.node_node
    assert shoal.get(node_of_task.options(**on_head).remote(), timeout=30) == cluster.head_node
    # The node's actor, called from this driver on the head's machine: its worker's tcp port.
    before = shoal.get(cluster.actors["node"].call.remote(), timeout=30)
    # The head's actor, called from a task on the node: the head worker's tcp port.
    assert shoal.get(call_actor.options(**on_node).remote(cluster.actors["head"]), timeout=30) >= 1
    assert shoal.get(cluster.actors["node"].call.remote(), timeout=30) == before + 1
    # An object made on the node, read here: the head's node manager pulls it through
    # the node's port into the head's store.
    [inner] = shoal.get(put_big.options(**on_node).remote(), timeout=30)
    assert shoal.get(inner, timeout=30) == b"y" * 300_000
    copy = f"{testing.SHM_PREFIX}{cluster.head_tag}-{inner.hex()}"
    assert copy in testing.shm_segments(), "the object was not pulled from the node"


# ----------------------------------------------------------------------- raw attacks


@dataclasses.dataclass
class RawAttack:
    name: str
    payload: bytes
    half_close: bool = False  # we close our side: the target must close its side too


def raw_attacks() -> list[RawAttack]:
    truncated_frame = struct.pack("<II", 1, 200) + b"x" * 20  # 200 bytes promised, 20 sent
    return [
        RawAttack("random bytes", os.urandom(4096)),
        RawAttack("HTTP request", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"),
        RawAttack("truncated length table", struct.pack("<II", 3, 10), half_close=True),
        RawAttack("truncated frame", truncated_frame),
        RawAttack("truncated frame, then EOF", truncated_frame, half_close=True),
    ]


def run_raw_attacks(target: Target, attacks: list[RawAttack]) -> None:
    """Send each attack on its own connection, all at once; then require silence for
    QUIET_SECONDS, and a close where we closed."""
    sel = selectors.DefaultSelector()
    received: dict[str, bytes] = {}
    closed: dict[str, bool] = {}
    socks = []
    try:
        for attack in attacks:
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=5)
            socks.append(sock)
            received[attack.name], closed[attack.name] = b"", False
            try:
                sock.sendall(attack.payload)
                if attack.half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                closed[attack.name] = True  # dropped before we were done: fine
                continue
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, attack)
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            waiting = [a.name for a in attacks if a.half_close and not closed[a.name]]
            if elapsed >= QUIET_SECONDS and not waiting:
                break
            assert elapsed < 10, f"{target.name}: still open after our EOF: {waiting}"
            for key, _ in sel.select(0.05):
                attack = key.data
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed[attack.name] = True
                    sel.unregister(key.fileobj)
                else:
                    received[attack.name] += data
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    for attack in attacks:
        assert received[attack.name] == b"", (
            f"{target.name} answered {attack.name}: {received[attack.name]!r}"
        )


def claim_two_gib(target: Target) -> None:
    """A frame length claiming 2 GiB, then body bytes: the target must drop the connection
    (the frame-size bound, and MAX_UNVERIFIED, are checked on the length table) before
    taking in the 64 MiB we offer."""
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=5)
    offered = 64 * 2**20
    sent = 0
    try:
        sock.sendall(struct.pack("<II", 1, 2 * 2**30))
        chunk = bytes(1 << 20)
        try:
            while sent < offered:
                sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            pytest.fail(f"{target.name} stopped reading without closing after {sent} bytes")
        sock.settimeout(0.05)
        deadline = time.monotonic() + 10
        answer = b""
        while True:
            assert time.monotonic() < deadline, f"{target.name} kept a 2 GiB frame's connection"
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        assert answer == b"", answer
    finally:
        sock.close()
    assert sent < offered, f"{target.name} took {sent} bytes of a 2 GiB frame"


# ---------------------------------------------------------------------- framed attacks


class Wire:
    """A TCP connection of the test's own to one target, speaking the protocol by hand."""

    def __init__(self, cluster: Cluster, target: Target) -> None:
        self.cluster = cluster
        self.target = target
        self.sock = socket.create_connection(("127.0.0.1", target.port), timeout=5)
        self.data = b""
        self.seq = 0
        self.recv_seq = 0
        self.hello_conn = b""
        # After the WELCOME every message is sealed with keys derived from both connection
        # ids (shoal._sealing): these are ours and the target's, as a genuine peer has them.
        self.keys: SessionKeys | None = None

    def close(self) -> None:
        self.sock.close()

    def send(self, frames: list[bytes]) -> None:
        try:
            self.sock.sendall(frame(*frames))
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped already: what comes next shows it

    def _read(self, deadline: float) -> bool:
        """More bytes; False at the end of the stream. Fails at ``deadline``."""
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            pytest.fail(f"{self.target.name}: neither an answer nor a close in time")
        except ConnectionResetError:
            data = b""
        self.data += data
        return bool(data)

    def _message(self, deadline: float) -> list[bytes] | None:
        """The next whole message, or None when the target closed the connection."""
        while True:
            if len(self.data) >= 4:
                (count,) = struct.unpack_from("<I", self.data)
                head = 4 + 4 * count
                if len(self.data) >= head:
                    lens = struct.unpack_from(f"<{count}I", self.data, 4)
                    if len(self.data) >= head + sum(lens):
                        frames, pos = [], head
                        for n in lens:
                            frames.append(self.data[pos : pos + n])
                            pos += n
                        self.data = self.data[pos:]
                        return frames
            if not self._read(deadline):
                return None

    def sign(
        self, msg: Message, seq: int | None = None, signer: Signer | None = None
    ) -> list[bytes]:
        """Frames for ``msg`` as bytes: signed with the cluster key (or ``signer``'s) during
        the handshake, sealed with this connection's keys (derived from ``signer``'s key
        when given) after it."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        if self.keys is not None and msg.type != M.HELLO:
            keys = self.keys
            if signer is not None:
                keys = session_keys(signer.key, self.hello_conn, self.welcome_conn)
            return [bytes(f) for f in keys.outgoing.seal(msg, seq)]
        return [bytes(f) for f in (signer or self.cluster.signer).encode(msg, seq)]

    def hello(self) -> list[bytes]:
        """A genuine HELLO with a fresh connection id, as another node's puller sends."""
        self.seq = self.recv_seq = 0
        self.keys = None
        self.hello_conn = os.urandom(16)
        body = {"conn": self.hello_conn, **version_info(), "role": "puller", "node": os.urandom(16)}
        return self.sign(Message(M.HELLO, body))

    def pull(self, seq: int | None = None, buffer: bytes | None = None) -> list[bytes]:
        """A harmless genuine request: node managers answer CHUNK "not on this node"."""
        body = {"o": os.urandom(28), "off": 0, "n": 1}
        return self.sign(Message(M.PULL, body, [buffer] if buffer else []), seq)

    def recv(self, what: str) -> Message:
        frames = self._message(time.monotonic() + 5)
        assert frames is not None, f"{self.target.name}: closed where {what} was due"
        self.recv_seq += 1
        if self.keys is not None:
            return self.keys.incoming.open(frames, self.recv_seq)
        msg, _ = self.cluster.signer.decode(frames)  # answers are signed with the real key
        if msg.type == M.WELCOME:
            self.welcome_conn = msg.body["conn"]
            self.keys = session_keys(self.cluster.key, self.hello_conn, self.welcome_conn)
        return msg

    def nothing_answered(self, what: str) -> None:
        """The target dropped this connection without a word (so a genuine HELLO sent now
        is never answered)."""
        self.send(self.hello())
        frames = self._message(time.monotonic() + 5)
        assert frames is None, f"{self.target.name} answered {what}: {frames!r}"

    def refused(self, why: str, what: str) -> None:
        msg = self.recv("REFUSED")
        assert msg.type == M.REFUSED, f"{self.target.name} answered {what} with {msg!r}"
        assert why in msg.body["reason"], msg.body
        self.target.rejections += 1

    def forgotten(self, what: str) -> None:
        """The target dropped this connection: a genuine next message is never answered."""
        self.nothing_answered(what)

    def connect(self) -> None:
        """Become an authenticated peer of the target."""
        self.send(self.hello())
        msg = self.recv("WELCOME")
        assert msg.type == M.WELCOME, msg


def evil_task(target: Target) -> Message:
    """A PUSH_TASK whose function and argument frames are pickles that create files."""
    fn = pickle.dumps(OpensAFile(str(target.evil_paths[0])), protocol=5)
    arg = pickle.dumps(RunsACommand(str(target.evil_paths[1])), protocol=5)
    body = {
        "t": os.urandom(24), "f": os.urandom(16), "fb": 1, "n": "evil", "nr": 1, "j": 1,
        "kw": [], "g": [], "res": {}, "a": [[0, 1, 0]],
    }  # fmt: skip
    return Message(M.PUSH_TASK, body, [fn, arg])


def framed_attacks(cluster: Cluster, target: Target) -> list[tuple[str, Callable[[Wire], None]]]:
    evil = pickle.dumps(OpensAFile(str(target.evil_paths[0])), protocol=5)
    evil_cmd = pickle.dumps(RunsACommand(str(target.evil_paths[1])), protocol=5)
    put_header = msgpack.packb(
        (int(M.PUT_OBJECT), 1, {"o": os.urandom(28), "f": 0}, [evil]), use_bin_type=True
    )

    def dropped(frames: list[bytes], count: int = 1) -> Callable[[Wire], None]:
        def attack(wire: Wire) -> None:
            wire.send(frames)
            target.rejections += count
            wire.nothing_answered("it")

        return attack

    def wrong_key_task(wire: Wire) -> None:
        hello = Message(M.HELLO, {"conn": os.urandom(16), **version_info(), "role": "puller"})
        wire.send(wire.sign(hello, 1, cluster.wrong))
        wire.send(wire.sign(evil_task(target), 2, cluster.wrong))
        target.rejections += 1  # the HELLO; the connection is gone before the task is read
        wire.nothing_answered("a HELLO and a PUSH_TASK signed with a wrong key")

    def wrong_key_task_authenticated(wire: Wire) -> None:
        wire.connect()
        wire.send(wire.sign(evil_task(target), 2, cluster.wrong))
        target.rejections += 1
        wire.forgotten("a PUSH_TASK signed with a wrong key")

    def hello_twice(wire: Wire) -> None:
        hello = wire.hello()
        wire.send(hello)
        assert wire.recv("WELCOME").type == M.WELCOME
        wire.send(hello)
        target.rejections += 1
        wire.forgotten("a replayed HELLO")

    def hello_replayed_elsewhere(wire: Wire) -> None:
        captured = wire.hello()
        wire.send(captured)
        assert wire.recv("WELCOME").type == M.WELCOME
        # What follows a HELLO on a connection: here, a genuinely signed task that would
        # create the file; never sent on the first connection, replayed on another one.
        follow_up = wire.sign(evil_task(target), 2)
        other = Wire(cluster, target)
        try:
            other.send(captured)
            other.refused("replayed HELLO", "a replayed HELLO")
            other.send(follow_up)  # never read: the refusal closed that connection
            other.nothing_answered("a replayed HELLO and a task")
        finally:
            other.close()

    def message_replayed(wire: Wire) -> None:
        wire.connect()
        request = wire.pull()
        wire.send(request)
        if target.answers_pull:
            answer = wire.recv("CHUNK")
            assert answer.type == M.CHUNK and answer.body.get("e"), answer
        wire.send(request)
        target.rejections += 1
        wire.forgotten("a replayed message")

    def flipped_byte(wire: Wire) -> None:
        wire.connect()
        frames = wire.pull(buffer=os.urandom(100_000))
        assert len(frames) == 2, "the buffer travels in a frame of its own"
        buffer = bytearray(frames[1])
        buffer[len(buffer) // 2] ^= 0x01
        wire.send([frames[0], bytes(buffer)])
        target.rejections += 1
        wire.forgotten("a message with a flipped byte")

    return [
        ("unsigned message with a pickle", dropped([MAGIC + bytes(32) + put_header, evil])),
        ("made-up signature", dropped([MAGIC + os.urandom(32) + put_header, evil_cmd])),
        ("pickle as the header", dropped([MAGIC + os.urandom(32) + evil, evil_cmd])),
        ("bare pickle", dropped([evil])),
        ("empty frame", dropped([b""])),
        ("too many frames", dropped([b"x"] * 5000)),
        ("PUSH_TASK signed with a wrong key", wrong_key_task),
        ("PUSH_TASK signed with a wrong key, authenticated", wrong_key_task_authenticated),
        ("HELLO sent twice", hello_twice),
        ("HELLO replayed on another connection", hello_replayed_elsewhere),
        ("genuine message replayed", message_replayed),
        ("flipped byte in a buffer frame", flipped_byte),
    ]


def run_framed_attacks(cluster: Cluster, target: Target) -> None:
    for what, attack in framed_attacks(cluster, target):
        wire = Wire(cluster, target)
        try:
            attack(wire)
        except Exception as exc:
            raise AssertionError(f"{target.name}, {what}: {exc!r}") from exc
        finally:
            wire.close()
        _assert_alive(target, what)


# ------------------------------------------------------------------------------ tests


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _assert_alive(target: Target, after: str) -> None:
    try:
        proc = psutil.Process(target.pid)
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert alive, f"{target.name} (pid {target.pid}) died after {after}"


@pytest.mark.parametrize("name", ["head", "node", "head worker", "node worker"])
def test_hostile_input_at_a_tcp_port(cluster: Cluster, name: str) -> None:
    target = cluster.targets[name]
    rss_before = _rss(target.pid)

    run_raw_attacks(target, raw_attacks())
    _assert_alive(target, "raw garbage")

    claim_two_gib(target)
    _assert_alive(target, "a 2 GiB frame header")
    grown = _rss(target.pid) - rss_before
    assert grown < RSS_SLACK, f"{name}: RSS grew by {grown / 2**20:.0f} MiB after a 2 GiB claim"

    run_framed_attacks(cluster, target)

    serve_real_work(cluster)
    grown = _rss(target.pid) - rss_before
    assert grown < RSS_SLACK, f"{name}: RSS grew by {grown / 2**20:.0f} MiB"
    assert not list(cluster.evil_dir.iterdir()), "a payload was unpickled"


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) shoal\._transport WARNING (.*)$")
_SUPPRESSED = re.compile(r"^(\d+) similar messages were suppressed$")


def _transport_log(target: Target) -> tuple[list[float], list[int]]:
    """Times of the rejection lines in the target's log, and the suppressed counts."""
    times, suppressed = [], []
    for line in target.log.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        counted = _SUPPRESSED.match(match.group(2))
        if counted:
            suppressed.append(int(counted.group(1)))
        else:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times, suppressed


def test_rejections_are_logged_at_a_bounded_rate(cluster: Cluster) -> None:
    targets = list(cluster.targets.values())
    for target in targets:
        if not target.rejections:  # this test runs alone (-k)
            run_framed_attacks(cluster, target)
    for target in targets:
        times, _ = _transport_log(target)
        assert times, f"{target.name} logged no rejection"
        windows = 1 + int((times[-1] - times[0]) // LOG_PERIOD)
        assert len(times) <= LOG_BURST * windows, (
            f"{target.name} logged {len(times)} rejections in {windows} window(s)"
        )
        assert target.rejections > LOG_BURST

    # Once a window is over, the next rejection reports how many were not logged. Keep
    # sending one garbage message (each on a new connection) to each process until each
    # has reported.
    wires = {t.name: Wire(cluster, t) for t in targets}

    def all_reported() -> bool:
        done = True
        for target in targets:
            if not _transport_log(target)[1]:
                # A connection of its own each time: garbage ends a connection.
                wires[target.name].close()
                wires[target.name] = Wire(cluster, target)
                wires[target.name].send([MAGIC + bytes(32) + b"garbage"])
                target.rejections += 1
                done = False
        return done

    try:
        testing.wait_for(all_reported, timeout=LOG_PERIOD + 10, interval=0.25)
        for wire in wires.values():
            wire.nothing_answered("garbage")  # and all of it has been handled by now
    finally:
        for wire in wires.values():
            wire.close()
    for target in targets:
        times, suppressed = _transport_log(target)
        # Every rejection was either logged or counted (the raw attacks may add some).
        assert len(times) + sum(suppressed) >= target.rejections, (target.name, times, suppressed)
        windows = 1 + int((times[-1] - times[0]) // LOG_PERIOD)
        assert len(times) <= LOG_BURST * windows


def test_a_chosen_routing_id_does_not_crash_the_target(cluster: Cluster) -> None:
    """Over ZMTP a peer could pick its routing id and make libzmq abort the process (an id
    collision with the ROUTER's own counter). Now ids are the listener's own numbering: a
    peer sending id-like bytes first (the old attack's ids, as a frame and raw) is dropped,
    and a genuine peer after them is welcomed by a live process."""
    actor = Probe.options(scheduling_strategy=_affinity(cluster.node_node)).remote()
    pid, _ = shoal.get(actor.whoami.remote(), timeout=30)
    [port] = _listening_ports(pid)
    target = Target("fresh worker", "worker", port, pid, Path(), [])
    squatters = []
    try:
        for i in range(32):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            squatters.append(sock)
            routing_id = b"\x00" + struct.pack(">I", 0x6B8B4567 + i)
            sock.sendall(frame(routing_id) if i % 2 else routing_id)
        wire = Wire(cluster, target)
        try:
            wire.send(wire.hello())
            assert wire.recv("WELCOME").type == M.WELCOME
        finally:
            wire.close()
        _assert_alive(target, "peers that sent routing ids of their choice")
    finally:
        for sock in squatters:
            sock.close()
    assert shoal.get(actor.call.remote(), timeout=30) == 1
