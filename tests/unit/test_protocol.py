"""Signer: what it signs, and every way a tampered frame list is refused.

Layout: frame 0 is MAGIC | signature | header (small buffers ride inside the header);
large buffers follow as frames of their own.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import zmq
from shoal import _protocol
from shoal._protocol import (
    MAGIC,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    SMALL_BUFFER,
    Message,
    MsgType,
    ProtocolError,
    Signer,
)

pytestmark = pytest.mark.timeout(10)

KEY = b"k" * 32
BIG = SMALL_BUFFER + 1  # a buffer of this size travels as a frame of its own


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY)


@pytest.fixture
def big_buffers() -> list[bytes]:
    return [os.urandom(BIG), os.urandom(BIG + 10), os.urandom(BIG + 20)]


@pytest.fixture
def frames(signer: Signer, big_buffers: list[bytes]) -> list[bytes]:
    msg = Message(MsgType.PUSH_TASK, {"task": b"\x01" * 16, "n": [1, 2]}, big_buffers)
    return [bytes(f) for f in signer.encode(msg, seq=7)]


def test_round_trip_with_buffers_on_the_wire(signer, frames, big_buffers):
    assert len(frames) == 4 and frames[0].startswith(MAGIC)
    msg, seq = signer.decode(frames)
    assert seq == 7
    assert msg.type is MsgType.PUSH_TASK
    assert msg.body == {"task": b"\x01" * 16, "n": [1, 2]}
    assert [bytes(f) for f in msg.frames] == big_buffers


def test_small_buffers_ride_in_the_header_and_keep_their_order(signer):
    small = [b"pickle", bytearray(b"buffer-1"), memoryview(b"b2")]
    big = os.urandom(BIG)
    sent = signer.encode(Message(MsgType.PUT_OBJECT, None, [*small, big, b"after-big"]), seq=1)
    # Small leading buffers are inside frame 0; from the first big one on, frames follow.
    assert len(sent) == 3
    msg, seq = signer.decode([zmq.Frame(bytes(f)) for f in sent])
    assert (msg.type, msg.body, seq) == (MsgType.PUT_OBJECT, None, 1)
    assert [bytes(f) for f in msg.frames] == [b"pickle", b"buffer-1", b"b2", big, b"after-big"]


def test_a_message_without_buffers_is_one_frame(signer):
    sent = signer.encode(Message(MsgType.EXIT, {"x": 1}), seq=3)
    assert len(sent) == 1
    msg, seq = signer.decode(sent)
    assert (msg.type, msg.body, list(msg.frames), seq) == (MsgType.EXIT, {"x": 1}, [], 3)


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        Signer(b"short")


def test_another_key_does_not_verify(frames):
    with pytest.raises(ProtocolError, match="signature"):
        Signer(b"x" * 32).decode(frames)


@pytest.mark.parametrize(
    "magic",
    [
        b"SHL" + bytes([PROTOCOL_VERSION - 1]),
        b"SHL" + bytes([PROTOCOL_VERSION + 1]),
        b"ZMQ" + bytes([PROTOCOL_VERSION]),
        b"",
    ],
)
def test_bad_magic_or_version(signer, frames, magic):
    frames[0] = magic + frames[0][len(MAGIC) :]
    with pytest.raises(ProtocolError, match="magic"):
        signer.decode(frames)


@pytest.mark.parametrize("length", [0, 3, len(MAGIC), PREFIX_SIZE - 1])
def test_a_first_frame_too_short_for_magic_and_signature(signer, frames, length):
    frames[0] = frames[0][:length]
    with pytest.raises(ProtocolError, match="magic"):
        signer.decode(frames)


def test_no_frames_at_all(signer):
    with pytest.raises(ProtocolError, match="empty"):
        signer.decode([])


@pytest.mark.parametrize("offset", [len(MAGIC), len(MAGIC) + 31, PREFIX_SIZE, PREFIX_SIZE + 5, -1])
def test_one_flipped_byte_in_the_signature_or_header_is_refused(signer, frames, offset):
    head = bytearray(frames[0])
    head[offset] ^= 0x01
    frames[0] = bytes(head)
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode(frames)


def test_one_flipped_byte_in_an_inline_buffer_is_refused(signer):
    sent = signer.encode(Message(MsgType.PUT_OBJECT, None, [b"A" * 1000]), seq=1)
    head = bytearray(sent[0])
    head[head.index(b"A" * 1000) + 500] ^= 0x01
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode([bytes(head)])


@pytest.mark.parametrize("index", [1, 2, 3])
def test_one_flipped_byte_in_a_wire_buffer_is_refused(signer, frames, index):
    frame = bytearray(frames[index])
    frame[len(frame) // 2] ^= 0x01
    frames[index] = bytes(frame)
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode(frames)


def tampered(frames: list[bytes], how: str) -> list[bytes]:
    head, bufs = frames[0], frames[1:]
    if how == "swap buffers":
        return [head, bufs[1], bufs[0], bufs[2]]
    if how == "drop last buffer":
        return [head, *bufs[:-1]]
    if how == "drop first buffer":
        return [head, *bufs[1:]]
    if how == "extra buffer":
        return [head, *bufs, b""]
    if how == "split a buffer":
        return [head, bufs[0], bufs[1][:3], bufs[1][3:], bufs[2]]
    if how == "join two buffers":
        return [head, bufs[0] + bufs[1], bufs[2]]
    if how == "move bytes between buffers":
        return [head, bufs[0] + bufs[1][:1], bufs[1][1:], bufs[2]]
    if how == "header bytes moved into a buffer":
        return [head[:-1], head[-1:] + bufs[0], *bufs[1:]]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "swap buffers",
        "drop last buffer",
        "drop first buffer",
        "extra buffer",
        "split a buffer",
        "join two buffers",
        "move bytes between buffers",
        "header bytes moved into a buffer",
    ],
)
def test_reordered_missing_or_reframed_frames_are_refused(signer, frames, how):
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode(tampered(frames, how))


def test_nothing_is_parsed_before_the_signature_is_checked(signer, frames, monkeypatch):
    parsed = []
    real_unpackb = msgpack.unpackb
    monkeypatch.setattr(
        _protocol.msgpack, "unpackb", lambda *a, **k: parsed.append(a) or real_unpackb(*a, **k)
    )
    other = msgpack.packb((int(MsgType.EXIT), 1, None, []))  # a different, well-formed header
    frames[0] = frames[0][:PREFIX_SIZE] + other
    with pytest.raises(ProtocolError):
        signer.decode(frames)
    assert parsed == []
    signer.decode(signer.encode(Message(MsgType.EXIT), 1))
    assert len(parsed) == 1  # the spy does see a verified message


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2]),
        msgpack.packb((1, 1, None)),
        msgpack.packb((9999, 1, None, [])),
        msgpack.packb("text"),
    ],
)
def test_a_signed_but_malformed_header_is_a_protocol_error(signer, header):
    frames = [MAGIC + signer.signature(header, []) + header]
    with pytest.raises(ProtocolError, match="malformed header"):
        signer.decode(frames)


def test_signatures_differ_for_every_framing_of_the_same_bytes(signer):
    header = os.urandom(10)
    framings = [[b"ab", b"c"], [b"a", b"bc"], [b"abc"], [b"abc", b""], [b"", b"abc"]]
    assert len({signer.signature(header, f) for f in framings}) == len(framings)
