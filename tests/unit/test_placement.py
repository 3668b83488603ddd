"""Placement algorithms: bundle placement per strategy, feasibility, group resource names,
request translation, and the node choice for single tasks (default and SPREAD)."""

from __future__ import annotations

import pytest
from shoal._placement import (
    BUNDLE_MARKER_REQUEST,
    BUNDLE_MARKER_TOTAL,
    NodeView,
    SpreadCursor,
    bundle_resources,
    commit_bundle,
    feasible_ever,
    group_cpu_in_use,
    group_resource_name,
    parse_group_resource,
    pick_node,
    pick_spread_node,
    place_bundles,
    release_bundle,
    translate_request,
)
from shoal._resources import UNIT, fits, subtract

pytestmark = pytest.mark.timeout(10)

A, B, C, D = (bytes([n]) * 16 for n in (1, 2, 3, 4))
PG = bytes(range(16))
H = PG.hex()


def node(cpu=0.0, gpu=0.0, free=None, alive=True, **custom):
    """A node with these totals; ``free`` is its available CPU (default: all of it)."""
    total = {}
    if cpu:
        total["CPU"] = int(cpu * UNIT)
    if gpu:
        total["GPU"] = int(gpu * UNIT)
    for name, amount in custom.items():
        total[name] = int(amount * UNIT)
    available = dict(total)
    if free is not None:
        available["CPU"] = int(free * UNIT)
    return NodeView(total, available, alive)


def cpus(n):
    return {"CPU": int(n * UNIT)}


# -- STRICT_PACK --------------------------------------------------------------------------


def test_strict_pack_puts_every_bundle_on_the_one_node_with_room_for_all():
    nodes = {A: node(cpu=4), B: node(cpu=8)}
    assert place_bundles([cpus(2)] * 3, "STRICT_PACK", nodes) == {0: B, 1: B, 2: B}


def test_strict_pack_prefers_the_roomiest_node_then_the_lowest_id():
    assert place_bundles([cpus(2)] * 2, "STRICT_PACK", {A: node(8), B: node(16)}) == {0: B, 1: B}
    assert place_bundles([cpus(2)] * 2, "STRICT_PACK", {B: node(8), A: node(8)}) == {0: A, 1: A}


def test_strict_pack_waits_when_no_node_has_room_now_but_one_could():
    nodes = {A: node(cpu=8, free=4), B: node(cpu=8, free=4)}
    assert place_bundles([cpus(2)] * 3, "STRICT_PACK", nodes) is None
    assert feasible_ever([cpus(2)] * 3, "STRICT_PACK", nodes) is None


def test_strict_pack_bigger_than_any_node_is_never_feasible():
    nodes = {A: node(cpu=8), B: node(cpu=8)}
    bundles = [cpus(4)] * 3
    assert place_bundles(bundles, "STRICT_PACK", nodes) is None
    why = feasible_ever(bundles, "STRICT_PACK", nodes)
    assert why is not None
    assert "STRICT_PACK" in why and "CPU=12" in why and "one node" in why
    # The same bundles may split under PACK.
    assert feasible_ever(bundles, "PACK", nodes) is None


# -- PACK ---------------------------------------------------------------------------------


def test_pack_keeps_the_group_on_one_node_when_one_can_take_it_all():
    assert set(place_bundles([cpus(2)] * 2, "PACK", {A: node(8), B: node(8)}).values()) == {A}
    # The roomiest node for the first bundle (A) cannot take the GPU bundle; G takes both.
    g = bytes([9]) * 16
    nodes = {A: node(cpu=16), g: node(cpu=2, gpu=1)}
    bundles = [cpus(1), {"CPU": UNIT, "GPU": UNIT}]
    assert place_bundles(bundles, "PACK", nodes) == {0: g, 1: g}


def test_pack_prefers_one_node_for_all_over_the_roomiest_node_for_the_first():
    # The greedy fill would put bundle 0 on A (more memory free) and bundle 1 on B.
    nodes = {A: node(cpu=2, memory=100), B: node(cpu=8, memory=60)}
    bundles = [{"memory": 50 * UNIT}, cpus(4)]
    assert place_bundles(bundles, "PACK", nodes) == {0: B, 1: B}


