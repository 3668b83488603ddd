"""Scheduling strategy objects, their wire form, the PlacementGroup handle and the checks of
placement_group() arguments."""

from __future__ import annotations

import importlib
import math
import pickle

import cloudpickle
import msgpack
import pytest
from shoal._resources import UNIT
from shoal.util.placement_group import PlacementGroup, validate_placement_group_args
from shoal.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
    strategy_to_wire,
)

# The module, not the function of the same name that shoal.util exports (as in Ray).
pg_module = importlib.import_module("shoal.util.placement_group")

pytestmark = pytest.mark.timeout(10)

NODE = bytes(range(16))
NODE_HEX = NODE.hex()
PG_ID = bytes([0xAB]) * 16


def make_pg(n=2):
    return PlacementGroup(PG_ID, [{"CPU": 1.5}] * n, "PACK", "trainers")


# -- NodeAffinitySchedulingStrategy -------------------------------------------------------


def test_node_affinity_wire_form():
    s = NodeAffinitySchedulingStrategy(NODE_HEX, soft=False)
    assert s.node_id == NODE_HEX and s.soft is False
    assert s.to_wire() == {
        "kind": "node",
        "node": NODE_HEX,
        "soft": False,
        "spill": False,
        "fail": False,
    }
    soft = NodeAffinitySchedulingStrategy(NODE_HEX, soft=True, _spill_on_unavailable=True)
    assert soft.to_wire()["soft"] is True and soft.to_wire()["spill"] is True
    hard = NodeAffinitySchedulingStrategy(NODE_HEX, False, _fail_on_unavailable=True)
    assert hard.to_wire()["fail"] is True


def test_node_affinity_accepts_upper_case_hex_and_binary_ids():
    upper = NodeAffinitySchedulingStrategy(NODE_HEX.upper(), soft=True)
    binary = NodeAffinitySchedulingStrategy(NODE, soft=True)  # type: ignore[arg-type]
    assert upper.node_id == binary.node_id == NODE_HEX
    assert upper == binary and hash(upper) == hash(binary)
    assert upper != NodeAffinitySchedulingStrategy(NODE_HEX, soft=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"node_id": "abc", "soft": True}, ValueError, ["node_id", "32 hex digits", "'abc'"]),
        ({"node_id": "z" * 32, "soft": True}, ValueError, ["node_id", "hex"]),
        ({"node_id": NODE_HEX + "00", "soft": True}, ValueError, ["32 hex digits"]),
        ({"node_id": 12, "soft": True}, TypeError, ["node_id", "int"]),
        ({"node_id": b"short", "soft": True}, TypeError, ["node_id", "bytes"]),
        ({"node_id": NODE_HEX, "soft": "yes"}, TypeError, ["soft", "'yes'"]),
        ({"node_id": NODE_HEX, "soft": None}, TypeError, ["soft"]),
        (
            {"node_id": NODE_HEX, "soft": False, "_spill_on_unavailable": True},
            ValueError,
            ["_spill_on_unavailable", "soft=True"],
        ),
        (
            {"node_id": NODE_HEX, "soft": True, "_fail_on_unavailable": True},
            ValueError,
            ["_fail_on_unavailable", "soft=False"],
        ),
        (
            {"node_id": NODE_HEX, "soft": True, "_spill_on_unavailable": 1},
            TypeError,
            ["_spill_on_unavailable"],
        ),
    ],
)
def test_node_affinity_rejects_bad_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        NodeAffinitySchedulingStrategy(**kwargs)
    for word in words:
        assert word in str(info.value)


# -- PlacementGroupSchedulingStrategy -----------------------------------------------------


def test_placement_group_strategy_wire_form_and_defaults():
    pg = make_pg()
    s = PlacementGroupSchedulingStrategy(pg)
    assert s.placement_group is pg
    assert s.placement_group_bundle_index == -1
    assert s.placement_group_capture_child_tasks is None
    assert s.to_wire() == {"kind": "pg", "pg": PG_ID.hex(), "bundle": -1, "capture": False}
    s = PlacementGroupSchedulingStrategy(pg, 1, placement_group_capture_child_tasks=True)
    assert s.to_wire() == {"kind": "pg", "pg": PG_ID.hex(), "bundle": 1, "capture": True}


