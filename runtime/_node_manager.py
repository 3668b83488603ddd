"""The node manager: one per machine, Ray's raylet. Its node's leases, workers and store.

    drivers, workers --(ipc)--> NodeManager.on_message
        REQUEST_LEASE, RETURN_LEASE, BLOCKED ...   NodeScheduler (leases, worker pool)
        CREATE_OBJECT, SEAL_OBJECT, GET_OBJECTS    the node's ObjectStore (capacity, spill)
        anything else                              up to the control store (UP)
    other node managers --(tcp)--> PULL: chunks of this node's objects
    control store --> on_control: DOWN (to a local process), TO_NODE, ACTOR_LEASE, ...

The local store keeps each object's file until the control store's directory frees it
(FREE_OBJECTS): reference counts are the directory's, kept for the whole cluster. A read
of an object this node does not have asks the directory where it is (LOCATE), then pulls
it from a node that has it (``_transfer.Pull``) into this node's shared memory.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from . import _config, _placement
from . import _memory_monitor as mem
from . import _scheduler as sch
from ._ioloop import IOLoop
from ._node_stats import SystemSampler
from ._object_store import (
    ObjectStore,
    RenameSegment,
    ReplyObjects,
    StoreFull,
    UnlinkSegment,
)
from ._protocol import Message, MsgType, ProtocolError, Signer
from ._resources import fits
from ._sealing import trim_spares
from ._session import Session
from ._shm import copy_file, free_bytes, unlink
from ._task_submitter import pick_address
from ._transfer import CHUNK_SIZE, STALL_SECONDS, ChunkServer, Pull, open_segment
from ._transport import Connection, Listener
from ._worker_processes import WorkerProcesses
from ._zygote import Zygote
from .runtime_env._manager import EnvManager

log = logging.getLogger("shoal.node")

M = MsgType

# The holder that pins every object in a node's store until the directory frees it.
DIRECTORY_PIN = b"\x00directory"

# Messages a node manager serves itself; everything else from a local process goes up.
NODE_LEVEL = frozenset(
    {
        M.REQUEST_LEASE,
        M.CANCEL_LEASE_REQUEST,
        M.RETURN_LEASE,
        M.BLOCKED,
        M.UNBLOCKED,
        M.CANCEL_TASK,
        M.CREATE_OBJECT,
        M.SEAL_OBJECT,
        M.GET_OBJECTS,
        M.RELAY,
        M.RELAY_CLOSE,
        M.PUSH_CHUNK,
        M.PULL,
        M.PING,
    }
)


# How often a node reports its resources when nothing changes (a heartbeat: the head's
# health check counts these), and the shortest gap between two reports when they change.
UPDATE_SECONDS = _config.HEALTH_CHECK_PERIOD_SECONDS
UPDATE_MIN_GAP = 0.02


class _Peer:
    __slots__ = (
        "addr",
        "client",
        "ident",
        "job",
        "last_seen",
        "namespace",
        "pid",
        "pidfd",
        "role",
        "wid",
    )

    def __init__(
        self, ident: bytes, wid: bytes, role: str, pid: int, addr: str, namespace: str
    ) -> None:
        self.ident = ident
        self.wid = wid
        self.role = role
        self.pid = pid
        self.addr = addr
        self.namespace = namespace
        self.job = 0
        self.pidfd: int | None = None
        self.client = False  # a driver on another machine (client-server mode)
        self.last_seen = 0.0


class NodeManager:
    def __init__(
        self,
        loop: IOLoop,
        ctx: Any,
        session: Session,
        args: argparse.Namespace,
        node_id: bytes,
        signer: Signer,
        zygote: Zygote | None,
        total: dict[str, int],
    ) -> None:
        self.loop = loop
        self.ctx = ctx
        self.session = session
        self.args = args
        self.node_id = node_id
        self.signer = signer
        self.number = 0  # given by the control store: it numbers jobs started here
        # Chunks of objects streamed in (a client's put over tcp) are opened (decrypted)
        # into one staging buffer and written from there: handled at once, each before the
        # next message is read, so the buffer is free again by then.
        self._staging: bytearray | None = None
        self.listener = Listener(
            ctx, signer, self._on_hello, self._on_message, sink=self._chunk_sink(M.PUSH_CHUNK)
        )
        self.address = self.listener.bind(session.socket_address("h"))
        self.tcp_address = ""  # where other nodes (and, on the head, nodes) reach us
        self.listener.attach(self.loop)
        # Hooks for peers that are not local processes (on the head: node links).
        self.on_foreign_hello: Callable[[bytes, dict[str, Any]], dict[str, Any]] | None = None
        self.on_foreign_message: Callable[[bytes, Message], None] | None = None
        self.foreign: set[bytes] = set()
        self.up: Any = None  # a link to the control store: .send(Message)

        self.scheduler = sch.NodeScheduler(
            total, pool_size=max(1, int(args.num_cpus)), cluster=True
        )
        self.store_capacity = args.object_store_memory
        self.spill_dir = args.spill_dir or os.path.join(session.path, "spill")
        os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        self.store = ObjectStore(
            self.store_capacity,
            self._segment_path,
            lambda wid: True,  # liveness is the directory's business
            spill=_spill_file,
            spill_path=lambda oid: os.path.join(self.spill_dir, f"shoal-{session.tag}-{oid.hex()}"),
            disk_free=lambda: free_bytes(self.spill_dir),
        )
        self.store.now = time.monotonic

        self.peers: dict[bytes, _Peer] = {}  # routing identity -> local process
        self.by_wid: dict[bytes, _Peer] = {}
        self.next_job = 1
        self.workers = WorkerProcesses(self.loop, session.logs, zygote, self._worker_exited)
        # Runtime envs: set up here in background threads, workers pooled by env key.
        self.envs = EnvManager(
            loop,
            node_id.hex(),
            lambda msg: self.up.send(msg),
            self.workers,
            lambda key: self._act_sched(self.scheduler.handle(sch.EnvReadyEvent(key))),
            lambda key, why: self._act_sched(self.scheduler.handle(sch.EnvFailedEvent(key, why))),
            self._resources_changed,
        )
        self.exiting = False
        self.on_shutdown: Callable[[], None] | None = None
        # Reads of objects this node does not have yet: oid -> local readers waiting.
        self.get_waiters: dict[bytes, list[bytes]] = {}
        self.locating: set[bytes] = set()
        self.chunks = ChunkServer(self.store)
        self.pulls: dict[bytes, Pull] = {}
        self.node_conns: dict[str, Connection] = {}  # other nodes' addresses -> connection
        self._update_due = False
        self._last_update = 0.0
        self.system = SystemSampler()
        # Client-server mode: connections to workers on behalf of clients, and objects
        # clients are streaming in.
        self.relays: dict[tuple[bytes, str], Connection] = {}
        self.uploads: dict[bytes, tuple[int, bytes]] = {}  # oid -> (fd, client)
        threshold, period = _config.memory_monitor_settings()
        self.memory = mem.MemoryMonitor(threshold, period)
        # Workers the memory monitor stopped, until their exit is handled: the figures
        # that say why (their owners get them with the news of the death).
        self.oom_victims: dict[bytes, dict[str, Any]] = {}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._act_sched(self.scheduler.start())
        self.loop.call_later(0.25, self._tick)
        if self.memory.enabled:
            self.loop.call_later(self.memory.period, self._check_memory)

    # -- memory ------------------------------------------------------------------------
    def _check_memory(self) -> None:
        try:
            figures = self.memory.check(self._oom_candidates)
        except Exception:  # a failed reading must not stop the checks
            log.exception("the memory monitor could not read the node's memory")
            figures = None
        if figures is not None:
            wid = figures["w"]
            figures["node"] = self.node_id.hex()
            self.oom_victims[wid] = figures
            kind = "actor worker" if figures["actor"] else "worker"
            log.warning("stopping %s %s: %s", kind, wid.hex(), mem.describe(figures))
            self.workers.kill(wid)
        self.loop.call_later(self.memory.period, self._check_memory)

    def _oom_candidates(self) -> list[mem.Candidate]:
        """Leased workers (tasks and actors): drivers and this process never are."""
        out = []
        for w in self.scheduler.workers.values():
            peer = self.by_wid.get(w.worker_id)
            if w.state != "leased" or peer is None:
                continue
            out.append(
                mem.Candidate(
                    w.worker_id, peer.pid, w.actor_id is not None, w.retriable, w.leased_at
                )
            )
        return out

    def cleanup(self) -> None:
        self.envs.close()
        self.workers.stop_all()
        for pull in self.pulls.values():
            pull.abort()
        for entry in self.store.objects.values():
            if entry.path:
                unlink(entry.path)
        for conn in [*self.node_conns.values(), *self.relays.values()]:
            conn.close()
        for fd, _ in self.uploads.values():
            os.close(fd)
        self.chunks.close()
        self.listener.close()

    def _tick(self) -> None:
        self.workers.reap_strays()
        trim_spares()
        self._act_sched(self.scheduler.handle(sch.TickEvent()))
        self._act_store(self.store.expire_pool())
        now = time.monotonic()
        if now - self._last_update >= UPDATE_SECONDS:
            self._send_update()
        for pull in list(self.pulls.values()):
            if now - pull.last_progress > STALL_SECONDS:
                # A source that stopped answering (died, or dropped our messages).
                if pull.next_source():
                    self._pull_next(pull)
                else:
                    self._finish_pull(pull, f"no chunk arrived for {STALL_SECONDS:.0f} s")
        for peer in [p for p in self.by_wid.values() if p.client]:
            # Silent too long: gone, as a driver that exited (its work and objects go).
            if now - peer.last_seen > _config.CLIENT_TIMEOUT_SECONDS:
                log.warning(
                    "client %s sent nothing for %.0f s: dropped",
                    peer.wid.hex(),
                    now - peer.last_seen,
                )
                self._process_gone(peer.wid, "its connection was lost", False)
        self.loop.call_later(0.25, self._tick)

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "avail": s.available,
            "res": s.total,
            "store": self.store.stats(),
            "workers": len(s.workers),
            "envs": self.envs.status(_count_by_env(s)),
            "sys": self.system.sample(),
        }

    def _send_update(self) -> None:
        self._update_due = False
        self._last_update = time.monotonic()
        if self.up is not None:
            self.up.send(Message(M.NODE_UPDATE, self.status()))

    def _resources_changed(self) -> None:
        if self._update_due:
            return
        self._update_due = True
        gap = UPDATE_MIN_GAP - (time.monotonic() - self._last_update)
        self.loop.call_later(max(0.0, gap), self._send_update)

    # -- peers -------------------------------------------------------------------------
    def _on_hello(self, ident: bytes, body: dict[str, Any]) -> dict[str, Any]:
        role = body.get("role")
        if role in ("node", "puller"):
            reply: dict[str, Any] = {"node": self.node_id}
            if role == "node":
                if self.on_foreign_hello is None:
                    raise ProtocolError("only the head takes nodes")
                reply = self.on_foreign_hello(ident, body)
            self.foreign.add(ident)
            return reply
        wid = body.get("wid")
        if role not in ("driver", "worker") or not isinstance(wid, bytes) or len(wid) != 8:
            raise ProtocolError("HELLO needs a role and an 8-byte worker id")
        if wid in self.by_wid:
            raise ProtocolError("a process with this worker id is already connected")
        if role == "worker" and not self.workers.known(wid):
            raise ProtocolError("unknown worker")
        peer = _Peer(
            ident,
            wid,
            role,
            int(body.get("pid", 0)),
            str(body.get("addr", "")),
            str(body.get("ns", "")),
        )
        self.peers[ident] = peer
        self.by_wid[wid] = peer
        welcome: dict[str, Any] = {
            "node": self.node_id,
            "tag": self.session.tag,
            "session": self.session.path,
            "head_pid": os.getpid(),
            "tcp": self.tcp_address,
        }
        if role == "driver":
            # Job ids carry the node's number, so that nodes need not ask for them.
            peer.job = (self.number << 16) | self.next_job
            self.next_job += 1
            welcome["job"] = peer.job
            if body.get("client"):
                # Its pid is on another machine: it is watched through its pings. A broken
                # connection may be resumed until that timeout drops it (_process_gone
                # forgets it in the listener): its work and objects stay until then.
                peer.client = True
                peer.last_seen = time.monotonic()
                welcome["resumable"] = True
            else:
                self._watch_pid(peer)
        else:
            w = self.scheduler.worker(wid)
            if w is not None and w.env:
                self.envs.worker_started(w.env)
            # After the transport has accepted the peer, so that a grant made at once can
            # already send to it.
            self.loop.call_soon(
                lambda: self._act_sched(self.scheduler.handle(sch.WorkerRegisteredEvent(wid)))
            )
        self.up.send(
            Message(
                M.PROC_JOINED,
                {
                    "w": wid,
                    "role": role,
                    "pid": peer.pid,
                    "addr": peer.addr,
                    "ns": peer.namespace,
                    "job": peer.job,
                },
            )
        )
        return welcome

    def _watch_pid(self, peer: _Peer) -> None:
        try:
            fd = os.pidfd_open(peer.pid)
        except OSError:
            return
        peer.pidfd = fd
        self.loop.add_reader(fd, lambda: self._process_gone(peer.wid, "exited", False))

    def _process_gone(self, wid: bytes, reason: str, worker: bool) -> None:
        peer = self.by_wid.pop(wid, None)
        if peer is not None:
            self.peers.pop(peer.ident, None)
            self.listener.forget(peer.ident)
            if peer.pidfd is not None:
                self.loop.remove_reader(peer.pidfd)
                os.close(peer.pidfd)
        for key in [k for k in self.relays if k[0] == wid]:
            self._close_relay(*key)
        for oid in [o for o, (_, c) in self.uploads.items() if c == wid]:
            os.close(self.uploads.pop(oid)[0])
        self._act_store(self.store.process_gone(wid))
        self._act_sched(self.scheduler.handle(sch.OwnerGoneEvent(wid)))
        if peer is not None or worker:
            self.up.send(Message(M.PROC_GONE, {"w": wid, "e": reason, "worker": worker}))
        if (
            self.args.parent_fd is None
            and getattr(self.args, "exit_with_driver", False)
            and peer
            and peer.role == "driver"
            and self.on_shutdown is not None
        ):
            self.on_shutdown()

    def _worker_exited(self, wid: bytes, reason: str) -> None:
        w = self.scheduler.worker(wid)
        if w is not None and w.state == "starting" and w.env:
            log_path = os.path.join(self.session.logs, f"worker-{wid.hex()}.log")
            self.envs.worker_failed(w.env, reason, log_path)
        self.memory.exited(wid)
        oom = self.oom_victims.get(wid)
        if oom is not None:
            reason = mem.describe(oom)  # what actors and owners report as the cause
        self._process_gone(wid, reason, True)
        self._act_sched(self.scheduler.handle(sch.WorkerExitedEvent(wid, reason)))
        self.oom_victims.pop(wid, None)

    # -- sending -----------------------------------------------------------------------
    def send(self, wid: bytes, msg: Message) -> bool:
        """To a process: directly when it is ours, else through the control store."""
        peer = self.by_wid.get(wid)
        if peer is not None:
            return self.listener.send(peer.ident, msg)
        if len(wid) == 8 and self.up is not None:
            self.up.send(
                Message(M.ROUTE, {"w": wid, "t": int(msg.type), "b": msg.body}, msg.frames)
            )
            return True
        return False

    def _act_sched(self, actions: list[sch.Action]) -> None:
        changed = False
        for a in actions:
            if isinstance(a, sch.Grant):
                changed = True
                if a.actor_id is not None:
                    self.up.send(
                        Message(M.ACTOR_LEASE_RESULT, {"aid": a.actor_id, "w": a.worker_id})
                    )
                    continue
                w = self.by_wid.get(a.worker_id)
                ok = w is not None and self.send(
                    a.owner,
                    Message(
                        M.LEASE_GRANTED,
                        {"r": a.req_id, "w": a.worker_id, "a": w.addr, "p": w.pid, "g": a.gpu_ids},
                    ),
                )
                if not ok:
                    self._act_sched(self.scheduler.handle(sch.ReturnLeaseEvent(a.worker_id)))
            elif isinstance(a, sch.Spill):
                r = a.request
                spill = {
                    "w": r.owner,
                    "r": r.req_id,
                    "res": r.resources,
                    "st": r.strategy,
                    "avail": self.scheduler.available,
                }
                if not r.retriable:
                    spill["nr"] = True
                if r.env:
                    spill["env"] = self.envs.spec(r.env)
                self.up.send(Message(M.SPILL_LEASE, spill))
            elif isinstance(a, sch.Reject):
                if a.actor_id is not None:
                    result: dict[str, Any] = {"aid": a.actor_id, "e": a.reason}
                    if a.env_failed:
                        result["env"] = True
                    self.up.send(Message(M.ACTOR_LEASE_RESULT, result))
                else:
                    failed: dict[str, Any] = {"r": a.req_id, "e": a.reason}
                    if a.env_failed:
                        failed["env"] = True
                    self.send(a.owner, Message(M.LEASE_FAILED, failed))
            elif isinstance(a, sch.Revoke):
                self.send(a.owner, Message(M.LEASE_REVOKE, {"w": a.worker_id}))
            elif isinstance(a, sch.Queued):
                self.send(a.owner, Message(M.LEASE_QUEUED, {"r": a.req_id}))
            elif isinstance(a, sch.StartWorker):
                self.workers.start(a.worker_id, self.envs.launch(a.env) if a.env else None)
            elif isinstance(a, sch.PrepareEnv):
                self.envs.prepare(a.env)
            elif isinstance(a, sch.KillWorker):
                changed = True
                self.workers.kill(a.worker_id)
            elif isinstance(a, sch.NotifyWorkerLost) and a.actor_id is None:
                changed = True
                died: dict[str, Any] = {"w": a.worker_id, "e": a.reason}
                oom = self.oom_victims.get(a.worker_id)
                if oom is not None:
                    died["oom"] = {k: v for k, v in oom.items() if k != "w"}
                self.send(a.owner, Message(M.WORKER_DIED, died))
        if changed or actions:
            self._resources_changed()

    def _act_store(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, ReplyObjects):
                pass  # local reads are answered by this class, not by the store's waiters
            elif isinstance(a, UnlinkSegment):
                self.chunks.forget(a.path)
                unlink(a.path)
            elif isinstance(a, RenameSegment):
                self.chunks.forget(a.src)
                try:
                    os.rename(a.src, a.dst)
                except OSError as exc:
                    log.warning("could not reuse segment %s: %s", a.src, exc)

    def _segment_path(self, oid: bytes) -> str:
        return f"/dev/shm/shoal-{self.session.tag}-{oid.hex()}"

    # -- messages from local processes -------------------------------------------------
    def _on_message(self, ident: bytes, msg: Message) -> None:
        peer = self.peers.get(ident)
        if peer is None:
            if ident in self.foreign:
                self._on_foreign(ident, msg)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s: %.200r", msg.type.name, peer.wid.hex(), msg.body)
        if peer.client:
            peer.last_seen = time.monotonic()
            if msg.type == M.EXIT and msg.body.get("bye"):
                self._process_gone(peer.wid, "it disconnected", False)
                return
        if msg.type not in NODE_LEVEL:
            self.up.send(
                Message(M.UP, {"w": peer.wid, "t": int(msg.type), "b": msg.body}, msg.frames)
            )
            return
        self.handle_for(peer.wid, msg)

    def handle_for(self, wid: bytes, msg: Message) -> None:
        """Serve a node-level message of process ``wid`` (local, or routed from elsewhere)."""
        handler = self._handlers.get(msg.type)
        if handler is None:
            log.warning("unexpected %s from %s", msg.type.name, wid.hex())
            return
        try:
            handler(self, wid, msg.body, msg.frames)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            # A well-signed but malformed message is a bug in a peer; it must not stop us.
            log.warning("bad %s from %s: %r", msg.type.name, wid.hex(), exc)

    def _on_foreign(self, ident: bytes, msg: Message) -> None:
        if msg.type == M.PULL:
            self.listener.send(ident, self.chunks.serve(msg.body))
        elif self.on_foreign_message is not None:
            self.on_foreign_message(ident, msg)

    def _h_request_lease(self, wid: bytes, body: Any, frames: Any) -> None:
        res = {str(k): int(v) for k, v in body["res"].items()}
        strategy = body.get("st")
        nospill = bool(body.get("ns"))
        pinned = bool(body.get("pin"))
        if isinstance(strategy, dict) and strategy.get("node") == self.node_id.hex():
            # Affinity to this very node: it waits here (hard), or may go elsewhere later.
            pinned = not strategy.get("soft")
            nospill, strategy = True, None
        env = self._lease_env(body, wid)
        if env is None:
            return
        self._act_sched(
            self.scheduler.handle(
                sch.RequestLeaseEvent(
                    wid,
                    int(body["r"]),
                    res,
                    None,
                    nospill,
                    strategy,
                    pinned=pinned,
                    env=env,
                    retriable=not body.get("nr"),
                )
            )
        )

    def _lease_env(self, body: Any, owner: bytes = b"", actor: bytes | None = None) -> str | None:
        """The key of the runtime env a lease asks for ("": none); None when it failed here
        a moment ago (the request is refused at once, with that error)."""
        if not body.get("env"):
            return ""
        try:
            key = self.envs.key_of(body["env"])
            error = self.envs.failure(key)
        except (ValueError, TypeError) as exc:  # malformed, or a field it has no plugin for
            error = (
                f"the runtime environment cannot be set up on node {self.node_id.hex()[:12]}: {exc}"
            )
        else:
            if error is None:
                return key
        if actor is not None:
            self.up.send(Message(M.ACTOR_LEASE_RESULT, {"aid": actor, "e": error, "env": True}))
        else:
            self.send(owner, Message(M.LEASE_FAILED, {"r": body["r"], "e": error, "env": True}))
        return None

    def _h_cancel_lease_request(self, wid: bytes, body: Any, frames: Any) -> None:
        self._act_sched(self.scheduler.handle(sch.CancelLeaseRequestEvent(wid, int(body["r"]))))
        if wid in self.by_wid:
            # It may have been sent to another node: the control store knows which.
            self.up.send(Message(M.UP, {"w": wid, "t": int(M.CANCEL_LEASE_REQUEST), "b": body}))

    def _h_return_lease(self, wid: bytes, body: Any, frames: Any) -> None:
        w = self.scheduler.worker(body["w"])
        if w is None:
            if wid in self.by_wid:
                self.up.send(Message(M.UP, {"w": wid, "t": int(M.RETURN_LEASE), "b": body}))
            return
        if w.owner == wid:
            self._act_sched(
                self.scheduler.handle(sch.ReturnLeaseEvent(body["w"], bool(body.get("kill"))))
            )

    def _h_blocked(self, wid: bytes, body: Any, frames: Any) -> None:
        self._act_sched(self.scheduler.handle(sch.WorkerBlockedEvent(wid)))

    def _h_unblocked(self, wid: bytes, body: Any, frames: Any) -> None:
        self._act_sched(self.scheduler.handle(sch.WorkerUnblockedEvent(wid)))

    def _h_cancel_task(self, wid: bytes, body: Any, frames: Any) -> None:
        target = body["w"]
        w = self.scheduler.worker(target)
        if w is None:
            if wid in self.by_wid:
                self.up.send(Message(M.UP, {"w": wid, "t": int(M.CANCEL_TASK), "b": body}))
            return
        if w.owner != wid:
            return
        if body.get("force"):
            self.workers.kill(target)
        else:
            self.send(
                target, Message(M.CANCEL_TASK, {"t": body["t"], "rec": body.get("rec", True)})
            )

    def _h_create_object(self, wid: bytes, body: Any, frames: Any) -> None:
        try:
            path, actions = self.store.reserve(
                body["o"], int(body["s"]), str(body.get("cs") or ""), wid
            )
        except StoreFull as exc:
            self._act_store(exc.actions)
            self.send(wid, Message(M.OBJECT_CREATED, {"r": body["r"], "e": str(exc)}))
            return
        self._act_store(actions)
        reuse = any(isinstance(a, RenameSegment) and a.dst == path for a in actions)
        if body.get("stream"):
            # A client streams the bytes in (PUSH_CHUNK): it cannot map our memory.
            try:
                fd = open_segment(path, int(body["s"]), reuse)
            except OSError as exc:
                self._act_store(self.store.abort(body["o"]))
                self.send(wid, Message(M.OBJECT_CREATED, {"r": body["r"], "e": str(exc)}))
                return
            self.uploads[body["o"]] = (fd, wid)
        self.send(wid, Message(M.OBJECT_CREATED, {"r": body["r"], "p": path, "reuse": reuse}))

    def _h_seal_object(self, wid: bytes, body: Any, frames: Any) -> None:
        oid = body["o"]
        upload = self.uploads.pop(oid, None)
        if upload is not None:
            os.close(upload[0])
        if body.get("abort"):
            self._act_store(self.store.abort(oid))
            if body.get("r") is not None:
                self.send(wid, Message(M.FLUSHED, {"r": body["r"]}))
            return
        entry = self.store.objects.get(oid)
        if entry is None or entry.path is None or entry.sealed:
            if body.get("r") is not None:
                self.send(wid, Message(M.FLUSHED, {"r": body["r"]}))
            return
        flags = int(body["f"])
        self._act_store(self.store.seal(oid, flags, [], DIRECTORY_PIN))
        self.up.send(
            Message(
                M.OBJECT_SEALED,
                {
                    "o": oid,
                    "s": entry.size,
                    "f": flags,
                    "c": list(body.get("c") or ()),
                    "h": body.get("h"),
                    "r": body.get("r"),
                    "w": wid,
                    "cs": entry.call_site,
                },
            )
        )
        self._answer_local(oid)
        self._resources_changed()

    def _h_get_objects(self, wid: bytes, body: Any, frames: Any) -> None:
        ready = []
        wanted = []
        for oid in body["o"]:
            entry = self.store.objects.get(oid)
            if entry is not None and entry.sealed:
                self.store._touch(entry)
                ready.append([oid, "s", entry.flags, entry.path, entry.size])
                continue
            waiters = self.get_waiters.setdefault(oid, [])
            if wid not in waiters:
                waiters.append(wid)
            if oid not in self.locating and oid not in self.pulls:
                self.locating.add(oid)
                wanted.append(oid)
        if ready:
            self.send(wid, Message(M.OBJECTS, {"r": 0, "e": ready}))
        if wanted:
            self.up.send(Message(M.LOCATE, {"o": wanted}))

    # -- clients (client-server mode) ---------------------------------------------------
    def _h_relay(self, wid: bytes, body: Any, frames: Any) -> None:
        """A client's message for a worker: sent on its behalf, the answers sent back."""
        address = str(body["a"])
        conn = self.relays.get((wid, address))
        if conn is None:
            conn = Connection(
                self.ctx,
                self.signer,
                pick_address(address, self.session.path),
                {"role": "driver", "wid": wid, "pid": 0},
                functools.partial(self._relayed_back, wid, address),
            )
            conn.attach(self.loop)
            self.relays[(wid, address)] = conn
        conn.send(Message(MsgType(body["t"]), body["b"], frames))

    def _relayed_back(self, wid: bytes, address: str, msg: Message) -> None:
        self.send(
            wid, Message(M.RELAYED, {"a": address, "t": int(msg.type), "b": msg.body}, msg.frames)
        )

    def _h_relay_close(self, wid: bytes, body: Any, frames: Any) -> None:
        self._close_relay(wid, str(body["a"]))

    def _close_relay(self, wid: bytes, address: str) -> None:
        conn = self.relays.pop((wid, address), None)
        if conn is not None:
            conn.close()

    def _h_push_chunk(self, wid: bytes, body: Any, frames: Any) -> None:
        oid, off = body["o"], int(body["off"])
        upload = self.uploads.get(oid)
        error = None
        if upload is None or upload[1] != wid or len(frames) != 1 or off < 0:
            error = "no such upload"
        else:
            try:
                os.pwrite(upload[0], frames[0], off)
            except OSError as exc:
                error = str(exc)
        ack: dict[str, Any] = {"o": oid, "off": off}
        if error:
            ack["e"] = error
        self.send(wid, Message(M.CHUNK_ACK, ack))

    def _h_pull(self, wid: bytes, body: Any, frames: Any) -> None:
        self.send(wid, self.chunks.serve(body))

    def _h_ping(self, wid: bytes, body: Any, frames: Any) -> None:
        self.send(wid, Message(M.PONG, {}))

    _handlers: dict[MsgType, Callable[[Any, bytes, Any, Any], None]] = {
        M.RELAY: _h_relay,
        M.RELAY_CLOSE: _h_relay_close,
        M.PUSH_CHUNK: _h_push_chunk,
        M.PULL: _h_pull,
        M.PING: _h_ping,
        M.REQUEST_LEASE: _h_request_lease,
        M.CANCEL_LEASE_REQUEST: _h_cancel_lease_request,
        M.RETURN_LEASE: _h_return_lease,
        M.BLOCKED: _h_blocked,
        M.UNBLOCKED: _h_unblocked,
        M.CANCEL_TASK: _h_cancel_task,
        M.CREATE_OBJECT: _h_create_object,
        M.SEAL_OBJECT: _h_seal_object,
        M.GET_OBJECTS: _h_get_objects,
    }

    # -- objects -----------------------------------------------------------------------
    def _answer_local(self, oid: bytes) -> None:
        """``oid`` is sealed in this node's store: answer the local readers waiting."""
        waiters = self.get_waiters.pop(oid, None)
        if not waiters:
            return
        entry = self.store.objects[oid]
        msg = Message(M.OBJECTS, {"r": 0, "e": [[oid, "s", entry.flags, entry.path]]})
        for wid in waiters:
            self.send(wid, msg)

    def _answer(self, oid: bytes, item: list[Any], frames: list[Any]) -> None:
        waiters = self.get_waiters.pop(oid, None)
        if not waiters:
            return
        msg = Message(M.OBJECTS, {"r": 0, "e": [item]}, frames)
        for wid in waiters:
            self.send(wid, msg)

    def _on_located(self, body: Any, frames: Any) -> None:
        pos = 0
        for item in body["e"]:
            oid, kind = item[0], item[1]
            self.locating.discard(oid)
            if kind == "i":
                n = item[3]
                self._answer(oid, item, list(frames[pos : pos + n]))
                pos += n
            elif kind == "e":
                self._answer(oid, item, [])
            elif kind == "n":
                self._locate_result(oid, item[2], item[3], item[4])

    def _locate_result(self, oid: bytes, flags: int, size: int, sources: list[Any]) -> None:
        entry = self.store.objects.get(oid)
        if entry is not None and entry.sealed:
            self._answer_local(oid)
            return
        if any(nid == self.node_id for nid, _ in sources):
            return  # sealed here any moment now (the seal is on its way)
        sources = [(nid, addr) for nid, addr in sources if addr]
        if not sources:
            self._answer(
                oid,
                [oid, "e", "lost", f"object {oid.hex()} was lost: no node holds a copy any more"],
                [],
            )
            return
        if oid in self.pulls:
            return
        try:
            path, actions = self.store.reserve(oid, size, "", DIRECTORY_PIN)
        except StoreFull as exc:
            self._act_store(exc.actions)
            self._answer(oid, [oid, "e", "lost", f"cannot fetch object {oid.hex()}: {exc}"], [])
            return
        self._act_store(actions)
        reuse = any(isinstance(a, RenameSegment) and a.dst == path for a in actions)
        try:
            pull = Pull(oid, path, size, flags, reuse, [addr for _, addr in sources])
        except OSError as exc:
            self._act_store(self.store.abort(oid))
            self._answer(oid, [oid, "e", "lost", f"cannot fetch object {oid.hex()}: {exc}"], [])
            return
        self.pulls[oid] = pull
        self._pull_next(pull)
        try:
            pull.allocate()
        except OSError as exc:
            self._finish_pull(pull, f"no room for it in this node's shared memory: {exc}")

    def _chunk_sink(self, mtype: MsgType) -> Callable[[MsgType, Any, int, int], Any]:
        def sink(t: MsgType, body: Any, index: int, n: int) -> Any:
            if t != mtype or index != 0 or n > CHUNK_SIZE:
                return None
            if self._staging is None:
                self._staging = bytearray(CHUNK_SIZE)
            return memoryview(self._staging)[:n]

        return sink

    def _node_conn(self, address: str) -> Connection:
        conn = self.node_conns.get(address)
        if conn is None:
            conn = Connection(
                self.ctx,
                self.signer,
                address,
                {"role": "puller", "node": self.node_id},
                functools.partial(self._on_chunk, address),
                sink=self._chunk_sink(M.CHUNK),  # written to the segment at once
            )
            conn.attach(self.loop)
            self.node_conns[address] = conn
        return conn

    def _pull_next(self, pull: Pull) -> None:
        conn = self._node_conn(pull.source)
        for request in pull.requests():
            conn.send(Message(M.PULL, request))

    def _on_chunk(self, address: str, msg: Message) -> None:
        if msg.type != M.CHUNK:
            return
        pull = self.pulls.get(msg.body.get("o"))
        if pull is None or pull.source != address:
            return
        error = pull.receive(msg.body, msg.frames)
        if error is not None:
            if pull.next_source():
                self._pull_next(pull)
                return
            self._finish_pull(pull, error)
            return
        if pull.done:
            self._finish_pull(pull, None)
        else:
            self._pull_next(pull)

    def _finish_pull(self, pull: Pull, error: str | None) -> None:
        oid = pull.oid
        self.pulls.pop(oid, None)
        pull.close()
        if error is not None:
            self._act_store(self.store.abort(oid))
            self._answer(oid, [oid, "e", "lost", f"cannot fetch object {oid.hex()}: {error}"], [])
            return
        self._act_store(self.store.seal(oid, pull.flags, [], DIRECTORY_PIN))
        self.up.send(Message(M.OBJECT_COPIED, {"o": oid}))
        self._answer_local(oid)
        self._resources_changed()

    def _free_objects(self, oids: list[bytes]) -> None:
        for oid in oids:
            pull = self.pulls.pop(oid, None)
            if pull is not None:
                pull.abort()
                self._act_store(self.store.abort(oid))
            self._act_store(self.store.update_refs(DIRECTORY_PIN, [], [oid]))
        self._resources_changed()

    # -- messages from the control store -----------------------------------------------
    def on_control(self, msg: Message) -> None:
        body = msg.body
        try:
            if msg.type == M.DOWN:
                peer = self.by_wid.get(body["w"])
                if peer is not None:
                    self.listener.send(
                        peer.ident, Message(MsgType(body["t"]), body["b"], msg.frames)
                    )
            elif msg.type == M.TO_NODE:
                self.handle_for(body["w"], Message(MsgType(body["t"]), body["b"], msg.frames))
            elif msg.type == M.LOCATED:
                self._on_located(body, msg.frames)
            elif msg.type == M.FREE_OBJECTS:
                self._free_objects(list(body["o"]))
            elif msg.type == M.ACTOR_LEASE:
                res = {str(k): int(v) for k, v in body["res"].items()}
                env = self._lease_env(body, actor=body["aid"])
                if env is not None:
                    self._act_sched(
                        self.scheduler.handle(
                            sch.RequestLeaseEvent(
                                b"",
                                0,
                                res,
                                body["aid"],
                                nospill=True,
                                env=env,
                                retriable=bool(body.get("rt")),
                            )
                        )
                    )
            elif msg.type == M.PACKAGE_DATA:
                self.envs.on_package(body, msg.frames)
            elif msg.type == M.PREPARE_ENV:
                self.envs.prepare(self.envs.key_of(body["env"]))
            elif msg.type == M.BUNDLE_RESERVE:
                self._reserve_bundle(body)
            elif msg.type == M.BUNDLE_RELEASE:
                self._release_bundle(body)
            elif msg.type == M.KILL_WORKER:
                self.workers.kill(body["w"])
            elif msg.type == M.OWNER_GONE:
                self._act_sched(self.scheduler.handle(sch.OwnerGoneEvent(body["w"])))
            elif msg.type == M.NODE_DIED:
                self._node_died(str(body.get("a") or ""))
            else:
                log.warning("unexpected %s from the control store", msg.type.name)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            log.warning("bad %s from the control store: %r", msg.type.name, exc)

    def _node_died(self, address: str) -> None:
        """Another node died: pulls from it go on from another copy, or ask the directory
        again (which has the object rebuilt, or says it is lost)."""
        if not address:
            return
        conn = self.node_conns.pop(address, None)
        if conn is not None:
            conn.close()
        for pull in list(self.pulls.values()):
            if address not in pull.sources[pull.source_index :]:
                continue
            current = pull.source == address
            pull.sources = pull.sources[: pull.source_index + 1] + [
                a for a in pull.sources[pull.source_index + 1 :] if a != address
            ]
            if not current:
                continue
            if pull.next_source():
                self._pull_next(pull)
                continue
            oid = pull.oid
            self.pulls.pop(oid, None)
            pull.abort()
            self._act_store(self.store.abort(oid))
            if self.get_waiters.get(oid):
                self.locating.add(oid)
                self.up.send(Message(M.LOCATE, {"o": [oid]}))

    def lose_local_drivers(self, reason: str) -> None:
        """The cluster is gone for this node (the head died, or declared it dead): its
        drivers fail what they wait for with ``reason`` instead of waiting forever."""
        for peer in list(self.by_wid.values()):
            if peer.role == "driver":
                self.listener.send(peer.ident, Message(M.EXIT, {"lost": True, "reason": reason}))

    def _reserve_bundle(self, body: Any) -> None:
        bundle = {str(k): int(v) for k, v in body["b"].items()}
        s = self.scheduler
        ok = fits(s.available, bundle)
        if ok:
            _placement.commit_bundle(s.total, s.available, body["pg"], int(body["i"]), bundle)
        self.up.send(
            Message(M.BUNDLE_RESULT, {"pg": body["pg"], "i": body["i"], "ok": ok, "b": bundle})
        )
        self._act_sched(s.handle(sch.TickEvent()))  # work waiting for the group may go now
        self._resources_changed()

    def _release_bundle(self, body: Any) -> None:
        bundle = {str(k): int(v) for k, v in body["b"].items()}
        s = self.scheduler
        self._act_sched(s.remove_group(body["pg"].hex()))
        _placement.release_bundle(s.total, s.available, body["pg"], int(body["i"]), bundle)
        self._resources_changed()


def _count_by_env(s: sch.NodeScheduler) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in s.workers.values():
        counts[w.env] = counts.get(w.env, 0) + 1
    return counts


def _spill_file(src: str, dst: str) -> str | None:
    """Copy an object file to the spill directory; an error text when the disk refuses."""
    try:
        copy_file(src, dst)
    except OSError as exc:
        unlink(dst)
        return str(exc)
    return None