def test_pack_splits_greedily_filling_the_roomiest_node_first():
    nodes = {A: node(cpu=4), B: node(cpu=3), C: node(cpu=2)}
    assert place_bundles([cpus(2)] * 4, "PACK", nodes) == {0: A, 1: A, 2: B, 3: C}


def test_pack_waits_when_the_free_room_is_too_fragmented():
    nodes = {A: node(cpu=4, free=1), B: node(cpu=4, free=1)}
    assert place_bundles([cpus(1)] * 3, "PACK", nodes) is None
    assert feasible_ever([cpus(1)] * 3, "PACK", nodes) is None


def test_pack_that_cannot_fit_even_an_idle_cluster_is_infeasible():
    nodes = {A: node(cpu=8), B: node(cpu=8)}
    why = feasible_ever([cpus(8)] * 3, "PACK", nodes)
    assert why is not None and "idle cluster" in why and "CPU=24" in why


def test_pack_places_scarce_bundles_first():
    # In index order, the CPU bundles would fill the GPU node (the roomiest) and leave the
    # GPU bundle no CPU; placing the GPU bundle first fits everything.
    g = bytes([9]) * 16
    nodes = {A: node(cpu=1), g: node(cpu=2, gpu=1)}
    bundles = [cpus(1), cpus(1), {"CPU": UNIT, "GPU": UNIT}]
    assert place_bundles(bundles, "PACK", nodes) == {0: g, 1: A, 2: g}


# -- SPREAD -------------------------------------------------------------------------------


def test_spread_uses_distinct_nodes_roomiest_first():
    nodes = {A: node(cpu=2), B: node(cpu=8), C: node(cpu=4)}
    assert place_bundles([cpus(1)] * 2, "SPREAD", nodes) == {0: B, 1: C}


def test_spread_shares_nodes_evenly_when_there_are_more_bundles_than_nodes():
    nodes = {A: node(cpu=10), B: node(cpu=2)}
    assert place_bundles([cpus(1)] * 4, "SPREAD", nodes) == {0: A, 1: B, 2: A, 3: B}


def test_spread_and_pack_differ_on_the_same_cluster():
    nodes = {A: node(cpu=4), B: node(cpu=3), C: node(cpu=2)}
    assert place_bundles([cpus(2)] * 4, "SPREAD", nodes) == {0: A, 1: B, 2: C, 3: A}


def test_spread_waits_when_no_node_has_room():
    assert place_bundles([cpus(1)] * 2, "SPREAD", {A: node(cpu=4, free=1)}) is None


# -- STRICT_SPREAD ------------------------------------------------------------------------


def test_strict_spread_needs_as_many_live_nodes_as_bundles():
    nodes = {A: node(cpu=8), B: node(cpu=8), C: node(cpu=8, alive=False)}
    assert place_bundles([cpus(1)] * 3, "STRICT_SPREAD", nodes) is None
    why = feasible_ever([cpus(1)] * 3, "STRICT_SPREAD", nodes)
    assert why is not None and "3 bundles" in why and "2 live nodes" in why
    assert place_bundles([cpus(1)] * 2, "STRICT_SPREAD", nodes) == {0: A, 1: B}


def test_strict_spread_finds_a_matching_where_greedy_would_not():
    # Bundle 0 ("a") goes first and likes N1 best, but bundle 1 (CPU) fits only N1.
    n1, n2 = A, B
    nodes = {n1: node(cpu=1, a=4), n2: node(a=1)}
    bundles = [{"a": UNIT}, cpus(1)]
    assert place_bundles(bundles, "STRICT_SPREAD", nodes) == {0: n2, 1: n1}


def test_strict_spread_waits_when_a_node_is_busy():
    nodes = {A: node(cpu=2), B: node(cpu=2, free=0)}
    assert place_bundles([cpus(1)] * 2, "STRICT_SPREAD", nodes) is None
    assert feasible_ever([cpus(1)] * 2, "STRICT_SPREAD", nodes) is None


