"""Actors: creation, ordered calls, state, handles passed around, kill, async and threaded
actors, named actors. (Detached actors need `shoal start`: see test_cli.py.)

Classes are defined inside fixtures and tests, so that cloudpickle ships them by value.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import shoal
from shoal.exceptions import ActorDiedError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]


@pytest.fixture
def counter_cls():
    @shoal.remote
    class Counter:
        def __init__(self, start=0):
            self.n = start

        def increment(self):
            self.n += 1
            return self.n

        def value(self):
            return self.n

    return Counter


@pytest.fixture
def namespace():
    return f"tests-{uuid.uuid4().hex[:8]}"


def test_spec_example_counter(track_actor):
    @shoal.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def increment(self):
            self.n += 1
            return self.n

    c = track_actor(Counter.remote())
    [c.increment.remote() for _ in range(5)]
    assert shoal.get(c.increment.remote(), timeout=30) == 6


def test_remote_returns_an_actor_handle(counter_cls, track_actor):
    c = track_actor(counter_cls.remote())
    assert isinstance(c, shoal.ActorHandle)
    assert isinstance(c.increment.remote(), shoal.ObjectRef)


def test_constructor_arguments(counter_cls, track_actor):
    c = track_actor(counter_cls.remote(start=10))
    assert shoal.get(c.increment.remote(), timeout=30) == 11


def test_state_persists_between_calls(counter_cls, track_actor):
    c = track_actor(counter_cls.remote())
    for expected in range(1, 4):
        assert shoal.get(c.increment.remote(), timeout=30) == expected
    assert shoal.get(c.value.remote(), timeout=30) == 3


def test_actors_do_not_share_state(counter_cls, track_actor):
    a, b = track_actor(counter_cls.remote()), track_actor(counter_cls.remote())
    shoal.get([a.increment.remote(), a.increment.remote()], timeout=30)
    assert shoal.get(b.value.remote(), timeout=30) == 0


def test_calls_from_one_caller_run_in_submission_order(track_actor):
    @shoal.remote
    class Log:
        def __init__(self):
            self.items = []

        def append(self, item, payload):
            self.items.append(item)

        def read(self):
            return self.items

    log = track_actor(Log.remote())
    # Payloads of varied sizes, so that inline and larger messages interleave.
    for i in range(100):
        log.append.remote(i, b"x" * (i % 7) * 40_000)
    assert shoal.get(log.read.remote(), timeout=30) == list(range(100))


def test_default_actor_runs_one_call_at_a_time(track_actor):
    @shoal.remote
    class Tracker:
        def __init__(self):
            self.active = 0
            self.peak = 0

        def work(self):
            self.active += 1
            self.peak = max(self.peak, self.active)
            time.sleep(0.02)  # widen the window in which an overlap would show
            self.active -= 1

        def peak_concurrency(self):
            return self.peak

    t = track_actor(Tracker.remote())
    shoal.get([t.work.remote() for _ in range(8)], timeout=30)
    assert shoal.get(t.peak_concurrency.remote(), timeout=30) == 1


def test_handle_passed_to_a_task(counter_cls, track_actor):
    @shoal.remote
    def bump(counter, times):
        return shoal.get([counter.increment.remote() for _ in range(times)])[-1]

    c = track_actor(counter_cls.remote())
    assert shoal.get(bump.remote(c, 3), timeout=30) == 3
    assert shoal.get(c.value.remote(), timeout=30) == 3


def test_handle_passed_to_another_actor(counter_cls, track_actor):
    @shoal.remote
    class Forwarder:
        def __init__(self, target):
            self.target = target

        def forward(self):
            return shoal.get(self.target.increment.remote())

        def forward_to(self, other):
            return shoal.get(other.increment.remote())

    target, other = track_actor(counter_cls.remote()), track_actor(counter_cls.remote(start=100))
    f = track_actor(Forwarder.remote(target))
    assert shoal.get([f.forward.remote(), f.forward.remote()], timeout=30) == [1, 2]
    assert shoal.get(f.forward_to.remote(other), timeout=30) == 101
    assert shoal.get(target.value.remote(), timeout=30) == 2


def test_method_decorator_sets_num_returns(track_actor):
    @shoal.remote
    class Splitter:
        @shoal.method(num_returns=2)
        def split(self, pair):
            return pair[0], pair[1]

    s = track_actor(Splitter.remote())
    left, right = s.split.remote(("l", "r"))
    assert shoal.get([left, right], timeout=30) == ["l", "r"]


def test_kill_makes_later_calls_raise_actor_died_error(counter_cls):
    c = counter_cls.remote()
    assert shoal.get(c.increment.remote(), timeout=30) == 1
    shoal.kill(c)
    with pytest.raises(ActorDiedError):
        shoal.get(c.increment.remote(), timeout=30)


def test_async_actor_runs_calls_concurrently(track_actor):
    @shoal.remote
    class Rendezvous:
        def __init__(self, expected):
            self.expected = expected
            self.arrived = 0
            self.everyone = asyncio.Event()

        async def arrive(self):
            self.arrived += 1
            if self.arrived == self.expected:
                self.everyone.set()
            # Deadlocks (then times out) unless all calls are in flight together.
            await asyncio.wait_for(self.everyone.wait(), timeout=20)
            return self.arrived

    r = track_actor(Rendezvous.remote(5))
    assert shoal.get([r.arrive.remote() for _ in range(5)], timeout=40) == [5] * 5


def test_async_actor_honours_max_concurrency(track_actor):
    @shoal.remote
    class Limited:
        def __init__(self):
            self.active = 0
            self.peak = 0
            self.pair_formed = asyncio.Event()

        async def enter(self):
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active == 2:
                self.pair_formed.set()
            # Needs 2 calls at once (else times out); a third would raise the peak.
            await asyncio.wait_for(self.pair_formed.wait(), timeout=20)
            await asyncio.sleep(0.05)
            self.active -= 1

        async def peak_concurrency(self):
            return self.peak

    a = track_actor(Limited.options(max_concurrency=2).remote())
    shoal.get([a.enter.remote() for _ in range(6)], timeout=40)
    assert shoal.get(a.peak_concurrency.remote(), timeout=30) == 2


def test_threaded_actor_runs_max_concurrency_calls_at_once(track_actor):
    @shoal.remote
    class Meeting:
        def __init__(self):
            self.barrier = threading.Barrier(4)

        def meet(self):
            # Raises BrokenBarrierError unless 4 calls wait at the same time.
            return self.barrier.wait(timeout=20)

    m = track_actor(Meeting.options(max_concurrency=4).remote())
    assert sorted(shoal.get([m.meet.remote() for _ in range(4)], timeout=40)) == [0, 1, 2, 3]


def test_named_actor_is_found_by_name(counter_cls, namespace, track_actor):
    c = track_actor(counter_cls.options(name="counter", namespace=namespace).remote())
    assert shoal.get(c.increment.remote(), timeout=30) == 1
    found = shoal.get_actor("counter", namespace=namespace)
    assert isinstance(found, shoal.ActorHandle)
    assert shoal.get(found.increment.remote(), timeout=30) == 2


def test_get_actor_raises_value_error_when_missing(namespace):
    with pytest.raises(ValueError):
        shoal.get_actor("no-such-actor", namespace=namespace)


def test_named_actor_is_not_found_in_another_namespace(counter_cls, namespace, track_actor):
    c = track_actor(counter_cls.options(name="hidden", namespace=namespace).remote())
    shoal.get(c.value.remote(), timeout=30)
    with pytest.raises(ValueError):
        shoal.get_actor("hidden", namespace=namespace + "-other")


def test_get_if_exists_returns_the_existing_actor(counter_cls, namespace, track_actor):
    options = {"name": "shared", "namespace": namespace, "get_if_exists": True}
    first = track_actor(counter_cls.options(**options).remote())
    assert shoal.get(first.increment.remote(), timeout=30) == 1
    second = counter_cls.options(**options).remote()
    assert shoal.get(second.increment.remote(), timeout=30) == 2
