"""The monitor as plain text: what a terminal, or a frontend that shows only text/plain,
gets instead of the widget."""

from __future__ import annotations

from typing import Any

from ._format import clock, format_bytes, format_count, format_rate, short_id
from ._monitor_html import MAX_ACTORS, MAX_FUNCTIONS, STATE_HEADERS, TASK_STATES, failure_title


def render(
    snapshot: dict[str, Any] | None, *, status: str, rate: float | None, metrics_text: str = ""
) -> str:
    if snapshot is None:
        return f"Shoal cluster ({status})"
    nodes = snapshot.get("nodes") or []
    alive = [n for n in nodes if n.get("alive")]
    cpus = sum((n.get("resources_total") or {}).get("CPU", 0) for n in alive)
    workers = (snapshot.get("workers") or {}).get("total", 0)
    lines = [
        f"Shoal cluster · {len(alive)} node{'s' if len(alive) != 1 else ''} · {cpus:g} CPUs · "
        f"{workers} workers · at {clock(snapshot.get('time'))} ({status})"
    ]
    for node in nodes:
        name = short_id(node.get("node_id")) + (" head" if node.get("is_head") else "")
        if not node.get("alive"):
            lines.append(f"  node {name}: dead ({node.get('death_reason') or '?'})")
            continue
        cpu = node.get("cpu_percent")
        total = node.get("resources_total") or {}
        free = node.get("resources_available") or {}
        used = total.get("CPU", 0) - free.get("CPU", 0)
        lines.append(
            f"  node {name}: CPU {'?' if cpu is None else f'{cpu:.0f}%'}, "
            f"memory {node.get('memory_percent') or 0:.0f}%, "
            f"store {format_bytes(node.get('object_store_used') or 0)} / "
            f"{format_bytes(node.get('object_store_capacity'))}, "
            f"CPUs in use {used:g}/{total.get('CPU', 0):g}, workers {node.get('workers') or 0}"
        )
    tasks = snapshot.get("tasks") or {}
    by_state = tasks.get("by_state") or {}
    counts = ", ".join(
        f"{h} {format_count(by_state.get(s, 0))}"
        for s, h in zip(TASK_STATES, STATE_HEADERS, strict=True)
    )
    rate_text = f", {format_rate(rate)} ending" if rate is not None else ""
    lines.append(f"Tasks: {counts}{rate_text}")
    by_name = tasks.get("by_name") or {}
    names = sorted(
        by_name, key=lambda n: (-by_name[n].get("RUNNING", 0), -sum(by_name[n].values()))
    )
    for name in names[:MAX_FUNCTIONS]:
        row = by_name[name]
        parts = ", ".join(
            f"{h} {format_count(row[s])}"
            for s, h in zip(TASK_STATES, STATE_HEADERS, strict=True)
            if row.get(s)
        )
        lines.append(f"  {name}: {parts}")
    actors = snapshot.get("actors") or []
    if actors:
        counts_text = ", ".join(
            f"{n} {s.lower()}" for s, n in sorted((snapshot.get("actor_counts") or {}).items())
        )
        lines.append(f"Actors: {counts_text}")
        for actor in actors[:MAX_ACTORS]:
            lines.append(
                f"  {actor.get('class_name')} {actor.get('name') or ''} {actor.get('state')} "
                f"restarts {actor.get('restarts') or 0} node {short_id(actor.get('node_id'))} "
                f"pid {actor.get('pid') or ''}".replace("  ", " ")
            )
    objects = snapshot.get("objects") or {}
    lines.append(
        f"Objects: {objects.get('objects', 0)} in the store, "
        f"{format_bytes(objects.get('used', 0))} of {format_bytes(objects.get('capacity'))}, "
        f"{format_bytes(objects.get('spilled') or 0)} spilled"
    )
    for obj in objects.get("largest") or []:
        lines.append(
            f"  {short_id(obj.get('object_id'), 16)} {format_bytes(obj.get('size'))} "
            f"{obj.get('owner') or ''}"
        )
    if metrics_text:
        lines.append(metrics_text.rstrip("\n"))
    failures = snapshot.get("failures") or []
    if failures:
        lines.append("Latest failures (newest first):")
        lines.extend(f"  {failure_title(f)}" for f in failures)
    return "\n".join(lines)
