"""When the head of a multi-host cluster dies without a word (SIGKILL), its nodes notice
within the node timeout and stop, with their workers: nothing is left running for a
cluster that no longer exists."""

from __future__ import annotations

import json

import pytest
from shoal.testing import wait_for

pytestmark = pytest.mark.timeout(90)

TIMEOUT = "3"  # SHOAL_NODE_TIMEOUT for this cluster, in seconds


def test_nodes_stop_when_the_head_is_killed(make_network):
    network = make_network(["head", "node"])
    head, node = network["head"], network["node"]
    key_file = str(network.dir / "cluster.key")
    env = {"SHOAL_NODE_TIMEOUT": TIMEOUT}
    head.run(
        ["shoal", "start", "--head", "--port", "6380", "--bind", head.ip, "--key-file", key_file]
        + ["--num-cpus", "1"],
        env=env,
    )
    node.run(
        ["shoal", "start", "--address", f"{head.ip}:6380", "--key-file", key_file]
        + ["--num-cpus", "1"],
        env=env,
    )
    info = json.loads(head.run(["sh", "-c", "cat $SHOAL_TMPDIR/session_2*/head.json"]).stdout)
    assert node.pids(), "the node runs processes (its manager and workers)"

    head.run(["kill", "-KILL", str(info["pid"])])
    # The node's manager and its workers all go, within the timeout and a margin.
    wait_for(lambda: not node.pids(), timeout=20, interval=0.1, message="node processes left")
    listing = node.run(["ls", "/dev/shm"]).stdout.split()
    assert not [name for name in listing if name.startswith("shoal-")]