def test_placement_group_strategy_checks_the_bundle_index_against_the_group():
    with pytest.raises(ValueError) as info:
        PlacementGroupSchedulingStrategy(make_pg(2), 2)
    assert "index 2 is out of range" in str(info.value)
    assert "2 bundles" in str(info.value) and "0 to 1" in str(info.value)
    # A handle that does not know its bundles (e.g. from an id alone) checks only >= -1.
    assert PlacementGroupSchedulingStrategy(PlacementGroup(PG_ID), 7).to_wire()["bundle"] == 7


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        ((None,), TypeError, ["placement_group", "PlacementGroup", "NoneType"]),
        ((PG_ID,), TypeError, ["placement_group", "bytes"]),
        ((make_pg(), -2), ValueError, ["placement_group_bundle_index", "-1", "-2"]),
        ((make_pg(), True), TypeError, ["placement_group_bundle_index", "bool"]),
        ((make_pg(), 1.0), TypeError, ["placement_group_bundle_index", "float"]),
        ((make_pg(), 0, "yes"), TypeError, ["placement_group_capture_child_tasks", "'yes'"]),
    ],
)
def test_placement_group_strategy_rejects_bad_arguments(args, error, words):
    with pytest.raises(error) as info:
        PlacementGroupSchedulingStrategy(*args)
    for word in words:
        assert word in str(info.value)


# -- strategy_to_wire ---------------------------------------------------------------------


def test_strategy_to_wire_for_every_accepted_value():
    assert strategy_to_wire(None) is None
    assert strategy_to_wire("DEFAULT") == {"kind": "default"}
    assert strategy_to_wire("SPREAD") == {"kind": "spread"}
    node = NodeAffinitySchedulingStrategy(NODE_HEX, soft=True)
    group = PlacementGroupSchedulingStrategy(make_pg(), 0)
    assert strategy_to_wire(node) == node.to_wire()
    assert strategy_to_wire(group) == group.to_wire()
    # The wire form goes through msgpack unchanged.
    for value in (None, "DEFAULT", "SPREAD", node, group):
        wire = strategy_to_wire(value)
        assert msgpack.unpackb(msgpack.packb(wire)) == wire


def test_strategy_to_wire_returns_a_fresh_dict():
    wire = strategy_to_wire("SPREAD")
    assert wire is not None
    wire["kind"] = "changed"
    assert strategy_to_wire("SPREAD") == {"kind": "spread"}


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("spread", ValueError, ["'DEFAULT', 'SPREAD'", "'spread'"]),
        ("PACK", ValueError, ["placement group strategy", "PlacementGroupSchedulingStrategy"]),
        ("STRICT_SPREAD", ValueError, ["placement_group(bundles, strategy='STRICT_SPREAD')"]),
        (3, TypeError, ["scheduling_strategy", "int"]),
        ({"kind": "node"}, TypeError, ["NodeAffinitySchedulingStrategy", "dict"]),
        (make_pg(), TypeError, ["PlacementGroupSchedulingStrategy", "PlacementGroup"]),
    ],
)
def test_strategy_to_wire_rejects_anything_else(value, error, words):
    with pytest.raises(error) as info:
        strategy_to_wire(value)
    for word in words:
        assert word in str(info.value)


# -- the PlacementGroup handle ------------------------------------------------------------


def test_placement_group_handle_fields():
    specs = [{"CPU": 1.5}, {"GPU": 1}]
    pg = PlacementGroup(PG_ID, specs, "STRICT_SPREAD", "trainers")
    assert pg.id == PG_ID and pg.id.hex() == "ab" * 16
    assert pg.bundle_specs == specs and pg.bundle_count == 2
    assert pg.strategy == "STRICT_SPREAD" and pg.name == "trainers"
    specs[0]["CPU"] = 99  # the handle keeps its own copy
    assert pg.bundle_specs[0] == {"CPU": 1.5}
    assert "ab" * 16 in repr(pg) and "trainers" in repr(pg)
    assert not pg.is_empty
    assert PlacementGroup.empty().is_empty and PlacementGroup.empty().bundle_count == 0


def test_placement_group_handles_compare_and_hash_by_id():
    a = PlacementGroup(PG_ID, [{"CPU": 1}])
    b = PlacementGroup(PG_ID)
    other = PlacementGroup(bytes(16), [{"CPU": 1}])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != other and a != PG_ID


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_handles_and_strategies_pickle(dumps):
    pg = make_pg()
    copy = pickle.loads(dumps(pg))
    assert copy == pg and copy.bundle_specs == pg.bundle_specs
    assert (copy.strategy, copy.name) == ("PACK", "trainers")
    for s in (
        PlacementGroupSchedulingStrategy(pg, 1, True),
        NodeAffinitySchedulingStrategy(NODE_HEX, soft=True, _spill_on_unavailable=True),
    ):
        assert pickle.loads(dumps(s)).to_wire() == s.to_wire()


@pytest.mark.parametrize("bad", [b"short", NODE_HEX, None])
def test_placement_group_handle_needs_a_16_byte_id(bad):
    with pytest.raises(ValueError, match="16 bytes"):
        PlacementGroup(bad)


