"""serialize/deserialize: the plain and cloudpickle paths, out-of-band buffers, contained refs."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from shoal import _serialization, _worker_context
from shoal._refs import ObjectRef
from shoal._serialization import (
    FLAG_ERROR,
    check_picklable,
    deserialize,
    pickle_definition,
    serialize,
    serialize_error,
)
from shoal.exceptions import TaskError

pytestmark = pytest.mark.timeout(10)


class FakeCore:
    """Counts what ObjectRefs tell their CoreWorker."""

    def __init__(self) -> None:
        self.increfs: list[bytes] = []
        self.decrefs: list[bytes] = []

    def incref(self, object_id: bytes) -> None:
        self.increfs.append(object_id)

    def decref(self, object_id: bytes) -> None:
        self.decrefs.append(object_id)


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore()
    monkeypatch.setattr(_worker_context, "_core", fake)  # refs rebuilt on load find it
    return fake


def round_trip(value):
    sv = serialize(value)
    return deserialize(sv.data, sv.buffers)


# -- plain values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1, 2.5, "text", b"bytes", None, True, 3j, (1, "a", None), [1, 2.0, b"x"], {"a": 1, 2: "b"}],
)
def test_plain_values_take_the_c_pickler_and_come_back_equal(value, monkeypatch):
    def no_cloudpickle(*args, **kwargs):
        raise AssertionError("plain values must not go through cloudpickle")

    monkeypatch.setattr(_serialization.cloudpickle, "dumps", no_cloudpickle)
    sv = serialize(value)
    assert sv.buffers == [] and sv.contained == [] and not sv.is_error
    assert deserialize(sv.data, sv.buffers) == value
    assert sv.frames() == [sv.data] and sv.nbytes == len(sv.data)


def test_flags_are_kept():
    assert serialize(1, FLAG_ERROR).is_error
    assert serialize([object], FLAG_ERROR).flags == FLAG_ERROR


# -- cloudpickle ----------------------------------------------------------------------------


def test_lambdas_closures_and_local_classes_go_by_value():
    offset = 10

    class Local:
        def __init__(self, n):
            self.n = n

        def total(self):
            return self.n + offset

    add = lambda x: x + offset  # noqa: E731
    assert round_trip(add)(1) == 11
    restored = round_trip(Local(5))
    assert restored.total() == 15
    assert type(restored).__name__ == "Local"
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(add)  # which is why cloudpickle is needed


def test_nested_containers_with_non_plain_values_round_trip():
    value = {"f": [lambda: 3], "t": ({1, 2}, frozenset("ab"))}
    restored = round_trip(value)
    assert restored["f"][0]() == 3 and restored["t"] == ({1, 2}, frozenset("ab"))


def test_check_picklable_names_what_failed():
    with pytest.raises(TypeError, match="argument 2 of type lock"):
        check_picklable(threading.Lock(), "argument 2")


def test_pickle_definition_hashes_the_same_function_the_same_way():
    def f(x):
        return x * 2

    h1, data = pickle_definition(f)
    h2, _ = pickle_definition(f)
    h3, _ = pickle_definition(lambda x: x * 3)
    assert h1 == h2 != h3 and len(h1) == 16
    assert pickle.loads(data)(4) == 8


# -- out-of-band buffers --------------------------------------------------------------------


def test_numpy_arrays_travel_out_of_band_without_a_copy():
    array = np.arange(100_000, dtype=np.float64)
    sv = serialize({"a": array, "tag": "x"})
    assert len(sv.buffers) == 1
    assert memoryview(sv.buffers[0]).nbytes == array.nbytes
    assert len(sv.data) < 1000  # the data itself is not in the pickle stream
    assert np.shares_memory(np.frombuffer(sv.buffers[0], dtype=np.float64), array)
    assert sv.nbytes == len(sv.data) + array.nbytes

    restored = deserialize(sv.data, sv.buffers)
    np.testing.assert_array_equal(restored["a"], array)
    assert restored["tag"] == "x"


def test_several_arrays_give_several_buffers_in_order():
    arrays = [np.full(1000, i, dtype=np.int32) for i in range(3)]
    sv = serialize(arrays)
    assert len(sv.buffers) == 3
    for i, restored in enumerate(deserialize(sv.data, sv.buffers)):
        np.testing.assert_array_equal(restored, arrays[i])


def test_a_non_contiguous_array_is_copied_in_band():
    array = np.arange(10_000, dtype=np.int64)[::3]
    sv = serialize(array)
    assert sv.buffers == []
    np.testing.assert_array_equal(deserialize(sv.data, sv.buffers), array)


def test_refs_inside_a_value_are_collected(core):
    first, second = ObjectRef(b"a" * 20, core=core), ObjectRef(b"b" * 20, core=core)
    assert core.increfs == [b"a" * 20, b"b" * 20]
    sv = serialize({"refs": [first], "nested": ({"deep": second},)})
    assert sorted(sv.contained) == [b"a" * 20, b"b" * 20]

    restored = deserialize(sv.data, sv.buffers)
    assert restored["refs"][0] == first and restored["nested"][0]["deep"] == second
    # Every rebuilt ref counts as a reference of its own.
    assert core.increfs.count(b"a" * 20) == 2


def test_a_bare_ref_is_collected(core):
    ref = ObjectRef(b"x" * 20, core=core)
    assert serialize(ref).contained == [b"x" * 20]


def test_collection_does_not_leak_into_the_next_value(core):
    ref = ObjectRef(b"x" * 20, core=core)
    assert serialize([ref, object]).contained == [b"x" * 20]
    assert serialize([object]).contained == []


def test_refs_are_only_collected_while_serializing(core):
    ref = ObjectRef(b"x" * 20, core=core)
    pickle.dumps(ref)  # outside serialize: nothing to collect into, and no error
    assert serialize([object]).contained == []


# -- errors ---------------------------------------------------------------------------------


class CustomError(Exception):
    pass


def test_a_picklable_exception_keeps_its_type():
    sv = serialize_error(CustomError("boom"))
    assert sv.is_error
    restored = deserialize(sv.data, sv.buffers)
    assert type(restored) is CustomError and str(restored) == "boom"


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def test_an_unpicklable_exception_falls_back_to_text():
    exc = HoldsALock("cannot ship me")
    with pytest.raises(TypeError):
        serialize(exc)
    sv = serialize_error(exc)
    assert sv.is_error
    restored = deserialize(sv.data, sv.buffers)
    assert isinstance(restored, TaskError)
    assert restored.cause_type_name == "HoldsALock"
    assert "cannot ship me" in str(restored)
    assert "HoldsALock" in restored.remote_traceback


def test_the_fallback_keeps_task_details_from_the_exception():
    exc = HoldsALock("")
    exc.remote_traceback = "Traceback ...\nHoldsALock"
    exc.task_name = "my_task"
    exc.pid = 1234
    restored = deserialize(*_data_and_buffers(serialize_error(exc)))
    assert (restored.task_name, restored.pid) == ("my_task", 1234)
    assert restored.remote_traceback == "Traceback ...\nHoldsALock"
    assert str(restored) == "Traceback ...\nHoldsALock"  # no message: the text stands in


def _data_and_buffers(sv):
    return sv.data, sv.buffers
