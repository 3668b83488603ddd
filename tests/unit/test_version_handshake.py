"""The version handshake: a peer of another protocol or Python version is refused with a
message that names the mismatch, on both sides (the refused side's error, the listener's
log). Over tcp on loopback; the local carrier shares the same handshake code."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from shoal import _transport
from shoal._ioloop import IOLoop
from shoal._protocol import Signer
from shoal._transport import Connection, Listener

pytestmark = pytest.mark.timeout(20)

KEY = b"V" * 32


@pytest.mark.parametrize(
    ("field", "theirs", "named"),
    [("py", "3.99", "Python version mismatch"), ("proto", 999, "protocol version mismatch")],
)
def test_a_version_mismatch_is_refused_with_a_clear_reason(field, theirs, named, caplog):
    ctx = None
    loop = IOLoop()
    listener = Listener(ctx, Signer(KEY), lambda ident, body: {"ok": True}, lambda *a: None)
    address = listener.bind("tcp://127.0.0.1:*")
    refused: list[str] = []
    conn = Connection(ctx, Signer(KEY), address, {field: theirs}, lambda msg: None, refused.append)
    listener.attach(loop)
    conn.attach(loop)
    limiter = _transport._reject_log
    _transport._reject_log = _transport.RateLimitedLog(logging.getLogger("test.handshake"))
    try:
        with caplog.at_level(logging.WARNING, logger="test.handshake"):
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                loop.run_once(20)
        assert refused, "the connecting side was told nothing"
        assert named in refused[0] and str(theirs) in refused[0]
        assert conn.welcome is None and not listener.peers
        logged: Any = [r.getMessage() for r in caplog.records]
        assert any(named in line for line in logged), logged
    finally:
        _transport._reject_log = limiter
        conn.close()
        listener.close()
        loop.close()
