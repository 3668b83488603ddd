"""The ``shoal`` commands that look at a running cluster: status, memory, list, summary,
stack, metrics. Each joins the cluster as a driver (``--address``, default the one on this
machine), makes one state request (shoal.state), leaves, and prints a rich table, or JSON
with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

LIST_KINDS = ("tasks", "actors", "objects", "nodes", "workers")


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default="auto",
        help="the cluster: 'auto' (the one on this machine), HOST:PORT, or a session directory",
    )
    parser.add_argument(
        "--key-file",
        default=None,
        help="the cluster key, to reach a cluster on another machine (client-server mode)",
    )
    parser.add_argument("--temp-dir", default=None)


def add_parsers(sub: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add the commands to the ``shoal`` parser; returns command name -> function."""
    status = sub.add_parser("status", help="show the nodes and resources of the running cluster")
    add_connection_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    memory = sub.add_parser("memory", help="list the objects in the object store")
    add_connection_args(memory)
    memory.add_argument("--limit", type=int, default=50)
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")

    listing = sub.add_parser(
        "list", help="list the cluster's tasks, actors, objects, nodes or workers"
    )
    listing.add_argument("kind", choices=LIST_KINDS)
    listing.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep records whose KEY is VALUE (KEY!=VALUE: is not); repeat to combine",
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument(
        "--detail", action="store_true", help="tasks: include the tracebacks of failures"
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(listing)

    summary = sub.add_parser("summary", help="task counts by function and state")
    summary.add_argument("kind", choices=("tasks",))
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(summary)

    stack = sub.add_parser(
        "stack",
        help="print the Python stacks of the worker running a task or actor, or of a node's "
        "workers (all workers without an option), without stopping them",
    )
    which = stack.add_mutually_exclusive_group()
    which.add_argument("--task", default=None, metavar="ID", help="a task id (or a unique prefix)")
    which.add_argument("--actor", default=None, metavar="ID", help="an actor id (or a prefix)")
    which.add_argument("--node", default=None, metavar="ID", help="a node id (or a prefix)")
    add_connection_args(stack)

    metrics = sub.add_parser(
        "metrics",
        help="print the cluster's metrics (user metrics and shoal_* built-ins) in Prometheus' "
        "text format",
    )
    metrics.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead: {metrics: [user series], builtin: [...], errors, dropped}",
    )
    add_connection_args(metrics)

    return {
        "metrics": metrics_cmd,
        "status": status_cmd,
        "memory": memory_cmd,
        "list": list_cmd,
        "summary": summary_cmd,
        "stack": stack_cmd,
    }


@contextmanager
def _connected(args: argparse.Namespace) -> Iterator[None]:
    import shoal

    shoal.init(address=args.address, log_to_driver=False, key_file=args.key_file)
    try:
        yield
    finally:
        shoal.shutdown()


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def parse_filters(texts: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for text in texts:
        if "!=" in text:
            key, _, value = text.partition("!=")
            op = "!="
        elif "=" in text:
            key, _, value = text.partition("=")
            op = "="
        else:
            raise ValueError(f"a filter is KEY=VALUE or KEY!=VALUE, got {text!r}")
        out.append((key.strip(), op, value.strip()))
    return out


# -- status and memory -------------------------------------------------------------------
def status_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    with _connected(args):
        nodes = shoal.state.list_nodes(limit=10_000)
        summary = shoal.state.summarize_tasks()
    if args.json:
        _print_json({"nodes": list(nodes), "tasks": summary})
        return
    from rich.table import Table

    table = Table(title="Shoal cluster")
    for col in ("node", "address", "state", "CPU", "cpu %", "memory", "workers", "object store"):
        table.add_column(col)
    for node in nodes:
        where = node["address"] + (" (head)" if node["is_head"] else "")
        if not node["alive"]:
            table.add_row(node["node_id"][:12], where, "DEAD: " + str(node["death_reason"] or ""))
            continue
        total, avail = node["resources_total"], node["resources_available"]
        cpu = total.get("CPU", 0.0)
        table.add_row(
            node["node_id"][:12],
            where,
            node["state"],
            f"{cpu - avail.get('CPU', 0.0):g} / {cpu:g} used",
            _percent(node["cpu_percent"]),
            _memory_text(node),
            str(node["workers"]),
            _store_text(node),
        )
    console = _console()
    console.print(table)
    extra = {
        name: f"{total - node['resources_available'].get(name, 0.0):g} / {total:g}"
        for node in nodes
        if node["alive"]
        for name, total in node["resources_total"].items()
        if name not in ("CPU", "memory", "object_store_memory")
    }
    if extra:
        console.print("other resources: " + ", ".join(f"{k} {v}" for k, v in sorted(extra.items())))
    console.print(_task_line(summary))
    _print_runtime_envs(console, nodes)


def _print_runtime_envs(console: Any, nodes: list[dict[str, Any]]) -> None:
    """The runtime envs each node has set up, is setting up, or failed to set up."""
    from rich.markup import escape
    from rich.table import Table

    rows = [(n, env) for n in nodes for env in n.get("runtime_envs") or ()]
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
            node["node_id"][:12],
            env["key"][:12],
            escape(env["what"]),
            state,
            str(env["workers"]),
            escape(env.get("error") or ""),
        )
    console.print(table)


