"""The control store's placement group table: reserving bundles on nodes, all or nothing.

    CREATE_PG --> PENDING --place_bundles--> BUNDLE_RESERVE to each chosen node
        every node said yes --> CREATED: lease requests parked for the group go on
        a node said no      --> the others are released, PENDING, tried again later
    REMOVE_PG / owner gone (not detached) --> REMOVED: bundles released on their nodes,
        which kill the work running in them
    a node with bundles dies --> RESCHEDULING: its bundles are placed again around the
        others (their work there is retried by its owners), then CREATED again

A bundle, once reserved, is a set of resources named after its group on its node (see
``_placement.bundle_resources``); work in the group asks for those names, so ordinary
resource scheduling puts it in the right place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _placement

PENDING, CREATED, REMOVED = "PENDING", "CREATED", "REMOVED"
# A created group that lost bundles with their node: they are placed again around the
# others (Ray's name); work for the group waits meanwhile, as for a pending group.
RESCHEDULING = "RESCHEDULING"


@dataclass
class GroupRecord:
    pg_id: bytes
    bundles: list[dict[str, int]]
    strategy: str
    name: str
    namespace: str
    owner: bytes
    detached: bool
    max_cpu_fraction: float = 1.0
    state: str = PENDING
    placement: dict[int, bytes] = field(default_factory=dict)  # reserved bundles
    reserving: dict[int, bytes] = field(default_factory=dict)  # asked, not answered yet
    attempt: set[int] = field(default_factory=set)  # bundles asked for in this attempt
    failed: bool = False  # a node refused during the current attempt
    parked: list[Any] = field(default_factory=list)  # work waiting for the group

    def info(self) -> dict[str, Any]:
        return {
            "placement_group_id": self.pg_id.hex(),
            "name": self.name,
            "bundles": {i: dict(b) for i, b in enumerate(self.bundles)},
            "bundles_to_node_id": {i: n.hex() for i, n in sorted(self.placement.items())},
            "strategy": self.strategy,
            "state": self.state,
        }


def group_of(resources: dict[str, int]) -> bytes | None:
    """The placement group a resource request is for, if any."""
    for name in resources:
        parsed = _placement.parse_group_resource(name)
        if parsed is not None:
            return bytes.fromhex(parsed[2])
    return None
