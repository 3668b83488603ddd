"""Placement groups: reserve bundles of resources across nodes, all or nothing (Ray's API).

    pg = placement_group([{"CPU": 2}, {"CPU": 2, "GPU": 1}], strategy="PACK")
    ray.get(pg.ready())
    f.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 1)).remote()

This module holds the user-facing handle and the argument checks. The calls that talk to
the cluster are below the line marked "cluster calls"; the algorithms are in
``shoal._placement``.
"""

from __future__ import annotations

import math
from typing import Any

from .._placement import BUNDLE_RESOURCE, STRATEGIES
from .._resources import UNIT, Resources, to_fixed

PLACEMENT_GROUP_ID_SIZE = 16
_NIL_ID = b"\xff" * PLACEMENT_GROUP_ID_SIZE


class PlacementGroup:
    """A handle to a placement group.

    ``id`` is 16 bytes (``pg.id.hex()`` gives the hex id used in resource names);
    ``bundle_specs`` holds the bundles as the user gave them. Handles compare and hash by
    id, and pickle, so they can be passed to tasks.
    """

    __slots__ = ("bundle_specs", "id", "name", "strategy")

    def __init__(
        self,
        id: bytes,
        bundle_specs: list[dict[str, float]] | None = None,
        strategy: str = "PACK",
        name: str = "",
    ) -> None:
        if not isinstance(id, bytes) or len(id) != PLACEMENT_GROUP_ID_SIZE:
            raise ValueError(f"a placement group id is {PLACEMENT_GROUP_ID_SIZE} bytes, got {id!r}")
        self.id = id
        self.bundle_specs = [dict(b) for b in bundle_specs or []]
        self.strategy = strategy
        self.name = name

    @staticmethod
    def empty() -> PlacementGroup:
        """The handle that stands for "no placement group"."""
        return PlacementGroup(_NIL_ID)

    @property
    def is_empty(self) -> bool:
        return self.id == _NIL_ID

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> Any:
        """An ObjectRef that resolves to this handle once every bundle is reserved.

        Works with ``ray.get`` and ``ray.wait``:

            ray.get(pg.ready(), timeout=10)
            ready, _ = ray.wait([pg.ready()], timeout=0)
        """
        return _ready(self)

    def wait(self, timeout_seconds: float | int = 30) -> bool:
        """Wait up to ``timeout_seconds`` for the group to be placed; True if it was."""
        from .._api import wait

        done, _ = wait([self.ready()], timeout=timeout_seconds)
        return bool(done)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash((PlacementGroup, self.id))

    def __repr__(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return (
            f"PlacementGroup(id={self.id.hex()}, strategy={self.strategy}, "
            f"bundles={self.bundle_specs}{name})"
        )

    def __getstate__(self) -> tuple[bytes, list[dict[str, float]], str, str]:
        return self.id, self.bundle_specs, self.strategy, self.name

    def __setstate__(self, state: tuple[bytes, list[dict[str, float]], str, str]) -> None:
        self.id, self.bundle_specs, self.strategy, self.name = state


# -- argument checks -----------------------------------------------------------------------
def validate_placement_group_args(
    bundles: Any,
    strategy: Any = "PACK",
    name: Any = "",
    lifetime: Any = None,
    _max_cpu_fraction_per_node: Any = 1.0,
) -> tuple[list[Resources], str, str, str | None]:
    """Check ``placement_group()``'s arguments; return the bundles in fixed point.

    Returns ``(bundles_fixed, strategy, name, lifetime)``. Zero amounts are dropped from
    the fixed bundles. Errors about the bundles are ``ValueError`` (as in Ray, so
    ``except ValueError`` catches every bad bundle) and name the bundle index and the
    resource.
    """
    if not isinstance(bundles, list):
        raise ValueError(
            "bundles must be a list of resource dicts, e.g. [{'CPU': 1}, {'GPU': 1}], "
            f"got {type(bundles).__name__}"
        )
    if not bundles:
        raise ValueError(
            "bundles must not be empty: a placement group reserves at least one bundle, "
            "e.g. [{'CPU': 1}]"
        )
    fixed = [_check_bundle(i, b) for i, b in enumerate(bundles)]
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"invalid placement group strategy {strategy!r}; "
            f"the strategies are {', '.join(STRATEGIES)}"
        )
    if not isinstance(name, str):
        raise TypeError(f"the placement group name must be a string, got {type(name).__name__}")
    if lifetime is not None and lifetime != "detached":
        raise ValueError(
            "the placement group lifetime must be None (it goes when its creator goes) or "
            f"'detached' (it stays until removed), got {lifetime!r}"
        )
    frac = _max_cpu_fraction_per_node
    if isinstance(frac, bool) or not isinstance(frac, (int, float)):
        raise TypeError(f"_max_cpu_fraction_per_node must be a number, got {type(frac).__name__}")
    if not 0 < frac <= 1:
        raise ValueError(f"_max_cpu_fraction_per_node must be above 0 and at most 1, got {frac!r}")
    return fixed, strategy, name, lifetime


