"""Garbage thrown at a live cluster's sockets: refused, logged, and the cluster keeps serving.

The head's socket and a worker's task socket are both attacked with raw zmq frames that
are not ours, a replay of nothing signed, and a pickle that would write a file if it were
ever loaded. After each attack, tasks and actors still run.
"""

from __future__ import annotations

import os
import pickle

import msgpack
import pytest
import shoal
import zmq
from shoal._protocol import MAGIC, MsgType

pytestmark = pytest.mark.timeout(60)


class WritesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def attacks(target_file: str) -> list[list[bytes]]:
    evil = pickle.dumps(WritesAFile(target_file), protocol=5)
    header = msgpack.packb(
        (int(MsgType.PUT_OBJECT), 1, {"o": b"x" * 20, "f": 0}, [evil]), use_bin_type=True
    )
    return [
        [os.urandom(300)],
        [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"],
        [MAGIC],
        [MAGIC + os.urandom(32) + header],  # a made-up signature
        [MAGIC + b"\x00" * 32 + header, evil],
        [b"x"] * 5000,  # too many frames
    ]


def sockets_of(session_dir: str) -> list[str]:
    return sorted(
        f"ipc://{os.path.join(session_dir, n)}"
        for n in os.listdir(session_dir)
        if n.endswith(".sock")
    )


def test_garbage_at_every_socket_is_refused_and_the_cluster_keeps_working(make_cluster, tmp_path):
    context = make_cluster(num_cpus=2)

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
    addresses = sockets_of(context["session_dir"])
    assert any(a.endswith("/h.sock") for a in addresses) and len(addresses) >= 3

    target = tmp_path / "pwned"
    ctx = zmq.Context()
    try:
        for address in addresses:
            for frames in attacks(str(target)):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
                sock.send_multipart(frames)
                # Nothing answers garbage; the cluster must still serve real work at once.
                assert sock.poll(50) == 0
                sock.close()
            assert shoal.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]
        assert shoal.get(counter.add.remote(), timeout=30) == 2
    finally:
        ctx.term()
    # Real work went through every socket after the garbage did: had a payload been
    # loaded, the file would exist by now.
    assert not target.exists()
