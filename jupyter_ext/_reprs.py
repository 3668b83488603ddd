"""Rich representations: ObjectRef, ActorHandle and the cluster, as HTML and text.

Invariant: a repr never raises and never waits on the cluster, except the cluster summary,
which asks the head once with a short timeout. Refs and handles are described from what
this process already knows; when the cluster is gone, they say so.

This module must not import IPython: ``_repr_html_`` methods of the runtime call it.
"""

from __future__ import annotations

import html
import os
from typing import Any

_STATE_COLORS = {
    "pending": "#b26b00",
    "ready": "#2e7d32",
    "failed": "#c62828",
    "alive": "#2e7d32",
    "dead": "#c62828",
    "unknown": "#6b6b6b",
}
_BADGE = (
    "padding:1px 6px;border-radius:8px;color:white;background:{color};"
    "font-size:85%;font-family:var(--jp-ui-font-family, sans-serif)"
)


def _badge(state: str) -> str:
    color = _STATE_COLORS.get(state.split()[0].rstrip(":").lower(), "#6b6b6b")
    return f'<span style="{_BADGE.format(color=color)}">{html.escape(state)}</span>'


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def _safe(render: Any, fallback: str, *args: Any) -> str:
    try:
        return str(render(*args))
    except Exception:
        return f"<code>{html.escape(fallback)}</code>"


# -- ObjectRef -------------------------------------------------------------------------
def ref_info(ref: Any) -> dict[str, Any]:
    """What this process knows about a ref: state (pending/ready/failed/unknown), size,
    where, and the error type of a failed one."""
    from shoal import _ids
    from shoal._serialization import FLAG_ERROR, deserialize

    core = ref._core
    oid = ref.binary()
    info: dict[str, Any] = {"state": "unknown", "size": None, "where": "", "error": ""}
    if core is None or getattr(core, "closed", False):
        info["where"] = "the cluster it belonged to is gone"
        return info
    value = core.lookup(oid)
    if value is None:
        if _ids.owner_of(oid) == core.worker_id:
            info["state"] = "pending"
            info["where"] = "not computed yet"
        else:
            info["where"] = "owned by another process; not read here yet"
        return info
    kind = value[0]
    if kind == "x":
        info["state"] = "failed"
        info["error"] = _error_name(value[1])
        info["where"] = "failed before it had a value"
        return info
    flags = value[-1] if kind == "s" else value[1].flags
    if kind == "v":
        sv = value[1]
        info["size"] = sv.nbytes
        info["where"] = "in this process (a small value)"
        if flags & FLAG_ERROR:
            try:
                info["error"] = _error_name(deserialize(sv.data, sv.buffers))
            except Exception:
                info["error"] = "error"
    else:
        path = value[1]
        try:
            info["size"] = os.path.getsize(path)
        except (OSError, TypeError):
            pass
        node = getattr(core, "node_id", b"").hex()[:12]
        if getattr(core, "client", False):
            info["where"] = "in the cluster's object store"
        else:
            info["where"] = f"object store of node {node}" + (
                " (spilled to disk)" if "/dev/shm/" not in str(path) else ""
            )
    info["state"] = "failed" if flags & FLAG_ERROR else "ready"
    return info


def _error_name(exc: Any) -> str:
    name = getattr(exc, "cause_type_name", "") or type(exc).__name__
    return str(name)


def ref_html(ref: Any) -> str:
    return _safe(_ref_html, repr(ref), ref)


def _ref_html(ref: Any) -> str:
    info = ref_info(ref)
    state = info["state"]
    if state == "failed" and info["error"]:
        state = f"failed: {info['error']}"
    # The whole id: refs of one owner share their leading half.
    parts = [f"<code>ObjectRef({html.escape(ref.hex())})</code>", _badge(state)]
    if info["size"] is not None:
        parts.append(html.escape(format_bytes(info["size"])))
    if info["where"]:
        parts.append(html.escape(info["where"]))
    return "<span>" + " · ".join(parts) + "</span>"