def memory_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    with _connected(args):
        objects = shoal.state.list_objects(limit=max(0, args.limit))
        stats = shoal.state.summarize_objects()
    if args.json:
        _print_json({"objects": list(objects), "total": objects.total, "stats": stats})
        return
    from rich.table import Table

    table = Table(
        title=f"Object store: {stats.get('objects', 0)} objects, "
        f"{_size(stats.get('used', 0))} of {_size(stats.get('capacity', 0))} used, "
        f"{_size(stats.get('spilled', 0))} spilled"
    )
    for col in ("object id", "size", "place", "held by", "call site"):
        table.add_column(col)
    for rec in objects:
        holders = ", ".join(rec["holders"]) or (
            f"inside {rec['contained_in']} object(s)" if rec["contained_in"] else ""
        )
        table.add_row(
            # The whole id: its first half names the owner, shared by all of a driver's objects.
            rec["object_id"],
            _size(rec["size"]),
            rec["place"],
            holders,
            rec["call_site"],
        )
    console = _console()
    console.print(table)
    if objects.truncated:
        console.print(f"... and {objects.total - len(objects)} more (--limit)")


# -- list, summary, stack ----------------------------------------------------------------
def list_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    filters = parse_filters(args.filter)
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    lister = getattr(shoal.state, f"list_{args.kind}")
    kwargs: dict[str, Any] = {"filters": filters, "limit": args.limit}
    if args.kind == "tasks":
        kwargs["detail"] = args.detail
    with _connected(args):
        records = lister(**kwargs)
    if args.json:
        _print_json(
            {
                "kind": args.kind,
                "total": records.total,
                "truncated": records.truncated,
                "records": list(records),
            }
        )
        return
    from rich.table import Table

    columns = _COLUMNS[args.kind]
    table = Table(title=f"{args.kind} ({len(records)} of {records.total})")
    for title, _ in columns:
        table.add_column(title)
    for rec in records:
        table.add_row(*(render(rec) for _, render in columns))
    console = _console()
    console.print(table)
    if records.truncated:
        console.print(f"{records.total - len(records)} more not shown (--limit)")
    if args.kind == "tasks" and args.detail:
        for rec in records:
            if rec.get("traceback"):
                console.print(f"\n[bold]{rec['name']} ({rec['task_id']})[/bold]", highlight=False)
                console.print(rec["traceback"].rstrip(), markup=False, highlight=False)


def summary_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    with _connected(args):
        summary = shoal.state.summarize_tasks()
    if args.json:
        _print_json(summary)
        return
    from rich.table import Table

    from ._task_events import STATE_NAMES

    states = [s for s in STATE_NAMES if s in summary["by_state"]]
    table = Table(title=f"tasks by function ({summary['total']} in all)")
    table.add_column("name")
    for state in states:
        table.add_column(state, justify="right")
    for name, counts in sorted(summary["by_name"].items()):
        table.add_row(name, *(str(counts.get(s, 0)) for s in states))
    console = _console()
    console.print(table)
    if summary["evicted"] or summary["dropped_events"]:
        console.print(
            f"the task log keeps {summary['capacity']} tasks: {summary['evicted']} were dropped "
            f"from it (counted above), {summary['dropped_events']} events were lost on the way"
        )


