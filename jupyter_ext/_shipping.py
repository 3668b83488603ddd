"""How a ``%%remote`` cell's variables travel, one entry per name.

    ("mod", "numpy")              a module: imported again by name on the other side
    ("sv", data, [buffers])       a value pickled here, on its own (buffers out of band)
    ("val", value)                a value holding ObjectRefs: left to Shoal's own
                                  serialization, which keeps track of the refs inside
    ("put", ref)                  a large value, put in the object store (driver side only)

Each name is pickled on its own so that a value that cannot be pickled, or cannot be
unpickled on the other side (its class lives in a module the cluster lacks), is reported
by its name and does not take the others down with it.

This module runs in workers too: it must not import IPython.
"""

from __future__ import annotations

import importlib
import pickle
import types
from typing import Any

from shoal import _config
from shoal._serialization import deserialize, serialize

Entry = tuple[Any, ...]


class ShippingError(Exception):
    """A variable that cannot be sent: carries the variable's name and the reason."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def module_name(value: Any) -> str | None:
    """The importable name of a module value, else None."""
    if isinstance(value, types.ModuleType):
        return value.__name__
    return None


def encode(name: str, value: Any, put_large: bool = False) -> Entry:
    """The entry for ``value``; raises ShippingError naming ``name`` if it cannot travel."""
    mod = module_name(value)
    if mod is not None:
        if mod == "__main__":
            raise ShippingError(name, "the module __main__ cannot be imported elsewhere")
        return ("mod", mod)
    try:
        sv = serialize(value)
    except Exception as exc:
        raise ShippingError(name, f"{type(value).__name__} cannot be pickled ({exc})") from exc
    if put_large and sv.nbytes >= _config.INLINE_THRESHOLD:
        return ("put", _put_serialized(value, sv, f"%%remote shipped {name}"))
    if sv.contained:
        return ("val", value)
    return ("sv", sv.data, [pickle.PickleBuffer(b) for b in sv.buffers])


def _put_serialized(value: Any, sv: Any, call_site: str) -> Any:
    """``shoal.put(value)`` without pickling the value a second time."""
    import shoal
    from shoal import _worker_context

    core = _worker_context.maybe_core()
    put_serialized = getattr(core, "put_serialized", None)
    if core is None or put_serialized is None:
        return shoal.put(value)
    oid = core.ids.put_id()
    put_serialized(oid, sv, call_site)
    return shoal.ObjectRef(oid, core)


def decode(name: str, entry: Entry) -> Any:
    """The value of an entry; raises ShippingError naming ``name`` if it cannot be loaded."""
    kind = entry[0]
    try:
        if kind == "mod":
            return importlib.import_module(entry[1])
        if kind == "sv":
            return deserialize(entry[1], list(entry[2]))
        if kind == "val":
            return entry[1]
        if kind == "put":
            import shoal

            return shoal.get(entry[1])
    except Exception as exc:
        raise ShippingError(name, f"{type(exc).__name__}: {exc}") from exc
    raise ShippingError(name, f"unknown entry kind {kind!r}")
