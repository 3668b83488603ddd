"""The state API: what the cluster holds and does, as lists of plain dicts.

    shoal.state.list_objects()     objects in the object stores, with size, place, holders
    shoal.state.list_nodes()       nodes with their resources

Filters are ``(key, op, value)`` tuples with op ``"="`` or ``"!="``, as in Ray's state API.
"""

from __future__ import annotations

from typing import Any

from ._protocol import Message, MsgType

__all__ = ["list_nodes", "list_objects", "summarize_objects"]

Filter = tuple[str, str, Any]


def _apply(
    records: list[dict[str, Any]], filters: list[Filter] | None, limit: int | None
) -> list[dict[str, Any]]:
    for key, op, value in filters or ():
        if op not in ("=", "!="):
            raise ValueError(f"filter operator must be '=' or '!=', got {op!r}")
        if op == "=":
            records = [r for r in records if str(r.get(key)) == str(value)]
        else:
            records = [r for r in records if str(r.get(key)) != str(value)]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        records = records[:limit]
    return records


def list_objects(
    filters: list[Filter] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Objects in the store: object_id, size, place (shared_memory, spilled, inline),
    holders (processes holding a ref), owner, contained_in and call_site.

    Objects that never left their owner (small task results) are not in the store and are
    not listed.
    """
    from ._api import _auto_init

    core = _auto_init()
    reply = core.request(Message(MsgType.LIST_OBJECTS, {}))
    records = sorted(reply.body["objects"], key=lambda r: -r["size"])
    return _apply(records, filters, limit)


def summarize_objects() -> dict[str, Any]:
    """Totals of the object store: objects, bytes in shared memory, capacity, bytes spilled."""
    from ._api import _auto_init

    core = _auto_init()
    reply = core.request(Message(MsgType.LIST_OBJECTS, {}))
    return dict(reply.body["stats"])


def list_nodes(
    filters: list[Filter] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    from ._api import nodes

    return _apply(nodes(), filters, limit)
