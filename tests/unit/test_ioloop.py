"""IOLoop: cross-thread wake-ups, timer order, and surviving a failing callback."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from shoal._ioloop import IOLoop

pytestmark = pytest.mark.timeout(10)

WAIT = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class LoopThread:
    """Runs a loop in a background thread; always stops and joins it."""

    def __init__(self, loop: IOLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=loop.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the loop did not stop"
        self.loop.close()


@pytest.fixture
def running() -> Iterator[LoopThread]:
    runner = LoopThread(IOLoop())
    runner.start()
    yield runner
    if runner.thread.is_alive():
        runner.stop()


def test_call_soon_threadsafe_wakes_a_loop_blocked_in_poll(running):
    # No timers and no sockets: the loop sleeps in poll() with no timeout until woken.
    ran_in: list[threading.Thread] = []
    done = threading.Event()

    def callback(tag):
        ran_in.append(threading.current_thread())
        assert tag == "hello"
        done.set()

    running.loop.call_soon_threadsafe(callback, "hello")
    assert done.wait(WAIT)
    # Again, now that the loop has certainly been idle in poll() once.
    done.clear()
    running.loop.call_soon_threadsafe(callback, "hello")
    assert done.wait(WAIT)
    assert ran_in == [running.thread, running.thread]
    assert running.loop.in_loop_thread() is False  # asked from this thread


def test_many_calls_from_many_threads_all_run_in_order_per_thread(running):
    results: list[tuple[int, int]] = []
    all_done = threading.Event()
    total = 4 * 200

    def record(thread_no, n):
        results.append((thread_no, n))
        if len(results) == total:
            all_done.set()

    def submit(thread_no):
        for n in range(200):
            running.loop.call_soon_threadsafe(record, thread_no, n)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert all_done.wait(WAIT)
    for thread_no in range(4):
        assert [n for t, n in results if t == thread_no] == list(range(200))


def test_stop_from_another_thread_ends_run(running):
    running.stop()
    assert running.loop.stopped


def test_timers_run_in_deadline_order_then_insertion_order():
    clock = FakeClock()
    loop = IOLoop(clock=clock)
    order: list[str] = []
    loop.call_later(3.0, order.append, "third")
    loop.call_later(1.0, order.append, "first")
    loop.call_later(2.0, order.append, "second-a")
    loop.call_later(2.0, order.append, "second-b")
    cancelled = loop.call_later(1.5, order.append, "cancelled")
    cancelled.cancel()
    loop.call_later(50.0, order.append, "not yet due")
    loop.call_later(4.0, loop.stop)
    clock.now += 10.0  # everything up to 4 s is due; the 50 s timer is not
    loop.run()
    loop.close()
    assert order == ["first", "second-a", "second-b", "third"]


def test_a_timer_fires_after_its_delay_in_real_time(running):
    fired = threading.Event()
    times: list[float] = []
    start = time.monotonic()

    def schedule():
        running.loop.call_later(0.05, lambda: (times.append(time.monotonic()), fired.set()))

    running.loop.call_soon_threadsafe(schedule)
    assert fired.wait(WAIT)
    assert times[0] - start >= 0.05


def test_a_raising_callback_does_not_stop_the_loop(running, caplog):
    caplog.set_level(logging.ERROR, logger="shoal._ioloop")
    done = threading.Event()

    def boom():
        raise RuntimeError("a bug in a handler")

    running.loop.call_soon_threadsafe(boom)
    running.loop.call_soon_threadsafe(lambda: running.loop.call_later(0.0, boom))
    running.loop.call_soon_threadsafe(lambda: running.loop.call_later(0.01, done.set))
    assert done.wait(WAIT)
    assert running.thread.is_alive()
    errors = [r for r in caplog.records if "error in IO loop callback" in r.getMessage()]
    assert len(errors) == 2
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in errors)


def test_a_raising_reader_does_not_stop_the_loop(caplog):
    caplog.set_level(logging.ERROR, logger="shoal._ioloop")
    # Datagrams keep message boundaries, as the test wants.
    pull, push = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[bytes] = []
    loop = IOLoop()
    runner = LoopThread(loop)

    def on_readable():
        message = pull.recv(64)
        received.append(message)
        if message == b"raise":
            raise ValueError("reader failed")
        if message == b"last":
            loop.stop()

    loop.add_reader(pull, on_readable)
    runner.start()
    try:
        for message in (b"raise", b"after", b"last"):
            loop.call_soon_threadsafe(push.send, message)  # sockets only in the loop's thread
        runner.thread.join(WAIT)
        assert not runner.thread.is_alive()
        assert received == [b"raise", b"after", b"last"]
        assert any("error in IO loop callback" in r.getMessage() for r in caplog.records)
    finally:
        if runner.thread.is_alive():
            runner.stop()
        else:
            loop.close()
        pull.close()
        push.close()


def test_remove_reader_stops_callbacks():
    loop = IOLoop()
    calls: list[int] = []
    r, w = os.pipe()
    try:
        loop.add_reader(r, lambda: calls.append(1))
        loop.remove_reader(r)
        loop.remove_reader(r)  # twice is harmless
        os.write(w, b"x")
        loop.call_soon(loop.stop)
        loop.run()
        assert calls == []
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_a_writer_is_called_only_while_registered_and_its_socket_has_room():
    loop = IOLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        calls: list[str] = []
        loop.add_reader(a.fileno(), lambda: calls.append("read"))
        loop.add_writer(a.fileno(), lambda: calls.append("write"))
        loop.run_once(0)
        assert calls == []  # full, and nothing to read

        with contextlib.suppress(BlockingIOError):
            while b.recv(1 << 20):
                pass
        loop.run_once(1000)
        assert calls == ["write"]

        loop.remove_writer(a.fileno())
        calls.clear()
        loop.run_once(0)
        assert calls == []  # the reader stays registered, with nothing to read

        b.send(b"y")
        loop.run_once(1000)
        assert calls == ["read"]
        loop.remove_reader(a.fileno())
    finally:
        loop.close()
        a.close()
        b.close()


def test_run_inline_runs_in_the_calling_thread_while_the_loop_sleeps(running):
    loop = running.loop
    wakes = []
    real_on_wake = loop._on_wake
    loop._readers[loop._wake_fd] = lambda: (wakes.append(1), real_on_wake())
    ran = []

    def work(tag):
        ran.append((tag, threading.current_thread(), loop.in_loop_thread()))

    time.sleep(0.05)  # the loop is asleep in poll
    loop.run_inline(work, "a")
    assert ran == [("a", threading.current_thread(), True)]
    assert not loop.in_loop_thread()
    time.sleep(0.05)
    assert wakes == []  # nothing woke the loop thread


def test_run_inline_waits_for_a_busy_loop_and_keeps_the_order_of_earlier_calls(running):
    loop = running.loop
    order: list[tuple[str, threading.Thread]] = []
    release = threading.Event()
    busy = threading.Event()

    def block():
        busy.set()
        release.wait(WAIT)

    loop.call_soon_threadsafe(block)
    assert busy.wait(WAIT)
    # The loop thread runs a callback: a call made now waits for it, and runs after the
    # calls scheduled before it.
    loop.call_soon_threadsafe(lambda: order.append(("queued", threading.current_thread())))
    threading.Timer(0.1, release.set).start()
    loop.run_inline(lambda: order.append(("inline", threading.current_thread())))
    assert release.is_set()
    assert [tag for tag, _ in order] == ["queued", "inline"]
    assert order[1][1] is threading.current_thread()


def test_a_reader_added_while_borrowing_wakes_the_loop(running):
    loop = running.loop
    a, b = socket.socketpair()
    got = threading.Event()
    try:
        time.sleep(0.05)
        loop.run_inline(loop.add_reader, a.fileno(), got.set)
        b.send(b"x")
        assert got.wait(WAIT)
        loop.run_inline(loop.remove_reader, a.fileno())
    finally:
        a.close()
        b.close()


@pytest.fixture
def sigint_handler() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_sigint_waits_until_the_main_thread_lets_go_of_the_loop(sigint_handler):
    loop = IOLoop()
    steps: list[str] = []

    def work():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # plenty of bytecodes for the handler to have run
            pass
        time.sleep(0.01)
        steps.append("finished")

    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_inline(work)
        assert steps == ["finished"]
        # Outside the loop's work, the interrupt comes at once as usual.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        loop.close()


def test_the_main_thread_does_not_borrow_under_a_handler_it_cannot_hold_off(sigint_handler):
    loop = IOLoop()
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        assert not loop.try_enter()
        ran: list[str] = []
        loop.run_inline(ran.append, "x")
        assert ran == []  # handed to the loop thread instead
        loop.run_once(0)
        assert ran == ["x"]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert loop.try_enter()  # nothing can be raised
        loop.leave()
    finally:
        loop.close()