def stack_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    with _connected(args):
        text = shoal.state.stack(task_id=args.task, actor_id=args.actor, node_id=args.node)
    sys.stdout.write(text)


def metrics_cmd(args: argparse.Namespace) -> None:
    import shoal.state

    with _connected(args):
        if args.json:
            _print_json(shoal.state._request({"kind": "metrics"}))
            return
        text = shoal.state.metrics_text()
    sys.stdout.write(text)


# -- rendering ---------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _percent(value: Any) -> str:
    return "" if value is None else f"{value:.0f}%"


def _memory_text(node: dict[str, Any]) -> str:
    if node.get("memory_total") is None:
        return ""
    return f"{_size(node['memory_used'])} of {_size(node['memory_total'])}"


def _store_text(node: dict[str, Any]) -> str:
    text = (
        f"{node['object_store_objects']} objects, "
        f"{_size(node['object_store_used'])} of {_size(node['object_store_capacity'])}"
    )
    if node["spilled_bytes"]:
        text += f", {_size(node['spilled_bytes'])} spilled"
    return text


def _task_line(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary["by_state"].items())
    return f"tasks: {counts or 'none yet'}"


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _seconds(t: Any) -> str:
    return "" if t is None else f"{t:.3f}s"


def _short(value: Any, n: int = 12) -> str:
    return "" if value is None else str(value)[:n]


def _error(rec: dict[str, Any]) -> str:
    if not rec.get("error_type"):
        return ""
    message = (rec.get("error_message") or "").strip().splitlines()
    return f"{rec['error_type']}: {message[0] if message else ''}"[:80]


_COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], str]]]] = {
    "tasks": [
        ("task id", lambda r: r["task_id"]),
        ("name", lambda r: r["name"]),
        ("state", lambda r: r["state"]),
        ("attempt", lambda r: str(r["attempt"])),
        ("node", lambda r: _short(r["node_id"])),
        ("pid", lambda r: str(r["pid"] or "")),
        ("started", lambda r: _clock(r["started_at"])),
        ("duration", lambda r: _seconds(r["duration"])),
        ("error", _error),
    ],
    "actors": [
        ("actor id", lambda r: r["actor_id"]),
        ("class", lambda r: r["class_name"]),
        ("name", lambda r: r["name"] or ""),
        ("state", lambda r: r["state"]),
        ("node", lambda r: _short(r["node_id"])),
        ("pid", lambda r: str(r["pid"] or "")),
        ("death cause", lambda r: r["death_cause"] or ""),
    ],
    "objects": [
        ("object id", lambda r: r["object_id"]),
        ("size", lambda r: _size(r["size"])),
        ("place", lambda r: r["place"]),
        ("reference", lambda r: r["reference_type"]),
        ("owner", lambda r: r["owner"]),
        ("call site", lambda r: r["call_site"]),
    ],
    "nodes": [
        ("node id", lambda r: r["node_id"]),
        ("address", lambda r: r["address"] + (" (head)" if r["is_head"] else "")),
        ("state", lambda r: r["state"]),
        ("cpu %", lambda r: _percent(r["cpu_percent"])),
        ("memory", _memory_text),
        ("workers", lambda r: str(r["workers"])),
        ("object store", _store_text),
    ],
    "workers": [
        ("worker id", lambda r: r["worker_id"]),
        ("type", lambda r: r["type"]),
        ("state", lambda r: r["state"]),
        ("node", lambda r: _short(r["node_id"])),
        ("pid", lambda r: str(r["pid"] or "")),
        ("actor", lambda r: r["actor_class"] or ""),
        ("running", lambda r: ", ".join(r["task_names"])),
    ],
}
