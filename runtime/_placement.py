"""Where bundles and tasks go across nodes: pure functions, no IO.

Placement groups (Ray's model):

    place_bundles(bundles, strategy, nodes)   bundle index -> node id, or None for "not now"
    feasible_ever(bundles, strategy, nodes)   why the group could never be placed, or None
    bundle_resources(pg_id, index, bundle)    what a node gains when it commits a bundle
    translate_request(request, pg_id, index)  a task's request rewritten to a group's names
    commit_bundle / release_bundle            the node-side bookkeeping of the two above

A committed bundle turns part of a node's resources into resources that only the group's
tasks can ask for. A bundle ``i`` of group ``G`` (``Ghex`` = its id in hex) reserving
``{"CPU": 2}`` takes 2 CPU out of the node's ``available`` and adds, to both ``total`` and
``available``::

    CPU_group_{i}_{Ghex}     2       this bundle only
    CPU_group_{Ghex}         2       any bundle of G on this node (summed over them)
    bundle_group_{i}_{Ghex}  1000    markers: every task of G asks for 0.001 of these,
    bundle_group_{Ghex}      1000    so that even a task asking for nothing lands on G

A task of G asking for bundle ``i`` asks for both the indexed and the wildcard names, so
that tasks asking for "any bundle" (index -1) can never take what bundle ``i`` holds.

Tasks outside placement groups:

    pick_node(request, nodes, local)              the default (hybrid) policy
    pick_spread_node(request, nodes, last_index)  the SPREAD strategy: round robin

Amounts are fixed point (see ``_resources``). Every function is deterministic: ties go to
the node with the most room left, then to the lowest node id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._resources import UNIT, Resources, add, describe, fits, subtract

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# The reserved resource name for the bundle markers; users may not put it in a bundle.
BUNDLE_RESOURCE = "bundle"
# What a committed bundle adds under each of its two marker names (Ray's 1000 units).
BUNDLE_MARKER_TOTAL = 1000 * UNIT
# What each task of a group asks for under the marker names (Ray's 0.001).
BUNDLE_MARKER_REQUEST = UNIT // 1000

_PREDEFINED = ("CPU", "GPU", "memory", "object_store_memory")
_GROUP_NAME = re.compile(r"^(?P<name>.+?)_group_(?:(?P<index>\d+)_)?(?P<pg>[0-9a-f]{32})$")


# -- nodes ---------------------------------------------------------------------------------
class NodeLike(Protocol):
    """What the functions here read of a node; ``alive`` (default True) is read if present."""

    @property
    def total(self) -> Resources: ...

    @property
    def available(self) -> Resources: ...


@dataclass
class NodeView:
    total: Resources
    available: Resources
    alive: bool = True


def _alive(nodes: Mapping[bytes, NodeLike]) -> list[bytes]:
    return sorted(nid for nid, node in nodes.items() if getattr(node, "alive", True))


# -- resource names ------------------------------------------------------------------------
def group_resource_name(name: str, pg_id: bytes, index: int = -1) -> str:
    """``{name}_group_{index}_{pg hex}``, or the wildcard ``{name}_group_{pg hex}`` for -1."""
    if index < -1:
        raise ValueError(f"bundle index must be >= -1, got {index}")
    if index == -1:
        return f"{name}_group_{pg_id.hex()}"
    return f"{name}_group_{index}_{pg_id.hex()}"


def parse_group_resource(resource: str) -> tuple[str, int, str] | None:
    """``(original name, bundle index or -1, group hex)`` of a group resource name, else None."""
    m = _GROUP_NAME.match(resource)
    if m is None:
        return None
    index = m.group("index")
    return m.group("name"), int(index) if index is not None else -1, m.group("pg")


def bundle_resources(pg_id: bytes, index: int, bundle: Resources) -> Resources:
    """What a node adds to its ``total`` and ``available`` when it commits bundle ``index``.

    Adding these with ``_resources.add`` for each committed bundle sums the wildcard names
    over the group's bundles on that node, as they should be.
    """
    if index < 0:
        raise ValueError(f"a committed bundle has an index >= 0, got {index}")
    out: Resources = {}
    for name, amount in bundle.items():
        if amount > 0:
            out[group_resource_name(name, pg_id, index)] = amount
            out[group_resource_name(name, pg_id)] = amount
    out[group_resource_name(BUNDLE_RESOURCE, pg_id, index)] = BUNDLE_MARKER_TOTAL
    out[group_resource_name(BUNDLE_RESOURCE, pg_id)] = BUNDLE_MARKER_TOTAL
    return out


def translate_request(request: Resources, pg_id: bytes, bundle_index: int) -> Resources:
    """A task's resource request, rewritten to be served by group ``pg_id``.

    With ``bundle_index`` -1 the task may run in any bundle of the group: it asks for the
    wildcard names only. With an index it asks for that bundle's names *and* the wildcard
    names, so the group's "any bundle" pool shrinks too. Either way it asks for a sliver of
    the bundle markers, which places even a request for nothing on a node of the group.
    All resources, ``memory`` included, must come out of the bundle: a task asking for
    memory runs in a group only if its bundle reserved memory, as in Ray.
    """
    if bundle_index < -1:
        raise ValueError(f"placement_group_bundle_index must be >= -1, got {bundle_index}")
    out: Resources = {}
    for name, amount in request.items():
        if amount <= 0:
            continue
        out[group_resource_name(name, pg_id)] = amount
        if bundle_index >= 0:
            out[group_resource_name(name, pg_id, bundle_index)] = amount
    out[group_resource_name(BUNDLE_RESOURCE, pg_id)] = BUNDLE_MARKER_REQUEST
    if bundle_index >= 0:
        out[group_resource_name(BUNDLE_RESOURCE, pg_id, bundle_index)] = BUNDLE_MARKER_REQUEST
    return out


def commit_bundle(
    total: Resources, available: Resources, pg_id: bytes, index: int, bundle: Resources
) -> None:
    """Node-side: reserve ``bundle`` out of ``available`` and add the group's resources."""
    subtract(available, bundle)
    gained = bundle_resources(pg_id, index, bundle)
    add(total, gained)
    add(available, gained)


