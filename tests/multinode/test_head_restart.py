"""A head restarted after a crash, with SHOAL_HEAD_STATE_DIR: its nodes join it again as
new nodes, and the detached actors of the old head are created again (their constructors
run again: their state is not kept). Everything else of the old head is gone."""

from __future__ import annotations

import os
import stat

import pytest
from ftcluster import PRELUDE, FtCluster
from shoal.testing import wait_for

pytestmark = pytest.mark.timeout(180)

CREATE = (
    PRELUDE
    + """
shoal.init(address="auto", namespace="restart", log_to_driver=False)

@shoal.remote(resources={"at_b": 0.1})
class Counter:
    def __init__(self):
        self.n = 0
    def add(self):
        self.n += 1
        return self.n, node_of()

kept = Counter.options(name="kept", lifetime="detached").remote()
temporary = Counter.options(name="temporary").remote()
say("CREATED", [shoal.get([kept.add.remote() for _ in range(3)])[-1], shoal.get(temporary.add.remote())[0]])
"""
)

USE = (
    PRELUDE
    + """
shoal.init(address="auto", namespace="restart", log_to_driver=False)
kept = shoal.get_actor("kept")
first = shoal.get(kept.add.remote(), timeout=60)
try:
    shoal.get_actor("temporary")
    temporary = "found"
except ValueError as exc:
    temporary = str(exc)
shoal.kill(kept)
say("USED", [first, temporary])
"""
)


def test_a_restarted_head_recovers_detached_actors_and_its_nodes(make_network) -> None:
    network = make_network(["head", "b"])
    state = network.dir / "head-state"
    env = {
        "SHOAL_HEALTH_CHECK_PERIOD": "0.5",
        "SHOAL_HEALTH_CHECK_FAILURE_THRESHOLD": "4",
        "SHOAL_HEAD_STATE_DIR": str(state),
    }
    cluster = FtCluster(network, env)
    cluster.start_head("head", cpus=1)
    cluster.start_node("b", cpus=1, resources={"at_b": 1})
    old_b = cluster.node_id("b")
    created = cluster.driver("head", CREATE)
    (count, on), temporary_count = created.expect("CREATED", timeout=60)
    assert (count, on, temporary_count) == (3, old_b, 1)
    assert created.wait(30) == 0
    assert len(os.listdir(state / "actors")) == 1  # the detached one only
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700

    network["head"].run(["kill", "-KILL", str(cluster.info("head")["pid"])])
    b_pid = cluster.info("b")["pid"]
    cluster.start_head("head", cpus=1)  # same address, key file and state directory
    # b lost its head, killed its workers (the actor too) and joins the new head.
    wait_for(lambda: cluster.node_id("b") != old_b, timeout=60, interval=0.2, message="b rejoined")
    assert cluster.info("b")["pid"] == b_pid
    new_b = cluster.node_id("b")

    used = cluster.driver("head", USE)
    (count, on), temporary = used.expect("USED", timeout=90)
    assert (count, on) == (1, new_b)  # made again, on b (the only node with at_b)
    assert "temporary" in temporary
    assert used.wait(30) == 0
    wait_for(lambda: not os.listdir(state / "actors"), timeout=10, message="record left")
