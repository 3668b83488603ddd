"""The control store: the cluster's single source of truth, in the head process.

    node managers --NodeLink--> ControlStore.on_node_message
        NODE_UPDATE       resources, store and worker counts (heartbeat)
        PROC_JOINED/GONE  drivers and workers connecting to, and leaving, their node
        UP                a process's message for the control store (actors, refs, logs)
        ROUTE             a node's message for a process on another node (lease grants)
        SPILL_LEASE       a lease request its node cannot serve now: pick another node
        LOCATE, OBJECT_SEALED, OBJECT_COPIED   the object directory
    ControlStore --NodeLink--> node managers
        DOWN              deliver a message to a process of that node
        TO_NODE           a process's message for that node's manager (return a lease ...)
        ACTOR_LEASE, KILL_WORKER, OWNER_GONE, LOCATED, FREE_OBJECTS

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
from ._object_store import FreeCopies, LostObject, ObjectEntry, ObjectStore, ReplyObjects
from ._protocol import Message, MsgType
from ._resources import as_floats, describe, fits, subtract
from ._stacks import StackQueries
from ._task_events import decode as decode_events
from ._task_log import TaskLog

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
        self.alive = True
        self.last_seen = time.monotonic()
        self.death_reason = ""


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
        self.spread_index = -1
        self.groups: dict[bytes, pgs.GroupRecord] = {}
        self.group_names: dict[tuple[str, str], bytes] = {}
        self.on_exit_request: Callable[[], None] | None = None
        # Where the head's own node keeps each object (shared memory or spilled), for lists.
        self.local_places: Callable[[], dict[str, str]] | None = None
        self.task_log = TaskLog()
        self.stacks = StackQueries()
        self.snapshot_cache: dict[str, Any] = {}  # what _state_views keeps between calls

    # -- membership --------------------------------------------------------------------
    def add_node(self, node_id: bytes, link: NodeLink, info: dict[str, Any]) -> NodeInfo:
        number = 0 if node_id == self.head_node else self.next_number
        if node_id != self.head_node:
            self.next_number += 1
        node = self.nodes[node_id] = NodeInfo(node_id, number, link, info)
        log.info("node %s joined (%s, %s)", node_id.hex()[:12], node.ip, describe(node.total))
        return node

    def node_gone(self, node_id: bytes, reason: str) -> None:
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        node.alive = False
        node.death_reason = reason
        log.warning("node %s is gone: %s", node_id.hex()[:12], reason)
        for proc in [p for p in self.procs.values() if p.node == node_id]:
            self._process_gone(proc.wid, f"its node {node_id.hex()[:12]} {reason}", True)
        self.directory.node_gone(node_id)
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

    def check_nodes(self) -> None:
        """Called every second: nodes silent for too long are declared dead."""
        now = time.monotonic()
        for node in list(self.nodes.values()):
            if (
                node.alive
                and node.node_id != self.head_node
                and now - node.last_seen > NODE_TIMEOUT_SECONDS
            ):
                self.node_gone(node.node_id, f"sent nothing for {NODE_TIMEOUT_SECONDS:.0f} s")

    def _is_alive(self, wid: bytes) -> bool:
        return wid in self.procs or wid in self.nodes

    def _process_gone(self, wid: bytes, reason: str, worker: bool) -> None:
        proc = self.procs.pop(wid, None)
        if proc is not None and proc.role == "driver":
            self.jobs.pop(proc.job, None)
        self._act_directory(self.directory.process_gone(wid))
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
        if node is None or not node.alive:
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
        self.nodes[target].link.send(
            Message(M.TO_NODE, {"w": owner, "t": int(M.REQUEST_LEASE), "b": request})
        )

    def _n_actor_lease_result(self, node: NodeInfo, body: Any, frames: Any) -> None:
        if body.get("e"):
            self._act_actors(
                self.actors.lease_rejected(body["aid"], "it cannot be scheduled: " + body["e"])
            )
        else:
            self._act_actors(self.actors.lease_granted(body["aid"], body["w"]))

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
        if rec.reserving:
            return
        if rec.state == pgs.REMOVED or rec.failed:
            self._release_bundles(rec)  # all or nothing: tried again at the next tick
            return
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
        if rec.state == pgs.PENDING:
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
            if rec.state == pgs.PENDING and not rec.reserving:
                self._try_place(rec)

    def _try_place(self, rec: pgs.GroupRecord) -> None:
        placement = _placement.place_bundles(
            rec.bundles,
            rec.strategy,
            self._alive_views(),
            max_cpu_fraction=rec.max_cpu_fraction,
        )
        if placement is None:
            return
        rec.failed = False
        rec.reserving = dict(placement)
        for i, nid in placement.items():
            node = self.nodes[nid]
            subtract(node.available, rec.bundles[i])
            node.link.send(
                Message(M.BUNDLE_RESERVE, {"pg": rec.pg_id, "i": i, "b": rec.bundles[i]})
            )

    def _release_bundles(self, rec: pgs.GroupRecord) -> None:
        for i, nid in rec.placement.items():
            node = self.nodes.get(nid)
            if node is not None and node.alive:
                node.link.send(
                    Message(M.BUNDLE_RELEASE, {"pg": rec.pg_id, "i": i, "b": rec.bundles[i]})
                )
        rec.placement = {}

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
        )
        try:
            actions = self.actors.create(rec)
        except ad.NameTaken as exc:
            self.send_to_process(proc.wid, Message(M.ACTOR_INFO, {"r": req, "e": str(exc)}))
            return
        if req is not None:
            self.send_to_process(proc.wid, Message(M.ACTOR_INFO, {"r": req, "info": rec.info()}))
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
        self._act_actors(self.actors.kill(body["aid"], "it was killed with shoal.kill()"))

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

    def _h_log_lines(self, proc: ProcInfo, body: Any, frames: Any) -> None:
        driver = self.jobs.get(int(body.get("j", 0)))
        if driver is not None:
            self.send_to_process(driver, Message(M.LOG_LINES, body))

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
    }

    # -- actions -----------------------------------------------------------------------
    def _act_actors(self, actions: list[ad.Action]) -> None:
        for a in actions:
            if isinstance(a, ad.RequestActorLease):
                self._place_actor(a)
            elif isinstance(a, ad.BecomeActor):
                body, frames = a.record.creation
                self.send_to_process(a.worker_id, Message(M.BECOME_ACTOR, body, frames))
            elif isinstance(a, ad.Publish):
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
        if target is None:
            error = self._park(a.resources, error, ("actor", a))
            if error:
                self._act_actors(
                    self.actors.lease_rejected(a.actor_id, "it cannot be scheduled: " + error)
                )
            return
        subtract(self.nodes[target].available, a.resources)
        self.nodes[target].link.send(
            Message(M.ACTOR_LEASE, {"aid": a.actor_id, "res": a.resources})
        )

    def _act_directory(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, ReplyObjects):
                self._reply_located(a.process, a.entries)
            elif isinstance(a, FreeCopies):
                for nid in a.nodes:
                    node = self.nodes.get(nid)
                    if node is not None and node.alive:
                        node.link.send(Message(M.FREE_OBJECTS, {"o": [a.oid]}))

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
