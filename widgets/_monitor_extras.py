"""Two parts of the monitor beside its live picture: the user metrics section (the
snapshot's ``metrics`` key, from ``shoal.util.metrics``) and the stacks of running work
(``shoal.state.stack`` for an actor or a node's workers, on request)."""

from __future__ import annotations

from typing import Any

from ._format import esc, format_count, table
from ._monitor_html import title

# The metrics section shows at most this many series (the snapshot carries up to 100).
METRICS_SHOWN = 20
STACK_TIMEOUT = 10.0


def _value(series: dict[str, Any]) -> str:
    if series.get("type") == "histogram":
        count = int(series.get("count") or 0)
        total = float(series.get("sum") or 0.0)
        mean = f", mean {total / count:.4g}" if count else ""
        return f"{format_count(count)} observed{mean}"
    return f"{float(series.get('value') or 0.0):.6g}"


def _tags(series: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((series.get("tags") or {}).items()))


def metrics_html(metrics: list[dict[str, Any]] | None) -> str:
    """The user metrics as an HTML table; "" when no process defined one."""
    if not metrics:
        return ""
    rows = [
        [esc(m.get("name", "")), esc(m.get("type", "")), esc(_tags(m)), esc(_value(m))]
        for m in metrics[:METRICS_SHOWN]
    ]
    more = len(metrics) - METRICS_SHOWN
    extra = f"{len(metrics)} series" + (f", first {METRICS_SHOWN} shown" if more > 0 else "")
    return title("Metrics", extra) + table(["name", "type", "tags", "value"], rows, "shoal-metrics")


def metrics_text(metrics: list[dict[str, Any]] | None) -> str:
    if not metrics:
        return ""
    lines = ["Metrics:"]
    for m in metrics[:METRICS_SHOWN]:
        tags = _tags(m)
        lines.append(f"  {m.get('name')}{'{' + tags + '}' if tags else ''} {_value(m)}")
    return "\n".join(lines) + "\n"


def stack_choices(snapshot: dict[str, Any] | None) -> list[tuple[str, tuple[str, str]]]:
    """What the stacks picker offers: every live actor, then every live node (all of its
    workers, so every running task, each named in its section)."""
    if not snapshot:
        return []
    out: list[tuple[str, tuple[str, str]]] = []
    for actor in snapshot.get("actors") or []:
        if actor.get("state") in ("ALIVE", "RESTARTING"):
            name = actor.get("name") or str(actor.get("actor_id", ""))[:8]
            out.append((f"actor {actor.get('class_name')} {name}", ("actor", actor["actor_id"])))
    for node in snapshot.get("nodes") or []:
        if node.get("alive"):
            node_id = str(node.get("node_id", ""))
            label = f"tasks and actors on node {node_id[:8]} ({node.get('address', '')})"
            out.append((label, ("node", node_id)))
    return out


def fetch_stacks(core: Any, choice: tuple[str, str]) -> str:
    """The stacks text for a picker choice, through the monitor's own core (a monitor
    never starts a cluster)."""
    from shoal._protocol import Message, MsgType
    from shoal.state import format_stacks

    kind, ident = choice
    reply = core.request(Message(MsgType.STACK, {kind: ident}), timeout=STACK_TIMEOUT)
    body = dict(reply.body)
    if "e" in body:
        raise ValueError(body["e"])
    return format_stacks(body)


def stacks_html(text: str) -> str:
    return (
        f'<pre style="max-height:24em;overflow:auto;font-size:85%;margin:4px 0">{esc(text)}</pre>'
    )
