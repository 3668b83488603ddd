"""tcp links to a head, through a forwarding proxy of the test's own (real sockets,
``tcp_proxy.py``): a client (``shoal.init("tcp://PROXY", key_file=...)`` in this process)
and a node (``shoal start --address PROXY``), and a head started with
``shoal start --head --port 0``.

- What crosses the wire is encrypted: a marker put, passed to a task and returned by it
  never appears in the bytes the proxy forwarded, and everything comes back right.
- A reset connection (the proxy cuts both ends with an RST) resumes within the grace
  period: while idle, with tasks and actor calls in flight (their results are made while
  the client is cut off), and in the middle of a large get and a large put. Every result
  is right and nothing runs twice (an actor's counter is incremented exactly N times).
- A node's link to the head resumes the same way: the node stays the same node, and work
  placed on it runs before and after.
- A client cut off for longer than SHOAL_CLIENT_TIMEOUT (3 s here, on both sides) gets the
  clear "disconnected" error, nothing hangs, and the head frees what the client held (its
  object and its actor).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shoal
from shoal import _config, testing
from shoal.exceptions import ShoalError
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

MARKER = "plain-text-marker-7f3a9c"


class Head:
    def __init__(self, directory: str, key_file: str) -> None:
        [session] = glob.glob(os.path.join(directory, "session_2*"))
        with open(os.path.join(session, "head.json")) as f:
            info = json.load(f)
        self.directory = directory
        self.key_file = key_file
        self.tag = info["tag"]
        host, port = info["tcp"].removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))


def _start_head(
    shoal_cli: Callable[..., Any], work: Path, name: str, env: dict[str, str]
) -> Iterator[Head]:
    directory = tempfile.mkdtemp(prefix=f"shoal-cl-{name}-", dir="/tmp")  # short: ipc paths
    key_file = str(work / f"{name}.key")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var, value in env.items():
                mp.setenv(var, value)
            started = shoal_cli(
                "start", "--head", "--port", "0", "--bind", "127.0.0.1", "--key-file", key_file,
                "--num-cpus", "2", "--temp-dir", directory,
            )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        yield Head(directory, key_file)
    finally:
        if shoal.is_initialized():
            shoal.shutdown()
        stopped = shoal_cli("stop", "--temp-dir", directory)
        shutil.rmtree(directory, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def head(
    shoal_cli: Callable[..., Any],
    leak_check: Callable[..., None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Head]:
    yield from _start_head(shoal_cli, tmp_path_factory.mktemp("link"), "head", {})
    leak_check("after the head the clients connected to")


@pytest.fixture
def proxy(head: Head) -> Iterator[TcpProxy]:
    p = TcpProxy(head.upstream)
    yield p
    if shoal.is_initialized():
        shoal.shutdown()
    p.close()


def _connect(proxy: TcpProxy, head: Head) -> None:
    shoal.init(f"tcp://{proxy.address}", key_file=head.key_file)


@shoal.remote
def shout(text: str) -> str:
    return text.upper() + "!"


@shoal.remote
def checksum(x: Any) -> tuple[int, int]:
    return int(x.nbytes), int(x[:: 1 << 17].sum())


@shoal.remote
def make_array(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.int64)


@shoal.remote
def gated_square(gate: str, x: int) -> int:
    import os
    import time

    while not os.path.exists(gate):
        time.sleep(0.005)
    return x * x


@shoal.remote(num_cpus=0)
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, gate: str = "", started: str = "") -> int:
        import os
        import time

        if started:
            open(started, "w").close()
        while gate and not os.path.exists(gate):
            time.sleep(0.005)
        self.n += 1
        return self.n

    def count(self) -> int:
        return self.n

    def echo(self, text: str) -> str:
        return text[::-1]

    def node(self) -> str:
        import shoal

        return shoal.get_runtime_context().get_node_id()

    def pid(self) -> int:
        import os

        return os.getpid()


def _cut_off(proxy: TcpProxy, while_down: Callable[[], None] = lambda: None) -> None:
    """Reset the client's connection and refuse it for two attempts to come back (the
    client is cut off, and knows it), run ``while_down``, then let it through again."""
    proxy.down()
    testing.wait_for(lambda: proxy.rejected >= 1, timeout=20, interval=0.01)
    while_down()
    testing.wait_for(lambda: proxy.rejected >= 2, timeout=20, interval=0.01)
    proxy.up()


# ------------------------------------------------------------------------- encryption


def test_the_wire_carries_no_plain_text(head: Head) -> None:
    proxy = TcpProxy(head.upstream, record=True)
    try:
        _connect(proxy, head)
        big = (MARKER.encode() + b"-") * 20_000  # ~500 KB: streamed in chunks
        small = MARKER + "-small"  # travels inside a message
        assert shoal.get(shoal.put(big)) == big
        assert shoal.get(shoal.put(small)) == small
        assert shoal.get(shout.remote(MARKER)) == MARKER.upper() + "!"
        counter = Counter.remote()
        assert shoal.get(counter.echo.remote(MARKER)) == MARKER[::-1]  # an actor call
        result = shoal.get(shout.remote(shoal.put(MARKER)))  # a ref as the argument
        assert result == MARKER.upper() + "!"
        shoal.shutdown()
        wire = proxy.recorded()
    finally:
        if shoal.is_initialized():
            shoal.shutdown()
        proxy.close()
    assert len(wire) > 2 * len(big), "the proxy did not see the traffic"
    for needle in (MARKER, MARKER.upper(), MARKER[5:20]):
        assert needle.encode() not in wire, f"{needle!r} crossed the wire in clear text"


# --------------------------------------------------------------------------- resuming


def test_an_idle_client_resumes_after_a_reset(proxy: TcpProxy, head: Head) -> None:
    _connect(proxy, head)
    counter = Counter.remote()
    assert shoal.get(counter.inc.remote()) == 1
    ref = shoal.put(np.arange(1_000_000))
    _cut_off(proxy)
    assert shoal.get(counter.inc.remote(), timeout=30) == 2
    assert shoal.get(shout.remote("again"), timeout=30) == "AGAIN!"
    assert shoal.get(checksum.remote(ref), timeout=30) == shoal.get(checksum.remote(ref))
    assert proxy.accepted >= 2 and proxy.resets == 1


def test_work_in_flight_completes_exactly_once_across_a_reset(
    proxy: TcpProxy, head: Head, gate: Callable[[], str], tmp_path: Path
) -> None:
    _connect(proxy, head)
    counter = Counter.remote()
    shoal.get(counter.count.remote())
    open_gate, started = gate(), str(tmp_path / "started")
    n = 300
    # The first call waits at the gate; the others queue behind it at the actor.
    calls = [counter.inc.remote(open_gate, started)]
    calls += [counter.inc.remote() for _ in range(n - 1)]
    tasks = [gated_square.remote(open_gate, i) for i in range(6)]
    testing.wait_for(lambda: os.path.exists(started), timeout=30, interval=0.01)

    # The results are made while the client is cut off: the head keeps them for it.
    _cut_off(proxy, while_down=lambda: Path(open_gate).touch())

    assert shoal.get(calls, timeout=60) == list(range(1, n + 1))
    assert shoal.get(tasks, timeout=60) == [i * i for i in range(6)]
    assert shoal.get(counter.count.remote(), timeout=30) == n  # none ran twice
    # Calls sent during the outage reach the actor once each as well.
    more = [counter.inc.remote() for _ in range(50)]
    _cut_off(proxy)
    assert shoal.get(more, timeout=60) == list(range(n + 1, n + 51))
    assert proxy.resets == 2


def test_a_large_get_resumes_after_a_reset_in_its_middle(proxy: TcpProxy, head: Head) -> None:
    _connect(proxy, head)
    n = 40_000_000  # 320 MB
    ref = make_array.remote(n)
    shoal.wait([ref], timeout=60)
    proxy.arm_reset(100_000_000)  # once 100 MB went to the client
    x = shoal.get(ref, timeout=90)
    assert proxy.resets == 1, "the transfer was not cut"
    assert x.nbytes == n * 8 and int(x[::1_000_003].sum()) == int(np.arange(n)[::1_000_003].sum())
    assert bool((x[-5:] == np.arange(n - 5, n)).all())


def test_a_large_put_resumes_after_a_reset_in_its_middle(proxy: TcpProxy, head: Head) -> None:
    _connect(proxy, head)
    n = 40_000_000
    arr = np.arange(n, dtype=np.int64)
    proxy.arm_reset(100_000_000, upstream=True)
    ref = shoal.put(arr)
    assert proxy.resets == 1, "the transfer was not cut"
    assert shoal.get(checksum.remote(ref), timeout=60) == (n * 8, int(arr[:: 1 << 17].sum()))


@shoal.remote
def node_id() -> str:
    import shoal

    return shoal.get_runtime_context().get_node_id()


def test_a_node_link_resumes_after_a_reset(
    head: Head, shoal_cli: Callable[..., Any], tmp_path: Path
) -> None:
    from shoal.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    proxy = TcpProxy(head.upstream)
    node_dir = tempfile.mkdtemp(prefix="shoal-cl-node-", dir="/tmp")
    try:
        joined = shoal_cli(
            "start", "--address", proxy.address, "--key-file", head.key_file,
            "--num-cpus", "1", "--temp-dir", node_dir,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stdout + joined.stderr
        [session] = glob.glob(os.path.join(node_dir, "session_2*"))
        with open(os.path.join(session, "head.json")) as f:
            node = json.load(f)["node_id"]
        shoal.init(f"tcp://{head.upstream[0]}:{head.upstream[1]}", key_file=head.key_file)
        on_node = NodeAffinitySchedulingStrategy(node, soft=False)
        assert shoal.get(node_id.options(scheduling_strategy=on_node).remote(), timeout=30) == node

        # An actor placed on the node while its link is down: the head's request for a
        # worker there waits in the link's session and goes when the node resumes it.
        placed: list[Any] = []

        def place_actor() -> None:
            actor = Counter.options(scheduling_strategy=on_node).remote()
            placed.append((actor, actor.node.remote()))

        _cut_off(proxy, while_down=place_actor)
        testing.wait_for(lambda: proxy.accepted >= 2, timeout=20, interval=0.01)

        [(actor, where)] = placed
        assert shoal.get(where, timeout=60) == node
        assert shoal.get(actor.inc.remote(), timeout=30) == 1
        refs = [node_id.options(scheduling_strategy=on_node).remote() for _ in range(5)]
        assert shoal.get(refs, timeout=60) == [node] * 5
        nodes = [n for n in shoal.nodes() if n["NodeID"] == node]
        assert len(shoal.nodes()) == 2 and nodes and nodes[0]["Alive"]
        assert proxy.resets == 1
    finally:
        if shoal.is_initialized():
            shoal.shutdown()
        stopped = shoal_cli("stop", "--temp-dir", node_dir)  # before the proxy goes
        proxy.close()
        shutil.rmtree(node_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


# ------------------------------------------------------------------ past the grace period


@pytest.fixture
def short_grace_head(
    shoal_cli: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Head]:
    """A head that drops a client silent for 3 s; this process's client gives up after 3 s."""
    monkeypatch.setattr(_config, "CLIENT_TIMEOUT_SECONDS", 3.0)
    monkeypatch.setattr(_config, "CLIENT_PING_SECONDS", 0.5)
    # (The module's head may still run: the session's leak check covers this one.)
    yield from _start_head(shoal_cli, tmp_path, "short", {"SHOAL_CLIENT_TIMEOUT": "3"})


