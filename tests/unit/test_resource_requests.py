"""Resource options: validation, fixed-point arithmetic, GPU device assignment."""

from __future__ import annotations

import math

import pytest
from shoal._resources import (
    UNIT,
    GpuSet,
    add,
    as_floats,
    describe,
    fits,
    request,
    subtract,
    to_fixed,
)

pytestmark = pytest.mark.timeout(10)


def req(num_cpus=None, num_gpus=None, memory=None, resources=None, default_cpus=1):
    return request(num_cpus, num_gpus, memory, resources, default_cpus)


# -- validation -----------------------------------------------------------------------------


def test_defaults_and_explicit_amounts_in_fixed_point():
    assert req() == {"CPU": UNIT}
    assert req(default_cpus=0) == {}
    assert req(num_cpus=0.5, num_gpus=2, memory=1024, resources={"tpu": 0.25}) == {
        "CPU": 5_000,
        "GPU": 2 * UNIT,
        "memory": 1024 * UNIT,
        "tpu": 2_500,
    }
    assert req(num_cpus=0) == {}  # an explicit 0 overrides the default
    assert req(resources={"tpu": 0}) == {"CPU": UNIT}


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"num_cpus": -1}, ValueError, "num_cpus"),
        ({"num_cpus": math.inf}, ValueError, "num_cpus"),
        ({"num_cpus": "2"}, TypeError, "num_cpus"),
        ({"num_cpus": True}, TypeError, "num_cpus"),
        ({"num_gpus": math.nan}, ValueError, "num_gpus"),
        ({"num_gpus": [1]}, TypeError, "num_gpus"),
        ({"num_gpus": 1.5}, ValueError, "num_gpus"),
        ({"memory": -5}, ValueError, "memory"),
        ({"memory": "1G"}, TypeError, "memory"),
        ({"resources": {"tpu": -1}}, ValueError, "resources['tpu']"),
        ({"resources": {"tpu": None}}, TypeError, "resources['tpu']"),
        ({"resources": {"": 1}}, ValueError, "resource names"),
        ({"resources": {3: 1}}, ValueError, "resource names"),
        ({"resources": {"CPU": 1}}, ValueError, "num_cpus"),
        ({"resources": {"GPU": 1}}, ValueError, "num_gpus"),
    ],
)
def test_invalid_options_raise_an_error_naming_the_option(kwargs, error, named):
    with pytest.raises(error) as info:
        req(**kwargs)
    assert named in str(info.value)


def test_fractional_gpus_below_one_and_whole_gpus_above_one_are_accepted():
    assert req(num_gpus=0.25)["GPU"] == 2_500
    assert req(num_gpus=3.0)["GPU"] == 3 * UNIT


# -- arithmetic -----------------------------------------------------------------------------


def test_tenths_add_up_exactly():
    assert 0.1 + 0.2 != 0.3  # what floats would do
    assert to_fixed(0.1) + to_fixed(0.2) == to_fixed(0.3)
    available = {"CPU": to_fixed(0.3)}
    for amount in (0.1, 0.2):
        assert fits(available, {"CPU": to_fixed(amount)})
        subtract(available, {"CPU": to_fixed(amount)})
    assert available == {"CPU": 0}
    assert not fits(available, {"CPU": 1})


def test_ten_tenths_fill_exactly_one_cpu():
    available = {"CPU": UNIT}
    for _ in range(10):
        assert fits(available, {"CPU": to_fixed(0.1)})
        subtract(available, {"CPU": to_fixed(0.1)})
    assert available["CPU"] == 0
    for _ in range(10):
        add(available, {"CPU": to_fixed(0.1)})
    assert available["CPU"] == UNIT


def test_fits_treats_a_missing_resource_as_zero():
    assert fits({"CPU": UNIT}, {})
    assert not fits({"CPU": UNIT}, {"tpu": 1})
    assert fits({"CPU": UNIT}, {"tpu": 0})


def test_describe_and_as_floats():
    res = {"CPU": 15_000, "memory": 2048 * UNIT, "tpu": 2_500}
    assert as_floats(res) == {"CPU": 1.5, "memory": 2048.0, "tpu": 0.25}
    assert describe(res) == "CPU=1.5, memory=2048, tpu=0.25"
    assert describe({}) == "nothing"


# -- GPU devices ----------------------------------------------------------------------------


def test_whole_gpus_take_free_devices_and_come_back():
    gpus = GpuSet(3)
    assert gpus.acquire(2 * UNIT) == [0, 1]
    assert gpus.acquire(2 * UNIT) is None  # one left
    assert gpus.free == [0, 0, UNIT]  # a failed request takes nothing
    assert gpus.acquire(UNIT) == [2]
    gpus.release([0, 1], 2 * UNIT)
    assert gpus.free == [UNIT, UNIT, 0]


def test_fractions_go_to_the_fullest_device_that_fits():
    gpus = GpuSet(2)
    assert gpus.acquire(to_fixed(0.5)) == [0]
    # Best fit: the device with 0.5 free, not the empty one.
    assert gpus.acquire(to_fixed(0.25)) == [0]
    assert gpus.acquire(to_fixed(0.5)) == [1]
    assert gpus.free == [2_500, 5_000]
    assert gpus.acquire(to_fixed(0.75)) is None
    # A whole GPU needs a device nobody uses at all.
    assert gpus.acquire(UNIT) is None
    gpus.release([0], to_fixed(0.5))
    gpus.release([0], to_fixed(0.25))
    assert gpus.free == [UNIT, 5_000]
    assert gpus.acquire(UNIT) == [0]


def test_zero_gpus_need_no_device():
    gpus = GpuSet(0)
    assert gpus.acquire(0) == []
    assert gpus.acquire(to_fixed(0.1)) is None
