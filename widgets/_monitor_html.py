"""The monitor as HTML: one snapshot (``shoal.state.cluster_snapshot()``) in, one string out.

The live widget sends this string as the value of one HTML widget per tick; the same
function, with the failures inlined as ``<details>``, is the fallback for frontends that
cannot show widgets (and what a saved notebook keeps).
"""

from __future__ import annotations

import re
from typing import Any

from shoal.jupyter_ext._tracebacks import location, notebook_text

from ._format import (
    FONT,
    MUTED,
    STATE_COLORS,
    badge,
    bar,
    clock,
    esc,
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    percent,
    short_id,
    stacked_bar,
    table,
)

TASK_STATES = ("PENDING_ARGS", "SUBMITTED", "RUNNING", "FINISHED", "FAILED", "CANCELLED")
STATE_HEADERS = ("pending args", "submitted", "running", "finished", "failed", "cancelled")
MAX_FUNCTIONS = 12
MAX_ACTORS = 20


def render(
    snapshot: dict[str, Any] | None,
    *,
    status: str,
    rate: float | None,
    inline_failures: bool,
    metrics_html: str = "",
) -> str:
    """The whole monitor. ``status`` is a short line (live, stopped and why, an error);
    ``rate`` tasks ended per second (None before two ticks); ``metrics_html`` is what the
    metrics section rendered ("" when the snapshot has none)."""
    if snapshot is None:
        return f'<div class="shoal-monitor" style="{FONT}">{header(None, status)}</div>'
    parts = [
        header(snapshot, status),
        nodes_section(snapshot.get("nodes") or []),
        tasks_section(snapshot.get("tasks") or {}, rate),
        actors_section(snapshot.get("actors") or [], snapshot.get("actor_counts") or {}),
        objects_section(snapshot.get("objects") or {}, snapshot.get("nodes") or []),
        metrics_html,
    ]
    if inline_failures:
        parts.append(failures_section(snapshot.get("failures") or []))
    return f'<div class="shoal-monitor" style="{FONT}">{"".join(parts)}</div>'


def title(text: str, extra: str = "") -> str:
    more = f' <span style="{MUTED};font-weight:normal">{extra}</span>' if extra else ""
    return f'<div style="font-weight:600;margin-top:6px">{esc(text)}{more}</div>'


def header(snapshot: dict[str, Any] | None, status: str) -> str:
    facts = ["<b>Shoal cluster</b>"]
    if snapshot is not None:
        nodes = [n for n in snapshot.get("nodes") or [] if n.get("alive")]
        cpus = sum((n.get("resources_total") or {}).get("CPU", 0) for n in nodes)
        workers = snapshot.get("workers") or {}
        facts.append(f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}")
        facts.append(f"{cpus:g} CPUs")
        facts.append(f"{format_count(workers.get('total', 0))} workers")
        facts.append(f"at {clock(snapshot.get('time'))}")
    return (
        f'<div class="shoal-monitor-header">{" · ".join(facts)} '
        f'<span class="shoal-monitor-status" style="{MUTED}">({esc(status)})</span></div>'
    )


