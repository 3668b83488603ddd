"""The control store when a node dies: what ran there is failed over, what was reserved
there is placed again, and what was stored there is rebuilt through its owner. Node links
are recorders (the control store only ever calls their ``send``); the multi-host tests
(tests/multinode/test_node_failure.py) run the same paths with real processes."""

from __future__ import annotations

import time

import pytest
from shoal import _actor_directory as ad
from shoal import _placement_groups as pgs
from shoal._control_store import ControlStore
from shoal._ids import return_id
from shoal._protocol import Message, MsgType

pytestmark = pytest.mark.timeout(10)

M = MsgType
HEAD, A, B, C = b"H" * 16, b"A" * 16, b"B" * 16, b"C" * 16
DRIVER, WORKER = b"driver-1", b"worker-1"


class Link:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def take(self, *types: MsgType) -> list[Message]:
        out = [m for m in self.sent if not types or m.type in types]
        self.sent = []
        return out


def down(link: Link, t: MsgType) -> list[dict]:
    """Bodies of the messages of type ``t`` delivered to processes through ``link``."""
    return [m.body["b"] | {"to": m.body["w"]} for m in link.take(M.DOWN) if m.body["t"] == t]


@pytest.fixture
def cluster():
    store = ControlStore(HEAD, lambda *a: None)
    links = {}
    for nid in (HEAD, A, B):
        links[nid] = Link()
        cpus = 5000 if nid == HEAD else 20000  # the head is too small for a 1-CPU bundle
        store.add_node(nid, links[nid], {"res": {"CPU": cpus}, "addr": f"tcp://{nid[:1].decode()}"})
    store.on_node_message(
        HEAD, Message(M.PROC_JOINED, {"w": DRIVER, "role": "driver", "pid": 1, "job": 1})
    )
    store.on_node_message(A, Message(M.PROC_JOINED, {"w": WORKER, "role": "worker", "pid": 2}))
    return store, links


def up(store: ControlStore, node: bytes, wid: bytes, t: MsgType, body: dict) -> None:
    store.on_node_message(node, Message(M.UP, {"w": wid, "t": int(t), "b": body}))


def test_the_owner_of_a_lease_on_the_dead_node_hears_that_its_worker_died(cluster):
    store, links = cluster
    grant = {"r": 7, "w": WORKER, "a": "tcp://a:1", "p": 2, "g": []}
    store.on_node_message(A, Message(M.ROUTE, {"w": DRIVER, "t": int(M.LEASE_GRANTED), "b": grant}))
    assert down(links[HEAD], M.LEASE_GRANTED)[0]["w"] == WORKER
    store.node_gone(A, "it missed its health checks")
    (died,) = down(links[HEAD], M.WORKER_DIED)
    assert died["to"] == DRIVER and died["w"] == WORKER
    assert "node 414141414141 died: it missed its health checks" in died["e"]
    assert WORKER not in store.procs
    # The other nodes drop pulls from it.
    (news,) = links[B].take(M.NODE_DIED)
    assert news.body == {"n": A, "a": "tcp://A"}


def test_a_returned_lease_is_not_reported(cluster):
    store, links = cluster
    grant = {"r": 7, "w": WORKER, "a": "tcp://a:1", "p": 2, "g": []}
    store.on_node_message(A, Message(M.ROUTE, {"w": DRIVER, "t": int(M.LEASE_GRANTED), "b": grant}))
    up(store, HEAD, DRIVER, M.RETURN_LEASE, {"w": WORKER})
    links[HEAD].take()
    store.node_gone(A, "gone")
    assert down(links[HEAD], M.WORKER_DIED) == []


def test_an_actor_whose_lease_was_asked_of_the_dead_node_is_placed_elsewhere(cluster):
    store, links = cluster
    body = {"aid": b"actor-1" * 2, "cls": "C", "res": {"CPU": 10000}, "meta": {}}
    body["st"] = {"kind": "node", "node": A.hex(), "soft": True}
    up(store, HEAD, DRIVER, M.CREATE_ACTOR, body)
    (lease,) = links[A].take(M.ACTOR_LEASE)
    assert lease.body["aid"] == body["aid"]
    links[HEAD].take()
    links[B].take()
    store.node_gone(A, "gone")
    placed = links[HEAD].take(M.ACTOR_LEASE) + links[B].take(M.ACTOR_LEASE)
    assert [m.body["aid"] for m in placed] == [body["aid"]]
    assert store.actors.actors[body["aid"]].state == ad.PENDING


