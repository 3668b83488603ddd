"""Scheduling strategies for ``scheduling_strategy=`` (Ray's names and meanings).

    "DEFAULT"    the default policy: the local node if it has room, else the least loaded;
                 unlike leaving the option out, it also stops a parent's placement group
                 from being captured
    "SPREAD"     round robin over the nodes with room
    NodeAffinitySchedulingStrategy(node_id, soft)       a given node
    PlacementGroupSchedulingStrategy(pg, bundle_index)  a placement group's bundle

``strategy_to_wire`` turns any of these into the small dict the scheduler receives.
"""

from __future__ import annotations

import re
from typing import Any

from .placement_group import PlacementGroup

NODE_ID_SIZE = 16
_HEX_NODE_ID = re.compile(f"[0-9a-f]{{{2 * NODE_ID_SIZE}}}")


class PlacementGroupSchedulingStrategy:
    """Run a task or actor in a placement group.

    Args:
        placement_group: the group (a handle from ``placement_group()``).
        placement_group_bundle_index: the bundle to use, or -1 (the default) for any
            bundle of the group with room.
        placement_group_capture_child_tasks: whether tasks and actors this one creates,
            without a strategy of their own, run in the same group. None means False.
    """

    def __init__(
        self,
        placement_group: PlacementGroup,
        placement_group_bundle_index: int = -1,
        placement_group_capture_child_tasks: bool | None = None,
    ) -> None:
        if not isinstance(placement_group, PlacementGroup):
            raise TypeError(
                "placement_group must be a PlacementGroup (from placement_group(...)), "
                f"got {type(placement_group).__name__}"
            )
        index = placement_group_bundle_index
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"placement_group_bundle_index must be an int, got {type(index).__name__}"
            )
        if index < -1:
            raise ValueError(
                f"placement_group_bundle_index must be -1 (any bundle) or a bundle index "
                f">= 0, got {index}"
            )
        count = placement_group.bundle_count
        if count and index >= count:
            raise ValueError(
                f"placement_group_bundle_index {index} is out of range: the placement group "
                f"has {count} bundle{'s' if count != 1 else ''} (indexes 0 to {count - 1}, "
                "or -1 for any)"
            )
        capture = placement_group_capture_child_tasks
        if capture is not None and not isinstance(capture, bool):
            raise TypeError(
                f"placement_group_capture_child_tasks must be True, False or None, got {capture!r}"
            )
        self.placement_group = placement_group
        self.placement_group_bundle_index = index
        self.placement_group_capture_child_tasks = capture

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": "pg",
            "pg": self.placement_group.id.hex(),
            "bundle": self.placement_group_bundle_index,
            "capture": bool(self.placement_group_capture_child_tasks),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroupSchedulingStrategy) and (
            other.to_wire() == self.to_wire()
        )

    def __hash__(self) -> int:
        return hash(tuple(self.to_wire().items()))

    def __repr__(self) -> str:
        return (
            f"PlacementGroupSchedulingStrategy(placement_group={self.placement_group.id.hex()}, "
            f"placement_group_bundle_index={self.placement_group_bundle_index}, "
            f"placement_group_capture_child_tasks={self.placement_group_capture_child_tasks})"
        )


class NodeAffinitySchedulingStrategy:
    """Run a task or actor on a given node.

    Args:
        node_id: the node's hex id (``ray.get_runtime_context().get_node_id()``, or the
            ``NodeID`` of ``ray.nodes()``).
        soft: if the node is gone, or could never hold the task, False fails the task and
            True runs it elsewhere. While the node lives and could hold it, the task runs
            only there, waiting for room if need be.
        _spill_on_unavailable: (soft only) run elsewhere also when the node merely has no
            room now, instead of waiting for it.
        _fail_on_unavailable: (hard only) fail at once when the node has no room now,
            instead of waiting.
    """

    def __init__(
        self,
        node_id: str,
        soft: bool,
        _spill_on_unavailable: bool = False,
        _fail_on_unavailable: bool = False,
    ) -> None:
        if isinstance(node_id, bytes) and len(node_id) == NODE_ID_SIZE:
            node_id = node_id.hex()  # a binary id: accepted, as Ray accepts NodeID objects
        if not isinstance(node_id, str):
            raise TypeError(
                f"node_id must be a node's hex id (a str), got {type(node_id).__name__}"
            )
        if not _HEX_NODE_ID.fullmatch(node_id.lower()):
            raise ValueError(
                f"node_id must be a node's hex id, {2 * NODE_ID_SIZE} hex digits "
                f"(see ray.get_runtime_context().get_node_id()), got {node_id!r}"
            )
        for arg, value in (
            ("soft", soft),
            ("_spill_on_unavailable", _spill_on_unavailable),
            ("_fail_on_unavailable", _fail_on_unavailable),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be True or False, got {value!r}")
        if _spill_on_unavailable and not soft:
            raise ValueError(
                "_spill_on_unavailable=True needs soft=True: a hard affinity never runs elsewhere"
            )
        if _fail_on_unavailable and soft:
            raise ValueError(
                "_fail_on_unavailable=True needs soft=False: a soft affinity runs elsewhere "
                "rather than fail"
            )
        self.node_id = node_id.lower()
        self.soft = soft
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": "node",
            "node": self.node_id,
            "soft": self.soft,
            "spill": self._spill_on_unavailable,
            "fail": self._fail_on_unavailable,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeAffinitySchedulingStrategy) and (
            other.to_wire() == self.to_wire()
        )

    def __hash__(self) -> int:
        return hash(tuple(self.to_wire().items()))

    def __repr__(self) -> str:
        extra = ", _spill_on_unavailable=True" if self._spill_on_unavailable else ""
        extra += ", _fail_on_unavailable=True" if self._fail_on_unavailable else ""
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft}{extra})"


SchedulingStrategyT = None | str | PlacementGroupSchedulingStrategy | NodeAffinitySchedulingStrategy

_NAMED = {"DEFAULT": {"kind": "default"}, "SPREAD": {"kind": "spread"}}


def strategy_to_wire(strategy: Any) -> dict[str, Any] | None:
    """The scheduler's form of a ``scheduling_strategy`` option.

    None (the option left out) stays None: the task may still run in a placement group
    captured from its parent. "DEFAULT" is ``{"kind": "default"}`` and does not capture.
    """
    if strategy is None:
        return None
    if isinstance(strategy, str):
        if strategy in _NAMED:
            return dict(_NAMED[strategy])
        hint = ""
        if strategy in ("PACK", "STRICT_PACK", "STRICT_SPREAD"):
            hint = (
                f"; {strategy} is a placement group strategy: create a group with "
                f"placement_group(bundles, strategy={strategy!r}) and pass "
                "PlacementGroupSchedulingStrategy(pg)"
            )
        raise ValueError(
            f"scheduling_strategy must be 'DEFAULT', 'SPREAD' or a strategy object, "
            f"got {strategy!r}{hint}"
        )
    if isinstance(strategy, (PlacementGroupSchedulingStrategy, NodeAffinitySchedulingStrategy)):
        return strategy.to_wire()
    raise TypeError(
        "scheduling_strategy must be None, 'DEFAULT', 'SPREAD', a "
        "NodeAffinitySchedulingStrategy or a PlacementGroupSchedulingStrategy (from "
        f"shoal.util.scheduling_strategies), got {type(strategy).__name__}"
    )
