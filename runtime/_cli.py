"""The ``shoal`` command: start, stop and inspect clusters on this machine.

shoal start --head [--port N] [--bind ADDR] [--key-file F] [--num-cpus N] [--resources JSON]
shoal start --address HEAD:PORT [--key-file F] [--num-cpus N] ...     (join as a node)
shoal stop
shoal status
shoal memory [--json]
shoal demo
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal cluster runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser(
        "start", help="start a head, or a node that joins one, in the background"
    )
    start.add_argument("--head", action="store_true", help="start a head node")
    start.add_argument(
        "--address", default=None, help="join the head at HOST:PORT as a node (instead of --head)"
    )
    start.add_argument(
        "--port",
        type=int,
        default=None,
        help="the tcp port to listen on (default: any free port; the address is printed)",
    )
    start.add_argument(
        "--bind",
        default=None,
        help="the address the head listens on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    start.add_argument(
        "--key-file",
        default=None,
        help="the cluster key: a head uses this file (creating a fresh key there if it does not exist), a node reads it",
    )
    start.add_argument(
        "--node-ip-address", default=None, help="the address other machines reach this one at"
    )
    start.add_argument("--num-cpus", type=float, default=None)
    start.add_argument("--num-gpus", type=int, default=0)
    start.add_argument(
        "--resources", default="{}", help="custom resources as JSON, e.g. '{\"TPU\": 2}'"
    )
    start.add_argument("--object-store-memory", type=int, default=None, help="bytes")
    start.add_argument(
        "--temp-dir", default=None, help="where session files go (default /tmp/shoal-sessions)"
    )

    stop = sub.add_parser("stop", help="stop every cluster started on this machine")
    stop.add_argument("--temp-dir", default=None)
    stop.add_argument("--timeout", type=float, default=10.0)

    status = sub.add_parser("status", help="show the nodes and resources of the running cluster")
    status.add_argument("--address", default="auto")
    status.add_argument("--temp-dir", default=None)

    memory = sub.add_parser("memory", help="list the objects in the object store")
    memory.add_argument("--address", default="auto")
    memory.add_argument("--temp-dir", default=None)
    memory.add_argument("--limit", type=int, default=50)
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("demo", help="run a short demo on a local cluster")

    args = parser.parse_args(argv)
    if getattr(args, "temp_dir", None):
        os.environ["SHOAL_TMPDIR"] = os.path.abspath(args.temp_dir)
    try:
        {"start": _start, "stop": _stop, "status": _status, "memory": _memory, "demo": _demo}[
            args.command
        ](args)
    except (ValueError, ConnectionError, RuntimeError) as exc:
        print(f"shoal {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(1)


def _start(args: argparse.Namespace) -> None:
    from . import _machine
    from ._api import _default_store_memory, start_head_process

    if args.head == bool(args.address):
        raise ValueError("pass either --head (start a head) or --address HOST:PORT (join one)")
    try:
        resources = json.loads(args.resources)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--resources is not valid JSON: {exc}") from None
    if not isinstance(resources, dict) or not all(
        isinstance(v, (int, float)) and v >= 0 for v in resources.values()
    ):
        raise ValueError("--resources must be a JSON object of name to a number >= 0")
    num_cpus = args.num_cpus if args.num_cpus is not None else _machine.cpu_count()
    if num_cpus < 0 or args.num_gpus < 0:
        raise ValueError("--num-cpus and --num-gpus must be >= 0")
    if args.port is not None and not 0 <= args.port < 65536:
        raise ValueError(f"--port must be a port number, got {args.port}")
    store = args.object_store_memory or _default_store_memory()
    common: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": args.num_gpus,
        "resources": resources,
        "object_store_memory": store,
        "embedded": False,
        "node_ip": args.node_ip_address,
    }
    if args.head:
        key, key_path = _head_key(args.key_file)
        proc, session = start_head_process(
            **common,
            port=0 if args.port is None else args.port,  # 0: any free port (it is printed)
            bind=args.bind or "127.0.0.1",
            key=key,
        )
        info = session.head_info() or {}
        address = str(info.get("tcp", "")).removeprefix("tcp://")
        print(f"Started a Shoal head (pid {proc.pid}).")
        print(f"  address:   {address}")
        print(f"  key file:  {key_path or session.key_path}")
        print(f"  session:   {session.path}")
        print("Join another machine to it with:")
        print(f"  shoal start --address {address} --key-file {key_path or session.key_path}")
        if args.temp_dir:
            # address="auto" looks in $SHOAL_TMPDIR, which is not where this head lives.
            print(
                f'Connect from Python with shoal.init("tcp://{address}", '
                f'key_file="{key_path or session.key_path}"); '
                f"stop it with `shoal stop --temp-dir {args.temp_dir}`."
            )
        else:
            print(
                'Connect from Python on this machine with shoal.init(address="auto"); '
                "stop it with `shoal stop`."
            )
        return
    proc, session = start_head_process(
        **common,
        port=args.port,
        join=args.address,
        key=_node_key(args.key_file, args.address),
    )
    info = session.head_info() or {}
    print(f"Started a Shoal node (pid {proc.pid}) in the cluster at {args.address}.")
    print(f"  node id:   {info.get('node_id', '')}")
    print(f"  node ip:   {info.get('node_ip', '')}")
    print(f"  session:   {session.path}")
    print("Stop it with `shoal stop`.")


def _head_key(path: str | None) -> tuple[bytes | None, str | None]:
    """The key a head uses: from ``path`` (made there first if missing), else a fresh one."""
    import secrets

    from ._session import read_key_file, write_key_file

    if path is None:
        return None, None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        write_key_file(path, secrets.token_bytes(32))
    return read_key_file(path), path


def _node_key(path: str | None, address: str) -> bytes:
    """The key a node joins with: --key-file, $SHOAL_CLUSTER_KEY, or a head on this machine."""
    from ._api import _find_session_by_address
    from ._session import cluster_key

    key = cluster_key(path)
    if key is not None:
        return key
    try:
        return _find_session_by_address(
            address if address.startswith("tcp://") else "tcp://" + address
        ).read_key()
    except ConnectionError:
        raise ValueError(
            f"no key for the cluster at {address}: pass --key-file (the head printed its path) "
            "or set SHOAL_CLUSTER_KEY"
        ) from None


def _stop(args: argparse.Namespace) -> None:
    from ._session import list_session_dirs, open_session, pid_alive, remove_segments

    heads = []
    for path in list_session_dirs():
        session = open_session(path)
        info = session.head_info()
        if info and pid_alive(int(info["pid"])):
            heads.append((int(info["pid"]), session))
    for pid, _ in heads:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    for pid, session in heads:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            remove_segments(session.tag)
    print(f"Stopped {len(heads)} Shoal cluster{'s' if len(heads) != 1 else ''}.")


def _status(args: argparse.Namespace) -> None:
    import shoal
    from rich.console import Console
    from rich.table import Table

    shoal.init(address=args.address, log_to_driver=False)
    try:
        nodes = shoal.nodes()
    finally:
        shoal.shutdown()
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="Shoal cluster")
    for col in ("node", "address", "alive", "resource", "used / total", "workers", "object store"):
        table.add_column(col)
    for node in nodes:
        where = str(node.get("NodeManagerAddress", "")) + (" (head)" if node.get("IsHead") else "")
        if not node["Alive"]:
            table.add_row(node["NodeID"][:12], where, "no: " + str(node.get("DeathReason", "")))
            continue
        store = node.get("ObjectStore", {})
        first = True
        for name, total in sorted(node["Resources"].items()):
            if name in ("memory", "object_store_memory"):
                continue
            used = total - node["Available"].get(name, 0.0)
            table.add_row(
                node["NodeID"][:12] if first else "",
                where if first else "",
                "yes" if node["Alive"] and first else "",
                name,
                f"{used:g} / {total:g}",
                str(node.get("Workers", "")) if first else "",
                _store_text(store) if first else "",
            )
            first = False
    console.print(table)
    _print_runtime_envs(console, nodes)


def _print_runtime_envs(console: Any, nodes: list[dict[str, Any]]) -> None:
    """The runtime envs each node has set up, is setting up, or failed to set up."""
    from rich.markup import escape
    from rich.table import Table

    rows = [(n, env) for n in nodes for env in n.get("RuntimeEnvs") or ()]
    if not rows:
        return
    table = Table(title="Runtime environments")
    for col in ("node", "env", "fields", "state", "workers", "error"):
        table.add_column(col)
    for node, env in rows:
        state = env["state"]
        if state == "building":
            state = f"building ({env['for']:.0f} s)"
        table.add_row(
            node["NodeID"][:12],
            env["key"][:12],
            escape(env["what"]),
            state,
            str(env["workers"]),
            escape(env.get("error") or ""),
        )
    console.print(table)


def _memory(args: argparse.Namespace) -> None:
    import shoal
    import shoal.state
    from rich.console import Console
    from rich.table import Table

    shoal.init(address=args.address, log_to_driver=False)
    try:
        objects = shoal.state.list_objects()
        stats = shoal.state.summarize_objects()
    finally:
        shoal.shutdown()
    if args.json:
        print(json.dumps({"objects": objects, "stats": stats}, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(
        title=f"Object store: {_store_text(stats)}, {stats.get('spilled', 0) / 2**20:.1f} MiB spilled"
    )
    for col in ("object id", "size", "place", "held by", "call site"):
        table.add_column(col)
    for rec in objects[: args.limit]:
        holders = ", ".join(rec["holders"]) or (
            f"inside {rec['contained_in']} object(s)" if rec["contained_in"] else ""
        )
        table.add_row(
            rec["object_id"][:24], _size(rec["size"]), rec["place"], holders, rec["call_site"]
        )
    console.print(table)
    if len(objects) > args.limit:
        console.print(f"... and {len(objects) - args.limit} more (--limit)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _store_text(store: dict[str, Any]) -> str:
    used, cap = store.get("used", 0), store.get("capacity", 0)
    return f"{store.get('objects', 0)} objects, {used / 2**30:.2f} of {cap / 2**30:.1f} GiB used"


def _demo(args: argparse.Namespace) -> None:
    from ._demo import run

    run()