def release_bundle(
    total: Resources, available: Resources, pg_id: bytes, index: int, bundle: Resources
) -> None:
    """Node-side undo of ``commit_bundle``: the group's names go, the resources come back.

    A group name whose total drops to zero is deleted from both dicts, even when leases
    still hold some of it: the caller must kill the group's workers and must not give
    their group resources back afterwards (the names are gone).
    """
    gained = bundle_resources(pg_id, index, bundle)
    subtract(total, gained)
    subtract(available, gained)
    for name in gained:
        if total.get(name, 0) <= 0:
            total.pop(name, None)
            available.pop(name, None)
    add(available, bundle)


def group_cpu_in_use(total: Resources) -> int:
    """CPU that committed bundles of any group hold on a node (its wildcard CPU names)."""
    used = 0
    for name, amount in total.items():
        parsed = parse_group_resource(name)
        if parsed is not None and parsed[0] == "CPU" and parsed[1] == -1:
            used += amount
    return used


def _without_group_resources(res: Resources) -> Resources:
    return {k: v for k, v in res.items() if parse_group_resource(k) is None}


def _cpu_cap(total_cpu: int, max_cpu_fraction: float) -> int | None:
    """The most CPU bundles may hold on a node under ``_max_cpu_fraction_per_node``.

    As in Ray: fraction x total, at least 1 CPU, and always at least 1 CPU left out.
    """
    if max_cpu_fraction >= 1:
        return None
    cap = max(int(max_cpu_fraction * total_cpu), UNIT)
    return min(cap, total_cpu - UNIT)


