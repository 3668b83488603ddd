"""The head process: control store, node manager and object store of one machine.

Run as ``python -m shoal._head --session DIR [options]``. One thread, one IO loop:

    drivers, workers --(ROUTER h.sock [+ tcp])--> Head.on_message --> state machines
        NodeScheduler (leases, worker pool)   ObjectStore (objects, holders)
        ActorDirectory (actors, names)        jobs and log routing
    actions --> messages to peers, worker processes started or killed, segments unlinked

Worker processes are children of this process; each is watched through a pidfd, so a
death is noticed at once. In the embedded mode (``shoal.init()`` with no address) the
driver holds the write end of a pipe whose read end is watched here: when the driver dies,
the head shuts down and cleans up after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

from . import _actor_directory as ad
from . import _scheduler as sch
from ._ioloop import IOLoop
from ._object_store import (
    LostObject,
    ObjectEntry,
    ObjectStore,
    RenameSegment,
    ReplyObjects,
    StoreFull,
    UnlinkSegment,
)
from ._protocol import Message, MsgType, ProtocolError, Signer
from ._resources import as_floats, to_fixed
from ._session import Session, clean_dead_sessions, remove_segments
from ._shm import copy_file, free_bytes, unlink
from ._transport import LazyContext, Listener
from ._worker_processes import WorkerProcesses
from ._zygote import Zygote, become_subreaper

log = logging.getLogger("shoal.head")

M = MsgType


class _Peer:
    __slots__ = ("addr", "ident", "job", "namespace", "pid", "pidfd", "role", "wid")

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


class Head:
    def __init__(
        self,
        session: Session,
        args: argparse.Namespace,
        node_id: bytes,
        zygote: Zygote | None = None,
    ) -> None:
        self.session = session
        self.args = args
        self.node_id = node_id
        self.loop = IOLoop()
        self.ctx = LazyContext()  # zmq only when a tcp port is bound
        self.signer = Signer(session.read_key())
        self.listener = Listener(self.ctx, self.signer, self._on_hello, self._on_message)
        self.address = self.listener.bind(session.socket_address("h"))
        self.tcp_address = ""
        if args.port is not None:
            self.tcp_address = self.listener.bind(f"tcp://127.0.0.1:{args.port}")
        self.listener.attach(self.loop)

        total = {"CPU": to_fixed(args.num_cpus)}
        if args.num_gpus:
            total["GPU"] = to_fixed(args.num_gpus)
        for name, amount in json.loads(args.resources or "{}").items():
            total[name] = to_fixed(amount)
        total["memory"] = int(_available_memory() * 0.7) * 10_000
        self.store_capacity = args.object_store_memory
        total["object_store_memory"] = self.store_capacity * 10_000
        self.scheduler = sch.NodeScheduler(total, pool_size=max(1, int(args.num_cpus)))
        self.spill_dir = args.spill_dir or os.path.join(session.path, "spill")
        os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        self.store = ObjectStore(
            self.store_capacity,
            self._segment_path,
            self._is_alive,
            spill=_spill_file,
            spill_path=lambda oid: os.path.join(self.spill_dir, f"shoal-{session.tag}-{oid.hex()}"),
            disk_free=lambda: free_bytes(self.spill_dir),
        )
        self.store.now = time.monotonic
        self.actors = ad.ActorDirectory()

        self.peers: dict[bytes, _Peer] = {}  # routing identity -> peer
        self.by_wid: dict[bytes, _Peer] = {}
        self.jobs: dict[int, _Peer] = {}
        self.next_job = 1
        self.workers = WorkerProcesses(self.loop, session.logs, zygote, self._worker_exited)
        self.exiting = False
        self.started_at = time.time()
        self.loop.call_later(1.0, self._tick)

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        self.session.write_head_info(
            {
                "pid": os.getpid(),
                "address": self.address,
                "tcp": self.tcp_address,
                "tag": self.session.tag,
                "node_id": self.node_id.hex(),
                "started": self.started_at,
            }
        )
        self._act_sched(self.scheduler.start())
        if self.args.parent_fd is not None:
            self.loop.add_reader(self.args.parent_fd, self._parent_gone)
        if self.args.ready_fd is not None:
            os.write(self.args.ready_fd, b"ready\n")
            os.close(self.args.ready_fd)
        signal.signal(signal.SIGTERM, lambda *_: self.loop.call_soon_threadsafe(self.shutdown))
        signal.signal(signal.SIGINT, lambda *_: self.loop.call_soon_threadsafe(self.shutdown))
        self.loop.run()
        self._cleanup()

    def _parent_gone(self) -> None:
        self.loop.remove_reader(self.args.parent_fd)
        self.shutdown()

    def shutdown(self) -> None:
        if self.exiting:
            return
        self.exiting = True
        self.loop.stop()

    def _cleanup(self) -> None:
        self.workers.stop_all()
        for entry in self.store.objects.values():
            if entry.path:
                unlink(entry.path)
        remove_segments(self.session.tag)
        self.listener.close()
        self.ctx.term()
        shutil.rmtree(self.session.path, ignore_errors=True)

    def _tick(self) -> None:
        self.workers.reap_strays()
        self._act_sched(self.scheduler.handle(sch.TickEvent()))
        self._act_store(self.store.expire_pool())
        self.loop.call_later(0.25, self._tick)

    # -- peers -------------------------------------------------------------------------
    def _on_hello(self, ident: bytes, body: dict[str, Any]) -> dict[str, Any]:
        role = body.get("role")
        wid = body.get("wid")
        if role not in ("driver", "worker") or not isinstance(wid, bytes) or len(wid) != 8:
            raise ProtocolError("HELLO needs a role and an 8-byte worker id")
        if wid in self.by_wid:
            raise ProtocolError("a process with this worker id is already connected")
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
            peer.job = self.next_job
            self.next_job += 1
            self.jobs[peer.job] = peer
            welcome["job"] = peer.job
            self._watch_pid(peer)
        else:
            if not self.workers.known(wid):
                raise ProtocolError("unknown worker")
            # After the transport has accepted the peer, so that a grant made at once can
            # already send to it.
            self.loop.call_soon(
                lambda: self._act_sched(self.scheduler.handle(sch.WorkerRegisteredEvent(wid)))
            )
        return welcome

    def _watch_pid(self, peer: _Peer) -> None:
        try:
            fd = os.pidfd_open(peer.pid)
        except OSError:
            return
        peer.pidfd = fd
        self.loop.add_reader(fd, lambda: self._process_gone(peer.wid, "exited"))

    def _process_gone(self, wid: bytes, reason: str) -> None:
        peer = self.by_wid.pop(wid, None)
        if peer is not None:
            self.peers.pop(peer.ident, None)
            self.listener.forget(peer.ident)
            if peer.pidfd is not None:
                self.loop.remove_reader(peer.pidfd)
                os.close(peer.pidfd)
            if peer.role == "driver":
                self.jobs.pop(peer.job, None)
        self._act_store(self.store.process_gone(wid))
        self._act_actors(self.actors.owner_gone(wid))
        self._act_sched(self.scheduler.handle(sch.OwnerGoneEvent(wid)))
        if (
            self.args.parent_fd is None
            and self.args.exit_with_driver
            and peer
            and peer.role == "driver"
        ):
            self.shutdown()

    # -- worker processes --------------------------------------------------------------
    def _worker_exited(self, wid: bytes, reason: str) -> None:
        self._process_gone(wid, reason)
        self._act_actors(self.actors.worker_exited(wid, reason))
        self._act_sched(self.scheduler.handle(sch.WorkerExitedEvent(wid, reason)))

    # -- actions -----------------------------------------------------------------------
    def _send(self, wid: bytes, msg: Message) -> bool:
        peer = self.by_wid.get(wid)
        return peer is not None and self.listener.send(peer.ident, msg)

    def _act_sched(self, actions: list[sch.Action]) -> None:
        for a in actions:
            if isinstance(a, sch.Grant):
                if a.actor_id is not None:
                    self._act_actors(self.actors.lease_granted(a.actor_id, a.worker_id))
                    continue
                w = self.by_wid.get(a.worker_id)
                ok = w is not None and self._send(
                    a.owner,
                    Message(
                        M.LEASE_GRANTED,
                        {"r": a.req_id, "w": a.worker_id, "a": w.addr, "p": w.pid, "g": a.gpu_ids},
                    ),
                )
                if not ok:
                    self._act_sched(self.scheduler.handle(sch.ReturnLeaseEvent(a.worker_id)))
            elif isinstance(a, sch.Reject):
                if a.actor_id is not None:
                    self._act_actors(
                        self.actors.lease_rejected(
                            a.actor_id, "it cannot be scheduled: " + a.reason
                        )
                    )
                else:
                    self._send(a.owner, Message(M.LEASE_FAILED, {"r": a.req_id, "e": a.reason}))
            elif isinstance(a, sch.Revoke):
                self._send(a.owner, Message(M.LEASE_REVOKE, {"w": a.worker_id}))
            elif isinstance(a, sch.Queued):
                self._send(a.owner, Message(M.LEASE_QUEUED, {"r": a.req_id}))
            elif isinstance(a, sch.StartWorker):
                self.workers.start(a.worker_id)
            elif isinstance(a, sch.KillWorker):
                self.workers.kill(a.worker_id)
            elif isinstance(a, sch.NotifyWorkerLost) and a.actor_id is None:
                self._send(a.owner, Message(M.WORKER_DIED, {"w": a.worker_id, "e": a.reason}))

    def _act_actors(self, actions: list[ad.Action]) -> None:
        for a in actions:
            if isinstance(a, ad.RequestActorLease):
                self._act_sched(
                    self.scheduler.handle(sch.RequestLeaseEvent(b"", 0, a.resources, a.actor_id))
                )
            elif isinstance(a, ad.BecomeActor):
                rec = a.record
                body, frames = rec.creation
                self._send(a.worker_id, Message(M.BECOME_ACTOR, body, frames))
            elif isinstance(a, ad.Publish):
                body = a.record.info()
                frames = a.record.death_error or ()
                for sub in a.subscribers:
                    self._send(sub, Message(M.ACTOR_UPDATE, body, frames))
            elif isinstance(a, ad.KillActorWorker):
                self.workers.kill(a.worker_id)

    def _act_store(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, ReplyObjects):
                self._send(a.process, _objects_message(a.req_id, a.entries))
            elif isinstance(a, UnlinkSegment):
                unlink(a.path)
            elif isinstance(a, RenameSegment):
                try:
                    os.rename(a.src, a.dst)
                except OSError as exc:
                    log.warning("could not reuse segment %s: %s", a.src, exc)

    def _segment_path(self, oid: bytes) -> str:
        return f"/dev/shm/shoal-{self.session.tag}-{oid.hex()}"

    def _is_alive(self, wid: bytes) -> bool:
        return wid in self.by_wid

    # -- messages ----------------------------------------------------------------------
    def _on_message(self, ident: bytes, msg: Message) -> None:
        peer = self.peers.get(ident)
        if peer is None:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s: %.200r", msg.type.name, peer.wid.hex(), msg.body)
        handler = self._handlers.get(msg.type)
        if handler is None:
            log.warning("unexpected %s from %s", msg.type.name, peer.wid.hex())
            return
        try:
            handler(self, peer, msg.body, msg.frames)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            # A well-signed but malformed message is a bug in a peer; it must not stop us.
            log.warning("bad %s from %s: %r", msg.type.name, peer.wid.hex(), exc)

    def _h_request_lease(self, peer: _Peer, body: Any, frames: Any) -> None:
        res = {str(k): int(v) for k, v in body["res"].items()}
        self._act_sched(self.scheduler.handle(sch.RequestLeaseEvent(peer.wid, int(body["r"]), res)))

    def _h_cancel_lease_request(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_sched(
            self.scheduler.handle(sch.CancelLeaseRequestEvent(peer.wid, int(body["r"])))
        )

    def _h_return_lease(self, peer: _Peer, body: Any, frames: Any) -> None:
        w = self.scheduler.worker(body["w"])
        if w is not None and w.owner == peer.wid:
            self._act_sched(
                self.scheduler.handle(sch.ReturnLeaseEvent(body["w"], bool(body.get("kill"))))
            )

    def _h_blocked(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_sched(self.scheduler.handle(sch.WorkerBlockedEvent(peer.wid)))

    def _h_unblocked(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_sched(self.scheduler.handle(sch.WorkerUnblockedEvent(peer.wid)))

    def _h_cancel_task(self, peer: _Peer, body: Any, frames: Any) -> None:
        wid = body["w"]
        w = self.scheduler.worker(wid)
        if w is None or w.owner != peer.wid:
            return
        if body.get("force"):
            self.workers.kill(wid)
        else:
            self._send(wid, Message(M.CANCEL_TASK, {"t": body["t"], "rec": body.get("rec", True)}))

    def _h_create_actor(self, peer: _Peer, body: Any, frames: Any) -> None:
        name = str(body.get("name") or "")
        ns = str(body.get("ns") or "")
        req = body.get("r")
        if name and body.get("gie"):
            existing = self.actors.lookup_name(name, ns)
            if existing is not None and existing.state != ad.DEAD:
                self._send(
                    peer.wid,
                    Message(M.ACTOR_INFO, {"r": req, "info": existing.info(), "existing": True}),
                )
                return
        rec = ad.ActorRecord(
            actor_id=body["aid"],
            owner=peer.wid,
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
            self._send(peer.wid, Message(M.ACTOR_INFO, {"r": req, "e": str(exc)}))
            return
        if req is not None:
            self._send(peer.wid, Message(M.ACTOR_INFO, {"r": req, "info": rec.info()}))
        self._act_actors(actions)

    def _h_actor_ready(self, peer: _Peer, body: Any, frames: Any) -> None:
        aid = body["aid"]
        rec = self.actors.actors.get(aid)
        if rec is None or rec.worker_id != peer.wid:
            return
        if body.get("err"):
            self._act_actors(self.actors.constructor_failed(aid, list(frames)))
        else:
            self._act_actors(self.actors.ready(aid, peer.addr, peer.pid))

    def _h_subscribe_actor(self, peer: _Peer, body: Any, frames: Any) -> None:
        rec = self.actors.subscribe(peer.wid, body["aid"])
        if rec is None:
            info = {
                "aid": body["aid"],
                "state": ad.DEAD,
                "reason": "no such actor (it may belong to a cluster that is gone)",
            }
            self._send(peer.wid, Message(M.ACTOR_UPDATE, info))
        else:
            self._send(peer.wid, Message(M.ACTOR_UPDATE, rec.info(), rec.death_error or ()))

    def _h_get_actor(self, peer: _Peer, body: Any, frames: Any) -> None:
        rec = self.actors.lookup_name(str(body["name"]), str(body.get("ns") or ""))
        info = rec.info() if rec is not None and rec.state != ad.DEAD else None
        self._send(peer.wid, Message(M.ACTOR_INFO, {"r": body["r"], "info": info}))

    def _h_kill_actor(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_actors(self.actors.kill(body["aid"], "it was killed with shoal.kill()"))

    def _h_release_actor(self, peer: _Peer, body: Any, frames: Any) -> None:
        rec = self.actors.actors.get(body["aid"])
        if rec is not None and rec.owner == peer.wid:
            self._act_actors(self.actors.release(body["aid"]))

    def _h_put_object(self, peer: _Peer, body: Any, frames: Any) -> None:
        h = body.get("h")
        holder = h if isinstance(h, bytes) else (peer.wid if h else None)
        self._act_store(
            self.store.put_inline(
                body["o"], int(body["f"]), list(frames), list(body.get("c") or ()), holder
            )
        )

    def _h_create_object(self, peer: _Peer, body: Any, frames: Any) -> None:
        try:
            path, actions = self.store.reserve(
                body["o"], int(body["s"]), str(body.get("cs") or ""), peer.wid
            )
        except StoreFull as exc:
            self._act_store(exc.actions)
            self._send(peer.wid, Message(M.OBJECT_CREATED, {"r": body["r"], "e": str(exc)}))
            return
        self._act_store(actions)
        reuse = any(isinstance(a, RenameSegment) and a.dst == path for a in actions)
        self._send(peer.wid, Message(M.OBJECT_CREATED, {"r": body["r"], "p": path, "reuse": reuse}))

    def _h_list_objects(self, peer: _Peer, body: Any, frames: Any) -> None:
        roles = {p.wid.hex(): f"{p.role} pid={p.pid}" for p in self.by_wid.values()}
        records = self.store.listing()
        for rec in records:
            rec["holders"] = [roles.get(h, h) for h in rec["holders"]]
        self._send(
            peer.wid,
            Message(M.REPLY, {"r": body["r"], "objects": records, "stats": self.store.stats()}),
        )

    def _h_seal_object(self, peer: _Peer, body: Any, frames: Any) -> None:
        oid = body["o"]
        if body.get("abort"):
            self._act_store(self.store.abort(oid))
        else:
            holder = body.get("h")
            self._act_store(self.store.seal(oid, int(body["f"]), list(body.get("c") or ()), holder))
        if body.get("r") is not None:
            self._send(peer.wid, Message(M.FLUSHED, {"r": body["r"]}))

    def _h_get_objects(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_store(self.store.get(peer.wid, int(body["r"]), list(body["o"])))

    def _h_ref_updates(self, peer: _Peer, body: Any, frames: Any) -> None:
        self._act_store(
            self.store.update_refs(peer.wid, list(body.get("a") or ()), list(body.get("d") or ()))
        )
        if body.get("r") is not None:
            self._send(peer.wid, Message(M.FLUSHED, {"r": body["r"]}))

    def _h_cluster_info(self, peer: _Peer, body: Any, frames: Any) -> None:
        s = self.scheduler
        node = {
            "NodeID": self.node_id.hex(),
            "Alive": True,
            "NodeManagerAddress": "127.0.0.1",
            "Resources": as_floats(s.total),
            "Available": as_floats(s.available),
            "Workers": len(s.workers),
            "ObjectStore": self.store.stats(),
            "Address": self.address,
        }
        self._send(peer.wid, Message(M.CLUSTER_INFO_REPLY, {"r": body["r"], "nodes": [node]}))

    def _h_log_lines(self, peer: _Peer, body: Any, frames: Any) -> None:
        driver = self.jobs.get(int(body.get("j", 0)))
        if driver is not None:
            self.listener.send(driver.ident, Message(M.LOG_LINES, body))

    def _h_exit(self, peer: _Peer, body: Any, frames: Any) -> None:
        if peer.role == "driver" and body.get("stop_cluster"):
            self.shutdown()

    _handlers = {
        M.REQUEST_LEASE: _h_request_lease,
        M.CANCEL_LEASE_REQUEST: _h_cancel_lease_request,
        M.RETURN_LEASE: _h_return_lease,
        M.BLOCKED: _h_blocked,
        M.UNBLOCKED: _h_unblocked,
        M.CANCEL_TASK: _h_cancel_task,
        M.CREATE_ACTOR: _h_create_actor,
        M.ACTOR_READY: _h_actor_ready,
        M.SUBSCRIBE_ACTOR: _h_subscribe_actor,
        M.GET_ACTOR: _h_get_actor,
        M.KILL_ACTOR: _h_kill_actor,
        M.RELEASE_ACTOR: _h_release_actor,
        M.PUT_OBJECT: _h_put_object,
        M.CREATE_OBJECT: _h_create_object,
        M.SEAL_OBJECT: _h_seal_object,
        M.GET_OBJECTS: _h_get_objects,
        M.REF_UPDATES: _h_ref_updates,
        M.CLUSTER_INFO: _h_cluster_info,
        M.LIST_OBJECTS: _h_list_objects,
        M.LOG_LINES: _h_log_lines,
        M.EXIT: _h_exit,
    }


def _objects_message(req_id: int, entries: list[tuple[bytes, Any]]) -> Message:
    out: list[list[Any]] = []
    frames: list[Any] = []
    for oid, entry in entries:
        if isinstance(entry, LostObject):
            out.append([oid, "e", entry.kind, entry.message])
        elif isinstance(entry, ObjectEntry) and entry.frames is not None:
            out.append([oid, "i", entry.flags, len(entry.frames)])
            frames.extend(entry.frames)
        elif isinstance(entry, ObjectEntry):
            out.append([oid, "s", entry.flags, entry.path])
    return Message(M.OBJECTS, {"r": req_id, "e": out}, frames)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo (psutil would cost 15 ms of start-up for one number)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _spill_file(src: str, dst: str) -> str | None:
    """Copy an object file to the spill directory; an error text when the disk refuses."""
    try:
        copy_file(src, dst)
    except OSError as exc:
        unlink(dst)
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal._head")
    parser.add_argument("--session", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--num-cpus", type=float, required=True)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--object-store-memory", type=int, required=True)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--parent-fd", type=int, default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--exit-with-driver", action="store_true")
    parser.add_argument("--spill-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    clean_dead_sessions()
    session = Session(args.session, args.tag)
    node_id = os.urandom(16)
    # What workers need to know, in the environment they inherit (set before the zygote
    # is forked, and before any thread or zmq context exists, which makes forking safe).
    os.environ.update(
        {
            "SHOAL_SESSION": session.path,
            "SHOAL_HEAD": session.socket_address("h"),
            "SHOAL_NODE_ID": node_id.hex(),
            "SHOAL_SHM_TAG": session.tag,
        }
    )
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    zygote = None
    if os.environ.get("SHOAL_NO_ZYGOTE") != "1":
        try:
            become_subreaper()
            zygote = Zygote(session.logs)
        except OSError as exc:
            log.warning("no worker zygote (%s); workers start with a fresh interpreter each", exc)
    head = Head(session, args, node_id, zygote)
    head.run()


if __name__ == "__main__":
    main()
