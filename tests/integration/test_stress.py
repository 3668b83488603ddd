"""Several driver threads mixing every kind of call at once: nothing fails, nothing hangs,
and when they are done the object store is empty again (no ref was leaked).

Refs caught in reference cycles are freed when Python's cycle collector runs, as any
object in a cycle is, so the test collects before it checks the store.

Run on demand (SHOAL_STRESS=1): on a loaded machine (two busy loops beside it) it fails
now and then because an actor in use dies "killed by signal SIGKILL" while nobody killed
it; that is under investigation, so the test stays out of CI until it is fixed.
Reproduce: ``SHOAL_STRESS=1 python -m pytest tests/integration/test_stress.py`` with
``python -c "while True: pass" &`` twice.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import traceback

import numpy as np
import pytest
import shoal
import shoal.state
from shoal import testing
from shoal.exceptions import GetTimeoutError, TaskCancelledError, WorkerCrashedError

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        os.environ.get("SHOAL_STRESS") != "1", reason="stress test: set SHOAL_STRESS=1"
    ),
]


def test_mixed_concurrent_load_leaves_nothing_behind(make_cluster):
    make_cluster(num_cpus=2)

    @shoal.remote
    def inc(x):
        return x + 1

    @shoal.remote
    def big(n):
        return np.ones(n)

    @shoal.remote(num_returns="streaming")
    def gen(n):
        for i in range(n):
            yield np.full(30_000, i)

    @shoal.remote
    def nested_big(n):
        return float(shoal.get(big.remote(n)).sum())

    @shoal.remote
    def consume(arr, lst):
        return float(arr.sum()) + len(lst)

    @shoal.remote
    class Store:
        def __init__(self):
            self.items = []

        def keep(self, x):
            self.items.append(x)
            return len(self.items)

    errors: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(30):
                kind = rng.randrange(8)
                if kind == 0:
                    values = [float(shoal.get(r, timeout=60).sum()) for r in gen.remote(4)]
                    assert values == [30_000.0 * j for j in range(4)]
                elif kind == 1:
                    r = big.remote(rng.choice([10, 200_000]))
                    assert shoal.get(consume.remote(r, [r]), timeout=60) > 0
                elif kind == 2:
                    assert shoal.get(nested_big.remote(200_000), timeout=60) == 200_000
                elif kind == 3:
                    store = Store.remote()
                    arr = shoal.put(np.ones(100_000))
                    shoal.get(store.keep.remote(arr), timeout=60)
                    assert shoal.get(store.keep.remote([arr]), timeout=60) == 2
                elif kind == 4:
                    name = f"s{seed}-{i}"
                    store = Store.options(name=name, namespace="stress").remote()
                    assert (
                        shoal.get(
                            shoal.get_actor(name, namespace="stress").keep.remote(1), timeout=60
                        )
                        == 1
                    )
                    shoal.kill(store)
                elif kind == 5:
                    r = inc.remote(1)
                    shoal.cancel(r, force=rng.random() < 0.3)
                    try:
                        shoal.get(r, timeout=60)
                    except (TaskCancelledError, WorkerCrashedError):
                        pass
                elif kind == 6:
                    try:
                        shoal.get(nested_big.remote(10), timeout=0.001)
                    except GetTimeoutError:
                        pass
                else:
                    p = shoal.put(np.arange(rng.choice([5, 50_000])))
                    assert shoal.get(inc.remote(shoal.get(p, timeout=60)[-1]), timeout=60) >= 5
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert errors == [], errors[0]
    gc.collect()
    try:
        testing.wait_for(lambda: shoal.state.summarize_objects()["objects"] == 0, timeout=30)
    except TimeoutError:
        raise AssertionError(
            f"objects left in the store: {shoal.state.list_objects(limit=5)}"
        ) from None
