"""The processes of a machine in a cluster: a head, or a node that joins one.

Run as ``python -m shoal._head --session DIR [options]``. One thread, one IO loop.

    head:  NodeManager (this machine) + ControlStore (the cluster), linked in-process
    node:  NodeManager (this machine), linked to the head's ControlStore over tcp

The links carry the same messages either way (see _control_store.py); on the head they
are handed over through the loop (``call_soon``), so nothing is signed or copied.

Worker processes are children of this process; each is watched through a pidfd, so a
death is noticed at once.

In the embedded mode (``shoal.init()`` with no address) the driver holds the write end of
a pipe whose read end is watched here: when the driver dies, the head shuts down and
cleans up after it.

Health (docs/fault_tolerance.md): a node reports every health-check period and the head
answers. The head declares a node dead when its reports stop for the threshold, or at once
when its connection closes. A node that hears nothing from the head for as long, or whose
connection to it closes, or that the head declared dead, kills its workers, tells its
drivers, and starts afresh in the same process (``exec``) as a new node (a new id) that
tries to join again for SHOAL_NODE_REJOIN_TIMEOUT seconds, then exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from typing import Any

from . import _config, _machine
from ._control_store import NODE_TIMEOUT_SECONDS, ControlStore
from ._head_state import HeadState
from ._ioloop import IOLoop
from ._metrics_http import MetricsHttpServer
from ._node_manager import NodeManager
from ._prometheus import exposition
from ._protocol import Message, MsgType, ProtocolError, Signer
from ._resources import to_fixed
from ._session import Session, clean_dead_sessions, remove_segments
from ._shm import unlink
from ._transport import Connection, LazyContext
from ._zygote import Zygote, become_subreaper
from .runtime_env._package_store import PackageStore

log = logging.getLogger("shoal.head")

M = MsgType


class _LoopLink:
    """An in-process link: the message is handled on a later turn of the same loop."""

    def __init__(self, loop: IOLoop, handler: Any, *args: Any) -> None:
        self.loop = loop
        self.handler = handler
        self.args = args

    def send(self, msg: Message) -> None:
        self.loop.call_soon(self.handler, *self.args, msg)


class _ListenerLink:
    """The head's link to a node that joined over tcp."""

    def __init__(self, nm: NodeManager, ident: bytes) -> None:
        self.nm = nm
        self.ident = ident

    def send(self, msg: Message) -> None:
        self.nm.listener.send(self.ident, msg)


