"""A Shoal cluster over separate hosts: a head and two nodes, each in its own network
namespace with its own /dev/shm and session directory (see netns.py).

    head (1 CPU)  <--tcp-->  a (1 CPU, {"at_a": 1})
                  <--tcp-->  b (1 CPU, {"at_b": 1})
                  <--tcp-->  client (no Shoal processes: client-server mode)

Drivers are Python scripts run on one of the hosts with ``shoal.init(address="auto")``;
each prints one JSON line with what the test checks.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import netns
import numpy as np
import pytest
from netns import require_netns

pytestmark = pytest.mark.timeout(120)

STORE = str(1536 << 20)


class Cluster:
    def __init__(self, network: netns.Network, key_file: str, address: str) -> None:
        self.network = network
        self.key_file = key_file
        self.address = address
        self.head = network["head"]
        self.a = network["a"]
        self.b = network["b"]
        self.client = network["client"]

    def drive(
        self,
        host: netns.Host,
        body: str,
        timeout: float = 60,
        init: str = 'address="auto", log_to_driver=False',
        **names: Any,
    ) -> Any:
        """Run ``body`` as a driver on ``host``; it sets ``result``, which comes back.
        ``names`` become variables of the script."""
        code = (
            "import json, os, time\nimport numpy as np\nimport shoal\nimport shoal.state\n"
            f"shoal.init({init})\n"
            "def node_of():\n    return shoal.get_runtime_context().get_node_id()\n"
            + "".join(f"{k} = {v!r}\n" for k, v in names.items())
            + textwrap.dedent(body)
            + '\nprint("RESULT " + json.dumps(result))\n'
        )
        out = host.python(code, timeout=timeout).stdout
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"the driver printed no result:\n{out}"
        self.last_output = out
        return json.loads(lines[-1][len("RESULT ") :])

    def client_init(self) -> str:
        return f"{self.address!r}, key_file={self.key_file!r}"

    def node_ids(self) -> dict[str, str]:
        """Host name -> node id, from the nodes' session files."""
        out = {}
        for host in (self.head, self.a, self.b):
            text = host.run(["sh", "-c", "cat $SHOAL_TMPDIR/session_2*/head.json"]).stdout
            out[host.name] = json.loads(text)["node_id"]
        return out

    def segments(self, host: netns.Host) -> list[str]:
        listing = host.run(["ls", "/dev/shm"]).stdout.split()
        return [name for name in listing if name.startswith("shoal-")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_netns()
    with netns.Network(["head", "a", "b", "client"], shm_size="3G") as network:
        key_file = str(network.dir / "cluster.key")
        head = network["head"]
        out = head.run(
            [
                "shoal",
                "start",
                "--head",
                "--port",
                "6380",
                "--bind",
                head.ip,
                "--key-file",
                key_file,
                "--num-cpus",
                "1",
                "--object-store-memory",
                STORE,
                "--metrics-port",
                "9091",
                "--metrics-bind",
                head.ip,
            ],
            timeout=60,
        ).stdout
        assert f"{head.ip}:6380" in out and key_file in out
        assert f"http://{head.ip}:9091/metrics" in out
        address = f"{head.ip}:6380"
        for name in ("a", "b"):
            network[name].run(
                [
                    "shoal",
                    "start",
                    "--address",
                    address,
                    "--key-file",
                    key_file,
                    "--num-cpus",
                    "1",
                    "--resources",
                    json.dumps({f"at_{name}": 1}),
                    "--object-store-memory",
                    STORE,
                ],
                timeout=60,
            )
        yield Cluster(network, key_file, address)


def test_nodes_join_and_show_in_status(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    nodes = cluster.drive(cluster.a, "result = shoal.nodes()")
    assert {n["NodeID"] for n in nodes} == set(ids.values())
    assert all(n["Alive"] for n in nodes)
    by_id = {n["NodeID"]: n for n in nodes}
    assert by_id[ids["a"]]["NodeManagerAddress"] == cluster.a.ip
    assert by_id[ids["b"]]["Resources"]["at_b"] == 1
    status = cluster.head.run(["shoal", "status"]).stdout
    for node_id in ids.values():
        assert node_id[:12] in status


def test_tasks_go_where_their_resources_are_and_spill_over(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    rendezvous = cluster.network.dir / "rendezvous"
    rendezvous.mkdir()
    result = cluster.drive(
        cluster.head,
        """
        @shoal.remote
        def where():
            return node_of()
        at_a = shoal.get([where.options(resources={"at_a": 1}).remote() for _ in range(3)])
        at_b = shoal.get(where.options(resources={"at_b": 0.5}).remote())

        # Three tasks that wait for each other (through files, without blocking in Shoal,
        # which would lend their CPU) can only finish if they run at once, one per node
        # (1 CPU each): two of them must go to other nodes.
        @shoal.remote
        def meet(rendezvous):
            open(os.path.join(rendezvous, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 30
            while len(os.listdir(rendezvous)) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            return node_of()
        met = shoal.get([meet.remote(RENDEZVOUS) for _ in range(3)], timeout=60)
        result = [at_a, at_b, met]
        """,
        RENDEZVOUS=str(rendezvous),
    )
    at_a, at_b, met = result
    assert at_a == [ids["a"]] * 3
    assert at_b == ids["b"]
    assert sorted(met) == sorted(ids.values())


def test_a_large_object_crosses_nodes_and_every_copy_is_freed(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    result = cluster.drive(
        cluster.head,
        """
        big = np.arange(128 * 1024 * 1024 // 8, dtype=np.int64)   # 128 MiB
        ref = shoal.put(big)
        @shoal.remote
        def total(x):
            return node_of(), int(x.sum()), bool(x.flags.writeable)
        @shoal.remote
        def make(n):
            return np.full(n, 7, dtype=np.uint8)
        on_a = shoal.get(total.options(resources={"at_a": 1}).remote(ref))
        on_b = shoal.get(total.options(resources={"at_b": 1}).remote(ref))
        made = shoal.get(make.options(resources={"at_b": 1}).remote(64 << 20))
        copies = [o for o in shoal.state.list_objects() if len(o["nodes"]) > 1]
        result = [on_a, on_b, int(made.sum()), made.nbytes, len(copies)]
        del made, ref, big
        """,
    )
    on_a, on_b, made_sum, made_bytes, with_copies = result
    expected = (128 * 1024 * 1024 // 8) * (128 * 1024 * 1024 // 8 - 1) // 2
    assert on_a == [ids["a"], expected, False]
    assert on_b == [ids["b"], expected, False]
    assert (made_sum, made_bytes) == (7 * (64 << 20), 64 << 20)
    assert with_copies >= 1  # the array was copied to a and b
    # The driver exited: its objects, and every copy of them on every host, are gone.
    for host in (cluster.head, cluster.a, cluster.b):
        netns_wait(lambda h=host: not cluster.segments(h), f"segments left on {host.name}")


def test_a_gigabyte_array_crosses(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    result = cluster.drive(
        cluster.a,
        """
        ref = shoal.put(np.ones(1 << 30, dtype=np.uint8))
        @shoal.remote(resources={"at_b": 1})
        def total(x):
            return node_of(), int(x.sum(dtype=np.int64))
        t = time.perf_counter()
        result = list(shoal.get(total.remote(ref))) + [time.perf_counter() - t]
        """,
        timeout=90,
    )
    assert result[:2] == [ids["b"], 1 << 30]


def test_named_detached_actor_is_found_from_another_host(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    created = cluster.drive(
        cluster.head,
        """
        @shoal.remote(resources={"at_b": 0.1})
        class Store:
            def __init__(self): self.items = {}
            def put(self, k, v): self.items[k] = v
            def get(self, k): return self.items.get(k)
            def node(self): return node_of()
        s = Store.options(name="kv", namespace="hosts", lifetime="detached").remote()
        shoal.get(s.put.remote("x", 41))
        result = shoal.get(s.node.remote())
        """,
    )
    assert created == ids["b"]
    found = cluster.drive(
        cluster.a,
        """
        s = shoal.get_actor("kv", namespace="hosts")
        value = shoal.get(s.get.remote("x"))
        shoal.kill(s)
        result = value
        """,
    )
    assert found == 41


def test_placement_group_strict_spread_over_the_hosts(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    result = cluster.drive(
        cluster.head,
        """
        from shoal.util import placement_group, remove_placement_group, placement_group_table
        from shoal.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InGroup
        pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        shoal.get(pg.ready(), timeout=30)
        table = placement_group_table(pg)
        @shoal.remote
        def where():
            return node_of()
        placed = shoal.get([where.options(scheduling_strategy=InGroup(pg, i)).remote() for i in range(3)])
        try:
            placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")
            too_many = None
        except ValueError as exc:
            too_many = str(exc)
        remove_placement_group(pg)
        result = [table["bundles_to_node_id"], placed, too_many]
        """,
    )
    bundles, placed, too_many = result
    assert sorted(bundles.values()) == sorted(ids.values())
    assert placed == [bundles[str(i)] for i in range(3)]
    assert too_many is not None and "never be placed" in too_many


def test_node_affinity(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    result = cluster.drive(
        cluster.head,
        f"""
        from shoal.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from shoal.exceptions import TaskUnschedulableError
        @shoal.remote
        def where():
            return node_of()
        @shoal.remote
        def busy_where():
            time.sleep(0.5)  # a busy node: the others must wait for it, not go elsewhere
            return node_of()
        hard = shoal.get([busy_where.options(scheduling_strategy=On("{ids["a"]}", soft=False)).remote() for _ in range(3)])
        soft = shoal.get(where.options(scheduling_strategy=On("ab" * 16, soft=True)).remote())
        try:
            shoal.get(where.options(scheduling_strategy=On("ab" * 16, soft=False)).remote())
            missing = None
        except TaskUnschedulableError as exc:
            missing = str(exc)
        result = [hard, soft, missing]
        """,
    )
    hard, soft, missing = result
    assert hard == [ids["a"]] * 3
    assert soft in ids.values()
    assert missing is not None and "not alive" in missing


def netns_wait(predicate: Any, message: str, timeout: float = 15) -> None:
    from shoal.testing import wait_for

    wait_for(predicate, timeout=timeout, interval=0.05, message=message)


def test_a_node_with_the_wrong_key_cannot_join(cluster: Cluster, tmp_path: Any) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("00" * 32)
    host = cluster.network.add_host("intruder")
    run = host.run(
        ["shoal", "start", "--address", cluster.address, "--key-file", str(wrong)],
        check=False,
        timeout=60,
        env={"SHOAL_START_TIMEOUT": "3"},
    )
    assert run.returncode != 0
    assert "no answer from the head" in run.stderr and "key" in run.stderr
    nodes = cluster.drive(cluster.head, "result = len(shoal.nodes())")
    assert nodes == 3


def test_a_client_outside_the_cluster_does_everything_over_one_connection(
    cluster: Cluster,
) -> None:
    ids = cluster.node_ids()
    # The client host runs no Shoal process and shares no memory with the cluster.
    assert not cluster.segments(cluster.client)
    result = cluster.drive(
        cluster.client,
        """
        @shoal.remote
        def square(x):
            print("squaring", x)
            return x * x
        squares = shoal.get([square.remote(i) for i in range(4)])
        @shoal.remote(resources={"at_a": 0.1})
        class Counter:
            def __init__(self): self.n = 0
            def add(self, k): self.n += k; return self.n
            def node(self): return node_of()
        c = Counter.remote()
        counts = shoal.get([c.add.remote(1) for _ in range(3)])
        actor_node = shoal.get(c.node.remote())
        big = np.arange(48 << 20, dtype=np.uint8)              # 48 MiB up and down
        ref = shoal.put(big)
        @shoal.remote(resources={"at_b": 1})
        def checksum(x):
            return node_of(), int(x[::4096].sum())
        remote_sum = shoal.get(checksum.remote(ref))
        back = shoal.get(ref)
        @shoal.remote(resources={"at_b": 1})
        def make():
            return np.full(40 << 20, 3, dtype=np.uint8)
        made = shoal.get(make.remote())
        ready, not_ready = shoal.wait([square.remote(9)], num_returns=1, timeout=30)
        @shoal.remote
        def boom():
            return 1 / 0
        try:
            shoal.get(boom.remote())
            error = None
        except ZeroDivisionError as exc:
            error = str(exc)
        result = {
            "squares": squares, "counts": counts, "actor_node": actor_node,
            "remote_sum": remote_sum, "same": bool((back == big).all()),
            "made": [int(made.sum()), made.nbytes], "waited": len(ready),
            "error": error,
        }
        """,
        init=cluster.client_init(),
    )
    assert result["squares"] == [0, 1, 4, 9]
    assert result["counts"] == [1, 2, 3] and result["actor_node"] == ids["a"]
    expected = int(np.arange(48 << 20, dtype=np.uint8)[::4096].sum())
    assert result["remote_sum"] == [ids["b"], expected]
    assert result["same"] is True
    assert result["made"] == [3 * (40 << 20), 40 << 20]
    assert result["waited"] == 1
    assert "ZeroDivisionError" in result["error"] and "boom" in result["error"]
    assert re.search(r"line \d+, in boom", result["error"])  # the remote frame
    assert "squaring 3" in cluster.last_output  # task output reached the client
    assert not cluster.segments(cluster.client)


def test_metrics_of_every_node_are_scraped_from_the_head(cluster: Cluster) -> None:
    ids = cluster.node_ids()
    cluster.drive(
        cluster.a,
        """
        @shoal.remote(resources={"at_a": 0.1})
        def on_a():
            from shoal.util.metrics import Counter
            Counter("hosts_calls", "Calls by node.", tag_keys=("host",)).inc(2, tags={"host": "a"})
        @shoal.remote(resources={"at_b": 0.1})
        def on_b():
            from shoal.util.metrics import Counter, Histogram
            Counter("hosts_calls", "Calls by node.", tag_keys=("host",)).inc(3, tags={"host": "b"})
            Histogram("hosts_size", "Sizes.", boundaries=[10]).observe(4)
        shoal.get([on_a.remote(), on_b.remote(), on_b.remote()])
        result = None
        """,
    )
    # Scraped from the client host, as a Prometheus elsewhere would, with the key file.
    scrape = """
        import time, urllib.request
        token = open(key_file).read().strip()
        request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
        deadline = time.monotonic() + 30
        while True:
            text = urllib.request.urlopen(request, timeout=10).read().decode()
            if 'hosts_calls_total{host="b"} 6.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        try:
            urllib.request.urlopen(url, timeout=10)
            refused = None
        except urllib.error.HTTPError as exc:
            refused = exc.code
        result = {"text": text, "refused": refused}
        """
    url = f"http://{cluster.head.ip}:9091/metrics"
    code = (
        "import json, urllib.error\n"
        + f"key_file = {cluster.key_file!r}\nurl = {url!r}\n"
        + textwrap.dedent(scrape)
        + '\nprint("RESULT " + json.dumps(result))\n'
    )
    out = cluster.client.python(code, timeout=60).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    text = result["text"]
    assert result["refused"] == 401
    assert 'hosts_calls_total{host="a"} 2.0' in text
    assert 'hosts_calls_total{host="b"} 6.0' in text
    assert "hosts_size_count 2.0" in text
    assert 'shoal_nodes{state="ALIVE"} 3.0' in text
    for node_id in ids.values():
        assert f'shoal_node_cpu_count{{node_id="{node_id}"}}' in text


def test_two_clients_have_their_own_namespaces(cluster: Cluster) -> None:
    cluster.drive(
        cluster.client,
        """
        @shoal.remote
        class Box:
            def get(self): return "mine"
        box = Box.options(name="box", lifetime="detached").remote()
        shoal.get(box.get.remote())
        result = shoal.get_runtime_context().namespace
        """,
        init=cluster.client_init(),
    )
    result = cluster.drive(
        cluster.client,
        """
        try:
            shoal.get_actor("box")
            visible = True
        except ValueError:
            visible = False
        result = visible
        """,
        init=cluster.client_init(),
    )
    assert result is False


def test_a_client_that_leaves_gives_its_resources_back_at_once(cluster: Cluster) -> None:
    cluster.drive(
        cluster.client,
        """
        @shoal.remote
        def one():
            return 1
        result = shoal.get([one.remote() for _ in range(6)])  # leases on several nodes
        """,
        init=cluster.client_init(),
    )
    # Within seconds (resource reports lag by up to 1 s), not the 30 s after which a
    # silent client is dropped.
    result = cluster.drive(
        cluster.head,
        """
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            free = shoal.available_resources().get("CPU", 0)
            if free >= 3:
                break
            time.sleep(0.05)
        result = free
        """,
    )
    assert result >= 3


def test_a_client_needs_the_key(cluster: Cluster) -> None:
    no_key = cluster.client.python(
        f"import shoal\nshoal.init({cluster.address!r})", check=False, timeout=30
    )
    assert no_key.returncode != 0 and "needs its key" in no_key.stderr
    wrong = cluster.network.dir / "wrong-client.key"
    wrong.write_text("11" * 32)
    refused = cluster.client.python(
        f"import shoal\nshoal.init({cluster.address!r}, key_file={str(wrong)!r})",
        check=False,
        timeout=30,
        env={"SHOAL_START_TIMEOUT": "2"},
    )
    assert refused.returncode != 0 and "key" in refused.stderr


GATED_CLIENT = """
import os, sys, time
import shoal
from shoal.exceptions import ShoalError
shoal.init(sys.argv[1], key_file=sys.argv[2])
gate, submitted = sys.argv[3], sys.argv[4]
@shoal.remote
def wait_for_gate(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return 42
ref = wait_for_gate.remote(gate)
open(submitted, "w").close()
try:
    print("RESULT", shoal.get(ref, timeout=60), flush=True)
except ShoalError as exc:
    print("ERROR", type(exc).__name__, exc, flush=True)
"""


def _gated_client(cluster: Cluster, tag: str, env: dict[str, str] | None = None) -> Any:
    import subprocess
    import sys

    gate = cluster.network.dir / f"gate-{tag}"
    submitted = cluster.network.dir / f"submitted-{tag}"
    argv = [sys.executable, "-c", GATED_CLIENT, cluster.address, cluster.key_file]
    proc = cluster.client.popen(
        [*argv, str(gate), str(submitted)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    netns_wait(lambda: submitted.exists() or proc.poll() is not None, "the client submitted")
    assert proc.poll() is None, proc.communicate()[0]
    return proc, gate


def _link(host: netns.Host, state: str) -> None:
    import subprocess

    subprocess.run(["ip", "link", "set", host.veth, state], check=True)


def test_a_client_rides_out_a_short_network_loss(cluster: Cluster) -> None:
    import time

    proc, gate = _gated_client(cluster, "short")
    _link(cluster.client, "down")
    try:
        gate.touch()  # the result is ready while the client is cut off
        time.sleep(3)  # the length of the outage, not a wait for a condition
    finally:
        _link(cluster.client, "up")
    out, _ = proc.communicate(timeout=60)
    assert "RESULT 42" in out, out


def test_a_client_cut_off_for_longer_gets_a_clear_error(cluster: Cluster) -> None:
    proc, gate = _gated_client(cluster, "long", env={"SHOAL_CLIENT_TIMEOUT": "3"})
    _link(cluster.client, "down")
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        _link(cluster.client, "up")
        gate.touch()
    assert "ERROR" in out and "disconnected" in out, out
    assert "3 s" in out or "for 3" in out or "nothing was heard" in out, out


def test_a_node_that_stops_leaves_the_cluster(cluster: Cluster) -> None:
    # Last in this module: it takes node b away.
    ids = cluster.node_ids()
    cluster.b.run(["shoal", "stop"])
    result = cluster.drive(
        cluster.head,
        f"""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            b = [n for n in shoal.nodes() if n["NodeID"] == "{ids["b"]}"]
            if b and not b[0]["Alive"]:
                break
            time.sleep(0.05)
        @shoal.remote
        def where():
            return node_of()
        result = [b[0]["Alive"], b[0]["DeathReason"], shoal.get(where.remote())]
        """,
    )
    alive, reason, ran_on = result
    assert alive is False and "left" in reason
    assert ran_on in (ids["head"], ids["a"])
    assert not cluster.segments(cluster.b)