def _score(request: Resources, available: Resources) -> float:
    """Room left after placing, summed as fractions per resource; -1 when it does not fit.

    Ray's bundle scorer: a node with more of what is asked for left over scores higher.
    """
    if not fits(available, request):
        return -1.0
    score = 0.0
    for name, amount in request.items():
        have = available.get(name, 0)
        if have > 0:
            score += (have - amount) / have
    return score


def _best(request: Resources, free: Mapping[bytes, Resources], among: Iterable[bytes]) -> bytes:
    """The highest score, then the lowest id. ``among`` must be non-empty, all fitting."""
    return min(among, key=lambda nid: (-_score(request, free[nid]), nid))


def _total(bundles: Iterable[Resources]) -> Resources:
    out: Resources = {}
    for b in bundles:
        add(out, b)
    return out


def _order(bundles: Sequence[Resources], indices: Iterable[int]) -> list[int]:
    """Scarce and big first, as Ray does: GPU, custom resources, store, memory, CPU."""
    custom = sorted({n for b in bundles for n in b} - set(_PREDEFINED))

    def key(i: int) -> tuple[int, ...]:
        b = bundles[i]
        return (
            -b.get("GPU", 0),
            *(-b.get(n, 0) for n in custom),
            -b.get("object_store_memory", 0),
            -b.get("memory", 0),
            -b.get("CPU", 0),
            i,
        )

    return sorted(indices, key=key)


class _Plan:
    """Scratch state of one placement attempt: what is free on each live node."""

    def __init__(self, nodes: Mapping[bytes, NodeLike], max_cpu_fraction: float) -> None:
        self.ids = _alive(nodes)
        self.free = {nid: dict(nodes[nid].available) for nid in self.ids}
        self.caps = {
            nid: _cpu_cap(nodes[nid].total.get("CPU", 0), max_cpu_fraction) for nid in self.ids
        }
        self.group_cpu = {nid: group_cpu_in_use(nodes[nid].total) for nid in self.ids}

    def can_take(self, nid: bytes, bundle: Resources) -> bool:
        if not fits(self.free[nid], bundle):
            return False
        cap = self.caps[nid]
        cpu = bundle.get("CPU", 0)
        return cap is None or cpu == 0 or self.group_cpu[nid] + cpu <= cap

    def take(self, nid: bytes, bundle: Resources) -> None:
        subtract(self.free[nid], bundle)
        self.group_cpu[nid] += bundle.get("CPU", 0)


