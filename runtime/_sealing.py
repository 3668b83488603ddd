"""Authenticated encryption of the messages on a tcp connection (AES-256-GCM).

The HELLO and the WELCOME (or REFUSED) of every connection are signed with HMAC-SHA256
(``_protocol.Signer``): they carry each side's fresh 16-byte connection id and the version
fields. On a tcp:// connection every later message is sealed instead of signed:

    keys   HKDF-SHA256(the cluster key, salt = HELLO's connection id | WELCOME's id,
           info = "shoal/3 tcp <direction>"): one 32-byte key per direction and connection
    frame  AES-GCM(key, nonce, the frame's bytes, aad) = ciphertext | tag (16 bytes)
    nonce  the message's sequence number (u64) | the frame's index (u32), little-endian
    aad    MAGIC | frame count (u32) | each sealed frame's length (u32): the length table

A message's frames are its msgpack header ``[type, seq, body, small]`` (as ``Signer``
builds it, without MAGIC and signature) and its large buffers, each sealed on its own.
Sequence numbers rise by one per message on a connection and each direction of each
connection has its own key, so a nonce is never used twice under one key. The receiver
opens a message with the sequence number it expects next: a replayed, reordered, dropped,
altered, split or joined message fails the tag check. Every frame of a message is opened
(verified) before its header is parsed.

AES-GCM costs less than the HMAC it replaces here (about 3.5 GB/s per core against 1.5 for
HMAC-SHA256, both with the CPU's instructions for them). ipc:// connections (Unix sockets
in the 0700 session directory) keep HMAC: nothing crosses a network there.

``cryptography`` is imported on first use, so processes that never make a tcp connection
(most workers of a one-machine cluster) do not pay its ~8 ms of import time.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgpack

from ._protocol import _MSG_TYPES, MAGIC, Message, MsgType, ProtocolError, _packers, split_small

TAG = 16  # bytes an AES-GCM tag adds to each frame
# Frames up to this size are sealed and opened into new bytes; a larger one into a
# bytearray of its own (``encrypt_into``/``decrypt_into``), so that a received value can be
# handed out read-only without a copy.
_INTO = 16 * 1024

# Sealed large frames between these sizes (chunks of large objects) go out from buffers
# used again once sent, at most this many in a process (a client's get has 6 chunks in
# flight, a pull between nodes 4).
SPARE_MIN = 1024 * 1024
SPARE_MAX = 16 * 1024 * 1024 + TAG
SPARES = 8

_nonce = struct.Struct("<QI").pack
_aad_one = struct.Struct("<4sII").pack  # MAGIC and the length table of a one-frame message

CONNECTING_TO_LISTENING = b"shoal/3 tcp connecting->listening"
LISTENING_TO_CONNECTING = b"shoal/3 tcp listening->connecting"
RESUME_INFO = b"shoal/3 resume"


Sink = Callable[[MsgType, Any, int, int], Any]


class Sealer:
    """Seals (or opens) the messages of one direction of one connection."""

    __slots__ = ("_aead", "_into", "_invalid")

    def __init__(self, key: bytes) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead: Any = AESGCM(key)
        self._invalid = InvalidTag
        # encrypt_into/decrypt_into came with cryptography 47; before, large frames take
        # the copying calls (one more allocation each).
        self._into = _INTO if hasattr(self._aead, "encrypt_into") else 1 << 62

    def seal(self, msg: Message, seq: int) -> list[Any]:
        if not msg.frames:  # most messages: one frame, and a shorter way
            header = _packers.packer.pack((msg.type.value, seq, msg.body, ()))
            aad = _aad_one(MAGIC, 1, len(header) + TAG)
            return [self._aead.encrypt(_nonce(seq, 0), header, aad)]
        small, wire = split_small(msg.frames)
        header = _packers.packer.pack((msg.type.value, seq, msg.body, small))
        if not wire:
            return [
                self._aead.encrypt(_nonce(seq, 0), header, _aad_one(MAGIC, 1, len(header) + TAG))
            ]
        lens = [len(header) + TAG]
        for buf in wire:
            lens.append((len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes) + TAG)
        aad = MAGIC + struct.pack(f"<{len(lens) + 1}I", len(lens), *lens)
        aead = self._aead
        out: list[Any] = [aead.encrypt(_nonce(seq, 0), header, aad)]
        into = self._into
        for i, buf in enumerate(wire, 1):
            n = lens[i]
            if n <= into:
                out.append(aead.encrypt(_nonce(seq, i), buf, aad))
            else:
                sealed = _buffer(n)
                aead.encrypt_into(_nonce(seq, i), buf, aad, sealed)
                out.append(sealed)
        return out

    def open(self, frames: Sequence[Any], seq: int, sink: Sink | None = None) -> Message:
        """Verify and decrypt a message expected to carry ``seq``, then parse it.

        Each frame is verified before anything in it is used. The header (frame 0) is
        parsed once it is verified, before the large frames are opened, so that ``sink(type,
        body, index, nbytes)`` can name where the plaintext of large frame ``index`` goes
        (a writable buffer of ``nbytes``; None: a new buffer). A frame that fails its
        check after that leaves garbage there, and the message is dropped: a sink's
        buffer must be one that nobody reads before its message was delivered.
        """
        if not frames:
            raise ProtocolError("an empty message")
        lens = [len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames]
        if min(lens) < TAG:
            raise ProtocolError("a sealed frame shorter than its tag")
        if len(lens) == 1:
            aad = _aad_one(MAGIC, 1, lens[0])
        else:
            aad = MAGIC + struct.pack(f"<{len(lens) + 1}I", len(lens), *lens)
        aead = self._aead
        try:
            header = aead.decrypt(_nonce(seq, 0), frames[0], aad)
        except self._invalid:
            raise _forged() from None
        # Verified: only now is it parsed.
        try:
            mtype, got, body, small = msgpack.unpackb(header, raw=False, strict_map_key=False)
            mtype = _MSG_TYPES[mtype]
        except Exception as exc:
            raise ProtocolError(f"malformed header: {exc}") from None
        if got != seq:
            raise ProtocolError(f"sequence number {got} where {seq} was due")
        if len(frames) == 1:
            return Message(mtype, body, small)
        wire: list[Any] = []
        into = self._into
        try:
            for i in range(1, len(frames)):
                n = lens[i] - TAG
                if n <= into:
                    wire.append(aead.decrypt(_nonce(seq, i), frames[i], aad))
                    continue
                dest = None
                if sink is not None:
                    try:
                        dest = sink(mtype, body, i - 1, n)
                    except (KeyError, TypeError, ValueError, AttributeError):
                        dest = None  # a body the sink does not understand: not its message
                if dest is None:
                    plain = bytearray(n)
                    aead.decrypt_into(_nonce(seq, i), frames[i], aad, plain)
                    # Read-only, as a value in shared memory is: the receiver must not write it.
                    wire.append(memoryview(plain).toreadonly())
                else:
                    aead.decrypt_into(_nonce(seq, i), frames[i], aad, dest)
                    wire.append(dest)
        except self._invalid:
            raise _forged() from None
        return Message(mtype, body, [*small, *wire])


# Buffers that sealed large frames went out from, shared by the process's connections (all
# sealing is loop work, one thread at a time), and when the last one was handed out.
_spares: list[bytearray] = []
_spares_used = 0.0


def _buffer(n: int) -> bytearray:
    """A buffer for a sealed frame of ``n`` bytes: one sent before, when nothing refers to
    it any more (the stream let go of it once it was sent), else a new one. A fresh large
    buffer costs its zeroing and, on a VM, page faults: a third of sealing."""
    global _spares_used
    if SPARE_MIN <= n <= SPARE_MAX:
        _spares_used = time.monotonic()
        for buf in _spares:
            # References: the list, the loop variable, getrefcount's argument.
            if len(buf) == n and sys.getrefcount(buf) == 3:
                return buf
        buf = bytearray(n)
        if len(_spares) < SPARES:
            _spares.append(buf)
        return buf
    return bytearray(n)


def trim_spares(idle_seconds: float = 2.0) -> None:
    """Let the spare buffers go when no large frame was sealed for ``idle_seconds`` (a
    process's periodic tick calls this)."""
    if _spares and time.monotonic() - _spares_used > idle_seconds:
        _spares.clear()


def _forged() -> ProtocolError:
    return ProtocolError("authentication failed (a forged, altered, replayed or reordered message)")


class SessionKeys(NamedTuple):
    """What both ends of one connection derive from the cluster key and its two ids."""

    outgoing: Sealer  # the connecting side's messages
    incoming: Sealer  # the listening side's messages
    resume: bytes  # proves, on a later connection, that it resumes this one's session


def session_keys(cluster_key: bytes, hello_conn: bytes, welcome_conn: bytes) -> SessionKeys:
    salt = hello_conn + welcome_conn
    return SessionKeys(
        Sealer(_hkdf(cluster_key, salt, CONNECTING_TO_LISTENING)),
        Sealer(_hkdf(cluster_key, salt, LISTENING_TO_CONNECTING)),
        _hkdf(cluster_key, salt, RESUME_INFO),
    )


def resume_proof(secret: bytes, conn_id: bytes) -> bytes:
    """Sent in a resuming HELLO: bound to that HELLO's fresh connection id, so it is worth
    nothing on any other connection."""
    return hmac.new(secret, RESUME_INFO + conn_id, hashlib.sha256).digest()


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def preload() -> None:
    """Import ``cryptography`` now (a worker template does, on a node that takes tcp)."""
    Sealer(bytes(32))
