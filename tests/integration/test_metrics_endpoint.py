"""Metrics in client-server mode and the HTTP endpoint under attack: a head started with
`shoal start --head --port --metrics-port`, a client driver in this process (tcp, with
the key file) whose tasks and own code record metrics, `shoal metrics --address`, a
Prometheus-style scrape with the key file's text as the bearer token, and hostile peers
(random bytes, huge headers, malformed requests, a slowloris connection, more idle
connections than the endpoint keeps) that neither stop it nor block the head.
"""

from __future__ import annotations

import json
import os
import socket
import time

import prometheus_text
import pytest
import shoal
import shoal.state as state
from shoal import testing
from shoal._metrics_http import MAX_CONNECTIONS, REQUEST_TIMEOUT
from shoal.util.metrics import Counter, Gauge

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def head(shoal_cli, leak_check, tmp_path_factory):
    """(cluster port, metrics port, key file) of a head started by `shoal start --head`."""
    port, metrics_port = testing.free_port(), testing.free_port()
    key = str(tmp_path_factory.mktemp("key") / "cluster.key")
    started = shoal_cli(
        "start", "--head", "--port", str(port), "--metrics-port", str(metrics_port),
        "--num-cpus", "2", "--key-file", key,
    )  # fmt: skip
    try:
        assert started.returncode == 0, testing.describe_run(started)
        assert f"metrics:   http://127.0.0.1:{metrics_port}/metrics" in started.stdout
        yield port, metrics_port, key
    finally:
        stopped = shoal_cli("stop")
        leak_check("after `shoal stop` of the metrics endpoint tests' head")
    assert stopped.returncode == 0, testing.describe_run(stopped)


def _token(key_file: str) -> str:
    with open(key_file) as f:
        return f.read().strip()