def test_the_bundles_of_a_dead_node_are_placed_again_around_the_others(cluster):
    store, links = cluster
    pg = b"group-01" * 2
    up(
        store,
        HEAD,
        DRIVER,
        M.CREATE_PG,
        {"pg": pg, "b": [{"CPU": 10000}] * 2, "st": "STRICT_SPREAD", "r": 1},
    )
    rec = store.groups[pg]
    for nid, link in links.items():
        for m in link.take(M.BUNDLE_RESERVE):
            store.on_node_message(nid, Message(M.BUNDLE_RESULT, {**m.body, "ok": True}))
    assert rec.state == pgs.CREATED and sorted(rec.placement.values()) == [A, B]
    kept = {i: n for i, n in rec.placement.items() if n == B}
    lost = [i for i, n in rec.placement.items() if n == A]
    links[C] = Link()
    store.add_node(C, links[C], {"res": {"CPU": 20000}, "addr": "tcp://C"})
    for link in links.values():
        link.take()
    store.node_gone(A, "gone")
    assert rec.state == pgs.RESCHEDULING
    asked = [(nid, m.body["i"]) for nid, link in links.items() for m in link.take(M.BUNDLE_RESERVE)]
    assert [i for _, i in asked] == lost  # only the lost bundle, and not where the other is
    assert [nid for nid, _ in asked] == [C]  # strictly spread: not next to the kept one
    nid, i = asked[0]
    store.on_node_message(nid, Message(M.BUNDLE_RESULT, {"pg": pg, "i": i, "ok": True, "b": {}}))
    assert rec.state == pgs.CREATED and rec.placement == {**kept, i: nid}
    assert all(m.type != M.BUNDLE_RELEASE for link in links.values() for m in link.sent)


def test_a_dead_node_that_talks_again_is_told_once_to_start_afresh(cluster):
    store, links = cluster
    store.node_gone(A, "it missed its health checks")
    for _ in range(3):
        store.on_node_message(A, Message(M.NODE_UPDATE, {"avail": {"CPU": 20000}}))
    (told,) = links[A].take(M.NODE_DEAD)
    assert "health checks" in told.body["reason"]
    assert not store.nodes[A].alive and store.nodes[A].available == {}


def test_a_silent_node_is_declared_dead_after_the_threshold(cluster):
    store, links = cluster
    store.nodes[B].last_seen = time.monotonic() - 1000
    store.check_nodes()
    assert not store.nodes[B].alive and "health checks" in store.nodes[B].death_reason
    assert store.nodes[A].alive and store.nodes[HEAD].alive


def test_a_lost_object_is_rebuilt_through_its_owner(cluster):
    store, links = cluster
    oid = return_id(DRIVER + (5).to_bytes(8, "big"), 1)
    store.on_node_message(
        A, Message(M.OBJECT_SEALED, {"o": oid, "s": 1 << 20, "f": 0, "h": DRIVER, "w": WORKER})
    )
    store.node_gone(A, "gone")
    links[HEAD].take()
    store.on_node_message(B, Message(M.LOCATE, {"o": [oid]}))
    (ask,) = down(links[HEAD], M.REBUILD_OBJECT)
    assert ask == {"o": oid, "to": DRIVER}
    assert links[B].take(M.LOCATED) == []  # the reader waits
    # Only the owner may give it up; then the reader gets its reason.
    up(store, A, WORKER, M.REBUILD_FAILED, {"o": oid, "e": "no"})  # A is dead: ignored
    up(store, HEAD, DRIVER, M.REBUILD_FAILED, {"o": oid, "e": "its lineage was dropped"})
    (located,) = links[B].take(M.LOCATED)
    assert located.body["e"] == [[oid, "e", "lost", "its lineage was dropped"]]