# -- placement groups ----------------------------------------------------------------------
def place_bundles(
    bundles: Sequence[Resources],
    strategy: str,
    nodes: Mapping[bytes, NodeLike],
    *,
    placed: Mapping[int, bytes] | None = None,
    max_cpu_fraction: float = 1.0,
) -> dict[int, bytes] | None:
    """Choose a node for every bundle, or None when that cannot be done with what is free.

    - STRICT_PACK: all bundles on one node.
    - PACK: on one node if one has room for all; else fill the roomiest node with as many
      bundles as fit, then the next, and so on (Ray's greedy).
    - STRICT_SPREAD: each bundle on a different node (an exact matching, so a bundle that
      fits only one node gets it).
    - SPREAD: each bundle on a node with no bundle of the group yet if one has room, else
      on the group's node with the fewest of its bundles.

    ``placed`` holds bundles that are already committed (when bundles are placed again
    after their node died): their resources are already out of ``available``; the others
    are placed around them (STRICT_PACK on the same node, STRICT_SPREAD elsewhere). The
    answer then covers all bundles. ``max_cpu_fraction`` is Ray's
    ``_max_cpu_fraction_per_node``: bundles of all groups together may hold at most that
    fraction of a node's CPUs (and never all of them).

    Only live nodes are used; the caller commits the answer (see ``commit_bundle``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; use one of {STRATEGIES}")
    placed = dict(placed or {})
    for i in placed:
        if not 0 <= i < len(bundles):
            raise ValueError(f"placed bundle index {i} is out of range for {len(bundles)} bundles")
    todo = [i for i in range(len(bundles)) if i not in placed]
    if not todo:
        return dict(sorted(placed.items()))
    plan = _Plan(nodes, max_cpu_fraction)
    if strategy == "STRICT_PACK":
        found = _strict_pack(bundles, todo, plan, placed)
    elif strategy == "PACK":
        found = _pack(bundles, todo, plan, placed)
    elif strategy == "STRICT_SPREAD":
        found = _strict_spread(bundles, todo, plan, placed)
    else:
        found = _spread(bundles, todo, plan, placed)
    if found is None:
        return None
    found.update(placed)
    return dict(sorted(found.items()))


def _fits_all(plan: _Plan, nid: bytes, bundles: Sequence[Resources], todo: list[int]) -> bool:
    """Whether node ``nid`` can take every bundle in ``todo`` (tried one by one)."""
    saved_free, saved_cpu = dict(plan.free[nid]), plan.group_cpu[nid]
    ok = True
    for i in todo:
        if not plan.can_take(nid, bundles[i]):
            ok = False
            break
        plan.take(nid, bundles[i])
    plan.free[nid], plan.group_cpu[nid] = saved_free, saved_cpu
    return ok


def _strict_pack(
    bundles: Sequence[Resources], todo: list[int], plan: _Plan, placed: dict[int, bytes]
) -> dict[int, bytes] | None:
    if placed:
        candidates = sorted(set(placed.values()) & set(plan.ids))
        if len(set(placed.values())) != 1 or not candidates:
            return None  # the group's node is gone: the whole group must move
    else:
        candidates = plan.ids
    need = _total(bundles[i] for i in todo)
    ok = [nid for nid in candidates if _fits_all(plan, nid, bundles, todo)]
    if not ok:
        return None
    best = _best(need, plan.free, ok)
    return {i: best for i in todo}


def _pack(
    bundles: Sequence[Resources], todo: list[int], plan: _Plan, placed: dict[int, bytes]
) -> dict[int, bytes] | None:
    out: dict[int, bytes] = {}
    left = _order(bundles, todo)
    # The group's own nodes first, fullest use of them being the point of PACK.
    for nid in sorted(set(placed.values()) & set(plan.ids)):
        for i in list(left):
            if plan.can_take(nid, bundles[i]):
                plan.take(nid, bundles[i])
                out[i] = nid
                left.remove(i)
    if not left:
        return out
    unused = [nid for nid in plan.ids if nid not in set(placed.values())]
    whole = [nid for nid in unused if _fits_all(plan, nid, bundles, left)]
    if whole:
        best = _best(_total(bundles[i] for i in left), plan.free, whole)
        out.update((i, best) for i in left)
        return out
    while left:
        first = bundles[left[0]]
        ok = [nid for nid in unused if plan.can_take(nid, first)]
        if not ok:
            return None
        nid = _best(first, plan.free, ok)
        for i in list(left):
            if plan.can_take(nid, bundles[i]):
                plan.take(nid, bundles[i])
                out[i] = nid
                left.remove(i)
        unused.remove(nid)
    return out


def _spread(
    bundles: Sequence[Resources], todo: list[int], plan: _Plan, placed: dict[int, bytes]
) -> dict[int, bytes] | None:
    out: dict[int, bytes] = {}
    count: dict[bytes, int] = {}
    for nid in placed.values():
        count[nid] = count.get(nid, 0) + 1
    for i in _order(bundles, todo):
        b = bundles[i]
        fresh = [nid for nid in plan.ids if nid not in count and plan.can_take(nid, b)]
        if fresh:
            nid = _best(b, plan.free, fresh)
        else:
            used = [nid for nid in plan.ids if nid in count and plan.can_take(nid, b)]
            if not used:
                return None
            nid = min(used, key=lambda n: (count[n], -_score(b, plan.free[n]), n))
        plan.take(nid, b)
        out[i] = nid
        count[nid] = count.get(nid, 0) + 1
    return out


def _strict_spread(
    bundles: Sequence[Resources], todo: list[int], plan: _Plan, placed: dict[int, bytes]
) -> dict[int, bytes] | None:
    taken = set(placed.values())
    ids = [nid for nid in plan.ids if nid not in taken]
    if len(todo) > len(ids):
        return None
    # One bundle per node, so whether a bundle fits a node does not depend on the others:
    # a bipartite matching. Preferences keep the answer the greedy one when that works.
    prefs = {i: _ranked(bundles[i], plan, ids) for i in todo}
    return _match(_order(bundles, todo), prefs)


def _ranked(bundle: Resources, plan: _Plan, ids: list[bytes]) -> list[bytes]:
    """The nodes that can take ``bundle``, best first."""
    ok = [nid for nid in ids if plan.can_take(nid, bundle)]
    return sorted(ok, key=lambda nid: (-_score(bundle, plan.free[nid]), nid))


def _match(order: list[int], prefs: dict[int, list[bytes]]) -> dict[int, bytes] | None:
    """A perfect matching of bundles to nodes by augmenting paths, or None."""
    owner: dict[bytes, int] = {}

    def assign(i: int, seen: set[bytes]) -> bool:
        # A free node first (the greedy choice), else move another bundle out of the way.
        for nid in prefs[i]:
            if nid not in owner:
                owner[nid] = i
                return True
        for nid in prefs[i]:
            if nid in seen:
                continue
            seen.add(nid)
            if assign(owner[nid], seen):
                owner[nid] = i
                return True
        return False

    for i in order:
        if not assign(i, set()):
            return None
    return {i: nid for nid, i in owner.items()}


def feasible_ever(
    bundles: Sequence[Resources],
    strategy: str,
    nodes: Mapping[bytes, NodeLike],
    *,
    max_cpu_fraction: float = 1.0,
) -> str | None:
    """Why the group could never be placed on these nodes, even all idle; None if it could.

    Judged on the live nodes' totals (other groups' resources left out, as if removed).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; use one of {STRATEGIES}")
    ids = _alive(nodes)
    if not ids:
        return "the cluster has no live nodes"
    totals = {nid: _without_group_resources(nodes[nid].total) for nid in ids}
    caps = {nid: _cpu_cap(totals[nid].get("CPU", 0), max_cpu_fraction) for nid in ids}
    n = len(bundles)

    def room(nid: bytes) -> Resources:
        cap = caps[nid]
        if cap is None:
            return totals[nid]
        return {**totals[nid], "CPU": cap}

    for i, b in enumerate(bundles):
        if any(fits(totals[nid], b) for nid in ids):
            if not any(fits(room(nid), b) for nid in ids):
                return (
                    f"bundle {i} ({describe(b)}) asks for more CPU than "
                    f"_max_cpu_fraction_per_node={max_cpu_fraction:g} lets bundles take "
                    "on any node"
                )
            continue
        for name, amount in sorted(b.items()):
            most = max(totals[nid].get(name, 0) for nid in ids)
            if amount > most:
                return (
                    f"bundle {i} ({describe(b)}) is bigger than every node: "
                    f"no node has more than {describe({name: most})}"
                )
        return f"bundle {i} ({describe(b)}) fits no single node; nodes have: " + _describe_nodes(
            totals
        )
    if strategy == "STRICT_PACK":
        need = _total(bundles)
        if not any(fits(room(nid), need) for nid in ids):
            return (
                f"STRICT_PACK puts all {n} bundles on one node, {describe(need)} in all, "
                "but no node is that big; nodes have: " + _describe_nodes(totals)
            )
    if strategy == "STRICT_SPREAD" and n > len(ids):
        return (
            f"STRICT_SPREAD puts each of the {n} bundles on a different node, "
            f"but the cluster has {len(ids)} live node{'s' if len(ids) != 1 else ''}"
        )
    idle = {nid: NodeView(dict(totals[nid]), dict(totals[nid])) for nid in ids}
    if place_bundles(bundles, strategy, idle, max_cpu_fraction=max_cpu_fraction) is None:
        return (
            f"the {n} bundles ({describe(_total(bundles))} in all) cannot be placed "
            f"{strategy} even on an idle cluster; nodes have: " + _describe_nodes(totals)
        )
    return None


