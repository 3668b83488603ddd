"""The control store: the cluster's single source of truth, in the head process.

    node managers --NodeLink--> ControlStore.on_node_message
        NODE_UPDATE       resources, store and worker counts (heartbeat)
        PROC_JOINED/GONE  drivers and workers connecting to, and leaving, their node
        UP                a process's message for the control store (actors, refs, logs)
        ROUTE             a node's message for a process on another node (lease grants)
        SPILL_LEASE       a lease request its node cannot serve now: pick another node
        LOCATE, OBJECT_SEALED, OBJECT_COPIED   the object directory
        (a node silent past the health-check threshold, or whose link closed: node_gone)
    ControlStore --NodeLink--> node managers
        DOWN              deliver a message to a process of that node
        TO_NODE           a process's message for that node's manager (return a lease ...)
        ACTOR_LEASE, KILL_WORKER, OWNER_GONE, LOCATED, FREE_OBJECTS
        NODE_DIED         another node is gone (drop pulls from it)
        NODE_DEAD         to a node declared dead that still talks: restart as a new node

Every driver and worker belongs to one node and talks only to its node manager; the
manager passes on what concerns the whole cluster. The head's own node manager uses the
same messages, handed over in-process (no sockets, no signatures: one process, one loop).

What is here: the process registry (who lives on which node, their jobs), the node table,
the actor directory, the object directory (holders, containment, where the copies are),
and the choice of a node for work its own node cannot take (``_placement``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _actor_directory as ad
from . import _config, _placement
from . import _placement_groups as pgs
from . import _state_views as views
from ._head_state import HeadState
from ._ids import owner_of
from ._metrics_store import MetricsStore
from ._object_store import (
    FreeCopies,
    LostObject,
    ObjectEntry,
    ObjectStore,
    RebuildObject,
    ReplyObjects,
)
from ._protocol import Message, MsgType
from ._resources import as_floats, describe, fits, subtract
from ._serialization import serialize_error
from ._stacks import StackQueries
from ._task_events import decode as decode_events
from ._task_log import TaskLog
from .exceptions import RuntimeEnvSetupError
from .runtime_env._package_store import PackageStore

log = logging.getLogger("shoal.control")

M = MsgType

NODE_TIMEOUT_SECONDS = _config.NODE_TIMEOUT_SECONDS


class NodeLink(Protocol):
    def send(self, msg: Message) -> None: ...


class ProcInfo:
    """A driver or worker somewhere in the cluster."""

    __slots__ = ("addr", "job", "node", "ns", "pid", "role", "wid")

    def __init__(
        self, wid: bytes, node: bytes, role: str, pid: int, addr: str, ns: str, job: int
    ) -> None:
        self.wid = wid
        self.node = node
        self.role = role
        self.pid = pid
        self.addr = addr
        self.ns = ns
        self.job = job


class NodeInfo:
    """A node of the cluster, as the control store sees it (a ``_placement.NodeLike``)."""

    def __init__(
        self,
        node_id: bytes,
        number: int,
        link: NodeLink,
        info: dict[str, Any],
    ) -> None:
        self.total = {str(k): int(v) for k, v in info["res"].items()}
        self.available = dict(self.total)
        self.node_id = node_id
        self.number = number
        self.link = link
        self.address = str(info.get("addr", ""))  # where other nodes pull objects from
        self.ip = str(info.get("ip", "127.0.0.1"))
        self.hostname = str(info.get("host", ""))
        self.pid = int(info.get("pid", 0))
        self.stats: dict[str, Any] = {}
        self.system: dict[str, Any] = {}  # CPU and memory of its machine (_node_stats)
        self.workers = 0
        self.envs: list[dict[str, Any]] = []  # its runtime envs (being built, ready, failed)
        self.alive = True
        self.last_seen = time.monotonic()
        self.death_reason = ""
        self.told_dead = False  # it was sent NODE_DEAD (it kept talking after its death)


class ControlStore:
    def __init__(self, head_node: bytes, call_soon: Callable[..., None]) -> None:
        self.head_node = head_node
        self.call_soon = call_soon
        self.actors = ad.ActorDirectory()
        # The directory has no capacity of its own: the nodes' stores have.
        self.directory = ObjectStore(1 << 62, lambda oid: "", self._is_alive)
        self.directory.recycle = False
        self.procs: dict[bytes, ProcInfo] = {}
        self.jobs: dict[int, bytes] = {}
        self.nodes: dict[bytes, NodeInfo] = {}
        self.next_number = 1  # the head's node is number 0
        # Lease requests sent to another node: (owner, request id) -> node, so that a
        # cancel from the owner reaches it.
        self.lease_routes: dict[tuple[bytes, int], bytes] = {}
        # Leases granted to an owner on another node than the worker's (they pass here, as
        # ROUTE): worker -> owner. When the worker's node dies, nobody is left there to tell
        # the owner; this does, and the owner retries the task elsewhere.
        self.remote_leases: dict[bytes, bytes] = {}
        # Actor leases asked of a node and not answered yet: actor -> node. A node that
        # dies before answering has them placed again.
        self.actor_leases: dict[bytes, bytes] = {}
        self.spread_index = -1
        self.groups: dict[bytes, pgs.GroupRecord] = {}
        self.group_names: dict[tuple[str, str], bytes] = {}
        self.on_exit_request: Callable[[], None] | None = None
        # Where the head's own node keeps each object (shared memory or spilled), for lists.
        self.local_places: Callable[[], dict[str, str]] | None = None
        # Runtime env packages uploaded by drivers, fetched by nodes (set by the head).
        self.packages: PackageStore | None = None
        # Detached actors kept on disk for a restarted head (SHOAL_HEAD_STATE_DIR; set by
        # the head), and those recovered from there that wait for a node that can take
        # them (their nodes join again after the restart): actor -> when to give up.
        self.state: HeadState | None = None
        self.recovering: dict[bytes, float] = {}
        self.waiting_actors: dict[bytes, ad.RequestActorLease] = {}
        self.task_log = TaskLog()
        self.stacks = StackQueries()
        self.metrics = MetricsStore()
        self.snapshot_cache: dict[str, Any] = {}  # what _state_views keeps between calls

    # -- membership --------------------------------------------------------------------
    def add_node(self, node_id: bytes, link: NodeLink, info: dict[str, Any]) -> NodeInfo:
        number = 0 if node_id == self.head_node else self.next_number
        if node_id != self.head_node:
            self.next_number += 1
        node = self.nodes[node_id] = NodeInfo(node_id, number, link, info)
        log.info("node %s joined (%s, %s)", node_id.hex()[:12], node.ip, describe(node.total))
        if self.waiting_actors:
            self.call_soon(self.retry_waiting_actors)  # once its link is usable
        return node

    def node_gone(self, node_id: bytes, reason: str) -> None:
        """A node left or died: what ran there is failed over, what was kept there is gone.

        Its workers' tasks are retried by their owners (WORKER_DIED, as after any worker
        death); its actors go down the actor-death path with the node's death as cause; its
        drivers are owners gone; its copies leave the object directory (an object left
        without a copy is rebuilt by its owner when next read); lease and actor-lease
        requests sent there go elsewhere; its placement group bundles are placed again.
        """
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        node.alive = False
        node.death_reason = reason
        node.available = {}
        log.warning("node %s is gone: %s", node_id.hex()[:12], reason)
        cause = f"its node {node_id.hex()[:12]} died: {reason}"
        procs = [p for p in self.procs.values() if p.node == node_id]
        for proc in procs:
            owner = self.remote_leases.pop(proc.wid, None)
            if owner is not None:
                self.send_to_process(owner, Message(M.WORKER_DIED, {"w": proc.wid, "e": cause}))
        for proc in procs:
            self._process_gone(proc.wid, cause, True)
        lost = self.directory.node_gone(node_id)
        if lost:
            log.warning(
                "%d objects lost their last copy with node %s; their owners rebuild them "
                "when they are read",
                len(lost),
                node_id.hex()[:12],
            )
        for key, target in list(self.lease_routes.items()):
            if target == node_id:
                del self.lease_routes[key]
                self.send_to_process(
                    key[0],
                    Message(
                        M.LEASE_FAILED,
                        {"r": key[1], "e": f"the node it was sent to {reason}", "retry": True},
                    ),
                )
        for aid, target in list(self.actor_leases.items()):
            rec = self.actors.actors.get(aid)
            if target == node_id:
                del self.actor_leases[aid]
                if rec is not None and rec.state != ad.DEAD and rec.creation is not None:
                    self._place_actor(ad.RequestActorLease(aid, rec.resources))
        self._reschedule_groups(node_id)
        for other in self.nodes.values():
            if other.alive and other.node_id != node_id:
                other.link.send(Message(M.NODE_DIED, {"n": node_id, "a": node.address}))

    def check_nodes(self) -> None:
        """Called every health-check period: nodes silent for too long are declared dead."""
        now = time.monotonic()
        for node in list(self.nodes.values()):
            if (
                node.alive
                and node.node_id != self.head_node
                and now - node.last_seen > NODE_TIMEOUT_SECONDS
            ):
                self.node_gone(
                    node.node_id,
                    f"it missed its health checks, nothing heard from it for "
                    f"{now - node.last_seen:.1f} s (the limit is SHOAL_HEALTH_CHECK_PERIOD x "
                    f"SHOAL_HEALTH_CHECK_FAILURE_THRESHOLD = {NODE_TIMEOUT_SECONDS:g} s)",
                )

    def _is_alive(self, wid: bytes) -> bool:
        return wid in self.procs or wid in self.nodes

    def _process_gone(self, wid: bytes, reason: str, worker: bool) -> None:
        proc = self.procs.pop(wid, None)
        if proc is not None and proc.role == "driver":
            self.jobs.pop(proc.job, None)
        self.remote_leases.pop(wid, None)
        self._act_directory(self.directory.process_gone(wid))
        self.metrics.process_gone(wid)
        self._act_actors(self.actors.owner_gone(wid))
        if worker:
            self._act_actors(self.actors.worker_exited(wid, reason))
        for key in [k for k in self.lease_routes if k[0] == wid]:
            del self.lease_routes[key]
        for rec in list(self.groups.values()):
            if rec.owner == wid and not rec.detached and rec.state != pgs.REMOVED:
                self._remove_group(rec)
        origin = proc.node if proc is not None else b""
        for node in self.nodes.values():
            if node.alive and node.node_id != origin:
                node.link.send(Message(M.OWNER_GONE, {"w": wid}))

    # -- sending -----------------------------------------------------------------------
    def send_to_process(self, wid: bytes, msg: Message) -> bool:
        proc = self.procs.get(wid)
        if proc is None:
            return False
        node = self.nodes.get(proc.node)
        if node is None or not node.alive:
            return False
        node.link.send(Message(M.DOWN, {"w": wid, "t": int(msg.type), "b": msg.body}, msg.frames))
        return True

    def send_to_node_of(self, wid: bytes, msg: Message) -> None:
        proc = self.procs.get(wid)
        if proc is not None:
            node = self.nodes.get(proc.node)
            if node is not None and node.alive:
                node.link.send(msg)

    # -- messages from node managers ---------------------------------------------------
    def on_node_message(self, node_id: bytes, msg: Message) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        if not node.alive:
            # Declared dead, yet it talks (a link that came back): what it did meanwhile
            # was done again elsewhere. It must not rejoin as itself (a split brain): it
            # is told to restart as a new node, and nothing it says is taken.
            if not node.told_dead and node.node_id != self.head_node:
                node.told_dead = True
                node.link.send(Message(M.NODE_DEAD, {"reason": node.death_reason}))
            return
        node.last_seen = time.monotonic()
        handler = self._node_handlers.get(msg.type)
        if handler is None:
            log.warning("unexpected %s from node %s", msg.type.name, node_id.hex()[:12])
            return
        try:
            handler(self, node, msg.body, msg.frames)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            log.warning("bad %s from node %s: %r", msg.type.name, node_id.hex()[:12], exc)

    def _n_update(self, node: NodeInfo, body: Any, frames: Any) -> None:
        node.available = {str(k): int(v) for k, v in body["avail"].items()}
        if "res" in body:
            node.total = {str(k): int(v) for k, v in body["res"].items()}
        node.stats = dict(body.get("store") or {})
        node.system = dict(body.get("sys") or {})
        node.workers = int(body.get("workers", 0))
        node.envs = list(body.get("envs") or [])
        if node.node_id != self.head_node:
            node.link.send(Message(M.PONG, {}))  # so that a node notices a dead head

    def _n_proc_joined(self, node: NodeInfo, body: Any, frames: Any) -> None:
        proc = ProcInfo(
            body["w"],
            node.node_id,
            str(body["role"]),
            int(body.get("pid", 0)),
            str(body.get("addr", "")),
            str(body.get("ns", "")),
            int(body.get("job", 0)),
        )
        self.procs[proc.wid] = proc
        if proc.role == "driver":
            self.jobs[proc.job] = proc.wid

    def _n_proc_gone(self, node: NodeInfo, body: Any, frames: Any) -> None:
        self._process_gone(body["w"], str(body.get("e", "exited")), bool(body.get("worker")))

    def _n_leave(self, node: NodeInfo, body: Any, frames: Any) -> None:
        self.node_gone(node.node_id, "left the cluster")

    def _n_up(self, node: NodeInfo, body: Any, frames: Any) -> None:
        proc = self.procs.get(body["w"])
        if proc is None:
            return
        handler = self._proc_handlers.get(MsgType(body["t"]))
        if handler is None:
            log.warning("unexpected %s from %s", MsgType(body["t"]).name, proc.wid.hex())
            return
        handler(self, proc, body["b"], frames)

    def _n_route(self, node: NodeInfo, body: Any, frames: Any) -> None:
        t = MsgType(body["t"])
        if t in (M.LEASE_GRANTED, M.LEASE_FAILED):
            self.lease_routes.pop((body["w"], int(body["b"]["r"])), None)
        if t == M.LEASE_GRANTED and body["w"] in self.procs:
            self.remote_leases[body["b"]["w"]] = body["w"]
        self.send_to_process(body["w"], Message(t, body["b"], frames))

    def _n_spill_lease(self, node: NodeInfo, body: Any, frames: Any) -> None:
        owner, req = body["w"], int(body["r"])
        res = {str(k): int(v) for k, v in body["res"].items()}
        if "avail" in body:
            # The asking node's own view is the freshest there is.
            node.available = {str(k): int(v) for k, v in body["avail"].items()}
        target, error = self._choose_node(res, body.get("st"), node.node_id)
        if target is None:
            error = self._park(res, error, ("lease", node.node_id, body))
            if error:
                self.send_to_process(owner, Message(M.LEASE_FAILED, {"r": req, "e": error}))
            return
        if target != node.node_id:
            self.lease_routes[(owner, req)] = target
            # Count it as taken until the node reports again, so that a burst of
            # requests spreads over the nodes instead of piling onto the first.
            subtract(self.nodes[target].available, res)
        strategy = body.get("st")
        pinned = (
            isinstance(strategy, dict)
            and strategy.get("kind") == "node"
            and not strategy.get("soft")
        )
        request = {"r": req, "res": res, "ns": True, "pin": pinned}
        if body.get("env"):
            request["env"] = body["env"]
        if body.get("nr"):
            request["nr"] = True  # not retriable (the memory monitor spares it longer)
        self.nodes[target].link.send(
            Message(M.TO_NODE, {"w": owner, "t": int(M.REQUEST_LEASE), "b": request})
        )

    def _n_actor_lease_result(self, node: NodeInfo, body: Any, frames: Any) -> None:
        if self.actor_leases.get(body["aid"]) == node.node_id:
            del self.actor_leases[body["aid"]]
        rec = self.actors.actors.get(body["aid"])
        if body.get("e") and body.get("env") and rec is not None:
            # Its callers get the setup error itself (RuntimeEnvSetupError), as the cause.
            error = RuntimeEnvSetupError(str(body["e"]))
            rec.death_error = serialize_error(error).frames()
            self._act_actors(
                self.actors.lease_rejected(
                    body["aid"], "its runtime environment could not be set up"
                )
            )
        elif body.get("e"):
            self._act_actors(
                self.actors.lease_rejected(body["aid"], "it cannot be scheduled: " + body["e"])
            )
        else:
            self._act_actors(self.actors.lease_granted(body["aid"], body["w"]))

    def _n_package_fetch(self, node: NodeInfo, body: Any, frames: Any) -> None:
        uri = str(body["uri"])
        data = None
        try:
            data = self.packages.get(uri) if self.packages is not None else None
            error = "" if data is not None else f"the head has no package {uri}"
        except (ValueError, OSError) as exc:
            error = str(exc)
        if data is None:
            node.link.send(Message(M.PACKAGE_DATA, {"uri": uri, "e": error}))
        else:
            node.link.send(Message(M.PACKAGE_DATA, {"uri": uri}, [data]))

    def _n_locate(self, node: NodeInfo, body: Any, frames: Any) -> None:
        self._act_directory(self.directory.get(node.node_id, 0, list(body["o"])))

    def _n_object_sealed(self, node: NodeInfo, body: Any, frames: Any) -> None:
        self._act_directory(
            self.directory.seal_at(
                body["o"],
                node.node_id,
                int(body["s"]),
                int(body["f"]),
                list(body.get("c") or ()),
                body.get("h"),
                str(body.get("cs") or ""),
            )
        )
        if body.get("r") is not None:
            self.send_to_process(body["w"], Message(M.FLUSHED, {"r": body["r"]}))

    def _n_object_copied(self, node: NodeInfo, body: Any, frames: Any) -> None:
        self._act_directory(self.directory.add_copy(body["o"], node.node_id))

    def _n_bundle_result(self, node: NodeInfo, body: Any, frames: Any) -> None:
        rec = self.groups.get(body["pg"])
        i = int(body["i"])
        if rec is None or rec.reserving.get(i) != node.node_id:
            if body.get("ok"):  # an answer nobody waits for: give the bundle back
                bundle = body.get("b") or {}
                node.link.send(Message(M.BUNDLE_RELEASE, {"pg": body["pg"], "i": i, "b": bundle}))
            return
        del rec.reserving[i]
        if body.get("ok"):
            rec.placement[i] = node.node_id
        else:
            rec.failed = True
        self._attempt_done(rec)

    def _attempt_done(self, rec: pgs.GroupRecord) -> None:
        """Every node asked in this attempt answered (or died): commit, or undo it all."""
        if rec.reserving:
            return
        if rec.state == pgs.REMOVED:
            self._release_bundles(rec)
            return
        if rec.failed:
            # All or nothing: tried again at the next tick. Bundles committed before this
            # attempt (a group placing again what a dead node held) stay.
            self._release_bundles(rec, rec.attempt)
            return
        rec.attempt = set()
        rec.state = pgs.CREATED
        parked, rec.parked = rec.parked, []
        for item in parked:
            self._unpark(item)

    _node_handlers: dict[MsgType, Callable[[Any, NodeInfo, Any, Any], None]] = {
        M.BUNDLE_RESULT: _n_bundle_result,
        M.NODE_UPDATE: _n_update,
        M.PROC_JOINED: _n_proc_joined,
        M.PROC_GONE: _n_proc_gone,
        M.NODE_LEAVE: _n_leave,
        M.UP: _n_up,
        M.ROUTE: _n_route,
        M.SPILL_LEASE: _n_spill_lease,
        M.ACTOR_LEASE_RESULT: _n_actor_lease_result,
        M.PACKAGE_FETCH: _n_package_fetch,
        M.LOCATE: _n_locate,
        M.OBJECT_SEALED: _n_object_sealed,
        M.OBJECT_COPIED: _n_object_copied,
    }

    # -- placement ---------------------------------------------------------------------
    def _alive_views(self) -> dict[bytes, _placement.NodeLike]:
        return {nid: n for nid, n in self.nodes.items() if n.alive}

    def _choose_node(
        self, res: dict[str, int], strategy: Any, origin: bytes
    ) -> tuple[bytes | None, str]:
        """The node for a lease request, or None and the reason none will ever do."""
        views = self._alive_views()
        if isinstance(strategy, dict) and strategy.get("kind") == "node":
            target = bytes.fromhex(str(strategy["node"]))
            node = self.nodes.get(target)
            if (
                node is not None
                and node.alive
                and fits(node.total, res)
                and (not strategy.get("soft") or fits(node.available, res))
            ):
                return target, ""
            if not strategy.get("soft"):
                if node is None or not node.alive:
                    return (
                        None,
                        f"its node affinity names node {strategy['node']}, which is not alive",
                    )
                return None, (
                    f"it asks for {describe(res)} but its node affinity names node "
                    f"{strategy['node'][:12]}, which has {describe(node.total)} in all"
                )
            strategy = None
        if isinstance(strategy, dict) and strategy.get("kind") == "spread":
            picked = _placement.pick_spread_node(res, views, self.spread_index)
            if picked is not None:
                target, self.spread_index = picked
                return target, ""
        else:
            chosen = _placement.pick_node(res, views, origin)
            if chosen is not None:
                return chosen, ""
        return None, self._infeasible(res)

    def _infeasible(self, res: dict[str, int]) -> str:
        alive = [n for n in self.nodes.values() if n.alive]
        if len(alive) == 1:
            return f"it asks for {describe(res)} but this cluster has {describe(alive[0].total)} in all"
        largest = "; ".join(f"{n.node_id.hex()[:8]}: {describe(n.total)}" for n in alive)
        return f"it asks for {describe(res)} but no node has that much ({largest})"

    # -- placement groups --------------------------------------------------------------
    def _park(self, res: dict[str, int], error: str, item: Any) -> str:
        """Work for a placement group that is not placed yet waits for it; returns the
        error to give when it cannot wait (no such group, or the request cannot fit it)."""
        gid = pgs.group_of(res)
        if gid is None:
            return error
        rec = self.groups.get(gid)
        if rec is None or rec.state == pgs.REMOVED:
            return f"its placement group {gid.hex()} was removed (or never existed)"
        if rec.state in (pgs.PENDING, pgs.RESCHEDULING):
            rec.parked.append(item)
            return ""
        return f"{error}; its placement group {gid.hex()} does not have room for it"

    def _unpark(self, item: Any) -> None:
        if item[0] == "lease":
            node = self.nodes.get(item[1])
            if node is not None and node.alive:
                self._n_spill_lease(node, item[2], ())
        else:
            self._place_actor(item[1])

    def retry_groups(self) -> None:
        """Called every second: pending groups try again (resources may have freed up)."""
        for rec in list(self.groups.values()):
            if rec.state in (pgs.PENDING, pgs.RESCHEDULING) and not rec.reserving:
                self._try_place(rec)
        self.retry_waiting_actors()

    # -- a restarted head (see _head_state.py) ----------------------------------------
    def recover_actors(self) -> int:
        """Create again the detached actors a previous head recorded; they are placed as
        their nodes join again (for SHOAL_NODE_REJOIN_TIMEOUT). Returns how many."""
        if self.state is None:
            return 0
        count = 0
        for saved in self.state.load_actors():
            try:
                rec = ad.ActorRecord(
                    actor_id=saved["aid"],
                    owner=b"",  # its owner was a driver of the old head: detached anyway
                    job_id=int(saved.get("job", 0)),
                    class_name=str(saved["cls"]),
                    name=str(saved.get("name") or ""),
                    namespace=str(saved.get("ns") or ""),
                    detached=True,
                    resources={str(k): int(v) for k, v in saved["res"].items()},
                    meta=saved["meta"],
                    creation=(saved["body"], list(saved["frames"])),
                )
                actions = self.actors.create(rec)
            except (KeyError, TypeError, ValueError, AttributeError, ad.NameTaken) as exc:
                log.error("could not recover actor %s: %r", saved.get("aid", b"").hex(), exc)
                continue
            self.recovering[rec.actor_id] = time.monotonic() + _config.NODE_REJOIN_SECONDS
            log.warning(
                "recovering detached actor %s (%s)", rec.name or rec.class_name, rec.actor_id.hex()
            )
            count += 1
            self._act_actors(actions)
        return count

    def retry_waiting_actors(self) -> None:
        waiting, self.waiting_actors = self.waiting_actors, {}
        for request in waiting.values():
            self._place_actor(request)

    def _keep_actor(self, rec: ad.ActorRecord) -> None:
        if self.state is None or not rec.detached or rec.creation is None:
            return
        body, frames = rec.creation
        self.state.save_actor(
            {
                "aid": rec.actor_id,
                "job": rec.job_id,
                "cls": rec.class_name,
                "name": rec.name,
                "ns": rec.namespace,
                "res": rec.resources,
                "meta": rec.meta,
                "body": body,
                "frames": [bytes(f) for f in frames],
            }
        )

    def _try_place(self, rec: pgs.GroupRecord) -> None:
        placement = _placement.place_bundles(
            rec.bundles,
            rec.strategy,
            self._alive_views(),
            placed=rec.placement,
            max_cpu_fraction=rec.max_cpu_fraction,
        )
        if placement is None:
            return
        new = {i: nid for i, nid in placement.items() if i not in rec.placement}
        rec.failed = False
        rec.reserving = dict(new)
        rec.attempt = set(new)
        for i, nid in new.items():
            node = self.nodes[nid]
            subtract(node.available, rec.bundles[i])
            node.link.send(
                Message(M.BUNDLE_RESERVE, {"pg": rec.pg_id, "i": i, "b": rec.bundles[i]})
            )

    def _release_bundles(self, rec: pgs.GroupRecord, only: set[int] | None = None) -> None:
        for i, nid in list(rec.placement.items()):
            if only is not None and i not in only:
                continue
            del rec.placement[i]
            node = self.nodes.get(nid)
            if node is not None and node.alive:
                node.link.send(
                    Message(M.BUNDLE_RELEASE, {"pg": rec.pg_id, "i": i, "b": rec.bundles[i]})
                )

    def _reschedule_groups(self, node_id: bytes) -> None:
        """``node_id`` died: its bundles are placed again, around the others."""
        for rec in list(self.groups.values()):
            if rec.state == pgs.REMOVED:
                continue
            lost = [i for i, nid in rec.placement.items() if nid == node_id]
            asked = [i for i, nid in rec.reserving.items() if nid == node_id]
            if not lost and not asked:
                continue
            for i in lost:
                del rec.placement[i]  # its resources went with the node
            for i in asked:
                del rec.reserving[i]
                rec.failed = True  # that node never answers: this attempt is over
            if lost and rec.state == pgs.CREATED:
                rec.state = pgs.RESCHEDULING
                log.warning(
                    "placement group %s lost bundles %s with node %s: placing them again",
                    rec.pg_id.hex(),
                    lost,
                    node_id.hex()[:12],
                )
            if asked:
                self._attempt_done(rec)
            if not rec.reserving:
                self._try_place(rec)

    def _remove_group(self, rec: pgs.GroupRecord) -> None:
        rec.state = pgs.REMOVED
        self._release_bundles(rec)
        if rec.name and self.group_names.get((rec.namespace, rec.name)) == rec.pg_id:
            del self.group_names[(rec.namespace, rec.name)]
        parked, rec.parked = rec.parked, []
        for item in parked:
            self._unpark(item)  # fails now: the group is gone

    def _h_create_pg(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        pg_id = body["pg"]
        bundles = [{str(k): int(v) for k, v in b.items()} for b in body["b"]]
        strategy = str(body["st"])
        name, ns = str(body.get("name") or ""), str(body.get("ns") or "")
        fraction = float(body.get("frac", 1.0))
        error = None
        if name and (ns, name) in self.group_names:
            error = f"a placement group named {name!r} already exists in namespace {ns!r}"
        else:
            reason = _placement.feasible_ever(
                bundles, strategy, self._alive_views(), max_cpu_fraction=fraction
            )
            if reason:
                error = f"the placement group can never be placed on this cluster: {reason}"
        if error:
            self.send_to_process(proc.wid, Message(M.REPLY, {"r": body["r"], "e": error}))
            return
        rec = pgs.GroupRecord(
            pg_id, bundles, strategy, name, ns, proc.wid, bool(body.get("detached")), fraction
        )
        self.groups[pg_id] = rec
        if name:
            self.group_names[(ns, name)] = pg_id
        self.send_to_process(proc.wid, Message(M.REPLY, {"r": body["r"]}))
        self._try_place(rec)

    def _h_remove_pg(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        rec = self.groups.get(body["pg"])
        if rec is not None and rec.state != pgs.REMOVED:
            self._remove_group(rec)

    def _h_pg_info(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        info: Any
        if body.get("pg") is not None:
            rec = self.groups.get(body["pg"])
            info = rec.info() if rec is not None else None
        elif body.get("name") is not None:
            gid = self.group_names.get((str(body.get("ns") or ""), str(body["name"])))
            info = self.groups[gid].info() if gid is not None else None
        else:
            info = {rec.pg_id.hex(): rec.info() for rec in self.groups.values()}
        self.send_to_process(proc.wid, Message(M.REPLY, {"r": body["r"], "info": info}))

    # -- messages from processes -------------------------------------------------------
    def _h_create_actor(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        name = str(body.get("name") or "")
        ns = str(body.get("ns") or "")
        req = body.get("r")
        if name and body.get("gie"):
            existing = self.actors.lookup_name(name, ns)
            if existing is not None and existing.state != ad.DEAD:
                self.send_to_process(
                    proc.wid,
                    Message(M.ACTOR_INFO, {"r": req, "info": existing.info(), "existing": True}),
                )
                return
        rec = ad.ActorRecord(
            actor_id=body["aid"],
            owner=proc.wid,
            job_id=int(body.get("job", 0)),
            class_name=str(body["cls"]),
            name=name,
            namespace=ns,
            detached=bool(body.get("detached")),
            resources={str(k): int(v) for k, v in body["res"].items()},
            meta=body["meta"],
            creation=(body, list(frames)),
            max_restarts=int(body.get("mr") or 0),
        )
        try:
            actions = self.actors.create(rec)
        except ad.NameTaken as exc:
            self.send_to_process(proc.wid, Message(M.ACTOR_INFO, {"r": req, "e": str(exc)}))
            return
        if req is not None:
            self.send_to_process(proc.wid, Message(M.ACTOR_INFO, {"r": req, "info": rec.info()}))
        self._keep_actor(rec)
        self._act_actors(actions)

    def _h_actor_ready(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        aid = body["aid"]
        rec = self.actors.actors.get(aid)
        if rec is None or rec.worker_id != proc.wid:
            return
        if body.get("err"):
            self._act_actors(self.actors.constructor_failed(aid, list(frames)))
        else:
            rec.node = proc.node
            self._act_actors(self.actors.ready(aid, proc.addr, proc.pid))

    def _h_subscribe_actor(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        rec = self.actors.subscribe(proc.wid, body["aid"])
        if rec is None:
            info = {
                "aid": body["aid"],
                "state": ad.DEAD,
                "reason": "no such actor (it may belong to a cluster that is gone)",
            }
            self.send_to_process(proc.wid, Message(M.ACTOR_UPDATE, info))
        else:
            self.send_to_process(
                proc.wid, Message(M.ACTOR_UPDATE, rec.info(), rec.death_error or ())
            )

    def _h_get_actor(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        rec = self.actors.lookup_name(str(body["name"]), str(body.get("ns") or ""))
        info = rec.info() if rec is not None and rec.state != ad.DEAD else None
        self.send_to_process(proc.wid, Message(M.ACTOR_INFO, {"r": body["r"], "info": info}))

    def _h_kill_actor(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        no_restart = bool(body.get("no_restart", True))
        reason = "it was killed with shoal.kill()"
        if not no_restart:
            reason = "it was killed with shoal.kill(no_restart=False)"
        self._act_actors(self.actors.kill(body["aid"], reason, no_restart))

    def _h_release_actor(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        rec = self.actors.actors.get(body["aid"])
        if rec is not None and rec.owner == proc.wid:
            self._act_actors(self.actors.release(body["aid"]))

    def _h_put_object(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        h = body.get("h")
        holder = h if isinstance(h, bytes) else (proc.wid if h else None)
        self._act_directory(
            self.directory.put_inline(
                body["o"], int(body["f"]), list(frames), list(body.get("c") or ()), holder
            )
        )

    def _h_ref_updates(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        self._act_directory(
            self.directory.update_refs(
                proc.wid, list(body.get("a") or ()), list(body.get("d") or ())
            )
        )
        if body.get("r") is not None:
            self.send_to_process(proc.wid, Message(M.FLUSHED, {"r": body["r"]}))

    def _h_forward_to_worker_node(self, proc: ProcInfo, body: Any, frames: Any, t: MsgType) -> None:
        """RETURN_LEASE / CANCEL_TASK for a worker on another node than the owner's."""
        self.send_to_node_of(body["w"], Message(M.TO_NODE, {"w": proc.wid, "t": int(t), "b": body}))

    def _h_return_lease(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        if self.remote_leases.get(body["w"]) == proc.wid:
            del self.remote_leases[body["w"]]
        self._h_forward_to_worker_node(proc, body, frames, M.RETURN_LEASE)

    def _h_cancel_task(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        self._h_forward_to_worker_node(proc, body, frames, M.CANCEL_TASK)

    def _h_cancel_lease_request(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        target = self.lease_routes.pop((proc.wid, int(body["r"])), None)
        if target is not None and target in self.nodes:
            self.nodes[target].link.send(
                Message(M.TO_NODE, {"w": proc.wid, "t": int(M.CANCEL_LEASE_REQUEST), "b": body})
            )

    def node_records(self) -> list[dict[str, Any]]:
        out = []
        for node in self.nodes.values():
            out.append(
                {
                    "NodeID": node.node_id.hex(),
                    "Alive": node.alive,
                    "NodeManagerAddress": node.ip,
                    "NodeManagerHostname": node.hostname,
                    "NodeName": node.ip,
                    "Resources": as_floats(node.total),
                    "Available": as_floats(node.available) if node.alive else {},
                    "Workers": node.workers,
                    "ObjectStore": node.stats,
                    "Address": node.address,
                    "IsHead": node.node_id == self.head_node,
                    "RuntimeEnvs": node.envs if node.alive else [],
                    "DeathReason": node.death_reason,
                    "alive": node.alive,
                }
            )
        return out

    def _h_cluster_info(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        self.send_to_process(
            proc.wid,
            Message(M.CLUSTER_INFO_REPLY, {"r": body["r"], "nodes": self.node_records()}),
        )

    def _h_list_objects(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        reply = {"r": body["r"], "objects": views.object_records(self)}
        reply["stats"] = {**views.store_totals(self), "objects": len(reply["objects"])}
        self.send_to_process(proc.wid, Message(M.REPLY, reply))

    # -- observability (_task_log.py, _state_views.py, _stacks.py) ---------------------
    def _h_task_events(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        # The batch of user metrics rides on the same message (_metrics.py).
        if body.get("m") is not None:
            try:
                self.metrics.apply(proc.wid, proc.pid, body["m"])
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                log.warning("bad metrics from pid %s: %r", proc.pid, exc)
        if frames or body.get("d"):
            events = decode_events(frames[0]) if frames else ()
            self.task_log.apply(events, proc.wid, proc.node, proc.pid, int(body.get("d", 0)))

    def _h_state(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        try:
            reply = views.query(self, self.task_log, body)
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"e": str(exc)}
        reply["r"] = body.get("r")
        self.send_to_process(proc.wid, Message(M.REPLY, reply))

    def _h_stack(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        try:
            targets = views.stack_targets(self, self.task_log, body, proc.wid)
        except ValueError as exc:
            self.send_to_process(proc.wid, Message(M.REPLY, {"r": body.get("r"), "e": str(exc)}))
            return
        qid, replies = self.stacks.start(proc.wid, body.get("r"), targets)
        for wid in targets:
            self.send_to_process(wid, Message(M.STACK_DUMP, {"q": qid}))
        self._send_replies(replies)

    def _h_stack_dump(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        self._send_replies(self.stacks.answer(int(body["q"]), proc.wid, str(body["text"])))

    def expire_requests(self) -> None:
        """Called every second: stack requests past their deadline are answered."""
        self._send_replies(self.stacks.expire())

    def _send_replies(self, replies: list[tuple[bytes, dict[str, Any]]]) -> None:
        for wid, reply in replies:
            self.send_to_process(wid, Message(M.REPLY, reply))

    def _h_rebuild_failed(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        oid = body["o"]
        if owner_of(oid) == proc.wid:  # only its owner may give an object up
            self._act_directory(self.directory.rebuild_failed(oid, str(body.get("e") or "")))

    def _h_log_lines(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        driver = self.jobs.get(int(body.get("j", 0)))
        if driver is not None:
            self.send_to_process(driver, Message(M.LOG_LINES, body))

    # -- runtime env packages (see runtime_env/_package_store.py) -----------------------
    def _h_package_upload(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        reply: dict[str, Any] = {"r": body["r"]}
        try:
            if self.packages is None:
                raise ValueError("this head keeps no packages")
            if body.get("probe"):
                reply["have"] = self.packages.has(str(body["uri"]))
            elif len(frames) != 1:
                raise ValueError("a package upload carries one buffer")
            else:
                self.packages.put(str(body["uri"]), frames[0])
        except (ValueError, OSError) as exc:
            reply["e"] = str(exc)
        self.send_to_process(proc.wid, Message(M.REPLY, reply))

    def _h_prepare_env(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        """eager_install: every node sets the job's env up now."""
        for node in self.nodes.values():
            if node.alive:
                node.link.send(Message(M.PREPARE_ENV, {"env": body["env"]}))

    def _h_exit(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        if proc.role == "driver" and body.get("stop_cluster") and self.on_exit_request:
            self.on_exit_request()

    _proc_handlers: dict[MsgType, Callable[[Any, ProcInfo, Any, Any], None]] = {
        M.CREATE_ACTOR: _h_create_actor,
        M.ACTOR_READY: _h_actor_ready,
        M.SUBSCRIBE_ACTOR: _h_subscribe_actor,
        M.GET_ACTOR: _h_get_actor,
        M.KILL_ACTOR: _h_kill_actor,
        M.RELEASE_ACTOR: _h_release_actor,
        M.PUT_OBJECT: _h_put_object,
        M.REF_UPDATES: _h_ref_updates,
        M.RETURN_LEASE: _h_return_lease,
        M.CANCEL_TASK: _h_cancel_task,
        M.CANCEL_LEASE_REQUEST: _h_cancel_lease_request,
        M.CLUSTER_INFO: _h_cluster_info,
        M.LIST_OBJECTS: _h_list_objects,
        M.TASK_EVENTS: _h_task_events,
        M.STATE: _h_state,
        M.STACK: _h_stack,
        M.STACK_DUMP: _h_stack_dump,
        M.LOG_LINES: _h_log_lines,
        M.EXIT: _h_exit,
        M.CREATE_PG: _h_create_pg,
        M.REMOVE_PG: _h_remove_pg,
        M.PG_INFO: _h_pg_info,
        M.PACKAGE_UPLOAD: _h_package_upload,
        M.PREPARE_ENV: _h_prepare_env,
        M.REBUILD_FAILED: _h_rebuild_failed,
    }

    # -- actions -----------------------------------------------------------------------
    def _act_actors(self, actions: list[ad.Action]) -> None:
        for a in actions:
            if isinstance(a, ad.RequestActorLease):
                self._place_actor(a)
            elif isinstance(a, ad.BecomeActor):
                body, frames = a.record.creation
                if a.record.num_restarts:
                    body = {**body, "restarts": a.record.num_restarts}
                self.send_to_process(a.worker_id, Message(M.BECOME_ACTOR, body, frames))
            elif isinstance(a, ad.Publish):
                if a.record.state == ad.DEAD:
                    self.recovering.pop(a.record.actor_id, None)
                    if self.state is not None and a.record.detached:
                        self.state.forget_actor(a.record.actor_id)
                info = a.record.info()
                frames = a.record.death_error or ()
                for sub in a.subscribers:
                    self.send_to_process(sub, Message(M.ACTOR_UPDATE, info, frames))
            elif isinstance(a, ad.KillActorWorker):
                self.send_to_node_of(a.worker_id, Message(M.KILL_WORKER, {"w": a.worker_id}))

    def _place_actor(self, a: ad.RequestActorLease) -> None:
        rec = self.actors.actors.get(a.actor_id)
        strategy = rec.creation[0].get("st") if rec is not None else None
        origin = self.procs[rec.owner].node if rec and rec.owner in self.procs else self.head_node
        target, error = self._choose_node(a.resources, strategy, origin)
        if target is None and time.monotonic() < self.recovering.get(a.actor_id, 0.0):
            self.waiting_actors[a.actor_id] = a  # its node may not have joined again yet
            return
        if target is None:
            error = self._park(a.resources, error, ("actor", a))
            if error:
                self._act_actors(
                    self.actors.lease_rejected(a.actor_id, "it cannot be scheduled: " + error)
                )
            return
        self.recovering.pop(a.actor_id, None)
        subtract(self.nodes[target].available, a.resources)
        lease: dict[str, Any] = {"aid": a.actor_id, "res": a.resources}
        if rec is not None and rec.restarts_left():
            lease["rt"] = True  # the memory monitor prefers work that can run again
        if rec is not None and rec.creation[0].get("env"):
            lease["env"] = rec.creation[0]["env"]
        self.actor_leases[a.actor_id] = target
        self.nodes[target].link.send(Message(M.ACTOR_LEASE, lease))

    def _act_directory(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, ReplyObjects):
                self._reply_located(a.process, a.entries)
            elif isinstance(a, FreeCopies):
                for nid in a.nodes:
                    node = self.nodes.get(nid)
                    if node is not None and node.alive:
                        node.link.send(Message(M.FREE_OBJECTS, {"o": [a.oid]}))
            elif isinstance(a, RebuildObject):
                log.info("object %s is lost: its owner makes it again", a.oid.hex())
                if not self.send_to_process(a.owner, Message(M.REBUILD_OBJECT, {"o": a.oid})):
                    self._act_directory(
                        self.directory.rebuild_failed(
                            a.oid,
                            f"object {a.oid.hex()} was lost with its node and its owner "
                            f"{a.owner.hex()} cannot be reached",
                        )
                    )

    def _reply_located(self, node_id: bytes, entries: list[tuple[bytes, Any]]) -> None:
        """Tell a node where the objects it asked for are (or that they are lost)."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        out: list[list[Any]] = []
        frames: list[Any] = []
        for oid, entry in entries:
            if isinstance(entry, LostObject):
                out.append([oid, "e", entry.kind, entry.message])
            elif isinstance(entry, ObjectEntry) and entry.frames is not None:
                out.append([oid, "i", entry.flags, len(entry.frames)])
                frames.extend(entry.frames)
            elif isinstance(entry, ObjectEntry):
                sources = [
                    [nid, self.nodes[nid].address]
                    for nid in sorted(entry.nodes or ())
                    if nid in self.nodes and self.nodes[nid].alive
                ]
                out.append([oid, "n", entry.flags, entry.size, sources])
        node.link.send(Message(M.LOCATED, {"e": out}, frames))