# -- all strategies -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_dead_nodes_are_never_used(strategy):
    nodes = {A: node(cpu=64, alive=False), B: node(cpu=4)}
    assert place_bundles([cpus(1)], strategy, nodes) == {0: B}


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_placement_does_not_change_the_nodes(strategy):
    nodes = {A: node(cpu=4), B: node(cpu=4)}
    before = {k: (dict(v.total), dict(v.available)) for k, v in nodes.items()}
    assert place_bundles([cpus(1)] * 2, strategy, nodes) is not None
    assert {k: (v.total, v.available) for k, v in nodes.items()} == before


def test_placement_is_deterministic_whatever_the_node_order():
    ids = [bytes([n]) * 16 for n in range(1, 7)]
    bundles = [cpus(1), cpus(2), {"GPU": UNIT}, cpus(1)]
    for strategy in ("PACK", "SPREAD", "STRICT_SPREAD"):
        forward = {i: node(cpu=4, gpu=1) for i in ids}
        backward = {i: node(cpu=4, gpu=1) for i in reversed(ids)}
        assert place_bundles(bundles, strategy, forward) == place_bundles(
            bundles, strategy, backward
        )


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown placement strategy 'RANDOM'"):
        place_bundles([cpus(1)], "RANDOM", {A: node(cpu=1)})
    with pytest.raises(ValueError, match="unknown placement strategy"):
        feasible_ever([cpus(1)], "pack", {A: node(cpu=1)})


# -- placing again around committed bundles -----------------------------------------------


def test_strict_spread_again_avoids_the_nodes_of_committed_bundles():
    nodes = {A: node(cpu=8), B: node(cpu=2)}
    assert place_bundles([cpus(1)] * 2, "STRICT_SPREAD", nodes, placed={0: A}) == {0: A, 1: B}


def test_strict_pack_again_goes_to_the_groups_node_or_nowhere():
    nodes = {A: node(cpu=2), B: node(cpu=8)}
    assert place_bundles([cpus(1)] * 2, "STRICT_PACK", nodes, placed={0: A}) == {0: A, 1: A}
    nodes[A].alive = False
    assert place_bundles([cpus(1)] * 2, "STRICT_PACK", nodes, placed={0: A}) is None


def test_pack_again_fills_the_groups_nodes_first():
    nodes = {A: node(cpu=2), B: node(cpu=8)}
    assert place_bundles([cpus(1)] * 3, "PACK", nodes, placed={0: A}) == {0: A, 1: A, 2: A}
    assert place_bundles([cpus(1)] * 3, "PACK", nodes) == {0: B, 1: B, 2: B}


def test_spread_again_prefers_nodes_without_the_groups_bundles():
    nodes = {A: node(cpu=8), B: node(cpu=2)}
    assert place_bundles([cpus(1)] * 2, "SPREAD", nodes, placed={0: A}) == {0: A, 1: B}


def test_nothing_left_to_place_and_bad_placed_indexes():
    assert place_bundles([cpus(1)], "PACK", {}, placed={0: A}) == {0: A}
    with pytest.raises(ValueError, match="placed bundle index 3 is out of range"):
        place_bundles([cpus(1)], "PACK", {A: node(cpu=1)}, placed={3: A})


# -- _max_cpu_fraction_per_node -----------------------------------------------------------


def test_max_cpu_fraction_caps_the_cpus_bundles_may_hold_on_a_node():
    nodes = {A: node(cpu=4)}
    bundles = [cpus(2), cpus(1)]
    assert place_bundles(bundles, "STRICT_PACK", nodes) == {0: A, 1: A}
    assert place_bundles(bundles, "STRICT_PACK", nodes, max_cpu_fraction=0.5) is None
    assert place_bundles([cpus(2)], "STRICT_PACK", nodes, max_cpu_fraction=0.5) == {0: A}
    why = feasible_ever([cpus(3)], "PACK", nodes, max_cpu_fraction=0.5)
    assert why is not None and "_max_cpu_fraction_per_node=0.5" in why and "bundle 0" in why


