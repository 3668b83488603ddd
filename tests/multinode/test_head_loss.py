"""When the head of a multi-host cluster dies without a word (SIGKILL): every driver, on
the head's host, on a node, or a client outside the cluster, fails what it waits for with
ClusterGoneError within the health-check bounds, later calls fail at once instead of
hanging, and the node's manager and workers exit: nothing is left running for a cluster
that no longer exists."""

from __future__ import annotations

import time

import pytest
from ftcluster import PRELUDE, FtCluster
from shoal.testing import wait_for

pytestmark = pytest.mark.timeout(120)

# Health checks every 0.5 s, dead after 4 misses (2 s); a node that lost the head tries to
# join again for 3 s before it exits; a client gives up after 3 s of silence.
ENV = {
    "SHOAL_HEALTH_CHECK_PERIOD": "0.5",
    "SHOAL_HEALTH_CHECK_FAILURE_THRESHOLD": "4",
    "SHOAL_NODE_REJOIN_TIMEOUT": "3",
    "SHOAL_CLIENT_TIMEOUT": "3",
}

WAITER = (
    PRELUDE
    + """
address, node, key_file, gate, started = sys.argv[1:6]
shoal.init(address, **({"key_file": key_file} if key_file else {}))

@shoal.remote
def forever(gate, started):
    open(started, "w").close()
    wait_file(gate, 600)
    return 1

ref = forever.options(scheduling_strategy=On(node, soft=False)).remote(gate, started)
wait_file(started)
say("READY", node_of())
try:
    shoal.get(ref)
    say("ERROR", None)
except ShoalError as exc:
    say("ERROR", [type(exc).__name__, str(exc), isinstance(exc, ClusterGoneError)])
t = time.monotonic()
for name, call in [
    ("get", lambda: shoal.get(forever.remote(gate, started), timeout=60)),
    ("put", lambda: shoal.put(np.zeros(1 << 20, dtype=np.uint8))),
    ("nodes", shoal.nodes),
]:
    try:
        call()
        say("LATER", [name, None, time.monotonic() - t])
    except ShoalError as exc:
        say("LATER", [name, type(exc).__name__, time.monotonic() - t])
"""
)


def test_drivers_fail_fast_and_nodes_stop_when_the_head_is_killed(make_network):
    network = make_network(["head", "node", "client"])
    cluster = FtCluster(network, ENV)
    cluster.start_head("head", cpus=1)
    cluster.start_node("node", cpus=2)
    head_id, node_id = cluster.node_id("head"), cluster.node_id("node")
    gate = str(network.dir / "gate")  # never opened: the tasks wait until they are killed
    started = [str(network.dir / f"started-{i}") for i in range(3)]
    drivers = {
        "on the head's host": cluster.driver("head", WAITER, "auto", head_id, "", gate, started[0]),
        "on the node": cluster.driver("node", WAITER, "auto", node_id, "", gate, started[1]),
        "a client": cluster.driver(
            "client",
            WAITER,
            f"tcp://{cluster.address}",
            node_id,
            cluster.key_file,
            gate,
            started[2],
        ),
    }
    for driver in drivers.values():
        driver.expect("READY")
    assert network["node"].pids(), "the node runs its manager and a busy worker"

    killed = time.monotonic()
    network["head"].run(["kill", "-KILL", str(cluster.info("head")["pid"])])
    for where, driver in drivers.items():
        name, message, is_gone = driver.expect("ERROR", timeout=30)
        took = time.monotonic() - killed
        assert is_gone, f"driver {where}: {name}: {message}"
        # Local drivers hear at once (a pidfd, their node's word); a client within its
        # SHOAL_CLIENT_TIMEOUT (3 s) and a ping period.
        assert took < 10, f"driver {where} took {took:.1f} s"
        for _ in range(3):
            call, error, after = driver.expect("LATER")
            assert error == "ClusterGoneError" and after < 2, (where, call, error, after)
        assert driver.wait(30) == 0, driver.text()

    # The node's workers are killed at once; its manager tries to join again for 3 s (the
    # head's host is up, so every try is refused at once), then exits.
    wait_for(lambda: not network["node"].pids(), timeout=20, interval=0.1, message="node left")
    assert not cluster.segments("node")
    wait_for(lambda: not network["head"].pids(), timeout=10, interval=0.1, message="head left")
    assert not network["client"].pids()
