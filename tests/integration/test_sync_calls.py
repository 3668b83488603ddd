"""Synchronous actor calls read their reply in the calling thread (the connection is lent
to it, and parked in the IO thread). Everything around that path must keep working: async
bursts after sync calls, replies nobody reads at once, chained calls, other threads and
asyncio waiting on a ref, several threads calling one actor, timeouts and actor deaths.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import shoal
from shoal import _api
from shoal.exceptions import ActorDiedError, GetTimeoutError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]


@pytest.fixture
def actor(track_actor):
    @shoal.remote
    class Echo:
        def __init__(self):
            self.calls = 0

        def echo(self, x):
            self.calls += 1
            return x

        def count(self):
            return self.calls

        def sleep(self, seconds):
            time.sleep(seconds)
            return seconds

    return track_actor(Echo.remote())


def _conn_of(handle):
    core = _api._auto_init()
    st = core.actors.actors[handle._actor_id]
    return st.conn.conn


def test_a_run_of_sync_calls_parks_the_connection_and_stays_correct(actor):
    for i in range(200):
        assert shoal.get(actor.echo.remote(i), timeout=30) == i
    conn = _conn_of(actor)
    assert conn.parked and conn.lent_to is None
    # Then an async burst on the parked connection, then sync calls again.
    refs = [actor.echo.remote(i) for i in range(500)]
    assert shoal.get(refs, timeout=30) == list(range(500))
    assert [shoal.get(actor.echo.remote(i), timeout=30) for i in range(50)] == list(range(50))
    assert shoal.get(actor.count.remote(), timeout=30) == 750


def test_a_reply_nobody_reads_at_once_is_still_delivered(actor):
    for i in range(20):
        shoal.get(actor.echo.remote(i), timeout=30)
    ref = actor.echo.remote("later")  # pushed on the parked connection; not read now
    time.sleep(0.3)  # longer than the IO loop's sweep: the IO thread reads it by then
    core = _api._auto_init()
    assert core.lookup(ref.binary()) is not None
    assert shoal.get(ref, timeout=30) == "later"


def test_wait_and_chained_calls_after_sync_calls(actor, track_actor):
    for i in range(20):
        shoal.get(actor.echo.remote(i), timeout=30)
    ready, _ = shoal.wait([actor.echo.remote("w")], num_returns=1, timeout=30)
    assert len(ready) == 1 and shoal.get(ready[0]) == "w"

    @shoal.remote
    class Adder:
        def add(self, x, y):
            return x + y

    adder = track_actor(Adder.remote())
    assert shoal.get(adder.add.remote(actor.echo.remote(40), 2), timeout=30) == 42
    assert shoal.get(actor.echo.remote(adder.add.remote(1, 2)), timeout=30) == 3


def test_another_thread_and_asyncio_wait_for_a_ref_made_here(actor):
    for i in range(20):
        shoal.get(actor.echo.remote(i), timeout=30)
    ref = actor.echo.remote("shared")
    got = []
    thread = threading.Thread(target=lambda: got.append(shoal.get(ref, timeout=30)))
    thread.start()
    thread.join(30)
    assert got == ["shared"]

    async def await_it():
        return await actor.echo.remote("awaited")

    assert asyncio.run(await_it()) == "awaited"


def test_threads_calling_one_actor_synchronously(actor):
    errors = []

    def run(tag):
        try:
            for i in range(100):
                assert shoal.get(actor.echo.remote((tag, i)), timeout=30) == (tag, i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert shoal.get(actor.count.remote(), timeout=30) == 400


def test_a_timeout_while_reading_the_reply_here(actor):
    shoal.get(actor.echo.remote(0), timeout=30)
    ref = actor.sleep.remote(1.0)
    start = time.monotonic()
    with pytest.raises(GetTimeoutError):
        shoal.get(ref, timeout=0.2)
    assert time.monotonic() - start < 0.9
    assert shoal.get(ref, timeout=30) == 1.0  # the reply still arrives afterwards


def test_the_actor_dying_while_its_reply_is_awaited_here(track_actor):
    @shoal.remote
    class Mortal:
        def ping(self):
            return "pong"

        def die(self):
            import os

            os._exit(1)

    mortal = track_actor(Mortal.remote())
    for _ in range(10):
        assert shoal.get(mortal.ping.remote(), timeout=30) == "pong"
    start = time.monotonic()
    with pytest.raises(ActorDiedError):
        shoal.get(mortal.die.remote(), timeout=30)
    assert time.monotonic() - start < 10


PESTERED = """
import os, random, signal, threading, time
import shoal

shoal.init(num_cpus=1)


@shoal.remote
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


c = Counter.remote()
shoal.get(c.inc.remote(), timeout=30)
done = threading.Event()
handled = threading.Event()
go = threading.Event()


def pester():
    # One SIGINT at a time, the next once the last one was handled: so every one lands
    # inside the calls below, at a random point of them.
    rng = random.Random(7)
    go.wait()
    for _ in range(300):
        time.sleep(rng.uniform(0.0002, 0.002))
        handled.clear()
        os.kill(os.getpid(), signal.SIGINT)
        assert handled.wait(30), "a SIGINT was never raised"
    done.set()


threading.Thread(target=pester, daemon=True).start()
interrupted = 0
while True:
    try:
        go.set()
        while not done.is_set():
            shoal.get(c.inc.remote(), timeout=20)
        break
    except KeyboardInterrupt:
        interrupted += 1
        handled.set()
last = 0
for _ in range(50):
    now = shoal.get(c.inc.remote(), timeout=10)
    assert now > last, (now, last)
    last = now
print("ok", interrupted)
"""


def test_ctrl_c_in_the_middle_of_sync_calls_leaves_the_connection_usable(run_driver):
    # The calling thread does the loop's work (push, read the reply): a KeyboardInterrupt
    # must never land half-way through it, or a message is lost or the stream corrupted.
    out = run_driver(PESTERED, timeout=120)
    assert out.split() == ["ok", "300"]


def test_results_from_two_parked_connections_come_without_waiting_for_the_sweep(actor, track_actor):
    @shoal.remote
    class Other:
        def echo(self, x):
            return x

    other = track_actor(Other.remote())
    for i in range(20):  # both connections end up parked
        shoal.get(actor.echo.remote(i), timeout=30)
        shoal.get(other.echo.remote(i), timeout=30)
    kept = []  # no ref is dropped: releases would also wake the IO thread
    waited = 0.0
    for i in range(20):
        # Sync calls park the connections again; then two results from two connections:
        # no single one to read here, so the IO thread must watch both at once, not at its
        # next 0.1 s sweep (a parked one then costs up to 0.1 s, ~1 s over the loop).
        kept += [actor.echo.remote(i), other.echo.remote(i)]
        assert shoal.get(kept[-2], timeout=30) == i and shoal.get(kept[-1], timeout=30) == i
        kept += [actor.echo.remote(i), other.echo.remote(-i)]
        start = time.monotonic()
        assert shoal.get(kept[-2:], timeout=30) == [i, -i]
        waited += time.monotonic() - start
    assert waited < 0.2