def _describe_nodes(totals: Mapping[bytes, Resources], limit: int = 5) -> str:
    ids = sorted(totals)
    parts = [f"{nid.hex()[:8]}: {describe(totals[nid])}" for nid in ids[:limit]]
    if len(ids) > limit:
        parts.append(f"and {len(ids) - limit} more")
    return "; ".join(parts)


# -- single tasks --------------------------------------------------------------------------
def pick_spread_node(
    request: Resources, nodes: Mapping[bytes, NodeLike], last_index: int
) -> tuple[bytes, int] | None:
    """The SPREAD strategy: the next node, round robin, that has room for ``request`` now.

    Nodes are taken in id order, starting after ``last_index`` (start with -1; pass back
    the index returned). When no node has room now, the next one that could ever hold the
    request is returned, for the request to wait there. None when no node ever could.
    """
    ids = _alive(nodes)
    n = len(ids)
    for room in ("available", "total"):
        for k in range(n):
            i = (last_index + 1 + k) % n
            if fits(getattr(nodes[ids[i]], room), request):
                return ids[i], i
    return None


def pick_node(
    request: Resources,
    nodes: Mapping[bytes, NodeLike],
    local: bytes,
    prefer_local: bool = True,
    *,
    avoid_gpu_nodes: bool = False,
) -> bytes | None:
    """The default policy: where a task without a strategy should run.

    1. The local node, if it is live and has room now (with ``prefer_local``).
    2. Else the node with room now whose scarcest resource keeps the largest fraction
       free afterwards (a load-balancing choice); ties go to the lowest id.
    3. Else a node that could ever hold it, to wait there: the local one if it could,
       else the one with the largest free fraction.
    None when no live node could ever hold the request.

    ``avoid_gpu_nodes`` (Ray does so by default) keeps a request that asks for no GPU off
    nodes with GPUs while a node without them has room.
    """
    ids = _alive(nodes)
    if avoid_gpu_nodes and not request.get("GPU", 0):
        plain = [nid for nid in ids if not nodes[nid].total.get("GPU", 0)]
        if plain:
            got = _pick_now(request, nodes, plain, local, prefer_local)
            if got is not None:
                return got
    got = _pick_now(request, nodes, ids, local, prefer_local)
    if got is not None:
        return got
    feasible = [nid for nid in ids if fits(nodes[nid].total, request)]
    if not feasible:
        return None
    if prefer_local and local in feasible:
        return local
    return min(feasible, key=lambda nid: (-_free_fraction(request, nodes[nid]), nid))