def _check_bundle(i: int, bundle: Any) -> Resources:
    if not isinstance(bundle, dict):
        raise ValueError(
            f"bundle {i} must be a dict of resource name to amount, "
            f"got {type(bundle).__name__}: {bundle!r}"
        )
    if not bundle:
        raise ValueError(
            f"bundle {i} is empty: each bundle reserves at least one resource, e.g. {{'CPU': 1}}"
        )
    out: Resources = {}
    for res, value in bundle.items():
        if not isinstance(res, str) or not res:
            raise ValueError(f"bundle {i}: resource names must be non-empty strings, got {res!r}")
        if res == BUNDLE_RESOURCE:
            raise ValueError(
                f"bundle {i}: the resource name {res!r} is reserved for placement groups"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"bundle {i}: the amount of {res!r} must be a number, "
                f"got {type(value).__name__}: {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"bundle {i}: the amount of {res!r} must be a finite number >= 0, got {value!r}"
            )
        amount = _fixed(res, value)
        if value > 0 and amount == 0:
            smallest = "1 byte" if res in ("memory", "object_store_memory") else f"{1 / UNIT:g}"
            raise ValueError(
                f"bundle {i}: the amount of {res!r} is too small to reserve: "
                f"{value!r} is below {smallest}"
            )
        if amount:
            out[res] = amount
    if not out:
        raise ValueError(
            f"bundle {i} reserves nothing: give at least one resource an amount above 0, "
            f"got {bundle!r}"
        )
    return out


def _fixed(name: str, value: float) -> int:
    # Memory amounts are whole bytes, as for tasks' ``memory`` option.
    if name in ("memory", "object_store_memory"):
        return int(value) * UNIT
    return to_fixed(value)


# -- cluster calls -------------------------------------------------------------------------
# -- cluster calls -------------------------------------------------------------------


def _core() -> Any:
    from .._api import _auto_init

    return _auto_init()