# -- ActorHandle -----------------------------------------------------------------------
def actor_info(handle: Any) -> dict[str, Any]:
    from shoal import _worker_context

    meta = getattr(handle, "_meta", {}) or {}
    info: dict[str, Any] = {
        "cls": meta.get("cls", "") or "?",
        "name": meta.get("name", ""),
        "state": "unknown",
        "node": "",
        "reason": "",
    }
    core = _worker_context.maybe_core()
    if core is None or getattr(core, "closed", False):
        info["node"] = "the cluster is gone"
        return info
    st = core.actors.actors.get(handle._actor_id)
    if st is None:
        info["state"] = "not used here yet"
        return info
    info["state"] = {"PENDING": "pending", "ALIVE": "alive", "DEAD": "dead"}.get(
        st.state, str(st.state).lower()
    )
    if st.death is not None:
        info["reason"] = getattr(st.death, "reason", "") or ""
    address = str(st.address or "")
    session = getattr(core, "session_path", "") or "\0"
    if address.startswith("ipc://") and session in address:
        info["node"] = f"this node ({core.node_id.hex()[:12]})"
    elif address.startswith("tcp://"):
        info["node"] = "host " + address[len("tcp://") :].rsplit(":", 1)[0]
    return info


def actor_html(handle: Any) -> str:
    return _safe(_actor_html, repr(handle), handle)


def _actor_html(handle: Any) -> str:
    info = actor_info(handle)
    head = f"<code>ActorHandle({html.escape(info['cls'])}, {html.escape(handle.actor_id[:12])}…)</code>"
    parts = [head]
    if info["name"]:
        parts.append(f"name <code>{html.escape(info['name'])}</code>")
    state = info["state"]
    if info["reason"]:
        state += f" ({info['reason']})"
    parts.append(_badge(state))
    if info["node"]:
        parts.append(html.escape(info["node"]))
    return f'<span title="{html.escape(handle.actor_id)}">' + " · ".join(parts) + "</span>"


# -- the cluster -----------------------------------------------------------------------
_SHOWN = ("CPU", "GPU", "memory", "object_store_memory")


def cluster_snapshot(timeout: float = 2.0) -> dict[str, Any] | None:
    """Facts about the cluster this process is connected to (None when there is none):
    one request to the head, bounded by ``timeout``."""
    from shoal import _api
    from shoal._protocol import Message, MsgType

    cluster = _api._cluster
    if cluster is None:
        return None
    core = cluster.core
    snapshot: dict[str, Any] = {
        "address": cluster.address,
        "session_dir": cluster.session_dir,
        "started_here": cluster.head is not None,
        "client": bool(getattr(core, "client", False)),
        "namespace": core.namespace,
        "node_id": core.node_id.hex(),
        "nodes": None,
        "error": "",
    }
    try:
        reply = core.request(Message(MsgType.CLUSTER_INFO, {}), timeout=timeout)
        snapshot["nodes"] = list(reply.body["nodes"])
    except Exception as exc:
        snapshot["error"] = f"the head did not answer: {exc}"
    return snapshot


def _resource_text(node: dict[str, Any]) -> dict[str, str]:
    total = node.get("Resources", {}) or {}
    free = node.get("Available", {}) or {}
    out = {}
    for key in ("CPU", "GPU"):
        if total.get(key):
            out[key] = f"{free.get(key, 0):g} / {total[key]:g} free"
        else:
            out[key] = "0"
    store = node.get("ObjectStore") or {}
    if store:
        out["store"] = (
            f"{format_bytes(store.get('used', 0))} / {format_bytes(store.get('capacity'))}"
        )
    else:
        out["store"] = format_bytes(total.get("object_store_memory"))
    out["memory"] = format_bytes(total.get("memory"))
    custom = [
        f"{k}={v:g}"
        for k, v in sorted(total.items())
        if k not in _SHOWN and not k.startswith(("node:", "bundle_group")) and "_group_" not in k
    ]
    out["custom"] = ", ".join(custom)
    return out