def test_max_cpu_fraction_always_leaves_one_cpu_out_and_allows_at_least_one():
    assert place_bundles([cpus(2)], "PACK", {A: node(cpu=2)}, max_cpu_fraction=0.99) is None
    assert place_bundles([cpus(1)], "PACK", {A: node(cpu=2)}, max_cpu_fraction=0.99) == {0: A}
    # 0.999 of 100 CPUs is 99.9, but one whole CPU stays out.
    assert place_bundles([cpus(99.5)], "PACK", {A: node(100)}, max_cpu_fraction=0.999) is None
    assert place_bundles([cpus(99)], "PACK", {A: node(100)}, max_cpu_fraction=0.999) == {0: A}
    # 0.1 of 4 CPUs is below one CPU: one CPU is allowed all the same.
    assert place_bundles([cpus(1)], "PACK", {A: node(cpu=4)}, max_cpu_fraction=0.1) == {0: A}
    # Bundles without CPU are not limited.
    assert place_bundles([{"GPU": UNIT}], "PACK", {A: node(gpu=1)}, max_cpu_fraction=0.5) == {0: A}


def test_max_cpu_fraction_counts_the_bundles_of_other_groups():
    n = node(cpu=4)
    other = bytes([7]) * 16
    commit_bundle(n.total, n.available, other, 0, cpus(2))
    assert group_cpu_in_use(n.total) == 2 * UNIT
    assert place_bundles([cpus(1)], "PACK", {A: n}, max_cpu_fraction=0.5) is None
    assert place_bundles([cpus(1)], "PACK", {A: n}) == {0: A}
    # On an idle cluster the other group would be gone: feasible.
    assert feasible_ever([cpus(1)], "PACK", {A: n}, max_cpu_fraction=0.5) is None


# -- feasible_ever ------------------------------------------------------------------------


def test_feasible_ever_ignores_what_is_busy_now():
    nodes = {A: node(cpu=4, free=0, gpu=1)}
    nodes[A].available["GPU"] = 0
    for strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        assert feasible_ever([{"CPU": 4 * UNIT, "GPU": UNIT}], strategy, nodes) is None


def test_feasible_ever_names_the_bundle_that_is_bigger_than_every_node():
    nodes = {A: node(cpu=8, gpu=1), B: node(cpu=8)}
    why = feasible_ever([cpus(1), {"GPU": 2 * UNIT}], "PACK", nodes)
    assert why is not None and "bundle 1" in why and "GPU=2" in why and "GPU=1" in why
    why = feasible_ever([{"TPU": UNIT}], "SPREAD", nodes)
    assert why is not None and "bundle 0" in why and "TPU=0" in why


def test_feasible_ever_names_a_bundle_that_fits_no_single_node():
    nodes = {A: node(cpu=8), B: node(cpu=2, gpu=1)}
    why = feasible_ever([{"CPU": 4 * UNIT, "GPU": UNIT}], "PACK", nodes)
    assert why is not None and "bundle 0" in why and "fits no single node" in why
    assert A.hex()[:8] in why and B.hex()[:8] in why


def test_feasible_ever_without_live_nodes():
    assert feasible_ever([cpus(1)], "PACK", {}) == "the cluster has no live nodes"
    why = feasible_ever([cpus(1)], "PACK", {A: node(cpu=4, alive=False)})
    assert why == "the cluster has no live nodes"


# -- group resources ----------------------------------------------------------------------


def test_group_resource_names_follow_ray():
    assert group_resource_name("CPU", PG, 0) == f"CPU_group_0_{H}"
    assert group_resource_name("CPU", PG) == f"CPU_group_{H}"
    assert group_resource_name("bundle", PG, 12) == f"bundle_group_12_{H}"
    assert parse_group_resource(f"CPU_group_3_{H}") == ("CPU", 3, H)
    assert parse_group_resource(f"my_res_group_{H}") == ("my_res", -1, H)
    assert parse_group_resource("CPU") is None
    assert parse_group_resource("my_group_thing") is None
    with pytest.raises(ValueError, match=">= -1"):
        group_resource_name("CPU", PG, -2)