def _pick_now(
    request: Resources,
    nodes: Mapping[bytes, NodeLike],
    ids: list[bytes],
    local: bytes,
    prefer_local: bool,
) -> bytes | None:
    if prefer_local and local in ids and fits(nodes[local].available, request):
        return local
    now = [nid for nid in ids if fits(nodes[nid].available, request)]
    if not now:
        return None
    return min(now, key=lambda nid: (-_free_fraction(request, nodes[nid]), nid))


def _free_fraction(request: Resources, node: NodeLike) -> float:
    """The smallest fraction of a resource left free on ``node`` after ``request``.

    Over the resources asked for, and CPU always (so empty requests balance by CPU).
    """
    names = set(request) | {"CPU"}
    worst = 1.0
    for name in names:
        total = node.total.get(name, 0)
        if total <= 0:
            continue
        left = node.available.get(name, 0) - request.get(name, 0)
        worst = min(worst, left / total)
    return worst


@dataclass
class SpreadCursor:
    """Holds the round-robin position of ``pick_spread_node`` for a caller that wants one."""

    last_index: int = -1

    def pick(self, request: Resources, nodes: Mapping[bytes, NodeLike]) -> bytes | None:
        got = pick_spread_node(request, nodes, self.last_index)
        if got is None:
            return None
        self.last_index = got[1]
        return got[0]
