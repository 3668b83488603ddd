"""Typed messages, their encoding and their signatures. Nothing here touches a socket.

Frame layout of one message, after any routing-identity frames that ROUTER sockets add:

    0    MAGIC (4 bytes: b"SHL" + protocol version) | signature (32 bytes) | header
    1…   buffers: raw bytes too large to travel inside the header

The header is msgpack ``[type, seq, body, small]``: ``small`` holds the message's leading
buffers while each is under 64 KiB (256 KiB in all), so that a typical message is one
zmq frame (every frame costs a few microseconds in pyzmq on each side). The signature is
HMAC-SHA256 with the cluster key over the frame count and every frame's length and bytes
(magic, header, buffers), so frames can be neither reordered, split, joined nor altered.
It is checked with ``hmac.compare_digest`` before the header is parsed; a payload is
unpickled only from a verified message. ``seq`` rises by one per message on a connection:
the transport drops anything not above the last seen value, which defeats replay. The
first message on every connection is HELLO (from the connecting side) or WELCOME (the
answer), carrying a fresh random connection id; a connection id is accepted once per
process lifetime.

On tcp connections only the HELLO and WELCOME (or REFUSED) are signed this way; every
later message is sealed with AES-GCM under keys of that connection (``_sealing.py``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import threading
from collections.abc import Sequence
from typing import Any

import msgpack

# 4: task events, state requests and stacks (message types 100-103) beside version 3's
# sealed tcp, resumable sessions, runtime env and fault tolerance messages. A peer of
# another version is refused at HELLO, rather than having messages it does not know dropped.
PROTOCOL_VERSION = 4
MAGIC = b"SHL" + bytes([PROTOCOL_VERSION])
SIGNATURE_SIZE = 32
PREFIX_SIZE = len(MAGIC) + SIGNATURE_SIZE

# Buffers that travel inside the header: each at most this big, and this much in all.
SMALL_BUFFER = 64 * 1024
SMALL_TOTAL = 256 * 1024

_pack_len = struct.Struct("<Q").pack
_pack_count = struct.Struct("<I").pack


class MsgType(enum.IntEnum):
    # handshake
    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    # owner <-> node manager: leases
    REQUEST_LEASE = 10
    LEASE_GRANTED = 11
    LEASE_FAILED = 12
    RETURN_LEASE = 13
    WORKER_DIED = 14
    BLOCKED = 15
    UNBLOCKED = 16
    CANCEL_LEASE_REQUEST = 17
    LEASE_QUEUED = 18
    LEASE_REVOKE = 19
    # owner <-> worker: tasks
    PUSH_TASK = 20
    TASK_DONE = 21
    STREAM_ITEM = 22
    CANCEL_TASK = 23
    # actors (owner <-> control store, control store <-> worker)
    CREATE_ACTOR = 30
    ACTOR_UPDATE = 31
    GET_ACTOR = 32
    ACTOR_INFO = 33
    KILL_ACTOR = 34
    SUBSCRIBE_ACTOR = 35
    BECOME_ACTOR = 36
    ACTOR_READY = 37
    ACTOR_CALL = 38
    RELEASE_ACTOR = 39
    # object store
    PUT_OBJECT = 40
    CREATE_OBJECT = 41
    OBJECT_CREATED = 42
    SEAL_OBJECT = 43
    GET_OBJECTS = 44
    OBJECTS = 45
    REF_UPDATES = 46
    FLUSHED = 48
    # cluster information and logs
    CLUSTER_INFO = 50
    CLUSTER_INFO_REPLY = 51
    LOG_LINES = 52
    EXIT = 53
    REPLY = 55
    LIST_OBJECTS = 56
    # node manager <-> control store (see _control_store.py)
    NODE_UPDATE = 60
    NODE_LEAVE = 61
    PROC_JOINED = 62
    PROC_GONE = 63
    UP = 64
    DOWN = 65
    ROUTE = 66
    TO_NODE = 67
    SPILL_LEASE = 68
    ACTOR_LEASE = 69
    ACTOR_LEASE_RESULT = 70
    KILL_WORKER = 71
    OWNER_GONE = 72
    LOCATE = 73
    LOCATED = 74
    OBJECT_SEALED = 75
    OBJECT_COPIED = 76
    FREE_OBJECTS = 77
    # node manager <-> node manager: object transfer
    PULL = 78
    CHUNK = 79
    # placement groups (process <-> control store <-> node managers)
    CREATE_PG = 80
    REMOVE_PG = 81
    PG_INFO = 82
    BUNDLE_RESERVE = 83
    BUNDLE_RESULT = 84
    BUNDLE_RELEASE = 85
    # a client (a driver off the cluster) <-> the head's node manager, over one connection
    RELAY = 86
    RELAYED = 87
    RELAY_CLOSE = 88
    PUSH_CHUNK = 89
    CHUNK_ACK = 90
    PING = 91
    PONG = 92
    # transport: a resumable session's acknowledgement (never reaches the application)
    ACK = 93
    # runtime environments (runtime_env/): packages through the head, eager builds
    PACKAGE_UPLOAD = 120
    PACKAGE_FETCH = 121
    PACKAGE_DATA = 122
    PREPARE_ENV = 123

    # fault tolerance: nodes and objects (docs/fault_tolerance.md)
    NODE_DIED = 140  # control store -> nodes: a node is gone (drop pulls from it)
    NODE_DEAD = 141  # head -> a node it declared dead: restart as a new node
    REBUILD_OBJECT = 142  # control store -> an owner: run again the task that made it
    REBUILD_FAILED = 143  # owner -> control store: it cannot be rebuilt (and why)
    # observability: task events, the state API, stacks (see _task_events.py, _stacks.py)
    TASK_EVENTS = 100
    STATE = 101
    STACK = 102
    STACK_DUMP = 103


_MSG_TYPES = {int(t): t for t in MsgType}  # a dict look-up is 10x cheaper than MsgType(n)
_MAGIC_FIELD = _pack_len(len(MAGIC)) + MAGIC


class _Packers(threading.local):
    # msgpack.packb makes a Packer per call; reusing one halves the cost. One per thread,
    # since a Packer keeps its buffer between calls.
    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


class ProtocolError(Exception):
    """A message that is not ours, is malformed, or fails authentication."""


class Message:
    """One message: a type, a msgpack-able body and raw buffers."""

    __slots__ = ("body", "frames", "type")

    def __init__(self, type: MsgType, body: Any = None, frames: Sequence[Any] = ()) -> None:
        self.type = type
        self.body = body
        self.frames = frames

    def __repr__(self) -> str:
        return f"Message({self.type.name}, {self.body!r}, {len(self.frames)} frames)"


def split_small(buffers: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]]:
    """The leading buffers that travel inside the header, and the rest (frames of their own)."""
    small = 0
    total = 0
    for buf in buffers:
        n = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
        if n > SMALL_BUFFER or total + n > SMALL_TOTAL:
            break
        total += n
        small += 1
    return buffers[:small], buffers[small:]


class Signer:
    """Signs and verifies frame lists with the cluster key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the cluster key must be at least 16 bytes")
        self.key = key  # tcp connections derive their keys from it (_sealing.py)
        # Keyed once: copying a keyed HMAC is cheaper than keying a new one per message. The
        # C object inside hmac.HMAC (when OpenSSL provides it) has the same copy, update and
        # digest; using it directly halves the cost of signing a small message.
        base = hmac.new(key, digestmod=hashlib.sha256)
        self._base: Any = getattr(base, "_hmac", None) or base

    def signature(self, header: Any, buffers: Sequence[Any]) -> bytes:
        h = self._base.copy()
        # Frame count, then each frame's length and bytes: MAGIC, header, buffers.
        h.update(_pack_count(len(buffers) + 2) + _MAGIC_FIELD + _pack_len(len(header)))
        h.update(header)
        for buf in buffers:
            view = memoryview(buf)
            h.update(_pack_len(view.nbytes))
            h.update(view)
        return h.digest()

    def encode(self, msg: Message, seq: int) -> list[Any]:
        if not msg.frames:
            header = _packers.packer.pack((msg.type.value, seq, msg.body, ()))
            return [MAGIC + self.signature(header, ()) + header]
        small, wire = split_small(msg.frames)
        header = _packers.packer.pack((msg.type.value, seq, msg.body, small))
        return [MAGIC + self.signature(header, wire) + header, *wire]

    def decode(self, frames: Sequence[Any]) -> tuple[Message, int]:
        """Verify then parse ``frames`` (zmq Frames, bytes or buffers; routing ids removed)."""
        if not frames:
            raise ProtocolError("an empty message")
        first = _as_bytes(frames[0])
        if len(first) < PREFIX_SIZE or first[: len(MAGIC)] != MAGIC:
            raise ProtocolError("bad magic or protocol version")
        sig = first[len(MAGIC) : PREFIX_SIZE]
        header = first[PREFIX_SIZE:]
        wire = [_as_buffer(f) for f in frames[1:]]
        if not hmac.compare_digest(sig, self.signature(header, wire)):
            raise ProtocolError("signature mismatch")
        # Verified: only now is anything parsed.
        try:
            mtype, seq, body, small = msgpack.unpackb(header, raw=False, strict_map_key=False)
            return Message(_MSG_TYPES[mtype], body, [*small, *wire] if wire else small), int(seq)
        except Exception as exc:
            raise ProtocolError(f"malformed header: {exc}") from None


def _as_bytes(frame: Any) -> Any:
    # bytes, or a buffer the local transport read a large frame into; a zmq.Frame copies.
    return frame if isinstance(frame, (bytes, bytearray, memoryview)) else frame.bytes


def _as_buffer(frame: Any) -> Any:
    # zmq.Frame exposes its memory through .buffer without a copy.
    return frame if isinstance(frame, (bytes, bytearray, memoryview)) else frame.buffer