class Machine:
    """The head or node process of one machine."""

    def __init__(
        self,
        session: Session,
        args: argparse.Namespace,
        node_id: bytes,
        node_ip: str,
        zygote: Zygote | None,
    ) -> None:
        self.session = session
        self.args = args
        self.node_id = node_id
        self.node_ip = node_ip
        self.loop = IOLoop()
        self.ctx = LazyContext()  # unused: no carrier needs a context
        self.signer = Signer(session.read_key())
        self.exiting = False
        self.started_at = time.time()
        self.nm = NodeManager(
            self.loop,
            self.ctx,
            session,
            args,
            node_id,
            self.signer,
            zygote,
            _node_resources(args),
        )
        self.nm.on_shutdown = self.shutdown
        self.control: ControlStore | None = None
        self.head_conn: Connection | None = None
        self.cluster_address = ""
        self.node_idents: dict[bytes, bytes] = {}  # head: routing identity -> node id
        self.heard_from_head = time.monotonic()
        self.rejoin_reason = ""  # set when this node starts again as a new node
        if args.address:
            self.nm.tcp_address = self._bind_tcp(node_ip, args.port or 0)
            self._join(args.address)
        else:
            if args.port is not None:
                bound = self._bind_tcp(args.bind, args.port)
                port = bound.rsplit(":", 1)[1]
                self.nm.tcp_address = f"tcp://{node_ip}:{port}"
                self.cluster_address = self.nm.tcp_address
            self.control = ControlStore(node_id, self.loop.call_soon)
            self.control.on_exit_request = self.shutdown
            self.control.local_places = self._local_places
            self.control.packages = PackageStore(os.path.join(session.path, "packages"))
            self.nm.up = _LoopLink(self.loop, self.control.on_node_message, node_id)
            self.control.add_node(
                node_id, _LoopLink(self.loop, self.nm.on_control), self._node_info()
            )
            if _config.HEAD_STATE_DIR and not args.parent_fd:
                self.control.state = HeadState(_config.HEAD_STATE_DIR)
                recovered = self.control.recover_actors()
                if recovered:
                    log.warning("recovered %d detached actors from the last head", recovered)
            self.nm.on_foreign_hello = self._node_hello
            self.nm.on_foreign_message = self._node_message
        self.metrics_http: MetricsHttpServer | None = None
        if args.metrics_port is not None:
            if self.control is None:
                raise ValueError("only a head serves metrics: --metrics-port goes with --head")
            control = self.control
            self.metrics_http = MetricsHttpServer(
                self.loop,
                args.metrics_bind,
                args.metrics_port,
                session.read_key(),
                lambda: exposition(control),
            )
        self.loop.call_later(TICK_SECONDS, self._tick)

    def _bind_tcp(self, host: str, port: int) -> str:
        return self.nm.listener.bind(f"tcp://{host}:{port if port else '*'}")

    def _node_info(self) -> dict[str, Any]:
        return {
            "res": self.nm.scheduler.total,
            "addr": self.nm.tcp_address,
            "ip": self.node_ip,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def _local_places(self) -> dict[str, str]:
        return {
            e.oid.hex(): ("spilled" if e.spilled else "shared_memory")
            for e in self.nm.store.objects.values()
            if e.sealed
        }

    # -- a node joining a head ---------------------------------------------------------
    def _join(self, address: str) -> None:
        if not address.startswith("tcp://"):
            address = "tcp://" + address
        self.cluster_address = address
        rejoin_until = self.args.rejoin_until
        while True:
            try:
                self._join_once(address)
                return
            except ConnectionError as exc:
                # A node starting afresh after losing the head keeps trying (the head may
                # be back, or the link) until its rejoin deadline; a first start does not.
                if rejoin_until is None or time.time() >= rejoin_until:
                    raise
                log.warning("could not rejoin the head yet (%s); trying again", exc)
                time.sleep(min(0.5, max(0.0, rejoin_until - time.time())))

    def _join_once(self, address: str) -> None:
        refused: list[str] = []
        hello = {"role": "node", "node": self.node_id, **self._node_info()}
        if self.args.previous_node:
            hello["prev"] = bytes.fromhex(self.args.previous_node)
        self.head_conn = Connection(
            self.ctx,
            self.signer,
            address,
            hello,
            self._from_head,
            refused.append,
            linger_ms=1000,
            # A broken link is resumed (see _transport._Session) until NODE_TIMEOUT_SECONDS
            # without a word from the head makes this node start again (``_tick``).
            resumable=True,
            on_lost=self._head_forgot_us,
        )
        # Shorter than what `shoal start` waits for us, so that it gets our reason.
        deadline = time.monotonic() + 0.8 * _config.START_TIMEOUT_SECONDS
        if self.args.rejoin_until is not None:
            # Short tries: a connect sent while the link was down is retried by TCP with
            # backoff (1, 3, 7 s ...); a fresh one goes out at once when the link is back.
            left = self.args.rejoin_until - time.time()
            deadline = min(deadline, time.monotonic() + min(left, REJOIN_TRY_SECONDS))
        conn = self.head_conn
        while conn.welcome is None and not refused and not conn.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.pump(min(left, 0.5))  # no loop runs yet: connect, send, read
        if conn.welcome is None:
            conn.close(0)
        if refused:
            raise ConnectionError(f"the head at {address} refused this node: {refused[0]}")
        if conn.welcome is None:
            if conn.error.startswith("cannot connect"):
                raise ConnectionError(f"{conn.error}: is a head listening there?")
            raise ConnectionError(
                f"no answer from the head at {address}: is a head listening there, and is "
                "the key file the one the head printed? (a message signed with another key "
                "is dropped unread)"
            )
        welcome = self.head_conn.welcome or {}
        self.nm.number = int(welcome.get("number", 0))
        self.nm.up = self.head_conn
        self.head_conn.attach(self.loop)
        self.heard_from_head = time.monotonic()

    def _head_forgot_us(self, reason: str) -> None:
        # The head refused to resume our session: it declared us dead, or it is a new head
        # (restarted at the same address). Either way, join it again as a new node.
        self._head_lost(reason)

    def _from_head(self, msg: Message) -> None:
        self.heard_from_head = time.monotonic()
        if msg.type == M.NODE_LEAVE:
            log.warning("the head is shutting down; this node stops too")
            self.shutdown()
            return
        if msg.type == M.NODE_DEAD:
            self._head_lost(
                f"the head declared this node dead ({msg.body.get('reason', '')}) while "
                "it could not reach it"
            )
            return
        if msg.type == M.PONG:
            return
        self.nm.on_control(msg)

    # -- the head taking nodes ---------------------------------------------------------
    def _node_hello(self, ident: bytes, body: dict[str, Any]) -> dict[str, Any]:
        assert self.control is not None
        node_id = body.get("node")
        if not isinstance(node_id, bytes) or len(node_id) != 16:
            raise ProtocolError("a node's HELLO needs a 16-byte node id")
        known = self.control.nodes.get(node_id)
        if known is not None and not known.alive:
            raise ProtocolError(
                f"this node was declared dead ({known.death_reason}); it must join again "
                "as a new node (a new node id)"
            )
        if known is not None:
            raise ProtocolError("a node with this id already joined")
        if not isinstance(body.get("res"), dict):
            raise ProtocolError("a node's HELLO needs its resources")
        node = self.control.add_node(node_id, _ListenerLink(self.nm, ident), body)
        self.node_idents[ident] = node_id
        prev = body.get("prev")
        if isinstance(prev, bytes) and prev != node_id:
            # The machine it ran as before (it lost the head, or was declared dead):
            # whatever that node held is gone, even if its silence did not show it yet.
            self.control.node_gone(prev, f"it started again as node {node_id.hex()[:12]}")
        # A broken link is resumed until the node is declared dead (``_forget_dead_nodes``).
        return {"number": node.number, "head": self.node_id, "resumable": True}

    def _node_message(self, ident: bytes, msg: Message) -> None:
        assert self.control is not None
        node_id = self.node_idents.get(ident)
        if node_id is not None:
            self.control.on_node_message(node_id, msg)

    def _forget_dead_nodes(self) -> None:
        """A node that left or was declared dead cannot resume its link: what the head
        kept for it goes."""
        assert self.control is not None
        for ident, node_id in list(self.node_idents.items()):
            node = self.control.nodes.get(node_id)
            if node is None or not node.alive:
                del self.node_idents[ident]
                self.nm.listener.forget(ident)

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        self.session.write_head_info(
            {
                "pid": os.getpid(),
                "address": self.nm.address,
                "tcp": self.cluster_address,
                "node_tcp": self.nm.tcp_address,
                "head": self.control is not None,
                "tag": self.session.tag,
                "node_id": self.node_id.hex(),
                "node_ip": self.node_ip,
                "started": self.started_at,
                "metrics": (
                    f"http://{_host_text(self.metrics_http.host)}:{self.metrics_http.port}/metrics"
                    if self.metrics_http is not None
                    else ""
                ),
            }
        )
        self.nm.start()
        if self.args.parent_fd is not None:
            self.loop.add_reader(self.args.parent_fd, self._parent_gone)
        if self.args.ready_fd is not None:
            os.write(self.args.ready_fd, b"ready\n")
            os.close(self.args.ready_fd)
        signal.signal(signal.SIGTERM, lambda *_: self.loop.call_soon_threadsafe(self.shutdown))
        signal.signal(signal.SIGINT, lambda *_: self.loop.call_soon_threadsafe(self.shutdown))
        self.loop.run()
        self._cleanup()
        if self.rejoin_reason:
            self._start_again()

    def _parent_gone(self) -> None:
        self.loop.remove_reader(self.args.parent_fd)
        self.shutdown()

    def shutdown(self) -> None:
        if self.exiting:
            return
        self.exiting = True
        if self.head_conn is not None:
            self.head_conn.send(Message(M.NODE_LEAVE, {}))
            self.head_conn.finish()
        if self.control is not None:
            for node in self.control.nodes.values():
                if node.alive and node.node_id != self.node_id:
                    node.link.send(Message(M.NODE_LEAVE, {}))
        self.loop.stop()

    def _cleanup(self) -> None:
        if self.metrics_http is not None:
            self.metrics_http.close()
        self.nm.cleanup()
        remove_segments(self.session.tag)
        if self.head_conn is not None:
            self.head_conn.close(0 if self.rejoin_reason else None)
        self.ctx.term()
        if not self.rejoin_reason:
            shutil.rmtree(self.session.path, ignore_errors=True)

    def _head_lost(self, reason: str) -> None:
        """This node is cut off from its cluster: start again as a new node (see the module
        docstring). Its workers are killed first: their tasks were (or are being) run again
        elsewhere, so nothing they would still do may count."""
        if self.exiting:
            return
        log.error("%s: this node starts again as a new node", reason)
        self.rejoin_reason = reason
        self.nm.lose_local_drivers(f"the node lost its cluster: {reason}")
        self.exiting = True
        self.loop.stop()

    def _start_again(self) -> None:
        """Replace this process with a fresh node process (same pid, session directory and
        options; a new node id) that joins the head again before a deadline."""
        argv = [sys.executable, "-m", "shoal._head", *_argv_for_restart(sys.argv[1:])]
        deadline = self.args.rejoin_until or (time.time() + _config.NODE_REJOIN_SECONDS)
        argv += ["--rejoin-until", repr(deadline), "--previous-node", self.node_id.hex()]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)

    def _tick(self) -> None:
        if self.exiting:
            return
        if self.control is not None:
            self._check_node_links()
            self.control.check_nodes()
            self.control.retry_groups()
            self._forget_dead_nodes()
            self.control.expire_requests()
        elif self.head_conn is not None and self.head_conn.closed:
            # With a resumable session, "closed" means the head ended it (a broken link is
            # resumed, and silence is caught below).
            self._head_lost(f"the connection to the head at {self.cluster_address} closed")
            return
        elif time.monotonic() - self.heard_from_head > NODE_TIMEOUT_SECONDS:
            # The head answers every report: it is gone, or this node is cut off from it
            # (then the head declares this node dead at about the same time).
            self._head_lost(
                f"nothing heard from the head at {self.cluster_address} for "
                f"{time.monotonic() - self.heard_from_head:.1f} s"
            )
            return
        self.loop.call_later(TICK_SECONDS, self._tick)

    def _check_node_links(self) -> None:
        """A node the listener forgot is gone at once: it said goodbye or broke a rule. (A
        broken link of a node's resumable session is kept waiting for the resume; a node
        that does not come back is declared dead by its silence, ``check_nodes``.)"""
        assert self.control is not None
        peers = self.nm.listener.peers
        for ident, node_id in list(self.node_idents.items()):
            if ident in peers:
                continue
            del self.node_idents[ident]
            node = self.control.nodes.get(node_id)
            if node is not None and node.alive:
                self.control.node_gone(
                    node_id, "its connection to the head closed (its process exited?)"
                )