def test_bundle_resources_are_indexed_wildcard_and_marker_names():
    bundle = {"CPU": 2 * UNIT, "memory": 1024 * UNIT, "GPU": 0}
    assert bundle_resources(PG, 1, bundle) == {
        f"CPU_group_1_{H}": 2 * UNIT,
        f"CPU_group_{H}": 2 * UNIT,
        f"memory_group_1_{H}": 1024 * UNIT,
        f"memory_group_{H}": 1024 * UNIT,
        f"bundle_group_1_{H}": 1000 * UNIT,
        f"bundle_group_{H}": 1000 * UNIT,
    }
    assert BUNDLE_MARKER_TOTAL == 1000 * UNIT and BUNDLE_MARKER_REQUEST == UNIT // 1000
    with pytest.raises(ValueError, match="index >= 0"):
        bundle_resources(PG, -1, bundle)


def test_committing_bundles_sums_the_wildcards_and_releasing_restores_the_node():
    n = node(cpu=8, gpu=1)
    total0, avail0 = dict(n.total), dict(n.available)
    b0, b1 = cpus(1), {"CPU": 2 * UNIT, "GPU": UNIT}
    commit_bundle(n.total, n.available, PG, 0, b0)
    commit_bundle(n.total, n.available, PG, 1, b1)
    assert n.available["CPU"] == 5 * UNIT and n.available["GPU"] == 0
    assert n.total["CPU"] == 8 * UNIT  # a node's own total does not change
    assert n.total[f"CPU_group_{H}"] == n.available[f"CPU_group_{H}"] == 3 * UNIT
    assert n.total[f"CPU_group_1_{H}"] == 2 * UNIT
    assert n.total[f"GPU_group_{H}"] == UNIT and f"GPU_group_0_{H}" not in n.total
    assert n.total[f"bundle_group_{H}"] == 2000 * UNIT

    release_bundle(n.total, n.available, PG, 1, b1)
    assert f"CPU_group_1_{H}" not in n.total and f"CPU_group_1_{H}" not in n.available
    assert f"GPU_group_{H}" not in n.total
    assert n.total[f"CPU_group_{H}"] == UNIT and n.total[f"bundle_group_{H}"] == 1000 * UNIT
    release_bundle(n.total, n.available, PG, 0, b0)
    assert (n.total, n.available) == (total0, avail0)


# -- translation of task requests ---------------------------------------------------------


def test_translate_any_bundle_uses_the_wildcard_names():
    assert translate_request({"CPU": UNIT}, PG, -1) == {
        f"CPU_group_{H}": UNIT,
        f"bundle_group_{H}": 10,
    }
    # A request for nothing still lands on one of the group's nodes.
    assert translate_request({}, PG, -1) == {f"bundle_group_{H}": 10}


def test_translate_one_bundle_asks_for_indexed_and_wildcard_names():
    assert translate_request({"CPU": UNIT, "memory": 5 * UNIT, "GPU": 0}, PG, 2) == {
        f"CPU_group_{H}": UNIT,
        f"CPU_group_2_{H}": UNIT,
        f"memory_group_{H}": 5 * UNIT,
        f"memory_group_2_{H}": 5 * UNIT,
        f"bundle_group_{H}": 10,
        f"bundle_group_2_{H}": 10,
    }
    with pytest.raises(ValueError, match="placement_group_bundle_index must be >= -1"):
        translate_request({"CPU": UNIT}, PG, -3)


def test_translated_requests_fit_only_their_bundle_and_share_the_wildcard():
    n = node(cpu=8)
    commit_bundle(n.total, n.available, PG, 0, cpus(2))
    in_bundle0 = translate_request(cpus(2), PG, 0)
    assert fits(n.available, in_bundle0)
    assert not fits(n.available, translate_request(cpus(1), PG, 1))  # not on this node
    assert not fits(n.available, translate_request(cpus(3), PG, -1))  # more than reserved
    assert not fits(n.available, translate_request({"memory": UNIT}, PG, -1))  # not reserved
    subtract(n.available, in_bundle0)
    # Bundle 0 is used up, and so is the group's "any bundle" pool on this node.
    assert not fits(n.available, translate_request(cpus(1), PG, -1))
    # Tasks asking for nothing still fit: the marker holds 1000 / 0.001 of them.
    assert fits(n.available, translate_request({}, PG, 0))


# -- SPREAD for single tasks --------------------------------------------------------------