def _totals(nodes: list[dict[str, Any]]) -> str:
    alive = [n for n in nodes if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
    store = sum(n.get("Resources", {}).get("object_store_memory", 0) for n in alive)
    dead = len(nodes) - len(alive)
    text = f"{len(alive)} node{'s' if len(alive) != 1 else ''}"
    if dead:
        text += f" ({dead} dead)"
    return f"{text}, {cpus:g} CPUs, {gpus:g} GPUs, object store {format_bytes(store)}"


def _how(snapshot: dict[str, Any]) -> str:
    if snapshot["client"]:
        return "connected in client-server mode"
    if snapshot["started_here"]:
        return "started by this kernel" if _in_ipython() else "started by this process"
    return "joined"


def _in_ipython() -> bool:
    import sys

    ipython = sys.modules.get("IPython")
    try:
        return ipython is not None and ipython.get_ipython() is not None
    except Exception:
        return False


def cluster_text(snapshot: dict[str, Any] | None) -> str:
    if snapshot is None:
        return "No Shoal cluster is connected. Start one with %cluster start."
    lines = [f"Shoal cluster at {snapshot['address']} ({_how(snapshot)})"]
    nodes = snapshot["nodes"]
    if nodes is None:
        lines.append(f"  {snapshot['error']}")
        return "\n".join(lines)
    lines.append(f"  {_totals(nodes)}")
    for node in nodes:
        res = _resource_text(node)
        flags = " (head)" if node.get("IsHead") else ""
        if node.get("NodeID") == snapshot["node_id"]:
            flags += " (this driver's node)"
        state = "alive" if node.get("Alive") else f"dead: {node.get('DeathReason') or '?'}"
        line = (
            f"  node {node.get('NodeID', '')[:12]}{flags}  {node.get('NodeManagerAddress', '')}  "
            f"{state}  CPU {res['CPU']}  GPU {res['GPU']}  object store {res['store']}  "
            f"workers {node.get('Workers', 0)}"
        )
        if res["custom"]:
            line += f"  {res['custom']}"
        lines.append(line)
    return "\n".join(lines)


_TABLE = "border-collapse:collapse;margin-top:4px"
_CELL = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd"


def cluster_html(snapshot: dict[str, Any] | None) -> str:
    if snapshot is None:
        return "<b>Shoal</b>: no cluster is connected. Start one with <code>%cluster start</code>."
    e = html.escape
    head = f"<b>Shoal cluster</b> at <code>{e(snapshot['address'])}</code> · {e(_how(snapshot))}"
    nodes = snapshot["nodes"]
    if nodes is None:
        return f"<div>{head}<br>{e(snapshot['error'])}</div>"
    columns = [
        "node",
        "address",
        "state",
        "CPU",
        "GPU",
        "memory",
        "object store",
        "workers",
        "resources",
    ]
    rows = ["<tr>" + "".join(f'<th style="{_CELL}">{c}</th>' for c in columns) + "</tr>"]
    for node in nodes:
        res = _resource_text(node)
        name = f"<code>{e(node.get('NodeID', '')[:12])}</code>"
        if node.get("IsHead"):
            name += " head"
        state = (
            _badge("alive")
            if node.get("Alive")
            else _badge(f"dead: {node.get('DeathReason') or '?'}")
        )
        cells = [
            name,
            e(str(node.get("NodeManagerAddress", ""))),
            state,
            e(res["CPU"]),
            e(res["GPU"]),
            e(res["memory"]),
            e(res["store"]),
            e(str(node.get("Workers", 0))),
            e(res["custom"]),
        ]
        rows.append("<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in cells) + "</tr>")
    return (
        f'<div class="shoal-cluster">{head}<br>{e(_totals(nodes))}'
        f'<table style="{_TABLE}">{"".join(rows)}</table></div>'
    )


class ClusterSummary:
    """What ``%cluster start`` and ``%cluster status`` show: a snapshot, as HTML and text."""

    def __init__(self, snapshot: dict[str, Any] | None) -> None:
        self.snapshot = snapshot

    def __repr__(self) -> str:
        return _safe(cluster_text, "ClusterSummary", self.snapshot)

    def _repr_html_(self) -> str:
        return _safe(cluster_html, "ClusterSummary", self.snapshot)


def context_html(context: dict[str, Any]) -> str:
    """``init()``'s return value: the live cluster if it is still the connected one."""
    return _safe(_context_html, "ClusterContext", context)


def _context_html(context: dict[str, Any]) -> str:
    from shoal import _api

    cluster = _api._cluster
    if cluster is None or cluster.address != context.get("address"):
        return (
            f"<b>Shoal cluster</b> at <code>{html.escape(str(context.get('address')))}</code> · "
            + _badge("disconnected")
        )
    return cluster_html(cluster_snapshot(timeout=1.0))
