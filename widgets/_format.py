"""Small pieces the monitor and the progress bar share: numbers as text, bars as HTML.

Invariant: every text that came from the cluster (function and actor names, error
messages, tracebacks, call sites) goes through ``esc`` before it is put in HTML: the
notebook's HTML widget sets ``innerHTML``, so anything unescaped would be markup.
"""

from __future__ import annotations

import html
import time
from typing import Any

from shoal.jupyter_ext._reprs import format_bytes

__all__ = ["bar", "esc", "format_bytes", "format_count", "format_duration", "format_rate"]

esc = html.escape

# JupyterLab's theme variables, with fallbacks for other frontends (light theme).
FONT = (
    "font-family:var(--jp-ui-font-family,sans-serif);font-size:var(--jp-ui-font-size1,13px);"
    "color:var(--jp-ui-font-color1,#222)"
)
MUTED = "color:var(--jp-ui-font-color2,#666)"
TRACK = "var(--jp-layout-color3,#ddd)"
BORDER = "var(--jp-border-color2,#ddd)"

STATE_COLORS = {
    "PENDING_ARGS": "#9e9e9e",
    "SUBMITTED": "#f9a825",
    "RUNNING": "#1e88e5",
    "FINISHED": "#43a047",
    "FAILED": "#e53935",
    "CANCELLED": "#8e24aa",
    "ALIVE": "#43a047",
    "PENDING_CREATION": "#f9a825",
    "DEAD": "#e53935",
}


def format_count(n: float) -> str:
    return f"{int(n):,}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def format_rate(per_second: float) -> str:
    if per_second >= 100:
        return f"{per_second:,.0f}/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    return f"{per_second:.2f}/s"


def clock(epoch: float | None) -> str:
    """HH:MM:SS of an epoch time, in this machine's zone."""
    if not epoch:
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def percent(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return max(0.0, min(100.0, 100.0 * part / whole))


def bar(
    pct: float | None,
    color: str = "#1e88e5",
    width: int = 80,
    label: str = "",
    warn: bool = False,
) -> str:
    """A horizontal bar filled to ``pct`` percent (an empty track when unknown). With
    ``warn``, a bar past 90% turns red (memory running out, not CPUs kept busy)."""
    fill = 0.0 if pct is None else pct
    if warn and pct is not None and pct >= 90:
        color = "#e53935"
    text = label if label else ("?" if pct is None else f"{pct:.0f}%")
    return (
        f'<span style="display:inline-block;width:{width}px;height:9px;background:{TRACK};'
        f'border-radius:3px;overflow:hidden;vertical-align:middle">'
        f'<span style="display:block;width:{fill:.1f}%;height:100%;background:{color}">'
        f"</span></span> <span>{esc(text)}</span>"
    )


def stacked_bar(parts: list[tuple[float, str, str]], width: int = 320) -> str:
    """One bar in several colours: ``(amount, color, title)`` each, scaled to their sum."""
    total = sum(amount for amount, _, _ in parts)
    spans = []
    for amount, color, title in parts:
        if amount <= 0 or total <= 0:
            continue
        spans.append(
            f'<span title="{esc(title)}" style="display:inline-block;height:100%;'
            f'width:{100.0 * amount / total:.2f}%;background:{color}"></span>'
        )
    return (
        f'<span style="display:inline-flex;width:{width}px;height:10px;background:{TRACK};'
        f'border-radius:3px;overflow:hidden;vertical-align:middle">{"".join(spans)}</span>'
    )


def badge(text: str, color: str) -> str:
    return (
        f'<span style="padding:0 6px;border-radius:8px;color:white;background:{color};'
        f'font-size:90%">{esc(text)}</span>'
    )


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table of cells that are already HTML."""
    cell = (
        f"padding:1px 10px 1px 0;text-align:left;border-bottom:1px solid {BORDER};"
        "white-space:nowrap"
    )
    head = "".join(f'<th style="{cell};font-weight:600">{esc(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="{cell}">{c}</td>' for c in row) + "</tr>" for row in rows
    )
    return (
        f'<table class="{cls}" style="border-collapse:collapse;margin:2px 0 6px 0">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def short_id(value: Any, n: int = 8) -> str:
    return str(value or "")[:n]