# -- placement_group() arguments ----------------------------------------------------------


def test_valid_arguments_come_back_in_fixed_point():
    bundles, strategy, name, lifetime = validate_placement_group_args(
        [{"CPU": 1.5, "GPU": 0}, {"GPU": 1, "memory": 2048.9}, {"tpu": 0.25}],
        strategy="STRICT_SPREAD",
        name="g",
        lifetime="detached",
        _max_cpu_fraction_per_node=0.5,
    )
    assert bundles == [
        {"CPU": 15_000},  # the zero amount is dropped
        {"GPU": UNIT, "memory": 2048 * UNIT},  # memory in whole bytes
        {"tpu": 2_500},
    ]
    assert (strategy, name, lifetime) == ("STRICT_SPREAD", "g", "detached")
    assert validate_placement_group_args([{"CPU": 1}])[1:] == ("PACK", "", None)


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_every_strategy_is_accepted(strategy):
    assert validate_placement_group_args([{"CPU": 1}], strategy)[1] == strategy


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"bundles": {"CPU": 1}}, ValueError, ["bundles must be a list", "dict"]),
        ({"bundles": ({"CPU": 1},)}, ValueError, ["bundles must be a list", "tuple"]),
        ({"bundles": []}, ValueError, ["bundles must not be empty"]),
        ({"bundles": [{"CPU": 1}, 4]}, ValueError, ["bundle 1", "dict", "int"]),
        ({"bundles": [{"CPU": 1}, {}]}, ValueError, ["bundle 1 is empty"]),
        (
            {"bundles": [{"CPU": 0, "GPU": 0.0}]},
            ValueError,
            ["bundle 0 reserves nothing", "above 0"],
        ),
        ({"bundles": [{"CPU": -1}]}, ValueError, ["bundle 0", "'CPU'", ">= 0", "-1"]),
        ({"bundles": [{"CPU": 1}, {"GPU": math.nan}]}, ValueError, ["bundle 1", "'GPU'", "nan"]),
        ({"bundles": [{"CPU": math.inf}]}, ValueError, ["bundle 0", "'CPU'", "finite"]),
        ({"bundles": [{"CPU": True}]}, ValueError, ["bundle 0", "'CPU'", "number", "bool"]),
        ({"bundles": [{"CPU": "2"}]}, ValueError, ["bundle 0", "'CPU'", "number", "str"]),
        ({"bundles": [{"CPU": 1, "": 1}]}, ValueError, ["bundle 0", "non-empty strings"]),
        ({"bundles": [{3: 1}]}, ValueError, ["bundle 0", "names", "3"]),
        ({"bundles": [{"CPU": 1, "bundle": 1}]}, ValueError, ["bundle 0", "'bundle'", "reserved"]),
        ({"bundles": [{"CPU": 0.00001}]}, ValueError, ["bundle 0", "'CPU'", "too small"]),
        ({"bundles": [{"memory": 0.5}]}, ValueError, ["'memory'", "too small", "1 byte"]),
        (
            {"bundles": [{"CPU": 1}], "strategy": "BEST"},
            ValueError,
            ["strategy 'BEST'", "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"],
        ),
        ({"bundles": [{"CPU": 1}], "strategy": None}, ValueError, ["strategy None"]),
        ({"bundles": [{"CPU": 1}], "name": 5}, TypeError, ["name", "int"]),
        (
            {"bundles": [{"CPU": 1}], "lifetime": "non_detached"},
            ValueError,
            ["lifetime", "None", "'detached'", "'non_detached'"],
        ),
        (
            {"bundles": [{"CPU": 1}], "_max_cpu_fraction_per_node": 0},
            ValueError,
            ["_max_cpu_fraction_per_node", "above 0", "at most 1"],
        ),
        (
            {"bundles": [{"CPU": 1}], "_max_cpu_fraction_per_node": 1.5},
            ValueError,
            ["_max_cpu_fraction_per_node", "1.5"],
        ),
        (
            {"bundles": [{"CPU": 1}], "_max_cpu_fraction_per_node": None},
            TypeError,
            ["_max_cpu_fraction_per_node", "number"],
        ),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, words):
    with pytest.raises(error) as info:
        validate_placement_group_args(**kwargs)
    for word in words:
        assert word in str(info.value)


# -- the cluster calls are stubs until the scheduler is wired -----------------------------


def test_placement_group_checks_arguments_before_calling_the_cluster():
    # No cluster is running in unit tests: a bad argument must fail before one is needed.
    with pytest.raises(ValueError, match="bundles must not be empty"):
        pg_module.placement_group([])
    with pytest.raises(TypeError, match="takes a PlacementGroup"):
        pg_module.remove_placement_group("not a group")  # type: ignore[arg-type]