def placement_group(
    bundles: list[dict[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: str | None = None,
    _max_cpu_fraction_per_node: float = 1.0,
) -> PlacementGroup:
    """Reserve ``bundles`` on the cluster, asynchronously; returns the group's handle.

    Args:
        bundles: a list of dicts of resource name to amount, e.g. ``[{"CPU": 2}, {"GPU": 1}]``;
            each bundle must fit on one node.
        strategy: how bundles spread over nodes:
            "PACK": as few nodes as possible (may use several);
            "SPREAD": different nodes where possible (may share);
            "STRICT_PACK": all on one node;
            "STRICT_SPREAD": each on a different node.
        name: a name to find the group by with ``get_placement_group``.
        lifetime: None (removed when its creator exits) or "detached" (kept until
            ``remove_placement_group``).
        _max_cpu_fraction_per_node: (experimental) at most this fraction of each node's
            CPUs may be held by bundles of all groups; below 1, one CPU is always left out.

    Use ``pg.ready()`` or ``pg.wait()`` to know when the bundles are reserved. A group
    that no set of nodes of the cluster could ever hold raises ValueError at once.
    """
    import os

    from .._protocol import Message, MsgType

    fixed, strategy, name, lifetime = validate_placement_group_args(
        bundles, strategy, name, lifetime, _max_cpu_fraction_per_node
    )
    core = _core()
    pg_id = os.urandom(PLACEMENT_GROUP_ID_SIZE)
    reply = core.request(
        Message(
            MsgType.CREATE_PG,
            {
                "pg": pg_id,
                "b": fixed,
                "st": strategy,
                "name": name,
                "ns": core.namespace,
                "detached": lifetime == "detached",
                "frac": float(_max_cpu_fraction_per_node),
            },
        )
    )
    if reply.body.get("e"):
        raise ValueError(reply.body["e"])
    return PlacementGroup(pg_id, [dict(b) for b in bundles], strategy, name)


def _ready_task() -> Any:
    from .._remote_function import RemoteFunction

    global _READY
    if _READY is None:
        _READY = RemoteFunction(_group_is_ready, {"num_cpus": 0, "max_retries": 0})
    return _READY


_READY: Any = None


def _group_is_ready(pg: PlacementGroup) -> PlacementGroup:
    return pg


def _ready(pg: PlacementGroup) -> Any:
    """An ObjectRef that resolves to ``pg`` once all its bundles are reserved: a task
    that asks for nothing but a place in the group, as in Ray."""
    from .scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg)
    return _ready_task().options(scheduling_strategy=strategy).remote(pg)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Remove a placement group, asynchronously: its bundles are released and the tasks
    and actors running in it are killed."""
    from .._protocol import Message, MsgType

    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(
            f"remove_placement_group() takes a PlacementGroup, got {type(placement_group).__name__}"
        )
    _core().send_head(Message(MsgType.REMOVE_PG, {"pg": placement_group.id}))


def _info(body: dict[str, Any]) -> Any:
    from .._protocol import Message, MsgType

    return _core().request(Message(MsgType.PG_INFO, body)).body.get("info")


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The handle of the placement group with this name; ValueError if there is none."""
    core = _core()
    info = _info({"name": placement_group_name, "ns": core.namespace})
    if info is None:
        raise ValueError(
            f"no placement group named {placement_group_name!r} in namespace {core.namespace!r}"
        )
    return _from_info(info)


def _from_info(info: dict[str, Any]) -> PlacementGroup:
    bundles = [
        {k: v / UNIT for k, v in b.items()}
        for _, b in sorted(info["bundles"].items(), key=lambda kv: int(kv[0]))
    ]
    return PlacementGroup(
        bytes.fromhex(info["placement_group_id"]), bundles, info["strategy"], info["name"]
    )


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """The state of one placement group, or of all of them keyed by hex id.

    One group's entry has ``placement_group_id``, ``name``, ``bundles`` (index -> dict),
    ``bundles_to_node_id``, ``strategy`` and ``state`` ("PENDING", "CREATED", "REMOVED").
    """
    if placement_group is not None:
        info = _info({"pg": placement_group.id})
        return _readable(info) if info is not None else {}
    table = _info({})
    return {k: _readable(v) for k, v in table.items()}


def _readable(info: dict[str, Any]) -> dict[str, Any]:
    out = dict(info)
    out["bundles"] = {
        int(i): {k: v / UNIT for k, v in b.items()} for i, b in info["bundles"].items()
    }
    out["bundles_to_node_id"] = {int(i): n for i, n in info["bundles_to_node_id"].items()}
    return out


def get_current_placement_group() -> PlacementGroup | None:
    """The placement group the calling task or actor runs in, or None.

    None in a driver, and in a task that was not scheduled in a placement group.
    """
    from .. import _worker_context
    from .._placement import parse_group_resource

    resources = _worker_context.current.fixed_resources or {}
    for name in resources:
        parsed = parse_group_resource(name)
        if parsed is not None:
            info = _info({"pg": bytes.fromhex(parsed[2])})
            return _from_info(info) if info is not None else None
    return None