def nodes_section(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for node in nodes:
        name = f"<code>{esc(short_id(node.get('node_id')))}</code>"
        if node.get("is_head"):
            name += " head"
        host = esc(str(node.get("hostname") or node.get("address") or ""))
        if not node.get("alive"):
            rows.append(
                [
                    name,
                    host,
                    badge("dead", STATE_COLORS["DEAD"]),
                    esc(node.get("death_reason") or ""),
                ]
                + ["", "", ""]
            )
            continue
        total = node.get("resources_total") or {}
        free = node.get("resources_available") or {}
        cpus = total.get("CPU", 0)
        used_cpus = cpus - free.get("CPU", 0)
        mem = node.get("memory_used")
        mem_label = (
            f"{node.get('memory_percent') or 0:.0f}% of {format_bytes(node.get('memory_total'))}"
            if mem is not None
            else "?"
        )
        store_used = node.get("object_store_used") or 0
        store_cap = node.get("object_store_capacity")
        store_label = f"{format_bytes(store_used)} / {format_bytes(store_cap)}"
        if node.get("spilled_bytes"):
            store_label += f", {format_bytes(node['spilled_bytes'])} spilled"
        rows.append(
            [
                name,
                host,
                bar(node.get("cpu_percent")),
                bar(node.get("memory_percent"), "#6d4c41", label=mem_label, warn=True),
                bar(percent(store_used, store_cap), "#00897b", label=store_label, warn=True),
                bar(percent(used_cpus, cpus), "#5e35b1", label=f"{used_cpus:g} / {cpus:g}"),
                format_count(node.get("workers") or 0),
            ]
        )
    header = ["node", "host", "CPU (machine)", "memory", "object store", "CPUs in use", "workers"]
    return title("Nodes") + table(header, rows, "shoal-nodes")


def tasks_section(tasks: dict[str, Any], rate: float | None) -> str:
    by_state = tasks.get("by_state") or {}
    total = tasks.get("total", sum(by_state.values()))
    extra = f"{format_count(total)} in all"
    if rate is not None:
        extra += f" · {format_rate(rate)} ending"
    counts = " ".join(
        f'<span class="shoal-task-state" data-state="{s}" style="margin-right:8px">'
        f"{badge(h, STATE_COLORS[s])} <b>{format_count(by_state.get(s, 0))}</b></span>"
        for s, h in zip(TASK_STATES, STATE_HEADERS, strict=True)
    )
    strip = stacked_bar([(by_state.get(s, 0), STATE_COLORS[s], s) for s in TASK_STATES])
    by_name = tasks.get("by_name") or {}
    names = sorted(
        by_name,
        key=lambda n: (-by_name[n].get("RUNNING", 0), -sum(by_name[n].values()), n),
    )
    rows = []
    for name in names[:MAX_FUNCTIONS]:
        row = by_name[name]
        cells = [f"<code>{esc(name)}</code>"]
        cells += [format_count(row.get(s, 0)) if row.get(s) else "" for s in TASK_STATES]
        rows.append(cells)
    more = ""
    if len(names) > MAX_FUNCTIONS:
        more = f'<div style="{MUTED}">and {len(names) - MAX_FUNCTIONS} more functions</div>'
    dropped = ""
    if tasks.get("dropped_events"):
        dropped = (
            f'<div style="{MUTED}">{format_count(tasks["dropped_events"])} task events were '
            "dropped before reaching the head: counts may be low</div>"
        )
    body = f'<div class="shoal-task-counts">{counts}</div><div>{strip}</div>'
    if rows:
        body += table(["function", *STATE_HEADERS], rows, "shoal-functions")
    return title("Tasks", extra) + body + more + dropped


def actors_section(actors: list[dict[str, Any]], counts: dict[str, int]) -> str:
    if not actors and not counts:
        return title("Actors", "none")
    extra = " · ".join(f"{format_count(n)} {s.lower()}" for s, n in sorted(counts.items()))
    rows = []
    for actor in actors[:MAX_ACTORS]:
        state = str(actor.get("state") or "?")
        cause = actor.get("death_cause") or ""
        rows.append(
            [
                f"<code>{esc(str(actor.get('class_name') or '?'))}</code>",
                esc(str(actor.get("name") or "")),
                badge(state.lower(), STATE_COLORS.get(state, "#6b6b6b"))
                + (f' <span style="{MUTED}">{esc(str(cause))}</span>' if cause else ""),
                format_count(actor.get("restarts") or 0),
                f"<code>{esc(short_id(actor.get('node_id')))}</code>",
                esc(str(actor.get("pid") or "")),
            ]
        )
    more = ""
    if len(actors) > MAX_ACTORS:
        more = f'<div style="{MUTED}">and {len(actors) - MAX_ACTORS} more actors</div>'
    return (
        title("Actors", extra)
        + table(["class", "name", "state", "restarts", "node", "pid"], rows, "shoal-actors")
        + more
    )


def objects_section(objects: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    spilled = objects.get("spilled")
    if spilled is None:
        spilled = sum(n.get("spilled_bytes") or 0 for n in nodes)
    extra = (
        f"{format_count(objects.get('objects', 0))} in the store · "
        f"{format_bytes(objects.get('used', 0))} of {format_bytes(objects.get('capacity'))} · "
        f"{format_bytes(spilled)} spilled"
    )
    rows = [
        [
            f"<code>{esc(short_id(o.get('object_id'), 16))}</code>",
            format_bytes(o.get("size")),
            esc(str(o.get("owner") or "")),
            esc(call_site(str(o.get("call_site") or ""))),
        ]
        for o in objects.get("largest") or []
    ]
    body = (
        table(["largest objects", "size", "owner", "made at"], rows, "shoal-objects")
        if rows
        else ""
    )
    return title("Objects", extra) + body


_CALL_SITE = re.compile(r"^(?P<what>.*) at (?P<file>.+):(?P<line>\d+) in (?P<name>.+)$")


def call_site(text: str) -> str:
    """``put() at Cell In[2], line 16`` for a put made in a notebook cell."""
    match = _CALL_SITE.match(text)
    if match is None:
        return text
    where = location(match["file"], int(match["line"]))
    name = "" if match["name"] == "<module>" else f" in {match['name']}"
    return f"{match['what']} at {where}{name}"


def failure_title(failure: dict[str, Any]) -> str:
    """One line naming a failure (the accordion's title; plain text)."""
    error = str(failure.get("error_type") or failure.get("state") or "error")
    message = str(failure.get("error_message") or "").strip().splitlines()
    first = message[0] if message else ""
    if len(first) > 80:
        first = first[:77] + "..."
    node = short_id(failure.get("node_id"))
    where = f" · node {node}" if node else ""
    return (
        f"{clock(failure.get('finished_at'))} {failure.get('name') or '?'}: {error}: {first}{where}"
    )


def failure_body(failure: dict[str, Any]) -> str:
    """A failure's details and remote traceback, as HTML."""
    facts = [
        f"task <code>{esc(str(failure.get('task_id') or ''))}</code>",
        f"attempt {failure.get('attempt') or 1}",
    ]
    if failure.get("pid"):
        facts.append(f"pid {esc(str(failure['pid']))}")
    if failure.get("duration") is not None:
        facts.append(f"ran {format_duration(failure.get('duration'))}")
    text = failure.get("traceback")
    if text:
        text = notebook_text(str(text))  # "Cell In[3], line 4", as the notebook's errors say
    else:
        text = f"{failure.get('error_type') or 'Error'}: {failure.get('error_message') or ''}"
    return (
        f'<div class="shoal-failure" style="{FONT}"><div style="{MUTED}">{" · ".join(facts)}</div>'
        f'<pre class="shoal-traceback" style="margin:4px 0;white-space:pre-wrap;'
        f'font-size:var(--jp-code-font-size,12px)">{esc(str(text))}</pre></div>'
    )


def failures_section(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return title("Latest failures", "none")
    items = "".join(
        f"<details><summary><code>{esc(failure_title(f))}</code></summary>{failure_body(f)}</details>"
        for f in failures
    )
    return title("Latest failures", "newest first") + items
