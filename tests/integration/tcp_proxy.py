"""A forwarding TCP proxy for tests: real sockets, one thread, and a recording of the bytes.

``TcpProxy(upstream)`` listens on a free loopback port and forwards every connection it
accepts to ``upstream`` (host, port), both ways. It can

- record everything that crossed it (``record=True``; ``recorded()``),
- cut every connection with a reset (``reset()``: SO_LINGER 0 on both sockets, so both
  ends get an RST, as when a NAT or a firewall forgets a connection),
- go down (``down()``: reset everything, then answer each new connection with a reset:
  ``rejected`` counts them) and come back (``up()``),
- reset every connection once ``reset_after`` bytes went downstream (``arm_reset``), so a
  test can cut a transfer in its middle without racing it.

The thread owns every socket; other threads hand it commands through a queue and a pipe,
and wait for them to be done.
"""

from __future__ import annotations

import collections
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

_LINGER_ZERO = struct.pack("ii", 1, 0)
CHUNK = 1 << 20


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass
    sock.close()


class TcpProxy:
    def __init__(self, upstream: tuple[str, int], record: bool = False) -> None:
        self.upstream = upstream
        self.record = record
        self.upstream_bytes = bytearray()  # client -> server, when recording
        self.downstream_bytes = bytearray()  # server -> client
        self.up_count = 0  # bytes forwarded each way
        self.down_count = 0
        self.accepted = 0  # connections forwarded
        self.rejected = 0  # connections reset at once while down
        self.resets = 0  # times every connection was cut
        self._accepting = True
        self._reset_at: int | None = None
        self._reset_upstream = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.setblocking(False)
        self.port = self._server.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._server, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._peer: dict[socket.socket, socket.socket] = {}
        self._downstream: set[socket.socket] = set()  # sockets whose bytes go to the client
        self._commands: collections.deque[tuple[Callable[[], Any], threading.Event]] = (
            collections.deque()
        )
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- commands (any thread) ---------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> None:
        done = threading.Event()
        self._commands.append((fn, done))
        os.write(self._wake_w, b"x")
        if not done.wait(10):
            raise TimeoutError("the proxy thread did not run a command within 10 s")

    def reset(self) -> None:
        """Cut every connection now (an RST to both ends)."""
        self._call(self._reset_all)

    def down(self) -> None:
        """Cut every connection, then reset each new one at once until ``up``."""

        def go_down() -> None:
            self._accepting = False
            self._reset_all()

        self._call(go_down)

    def up(self) -> None:
        def go_up() -> None:
            self._accepting = True

        self._call(go_up)

    def arm_reset(self, after_bytes: int, upstream: bool = False) -> None:
        """Cut every connection once this many more bytes went to the client (or, with
        ``upstream``, to the server)."""

        def arm() -> None:
            self._reset_upstream = upstream
            self._reset_at = (self.up_count if upstream else self.down_count) + after_bytes

        self._call(arm)

    def recorded(self) -> bytes:
        with self._lock:
            return bytes(self.upstream_bytes) + bytes(self.downstream_bytes)

    def close(self) -> None:
        if self._stopped:
            return

        def stop() -> None:
            self._stopped = True
            self._reset_all()

        self._call(stop)
        self._thread.join(10)
        self._server.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the proxy thread --------------------------------------------------------------
    def _reset_all(self) -> None:
        for sock in list(self._peer):
            self._sel.unregister(sock)
            _reset(sock)
        if self._peer:
            self.resets += 1
        self._peer.clear()
        self._downstream.clear()
        self._reset_at = None

    def _accept(self) -> None:
        try:
            client, _ = self._server.accept()
        except BlockingIOError:
            return
        if not self._accepting:
            self.rejected += 1
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(10)  # a send never blocks forever: both ends keep reading
        self._peer[client], self._peer[server] = server, client
        self._downstream.add(server)
        self._sel.register(client, selectors.EVENT_READ, None)
        self._sel.register(server, selectors.EVENT_READ, None)
        self.accepted += 1

    def _forward(self, sock: socket.socket) -> None:
        other = self._peer.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            # One end went away: so does the other (as a NAT would show it: an RST).
            self._sel.unregister(sock)
            self._sel.unregister(other)
            del self._peer[sock], self._peer[other]
            self._downstream.discard(sock)
            self._downstream.discard(other)
            sock.close()
            _reset(other)
            return
        downstream = sock in self._downstream
        if self.record:
            with self._lock:
                (self.downstream_bytes if downstream else self.upstream_bytes).extend(data)
        try:
            other.sendall(data)
        except OSError:
            self._reset_all()
            return
        if downstream:
            self.down_count += len(data)
        else:
            self.up_count += len(data)
        count = self.up_count if self._reset_upstream else self.down_count
        if self._reset_at is not None and count >= self._reset_at:
            self._reset_all()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._sel.select(0.5):
                if key.data == "wake":
                    os.read(self._wake_r, 4096)
                    while self._commands:
                        fn, done = self._commands.popleft()
                        try:
                            fn()
                        finally:
                            done.set()
                elif key.fileobj is self._server:
                    if not self._stopped:
                        self._accept()
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock in self._peer:
                        self._forward(sock)