def test_a_client_cut_off_past_the_grace_period_fails_clearly_and_is_freed(
    short_grace_head: Head, gate: Callable[[], str]
) -> None:
    head = short_grace_head
    proxy = TcpProxy(head.upstream)
    try:
        _connect(proxy, head)
        counter = Counter.remote()
        actor_pid = shoal.get(counter.pid.remote())
        obj = shoal.put(np.ones(1_000_000))  # 8 MB in the head's store
        segment = f"{testing.SHM_PREFIX}{head.tag}-{obj.hex()}"
        assert segment in testing.shm_segments()
        never = gate()
        pending = gated_square.remote(never, 3)

        proxy.down()  # and it stays down
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                shoal.get(pending, timeout=60)
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(30)
        assert not waiter.is_alive(), "get() hung after the grace period"
        [error] = errors
        assert isinstance(error, ShoalError) and "disconnected" in str(error), repr(error)
        with pytest.raises(ShoalError, match="disconnected"):
            shoal.get(counter.count.remote(), timeout=10)

        # The head dropped the client: its object and its actor are gone.
        testing.wait_for(lambda: segment not in testing.shm_segments(), timeout=20)
        testing.wait_for(lambda: not _alive(actor_pid), timeout=20)
        shoal.shutdown()

        # The head still serves everyone else.
        proxy.up()
        _connect(proxy, head)
        assert shoal.get(shout.remote("next"), timeout=30) == "NEXT!"
    finally:
        if shoal.is_initialized():
            shoal.shutdown()
        proxy.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