def _request(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send ``raw``, then read until the server closes; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return _read_to_end(sock, timeout)


def _read_to_end(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _scrape(port: int, token: str | None, path: str = "/metrics") -> tuple[int, bytes]:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    answer = _request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_start_and_init_refuse_bad_metrics_options(shoal_cli):
    result = shoal_cli("start", "--address", "127.0.0.1:1", "--metrics-port", "9")
    assert result.returncode == 1 and "go with --head" in result.stderr
    result = shoal_cli("start", "--head", "--metrics-bind", "0.0.0.0")
    assert result.returncode == 1 and "--metrics-bind needs --metrics-port" in result.stderr
    result = shoal_cli("start", "--head", "--metrics-port", "70000")
    assert result.returncode == 1 and "--metrics-port must be a port number" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        result = shoal_cli("start", "--head", "--metrics-port", str(taken), "--num-cpus", "1")
    assert result.returncode == 1, testing.describe_run(result)
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in result.stderr
    with pytest.raises(ValueError, match="metrics_export_port must be a port number"):
        shoal.init(metrics_export_port=70000)
    with pytest.raises(ValueError, match="cannot be set when joining"):
        shoal.init("auto", metrics_export_port=1234)
    assert not shoal.is_initialized()


def test_a_client_drivers_metrics_through_the_head(head, shoal_cli):
    port, metrics_port, key = head
    shoal.init(f"tcp://127.0.0.1:{port}", key_file=key)
    try:
        assert shoal._api._cluster is not None and shoal._api._cluster.core.client
        Counter("cs_driver_calls", "Counted by the client driver.").inc(3)
        Gauge("cs_driver_gauge", "Set by the client driver.").set(8)

        @shoal.remote
        def on_the_cluster(i: int) -> int:
            from shoal.util.metrics import Counter

            Counter("cs_task_calls", "Counted by tasks.", tag_keys=("parity",)).inc(
                tags={"parity": "even" if i % 2 == 0 else "odd"}
            )
            return i

        assert shoal.get([on_the_cluster.remote(i) for i in range(10)]) == list(range(10))

        def all_there():
            records = {(m["name"], tuple(m["tags"].values())): m for m in state.list_metrics()}
            wanted = {
                ("cs_driver_calls", ()): 3,
                ("cs_driver_gauge", ()): 8,
                ("cs_task_calls", ("even",)): 5,
                ("cs_task_calls", ("odd",)): 5,
            }
            return all(k in records and records[k]["value"] == v for k, v in wanted.items())

        testing.wait_for(all_there, timeout=20, interval=0.1)
        result = shoal_cli("metrics", "--address", f"127.0.0.1:{port}", "--key-file", key)
        assert result.returncode == 0, testing.describe_run(result)
        families = prometheus_text.parse(result.stdout)
        assert prometheus_text.value(families, "cs_task_calls_total", parity="odd") == 5
        assert prometheus_text.value(families, "cs_driver_gauge") == 8
        assert (
            prometheus_text.value(families, "shoal_tasks", name="on_the_cluster", state="FINISHED")
            == 10
        )
        result = shoal_cli("metrics", "--json", "--address", f"127.0.0.1:{port}", "--key-file", key)
        assert result.returncode == 0, testing.describe_run(result)
        assert any(m["name"] == "cs_driver_calls" for m in json.loads(result.stdout)["metrics"])
    finally:
        shoal.shutdown()

    # Scraped over HTTP with the key file's text, as Prometheus' credentials_file does. The
    # client is gone: its counter stays, its gauge went with it.
    def scraped_after_the_client_left():
        status, body = _scrape(metrics_port, _token(key))
        assert status == 200, body
        families = prometheus_text.parse(body.decode())
        gone = prometheus_text.value(families, "cs_driver_gauge") is None
        return families if gone else None

    families = testing.wait_for(scraped_after_the_client_left, timeout=40, interval=0.2)
    assert prometheus_text.value(families, "cs_driver_calls_total") == 3
    assert prometheus_text.value(families, "cs_task_calls_total", parity="even") == 5
    assert families["cs_driver_gauge"]["samples"] == []  # still defined, no value


def test_scrapes_without_the_token_get_401_and_nothing_else(head):
    _, metrics_port, key = head
    assert _scrape(metrics_port, None) == (401, b"unauthorized\n")
    assert _scrape(metrics_port, "00" * 32) == (401, b"unauthorized\n")
    assert _scrape(metrics_port, _token(key)[:-1]) == (401, b"unauthorized\n")
    assert _scrape(metrics_port, None, "/nothing") == (401, b"unauthorized\n")
    for _ in range(100):  # no lockout, nothing kept per attempt
        assert _scrape(metrics_port, "wrong")[0] == 401
    assert _scrape(metrics_port, _token(key))[0] == 200


def test_hostile_bytes_and_headers_are_refused_and_the_endpoint_goes_on(head):
    _, metrics_port, key = head
    token = _token(key)
    # Random bytes: no request in 8 KiB, so 431, and the connection ends.
    answer = _request(metrics_port, os.urandom(64 * 1024))
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b""
    # A huge header, a bad request line, a header line without a colon.
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    assert _request(metrics_port, huge).startswith(b"HTTP/1.1 431 ")
    assert _request(metrics_port, b"\x00\xff\xfe nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _request(metrics_port, b"GET /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    no_colon = f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {token}\r\nbroken\r\n\r\n"
    assert _request(metrics_port, no_colon.encode()).startswith(b"HTTP/1.1 400 ")
    # A request with a body: the body is never read, the answer still arrives whole.
    with_body = (
        f"POST /metrics HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 200000\r\n\r\n"
    ).encode() + b"b" * 200_000
    assert _request(metrics_port, with_body).startswith(b"HTTP/1.1 405 ")
    # A peer that connects and closes at once, or half-way through a request.
    for raw in (b"", b"GET /met"):
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as sock:
            sock.sendall(raw)
    assert _scrape(metrics_port, token)[0] == 200


def test_a_slowloris_connection_is_closed_and_blocks_nothing(head):
    port, metrics_port, key = head
    token = _token(key)
    slow = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
    opened = time.monotonic()
    try:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        # While it trickles a header line now and then, others are served at once, and
        # the head's loop goes on (a client driver's task runs).
        status, _ = _scrape(metrics_port, token)
        assert status == 200
        shoal.init(f"tcp://127.0.0.1:{port}", key_file=key)
        try:

            @shoal.remote
            def during_slowloris() -> str:
                return "ran"

            assert shoal.get(during_slowloris.remote(), timeout=30) == "ran"
        finally:
            shoal.shutdown()
        slow.settimeout(0.3)
        closed_at = None
        while time.monotonic() - opened < REQUEST_TIMEOUT + 10:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                data = slow.recv(4096)
                if data == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "the slow connection was never closed"
        assert REQUEST_TIMEOUT - 0.5 <= closed_at - opened <= REQUEST_TIMEOUT + 3
    finally:
        slow.close()
    assert _scrape(metrics_port, token)[0] == 200


def test_more_idle_connections_than_kept_evict_the_oldest(head):
    _, metrics_port, key = head
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 36):
            idle.append(socket.create_connection(("127.0.0.1", metrics_port), timeout=5))
        started = time.monotonic()
        assert _scrape(metrics_port, _token(key))[0] == 200
        assert time.monotonic() - started < 3

        def closed(sock: socket.socket) -> bool:
            sock.settimeout(0.01)
            try:
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

        # The oldest went to make room; at most MAX_CONNECTIONS are held at any time.
        testing.wait_for(
            lambda: sum(closed(s) for s in idle) >= len(idle) - MAX_CONNECTIONS + 1, timeout=10
        )
        assert closed(idle[0]) and not closed(idle[-1])
    finally:
        for sock in idle:
            sock.close()
