"""Signer: what it signs, and every way a tampered frame list is refused."""

from __future__ import annotations

import os

import msgpack
import pytest
import zmq
from shoal import _protocol
from shoal._protocol import MAGIC, Message, MsgType, ProtocolError, Signer

pytestmark = pytest.mark.timeout(10)

KEY = b"k" * 32


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY)


@pytest.fixture
def frames(signer: Signer) -> list[bytes]:
    msg = Message(
        MsgType.PUSH_TASK, {"task": b"\x01" * 16, "n": [1, 2]}, [b"pickle", b"buffer-1", b"b2"]
    )
    return [bytes(f) for f in signer.encode(msg, seq=7)]


def test_round_trip(signer, frames):
    msg, seq = signer.decode(frames)
    assert seq == 7
    assert msg.type is MsgType.PUSH_TASK
    assert msg.body == {"task": b"\x01" * 16, "n": [1, 2]}
    assert [bytes(f) for f in msg.frames] == [b"pickle", b"buffer-1", b"b2"]
    assert frames[0] == MAGIC and len(frames[1]) == _protocol.SIGNATURE_SIZE


def test_round_trip_of_zmq_frames_and_buffer_types(signer):
    payload = bytearray(b"a" * 1000)
    sent = signer.encode(Message(MsgType.PUT_OBJECT, None, [memoryview(payload), b""]), seq=1)
    msg, seq = signer.decode([zmq.Frame(bytes(f)) for f in sent])
    assert (msg.type, msg.body, seq) == (MsgType.PUT_OBJECT, None, 1)
    assert [bytes(f) for f in msg.frames] == [bytes(payload), b""]


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        Signer(b"short")


def test_another_key_does_not_verify(frames):
    with pytest.raises(ProtocolError, match="signature"):
        Signer(b"x" * 32).decode(frames)


@pytest.mark.parametrize("magic", [b"SHL\x02", b"ZMQ\x01", b"", b"SHL\x01\x00"])
def test_bad_magic_or_version(signer, frames, magic):
    frames[0] = magic
    with pytest.raises(ProtocolError, match="magic"):
        signer.decode(frames)


def test_signature_of_the_wrong_size(signer, frames):
    frames[1] = frames[1][:-1]
    with pytest.raises(ProtocolError, match="signature size"):
        signer.decode(frames)


@pytest.mark.parametrize("index", [1, 2, 3, 4, 5])
def test_one_flipped_byte_anywhere_is_refused(signer, frames, index):
    frame = bytearray(frames[index])
    frame[len(frame) // 2] ^= 0x01
    frames[index] = bytes(frame)
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode(frames)


def tampered(frames: list[bytes], how: str) -> list[bytes]:
    head, bufs = frames[:3], frames[3:]
    if how == "swap buffers":
        return [*head, bufs[1], bufs[0], bufs[2]]
    if how == "swap header and buffer":
        return [frames[0], frames[1], bufs[0], frames[2], *bufs[1:]]
    if how == "drop last buffer":
        return [*head, *bufs[:-1]]
    if how == "drop first buffer":
        return [*head, *bufs[1:]]
    if how == "extra buffer":
        return [*head, *bufs, b""]
    if how == "split a buffer":
        return [*head, bufs[0], bufs[1][:3], bufs[1][3:], bufs[2]]
    if how == "join two buffers":
        return [*head, bufs[0] + bufs[1], bufs[2]]
    if how == "move bytes between buffers":
        return [*head, bufs[0] + bufs[1][:1], bufs[1][1:], bufs[2]]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "swap buffers",
        "swap header and buffer",
        "drop last buffer",
        "drop first buffer",
        "extra buffer",
        "split a buffer",
        "join two buffers",
        "move bytes between buffers",
    ],
)
def test_reordered_missing_or_reframed_frames_are_refused(signer, frames, how):
    with pytest.raises(ProtocolError, match="signature"):
        signer.decode(tampered(frames, how))


@pytest.mark.parametrize("count", [0, 1, 2])
def test_too_few_frames(signer, frames, count):
    with pytest.raises(ProtocolError, match="at least 3 frames"):
        signer.decode(frames[:count])


def test_nothing_is_parsed_before_the_signature_is_checked(signer, frames, monkeypatch):
    parsed = []
    real_unpackb = msgpack.unpackb
    monkeypatch.setattr(
        _protocol.msgpack, "unpackb", lambda *a, **k: parsed.append(a) or real_unpackb(*a, **k)
    )
    frames[2] = msgpack.packb((int(MsgType.EXIT), 1, None))  # a different, well-formed header
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
        msgpack.packb((9999, 1, None)),
        msgpack.packb("text"),
    ],
)
def test_a_signed_but_malformed_header_is_a_protocol_error(signer, header):
    frames = [MAGIC, signer.signature(header, []), header]
    with pytest.raises(ProtocolError, match="malformed header"):
        signer.decode(frames)


def test_signatures_differ_for_every_framing_of_the_same_bytes(signer):
    header = os.urandom(10)
    framings = [[b"ab", b"c"], [b"a", b"bc"], [b"abc"], [b"abc", b""], [b"", b"abc"]]
    assert len({signer.signature(header, f) for f in framings}) == len(framings)
