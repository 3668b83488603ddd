"""The opt-in HTTP endpoint Prometheus scrapes: ``GET /metrics``, with the cluster key.

    shoal start --head --metrics-port 9091 [--metrics-bind 127.0.0.1]
    curl -H "Authorization: Bearer $(cat cluster.key)" http://127.0.0.1:9091/metrics

Served by the head's IO loop, never blocking it: a non-blocking listening socket and
non-blocking connections, each read and written as poll says it can be. One request per
connection (``Connection: close``). Only the request line and header lines are looked at
before the token is checked, and a request body is never read. Against hostile peers:

- a request (line and headers) may be at most MAX_REQUEST bytes (else 431, then close);
- a connection has REQUEST_TIMEOUT seconds from its accept to deliver its request and
  RESPONSE_TIMEOUT more to take the answer; past that it is closed (slowloris);
- at most MAX_CONNECTIONS at once: one more evicts the oldest that is still sending its
  request (an idle connection costs its holder as much as it costs us);
- the token is compared with ``hmac.compare_digest``; a wrong or missing one gets 401
  and nothing else, whatever the path.

Making the text is the only work proportional to the data; it is bounded by the metric
stores' series limit (a few milliseconds for thousands of series).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ._ioloop import IOLoop, TimerHandle
from ._prometheus import CONTENT_TYPE

log = logging.getLogger("shoal.metrics")

MAX_REQUEST = 8 * 1024
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = float(os.environ.get("SHOAL_METRICS_HTTP_TIMEOUT", 5.0))
RESPONSE_TIMEOUT = 10.0
LINGER_SECONDS = 1.0  # after the answer: read what the peer still sends, then close
SWEEP_SECONDS = 0.25

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class _Conn:
    __slots__ = ("deadline", "inbuf", "out", "phase", "sock", "writing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.phase = "request"  # then "response", then "linger"
        self.writing = False  # a writer is registered for the socket


class MetricsHttpServer:
    def __init__(
        self,
        loop: IOLoop,
        host: str,
        port: int,
        key: bytes,
        render: Callable[[], str],
    ) -> None:
        self.loop = loop
        self.render = render
        self.token = key.hex().encode()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.conns: dict[socket.socket, _Conn] = {}  # oldest first
        self.served = 0
        loop.add_reader(sock, self._accept)
        self._timer: TimerHandle | None = loop.call_later(SWEEP_SECONDS, self._sweep)
        self.closed = False

    # -- connections ---------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of descriptors, say: stop accepting for a moment rather than spin.
                log.warning("metrics endpoint cannot accept: %s", exc)
                self.loop.remove_reader(self.sock)
                self.loop.call_later(1.0, self._resume)
                return
            sock.setblocking(False)
            if len(self.conns) >= MAX_CONNECTIONS and not self._evict():
                sock.close()
                continue
            conn = _Conn(sock, time.monotonic() + REQUEST_TIMEOUT)
            self.conns[sock] = conn
            self.loop.add_reader(sock, lambda c=conn: self._read(c))

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock, self._accept)

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request; False if none is."""
        for conn in self.conns.values():
            if conn.phase != "response":
                self._close(conn)
                return True
        return False

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock, None) is None:
            return
        self.loop.remove_reader(conn.sock)
        self.loop.remove_writer(conn.sock)
        conn.sock.close()

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if now > c.deadline]:
            self._close(conn)
        if not self.closed:
            self._timer = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for conn in list(self.conns.values()):
            self._close(conn)
        self.loop.remove_reader(self.sock)
        self.sock.close()

    # -- reading the request -------------------------------------------------------------
    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if conn.phase == "linger":
            return  # what a client sends after its answer is read and dropped
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_REQUEST:
            if len(conn.inbuf) > MAX_REQUEST:
                self._respond(conn, 431, b"request too large\n")
            return
        head = bytes(conn.inbuf[:end])
        conn.inbuf = bytearray()
        try:
            status, body, extra = self._answer(head)
        except Exception:
            log.exception("metrics endpoint failed to answer")
            status, body, extra = 500, b"internal error\n", ""
        # HEAD: the headers a GET would have, without the body.
        self._respond(conn, status, body, extra, head_only=head.startswith(b"HEAD "))

    def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"bad request line\n", ""
        auth = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return 400, b"bad header line\n", ""
            if name.strip().lower() == b"authorization":
                auth = value.strip()
        if not self._authorized(auth):
            return 401, b"unauthorized\n", 'WWW-Authenticate: Bearer realm="shoal"\r\n'
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            return 404, b"not found: the metrics are at /metrics\n", ""
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", "Allow: GET, HEAD\r\n"
        self.served += 1
        return 200, self.render().encode(), ""

    def _authorized(self, auth: bytes) -> bool:
        scheme, _, token = auth.partition(b" ")
        # Compared whatever the scheme, so the time taken says nothing about the token.
        same = hmac.compare_digest(token.strip().lower(), self.token)
        return scheme.lower() == b"bearer" and same

    # -- writing the answer --------------------------------------------------------------
    def _respond(
        self, conn: _Conn, status: int, body: bytes, extra: str = "", head_only: bool = False
    ) -> None:
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n"
        ).encode()
        conn.out = memoryview(head if head_only else head + body)
        conn.phase = "response"
        conn.deadline = time.monotonic() + RESPONSE_TIMEOUT
        self.loop.remove_reader(conn.sock)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[n:]
        if conn.out:
            if not conn.writing:
                conn.writing = True
                self.loop.add_writer(conn.sock, lambda: self._write(conn))
            return
        if conn.writing:
            conn.writing = False
            self.loop.remove_writer(conn.sock)
        # Half-close and drain a moment before closing: closing a socket that holds unread
        # input sends a reset, which may make the client lose the answer.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.phase = "linger"
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self.loop.add_reader(conn.sock, lambda: self._read(conn))

    def info(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "connections": len(self.conns)}
