"""Objects: put/get, get timeouts, wait, large values through shared memory, awaiting refs
and turning them into futures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import numpy as np
import pytest
import shoal
from shoal.exceptions import GetTimeoutError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]

TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize(
    "value",
    [0, "text", b"bytes", None, [1, "two", 3.0], {"k": (1, 2)}, {1, 2, 3}],
    ids=lambda v: type(v).__name__,
)
def test_put_get_roundtrip(value):
    ref = shoal.put(value)
    assert isinstance(ref, shoal.ObjectRef)
    assert shoal.get(ref, timeout=30) == value


def test_get_list_keeps_order():
    refs = [shoal.put(i) for i in range(20)]
    assert shoal.get(refs[::-1], timeout=30) == list(range(20))[::-1]


def test_get_timeout_raises_get_timeout_error(gate, wait_path):
    release = gate()

    @shoal.remote
    def blocked():
        wait_path(release)
        return 1

    ref = blocked.remote()
    start = time.monotonic()
    with pytest.raises(GetTimeoutError) as info:
        shoal.get(ref, timeout=0.3)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, TimeoutError)
    Path(release).touch()
    assert shoal.get(ref, timeout=30) == 1


def test_wait_returns_ready_and_not_ready(gate, wait_path):
    release = gate()

    @shoal.remote
    def fast():
        return "fast"

    @shoal.remote
    def slow():
        wait_path(release)
        return "slow"

    slow_ref, fast_ref = slow.remote(), fast.remote()
    ready, not_ready = shoal.wait([slow_ref, fast_ref], num_returns=1, timeout=30)
    assert ready == [fast_ref]
    assert not_ready == [slow_ref]
    Path(release).touch()
    assert shoal.get(slow_ref, timeout=30) == "slow"


def test_wait_timeout_returns_what_is_ready(gate, wait_path):
    release = gate()

    @shoal.remote
    def slow():
        wait_path(release)

    ref = slow.remote()
    start = time.monotonic()
    ready, not_ready = shoal.wait([ref], num_returns=1, timeout=0.3)
    assert (ready, not_ready) == ([], [ref])
    assert time.monotonic() - start < 10


def test_wait_returns_at_most_num_returns():
    refs = [shoal.put(i) for i in range(3)]
    ready, not_ready = shoal.wait(refs, num_returns=2, timeout=30)
    assert len(ready) == 2
    assert len(not_ready) == 1
    assert set(ready) | set(not_ready) == set(refs)


def test_large_numpy_array_roundtrip_through_put():
    array = np.arange(TEN_MB // 8, dtype=np.float64)
    result = shoal.get(shoal.put(array), timeout=30)
    assert result.dtype == array.dtype
    np.testing.assert_array_equal(result, array)


def test_get_of_large_numpy_array_is_read_only():
    result = shoal.get(shoal.put(np.ones(TEN_MB, dtype=np.uint8)), timeout=30)
    assert result.flags.writeable is False


def test_large_bytes_roundtrip():
    data = bytes(range(256)) * (TEN_MB // 256)
    assert shoal.get(shoal.put(data), timeout=30) == data


def test_large_array_as_task_argument():
    @shoal.remote
    def checksum(a):
        return a.shape, float(a.sum())

    array = np.arange(TEN_MB // 8, dtype=np.float64)
    expected = (array.shape, float(array.sum()))
    assert shoal.get(checksum.remote(array), timeout=30) == expected
    ref = shoal.put(array)
    assert shoal.get([checksum.remote(ref), checksum.remote(ref)], timeout=30) == [expected] * 2


def test_large_array_as_task_result():
    @shoal.remote
    def make(n):
        return np.full(n, 7, dtype=np.uint8)

    result = shoal.get(make.remote(TEN_MB), timeout=30)
    assert result.shape == (TEN_MB,)
    assert int(result.min()) == 7 and int(result.max()) == 7
    assert result.flags.writeable is False


def test_ref_is_awaitable():
    @shoal.remote
    def double(x):
        return 2 * x

    async def main():
        one = await double.remote(1)
        many = await asyncio.gather(*(double.remote(i) for i in range(3)))
        return one, list(many)

    assert asyncio.run(asyncio.wait_for(main(), timeout=30)) == (2, [0, 2, 4])


def test_ref_future():
    @shoal.remote
    def double(x):
        return 2 * x

    future = double.remote(21).future()
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 42