# How often the head checks its nodes' health and a node its head's.
TICK_SECONDS = min(1.0, _config.HEALTH_CHECK_PERIOD_SECONDS)
# How long one try of a node joining again may take.
REJOIN_TRY_SECONDS = 5.0


def _argv_for_restart(argv: list[str]) -> list[str]:
    """A node's own options, without those that only its first start had (the pipe to
    `shoal start`) or that its restart sets anew."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--ready-fd", "--rejoin-until", "--previous-node"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _node_resources(args: argparse.Namespace) -> dict[str, int]:
    total = {"CPU": to_fixed(args.num_cpus)}
    if args.num_gpus:
        total["GPU"] = to_fixed(args.num_gpus)
    for name, amount in json.loads(args.resources or "{}").items():
        total[name] = to_fixed(amount)
    total["memory"] = int(_available_memory() * 0.7) * 10_000
    total["object_store_memory"] = args.object_store_memory * 10_000
    return total


def _available_memory() -> int:
    # Container-aware (a cgroup limit caps it); reads /proc/meminfo directly, because psutil
    # would cost 15 ms of start-up for one number.
    return _machine.memory_available()


def node_ip_for(args: argparse.Namespace) -> str:
    """The address other machines reach this one at."""
    if args.node_ip:
        return str(args.node_ip)
    if args.address:
        host = args.address.removeprefix("tcp://").rsplit(":", 1)[0]
        # The local address of the route to the head (a UDP "connect" sends nothing).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((host, 9))
                return str(s.getsockname()[0])
            except OSError:
                return "127.0.0.1"
    if args.bind and args.bind not in ("0.0.0.0", "*"):
        return str(args.bind)
    if args.bind in ("0.0.0.0", "*"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal._head")
    parser.add_argument("--session", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--num-cpus", type=float, required=True)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--object-store-memory", type=int, required=True)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--address", default=None, help="join the head at this address")
    parser.add_argument("--node-ip", default=None)
    parser.add_argument("--parent-fd", type=int, default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--exit-with-driver", action="store_true")
    parser.add_argument("--spill-dir", default=None)
    # Set by a node that starts again after losing its cluster (Machine._start_again).
    parser.add_argument("--rejoin-until", type=float, default=None)
    parser.add_argument("--previous-node", default=None)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--metrics-bind", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    clean_dead_sessions()
    session = Session(args.session, args.tag)
    node_id = os.urandom(16)
    node_ip = node_ip_for(args)
    # What workers need to know, in the environment they inherit (set before the zygote
    # is forked, and before any thread or zmq context exists, which makes forking safe).
    env = {
        "SHOAL_SESSION": session.path,
        "SHOAL_HEAD": session.socket_address("h"),
        "SHOAL_NODE_ID": node_id.hex(),
        "SHOAL_SHM_TAG": session.tag,
    }
    if args.address or args.port is not None:
        env["SHOAL_NODE_IP"] = node_ip  # workers also listen on tcp, for other nodes
    os.environ.update(env)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.pop("SHOAL_RUNTIME_ENV", None)  # a driver started inside a task had it
    zygote = None
    if os.environ.get("SHOAL_NO_ZYGOTE") != "1":
        try:
            become_subreaper()
            zygote = Zygote(session.logs)
        except OSError as exc:
            log.warning("no worker zygote (%s); workers start with a fresh interpreter each", exc)
    if args.rejoin_until is not None:
        # `shoal stop` while it tries to join again: give up like a failed join.
        signal.signal(signal.SIGTERM, _stop_joining)
    try:
        machine = Machine(session, args, node_id, node_ip, zygote)
    except Exception as exc:  # ConnectionError, ValueError, OSError (bind ...)
        log.error("could not start: %s", exc)
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error: {exc}\n".encode()[:4000])
        unlink(session.socket_address("h").removeprefix("ipc://"))
        if args.rejoin_until is not None:
            # Nobody else cleans up after a node that gave up rejoining.
            if zygote is not None:
                zygote.close()
            remove_segments(session.tag)
            shutil.rmtree(session.path, ignore_errors=True)
        raise SystemExit(1) from None
    # What exists now (modules, classes, the machine) lives as long as the process: out of
    # the collector's sight, a full collection only walks what came later, such as the
    # records of the control store's task log, which churn with every task.
    gc.freeze()
    machine.run()


class _Stopped(Exception):
    pass


def _stop_joining(signum: int, frame: Any) -> None:
    # Not a ConnectionError: the join loop would take that for a failed try, and try again.
    raise _Stopped("stopped (SIGTERM) while trying to join the head again")


if __name__ == "__main__":
    main()
