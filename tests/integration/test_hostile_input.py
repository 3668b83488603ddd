"""Garbage thrown at a live cluster's sockets: refused, logged, and the cluster keeps serving.

The head's socket and the workers' task sockets are Unix stream sockets carrying
length-prefixed frames. Each is attacked with raw bytes that are not ours, bounds a peer
may not claim, frames with no valid signature (one holding a pickle that would write a file
if it were ever loaded), a signed HELLO with one byte flipped, and a replay of a signed
HELLO. After each attack the connection is closed by the cluster, nothing but a REFUSED is
ever answered, and tasks and actors still run.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct

import msgpack
import pytest
import shoal
from shoal import testing
from shoal._protocol import MAGIC, Message, MsgType, Signer
from shoal._session import read_key_file
from shoal._transport import version_info

pytestmark = pytest.mark.timeout(90)


class WritesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def wire(frames: list[bytes]) -> bytes:
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames)) + b"".join(frames)


def attacks(target_file: str) -> dict[str, bytes]:
    evil = pickle.dumps(WritesAFile(target_file), protocol=5)
    header = msgpack.packb(
        (int(MsgType.PUT_OBJECT), 1, {"o": b"x" * 20, "f": 0}, [evil]), use_bin_type=True
    )
    return {
        "random bytes": b"\xff\xff\xff\xff" + os.urandom(300),
        "http request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "2 GiB frame": struct.pack("<II", 1, 2**31) + os.urandom(64),
        "too many frames": struct.pack("<I", 5000) + b"\x01\x00\x00\x00" * 5000,
        "too large before authentication": struct.pack("<II", 1, 10 << 20) + b"x" * 4096,
        "magic only": wire([MAGIC]),
        "a made-up signature": wire([MAGIC + os.urandom(32) + header]),
        "a zero signature and a pickle": wire([MAGIC + b"\x00" * 32 + header, evil]),
    }


def signed_hello(key: bytes) -> bytes:
    # No role: the head refuses it after checking the signature, and a worker accepts it.
    body = {"conn": os.urandom(16), **version_info()}
    return wire(Signer(key).encode(Message(MsgType.HELLO, body), 1))


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the cluster sends until it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection was closed"
        data += chunk
    return data


def read_message(sock: socket.socket) -> list[bytes]:
    """One message, as the cluster frames it."""
    (count,) = struct.unpack("<I", read_exactly(sock, 4))
    lens = struct.unpack(f"<{count}I", read_exactly(sock, 4 * count))
    return [read_exactly(sock, n) for n in lens]


def socket_paths(session_dir: str) -> list[str]:
    return sorted(
        os.path.join(session_dir, n) for n in os.listdir(session_dir) if n.endswith(".sock")
    )


def test_garbage_at_every_socket_is_refused_and_the_cluster_keeps_working(make_cluster, tmp_path):
    context = make_cluster(num_cpus=2)
    session_dir = context["session_dir"]
    # The key signs HELLOs as if they were captured from real traffic.
    key = read_key_file(os.path.join(session_dir, "cluster.key"))

    @shoal.remote
    def square(x):
        return x * x

    @shoal.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

    counter = Counter.remote()
    assert shoal.get(counter.add.remote(), timeout=30) == 1
    # The head's socket, the actor's worker's and a pooled worker's (started in the
    # background: on a loaded machine it may still be coming up).
    testing.wait_for(lambda: len(socket_paths(session_dir)) >= 3, timeout=30)
    paths = socket_paths(session_dir)
    assert any(p.endswith("/h.sock") for p in paths)

    target = tmp_path / "pwned"
    attempts = 0
    for path in paths:
        for name, data in attacks(str(target)).items():
            with connect(path) as sock:
                sock.sendall(data)
                # Nothing answers garbage: the cluster closes the connection.
                assert read_until_closed(sock) == b"", name
            attempts += 1

        # A truncated message, then the attacker goes away: forgotten.
        with connect(path) as sock:
            sock.sendall(struct.pack("<II", 1, 1000) + b"x" * 10)

        # A signed HELLO with one byte flipped: dropped before it is parsed.
        hello = bytearray(signed_hello(key))
        hello[-3] ^= 0x01
        with connect(path) as sock:
            sock.sendall(bytes(hello))
            assert read_until_closed(sock) == b""

        # A signed HELLO, then the same bytes again on a new connection: the replay is
        # refused with a REFUSED and closed (the head refuses the first one too, for having
        # no role; a worker accepts it).
        hello = signed_hello(key)
        with connect(path) as first:
            first.sendall(hello)
            answer, _ = Signer(key).decode(read_message(first))
            assert answer.type in (MsgType.WELCOME, MsgType.REFUSED)
            with connect(path) as replay:
                replay.sendall(hello)
                answer, _ = Signer(key).decode(read_message(replay))
                assert answer.type == MsgType.REFUSED and "replayed" in answer.body["reason"]
                assert read_until_closed(replay) == b""
        attempts += 3

        assert shoal.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]
    assert shoal.get(counter.add.remote(), timeout=30) == 2
    # Real work went through every socket after the garbage did: had a payload been
    # loaded, the file would exist by now.
    assert not target.exists()

    # The head logged its rejections at a bounded rate: at most a burst of 5 per 10 s.
    with open(os.path.join(session_dir, "logs", "head.log"), errors="replace") as f:
        rejections = [line for line in f if "shoal._transport" in line]
    assert attempts > 10 and 1 <= len(rejections) <= 5, rejections