def test_spread_goes_round_robin_over_nodes_in_id_order():
    nodes = {C: node(cpu=4), A: node(cpu=4), B: node(cpu=4)}
    last, seen = -1, []
    for _ in range(4):
        got = pick_spread_node(cpus(1), nodes, last)
        assert got is not None
        seen.append(got[0])
        last = got[1]
    assert seen == [A, B, C, A]


def test_spread_skips_nodes_without_room_then_falls_back_to_feasible_ones():
    nodes = {A: node(cpu=4), B: node(cpu=4, free=0), C: node(cpu=4)}
    assert pick_spread_node(cpus(1), nodes, -1) == (A, 0)
    assert pick_spread_node(cpus(1), nodes, 0) == (C, 2)
    busy = {A: node(cpu=4, free=0), B: node(cpu=4, free=0), C: node(cpu=1, free=0)}
    assert pick_spread_node(cpus(1), busy, 0) == (B, 1)
    assert pick_spread_node(cpus(2), busy, 1) == (A, 0)  # C could never hold 2 CPUs


def test_spread_with_no_feasible_node_or_dead_nodes():
    assert pick_spread_node(cpus(8), {A: node(cpu=4)}, -1) is None
    assert pick_spread_node(cpus(1), {}, -1) is None
    nodes = {A: node(cpu=4, alive=False), B: node(cpu=4)}
    assert pick_spread_node(cpus(1), nodes, -1) == (B, 0)


def test_spread_cursor_keeps_the_position():
    cursor = SpreadCursor()
    nodes = {A: node(cpu=4), B: node(cpu=4)}
    assert [cursor.pick(cpus(1), nodes) for _ in range(3)] == [A, B, A]
    assert cursor.pick(cpus(9), nodes) is None and cursor.last_index == 0


# -- the default policy -------------------------------------------------------------------


def test_default_prefers_the_local_node_when_it_has_room():
    nodes = {A: node(cpu=2), B: node(cpu=64)}
    assert pick_node(cpus(1), nodes, local=A) == A
    assert pick_node(cpus(1), nodes, local=A, prefer_local=False) == B


def test_default_otherwise_picks_the_largest_free_fraction():
    # B has more CPUs free, C a larger fraction of its CPUs.
    nodes = {A: node(cpu=4, free=0), B: node(cpu=8, free=6), C: node(cpu=4)}
    assert pick_node(cpus(1), nodes, local=A) == C
    # Ties go to the lowest id; empty requests balance by CPU.
    assert pick_node(cpus(1), {A: node(cpu=4, free=0), C: node(4), B: node(4)}, A) == B
    assert pick_node({}, {B: node(cpu=4, free=1), C: node(cpu=4, free=3)}, local=A) == C


def test_default_queues_on_a_feasible_node_when_none_has_room():
    nodes = {A: node(cpu=4, free=0), B: node(cpu=8, free=0, gpu=1), C: node(cpu=8, free=0)}
    assert pick_node(cpus(2), nodes, local=A) == A
    assert pick_node(cpus(6), nodes, local=A) == B  # A could never hold 6; B, C tie
    assert pick_node({"CPU": UNIT, "GPU": UNIT}, nodes, local=A) == B
    assert pick_node({"TPU": UNIT}, nodes, local=A) is None


def test_default_never_picks_a_dead_node():
    nodes = {A: node(cpu=4, alive=False), B: node(cpu=2)}
    assert pick_node(cpus(1), nodes, local=A) == B
    assert pick_node(cpus(4), nodes, local=A) is None


def test_default_can_keep_cpu_tasks_off_gpu_nodes():
    nodes = {A: node(cpu=8, gpu=1), B: node(cpu=2)}
    assert pick_node(cpus(1), nodes, local=A) == A
    assert pick_node(cpus(1), nodes, local=A, avoid_gpu_nodes=True) == B
    assert pick_node({"GPU": UNIT}, nodes, local=B, avoid_gpu_nodes=True) == A
    # When the plain nodes are full, the GPU node is used after all.
    nodes[B].available["CPU"] = 0
    assert pick_node(cpus(1), nodes, local=B, avoid_gpu_nodes=True) == A
