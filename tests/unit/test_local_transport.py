"""Stream: framing over a Unix socket pair, byte by byte, in bulk, and at its bounds."""

from __future__ import annotations

import builtins
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from shoal import _local_transport
from shoal._local_transport import COPY_LIMIT, MAX_UNVERIFIED, Stream
from shoal._protocol import ProtocolError

pytestmark = pytest.mark.timeout(30)

MAX_FRAMES = 16
MAX_FRAME = 8 << 20


@pytest.fixture
def pair() -> Iterator[tuple[Stream, socket.socket]]:
    """A Stream reading from one end; the test writes raw bytes to the other."""
    a, b = socket.socketpair()
    stream = Stream(a, MAX_FRAMES, MAX_FRAME)
    stream.verified = True
    yield stream, b
    stream.close()
    b.close()


def wire(frames: list[bytes]) -> bytes:
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames)) + b"".join(frames)


def drain(stream: Stream) -> list[list[bytes]]:
    out = []
    while (msg := stream.next_message()) is not None:
        out.append([bytes(f) for f in msg])
    return out


MESSAGES = [
    [b"one"],
    [b"", b"empty first"],
    [os.urandom(COPY_LIMIT)],
    [os.urandom(COPY_LIMIT + 1), b"after a large frame"],
    [b"a", os.urandom(200_000), b"b", os.urandom(70_000)],
]


def test_messages_split_at_every_point_arrive_whole(pair):
    stream, peer = pair
    data = b"".join(wire(m) for m in MESSAGES)
    got: list[list[bytes]] = []
    # Odd chunk sizes put every boundary (count, lengths, frames) in the middle of a read.
    pos, step = 0, 1
    while pos < len(data):
        peer.sendall(data[pos : pos + step])
        pos += step
        step = step * 3 + 1 if step < 50_000 else 7
        got += drain(stream)
    got += drain(stream)
    assert got == MESSAGES


def test_many_messages_in_one_read(pair):
    stream, peer = pair
    peer.sendall(b"".join(wire([str(n).encode()]) for n in range(2000)))
    got = []
    while len(got) < 2000:
        got += drain(stream)
    assert got == [[str(n).encode()] for n in range(2000)]


def test_large_frames_are_read_only_buffers_of_their_own(pair):
    stream, peer = pair
    big = os.urandom(100_000)
    peer.sendall(wire([big, b"small"]))
    msg = None
    while msg is None:
        msg = stream.next_message()
    assert isinstance(msg[0], memoryview) and msg[0].readonly and bytes(msg[0]) == big
    assert msg[1] == b"small" and isinstance(msg[1], bytes)


def test_writes_queue_what_the_socket_does_not_take_and_flush_keeps_order():
    a, b = socket.socketpair()
    writer, reader = Stream(a, MAX_FRAMES, MAX_FRAME), Stream(b, MAX_FRAMES, MAX_FRAME)
    reader.verified = True
    sent = [[os.urandom(3 << 20), n.to_bytes(4, "big")] for n in range(4)]
    sent += [[n.to_bytes(4, "big")] for n in range(1000)]
    for frames in sent:
        writer.write(frames)
    assert writer._out  # the socket took only part: the rest waits
    got = []
    while len(got) < len(sent):
        writer.flush()
        got += drain(reader)
    assert got == sent and not writer.flush()
    writer.close()
    reader.close()


def test_a_write_to_a_closed_peer_marks_the_stream_ended(pair):
    stream, peer = pair
    peer.close()
    stream.write([b"x" * 100])
    stream.write([b"y" * 100_000, b"z" * 100_000])
    assert stream.next_message() is None and stream.eof


def test_the_end_of_the_stream_in_the_middle_of_a_message(pair):
    stream, peer = pair
    peer.sendall(wire([b"whole"]) + wire([b"cut short"])[:-3])
    assert stream.next_message() == [b"whole"]
    peer.close()
    # A reader reads again each time poll says the socket is readable (it stays so at EOF).
    for _ in range(3):
        assert stream.next_message() is None
    assert stream.eof and stream.mid_message


@pytest.mark.parametrize(
    "data, error",
    [
        (struct.pack("<I", 0), "0 frames"),
        (struct.pack("<I", MAX_FRAMES + 1), f"{MAX_FRAMES + 1} frames"),
        (struct.pack("<II", 1, MAX_FRAME + 1), f"a frame of {MAX_FRAME + 1} bytes"),
        (struct.pack("<III", 2, 10, 2**31), "a frame of 2147483648 bytes"),
    ],
)
def test_bounds_are_checked_before_the_frames_arrive(pair, data, error):
    stream, peer = pair
    peer.sendall(data)
    with pytest.raises(ProtocolError, match=error):
        stream.next_message()


def test_before_verification_a_message_is_small_and_one_is_read_at_a_time(pair, monkeypatch):
    stream, peer = pair
    stream.verified = False
    allocated: list[int] = []
    monkeypatch.setattr(
        _local_transport,
        "bytearray",
        lambda n: allocated.append(n) or builtins.bytearray(n),
        raising=False,
    )
    # A HELLO-sized message, then a large one that only a verified stream may read.
    peer.sendall(wire([b"hello"]) + wire([b"x" * MAX_UNVERIFIED]))
    assert stream.next_message() == [b"hello"]
    stream.verified = True  # what the transport does once the HELLO was verified
    got = None
    while got is None:
        got = stream.next_message()
    assert bytes(got[0]) == b"x" * MAX_UNVERIFIED

    stream.verified = False
    peer.sendall(wire([b"x" * (MAX_UNVERIFIED - 7)]))
    with pytest.raises(ProtocolError, match="before authentication"):
        stream.next_message()
    assert allocated == [MAX_UNVERIFIED]  # only the verified one got a buffer of its own


def test_close_with_linger_sends_what_is_queued():
    a, b = socket.socketpair()
    writer = Stream(a, MAX_FRAMES, MAX_FRAME)
    data = os.urandom(4 << 20)
    writer.write([data])
    assert writer._out
    received = bytearray()

    def read() -> None:
        while chunk := b.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    writer.close(linger_ms=5000)
    reader.join(10)
    assert bytes(received) == wire([data])
    b.close()
