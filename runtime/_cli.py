"""The ``shoal`` command: start, stop and inspect clusters on this machine.

shoal start --head [--port N] [--bind ADDR] [--key-file F] [--num-cpus N] [--resources JSON]
            [--metrics-port N [--metrics-bind ADDR]]
shoal start --address HEAD:PORT [--key-file F] [--num-cpus N] ...     (join as a node)
shoal stop
shoal status [--json]
shoal memory [--json]
shoal list tasks|actors|objects|nodes|workers [--filter KEY=VALUE ...] [--limit N] [--json]
shoal summary tasks [--json]
shoal stack [--task ID | --actor ID | --node ID]
shoal metrics [--json]
shoal demo

The commands that look at a running cluster are in _cli_state.py.
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
    start.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="head: serve GET /metrics (Prometheus' text format) on this port (0: any free "
        "one), to clients that send the cluster key as a bearer token",
    )
    start.add_argument(
        "--metrics-bind",
        default=None,
        help="the address the metrics endpoint listens on (default 127.0.0.1: this machine only)",
    )

    stop = sub.add_parser("stop", help="stop every cluster started on this machine")
    stop.add_argument("--temp-dir", default=None)
    stop.add_argument("--timeout", type=float, default=10.0)

    from ._cli_state import add_parsers

    commands = add_parsers(sub)
    sub.add_parser("demo", help="run a short demo on a local cluster")

    args = parser.parse_args(argv)
    if getattr(args, "temp_dir", None):
        os.environ["SHOAL_TMPDIR"] = os.path.abspath(args.temp_dir)
    try:
        {"start": _start, "stop": _stop, "demo": _demo, **commands}[args.command](args)
    except (ValueError, TypeError, ConnectionError, RuntimeError) as exc:
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
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise ValueError(f"--metrics-port must be a port number, got {args.metrics_port}")
    if not args.head and (args.metrics_port is not None or args.metrics_bind):
        raise ValueError(
            "--metrics-port and --metrics-bind go with --head: the head serves metrics"
        )
    if args.metrics_bind and args.metrics_port is None:
        raise ValueError("--metrics-bind needs --metrics-port")
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
            metrics_port=args.metrics_port,
            metrics_bind=args.metrics_bind,
        )
        info = session.head_info() or {}
        address = str(info.get("tcp", "")).removeprefix("tcp://")
        print(f"Started a Shoal head (pid {proc.pid}).")
        print(f"  address:   {address}")
        print(f"  key file:  {key_path or session.key_path}")
        print(f"  session:   {session.path}")
        if info.get("metrics"):
            print(f"  metrics:   {info['metrics']} (bearer token: the key file's text)")
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


def _demo(args: argparse.Namespace) -> None:
    from ._demo import run

    run()
