"""Actor fault tolerance: restarts (max_restarts), resent calls (max_task_retries), the
reasons ActorDiedError gives, and calls after the final death failing at once.

Workers are killed for real (SIGKILL from this process, os._exit inside a method). Each
test has a cluster of its own, shut down and checked for leaks at teardown (fresh_cluster).
Classes are defined inside the tests, so that cloudpickle ships them by value.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
import shoal
from shoal import testing
from shoal.exceptions import (
    ActorDiedError,
    ActorError,
    ActorUnavailableError,
    TaskCancelledError,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("fresh_cluster")]

# How long a call on an actor that is dead for good may take to fail: it must not wait
# for anything (generous, for a loaded 2-core machine).
FAIL_FAST_SECONDS = 2.0


def _kill9(pid: int) -> None:
    """SIGKILL a worker and wait until it is gone (reaped by its node).

    A call sent while the worker still lives (even a moment before it dies) may have run,
    so it is resent only with max_task_retries; tests that mean to make a call after the
    death wait for it here."""
    os.kill(pid, signal.SIGKILL)
    testing.wait_for(lambda: not psutil.pid_exists(pid), timeout=15)


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def _assert_fails_fast(ref_maker, match: str | None = None) -> ActorDiedError:
    start = time.monotonic()
    with pytest.raises(ActorDiedError, match=match) as info:
        shoal.get(ref_maker(), timeout=30)
    elapsed = time.monotonic() - start
    assert elapsed < FAIL_FAST_SECONDS, f"a call on a dead actor took {elapsed:.2f} s to fail"
    return info.value


def _make_recorder(log: str):
    """An actor that logs its constructor runs and its calls, one line each, with its pid."""

    @shoal.remote
    class Recorder:
        def __init__(self, start=0):
            self.n = start
            with open(log, "a") as f:
                f.write(f"init {os.getpid()} {start}\n")

        def pid(self):
            return os.getpid()

        def incr(self):
            self.n += 1
            return self.n

        def record(self, i):
            with open(log, "a") as f:
                f.write(f"call {os.getpid()} {i}\n")
            return i

        def die(self):
            os._exit(3)

    return Recorder


# ------------------------------------------------------------------------ no restarts


def test_actor_without_restarts_dies_with_the_signal_and_later_calls_fail_fast(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).remote()
    pid = shoal.get(a.pid.remote(), timeout=30)
    _kill9(pid)
    err = _assert_fails_fast(lambda: a.incr.remote(), match="SIGKILL")
    assert "worker process died (killed by signal SIGKILL (9))" in str(err)
    assert err.actor_id == a.actor_id
    # Once known dead, every call fails at once, as do calls through a handle that a task
    # gets (another process, which learns of the death from the head).
    _assert_fails_fast(lambda: a.incr.remote())

    @shoal.remote(max_retries=0)
    def use(handle):
        try:
            shoal.get(handle.incr.remote(), timeout=20)
        except ActorDiedError as exc:
            return str(exc)
        return "no error"

    assert "SIGKILL" in shoal.get(use.remote(a), timeout=30)
    assert [line.split()[0] for line in _lines(log)] == ["init"]  # never restarted


def test_actor_killed_with_kill_says_so_and_is_not_restarted(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).options(max_restarts=3).remote()
    pid = shoal.get(a.pid.remote(), timeout=30)
    shoal.kill(a)  # no_restart=True by default, as in Ray
    err = _assert_fails_fast(lambda: a.incr.remote(), match="killed with shoal.kill")
    assert err.reason == "it was killed with shoal.kill()"
    testing.wait_for(lambda: not psutil.pid_exists(pid), timeout=15)
    # The head says so too (not only this process, which marked it dead at once): a task,
    # which asks the head, gets the same reason.

    @shoal.remote(max_retries=0)
    def use(handle):
        try:
            shoal.get(handle.incr.remote(), timeout=20)
        except ActorDiedError as exc:
            return exc.reason
        return "no error"

    assert shoal.get(use.remote(a), timeout=30) == "it was killed with shoal.kill()"
    assert len(_lines(log)) == 1  # never restarted


# -------------------------------------------------------------------------- restarts


def test_restarts_rerun_the_constructor_then_final_death_says_out_of_restarts(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).options(max_restarts=2).remote(10)
    assert shoal.get(a.incr.remote(), timeout=30) == 11
    assert shoal.get(a.incr.remote(), timeout=30) == 12
    pids = [shoal.get(a.pid.remote(), timeout=30)]
    for _ in range(2):
        _kill9(pids[-1])
        # A call made now waits for the restarted actor, whose state the constructor
        # built again from the original arguments.
        assert shoal.get(a.incr.remote(), timeout=30) == 11
        assert shoal.get(a.incr.remote(), timeout=30) == 12
        pids.append(shoal.get(a.pid.remote(), timeout=30))
    assert len(set(pids)) == 3
    inits = [line.split() for line in _lines(log) if line.startswith("init")]
    assert [(int(p), s) for _, p, s in inits] == [(pid, "10") for pid in pids]
    _kill9(pids[-1])
    err = _assert_fails_fast(lambda: a.incr.remote(), match="no restarts left")
    assert "killed by signal SIGKILL (9)" in str(err)
    assert "restarted 2 of max_restarts=2 times" in str(err)
    _assert_fails_fast(lambda: a.incr.remote())
    assert len(_lines(log)) == 3  # no fourth constructor run


def test_calls_made_while_restarting_wait_for_the_restarted_actor(tmp_path, gate):
    log, slow = str(tmp_path / "log"), gate()

    @shoal.remote(max_restarts=1)
    class SlowRestart:
        def __init__(self):
            with open(log, "a") as f:
                f.write(f"init {os.getpid()}\n")
            with open(log) as f:
                restart = len(f.readlines()) > 1
            if restart:  # hold it until the test says so
                deadline = time.monotonic() + 60
                while not os.path.exists(slow) and time.monotonic() < deadline:
                    time.sleep(0.01)

        def pid(self):
            return os.getpid()

    a = SlowRestart.remote()
    first = shoal.get(a.pid.remote(), timeout=30)
    _kill9(first)
    testing.wait_for(lambda: len(_lines(log)) == 2, timeout=30)  # constructor rerunning
    refs = [a.pid.remote() for _ in range(3)]
    ready, _ = shoal.wait(refs, num_returns=1, timeout=0.5)
    assert ready == []  # they wait for the restart, they do not fail
    Path(slow).touch()
    second = shoal.get(refs, timeout=30)
    assert len(set(second)) == 1 and second[0] != first


def test_calls_in_flight_without_max_task_retries_fail_unavailable_then_work(tmp_path, gate):
    log, started, never = str(tmp_path / "log"), str(tmp_path / "started"), gate()

    @shoal.remote(max_restarts=1)
    class Busy:
        def __init__(self):
            with open(log, "a") as f:
                f.write(f"init {os.getpid()}\n")

        def block(self):
            open(started, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(never) and time.monotonic() < deadline:
                time.sleep(0.01)
            return "unblocked"

        def pid(self):
            return os.getpid()

    a = Busy.remote()
    pid = shoal.get(a.pid.remote(), timeout=30)
    blocked = a.block.remote()
    behind = a.pid.remote()  # sent too, waits behind block() in the actor
    testing.wait_for(lambda: os.path.exists(started), timeout=30)
    _kill9(pid)
    for ref in (blocked, behind):
        with pytest.raises(ActorUnavailableError, match="max_task_retries is 0") as info:
            shoal.get(ref, timeout=30)
        assert isinstance(info.value, ActorError)
        assert not isinstance(info.value, ActorDiedError)
        assert "being restarted" in str(info.value) and "SIGKILL" in str(info.value)
    assert shoal.get(a.pid.remote(), timeout=30) != pid
    assert len(_lines(log)) == 2


def test_max_task_retries_resends_calls_in_flight_exactly_in_order(tmp_path):
    log, started = str(tmp_path / "log"), str(tmp_path / "started")

    @shoal.remote(max_restarts=1, max_task_retries=-1)
    class Ordered:
        def __init__(self):
            with open(log, "a") as f:
                f.write(f"init {os.getpid()}\n")
            self.first_life = not shoal.get_runtime_context().was_current_actor_reconstructed

        def block(self):
            with open(log, "a") as f:
                f.write(f"block {os.getpid()}\n")
            if self.first_life:
                open(started, "w").close()
                time.sleep(60)  # killed meanwhile
            return "block done"

        def record(self, i):
            with open(log, "a") as f:
                f.write(f"call {os.getpid()} {i}\n")
            return i

        def pid(self):
            return os.getpid()

    a = Ordered.remote()
    first = shoal.get(a.pid.remote(), timeout=30)
    refs = [a.block.remote()] + [a.record.remote(i) for i in range(20)]
    testing.wait_for(lambda: os.path.exists(started), timeout=30)
    later = [a.record.remote(i) for i in range(20, 25)]  # sent while it was still alive
    _kill9(first)
    assert shoal.get(refs + later, timeout=60) == ["block done", *range(25)]
    second = shoal.get(a.pid.remote(), timeout=30)
    assert second != first
    lines = _lines(log)
    assert lines[:2] == [f"init {first}", f"block {first}"]  # nothing else ran first
    assert lines[2:] == [
        f"init {second}",
        f"block {second}",
        *[f"call {second} {i}" for i in range(25)],
    ]


def test_method_level_max_task_retries_overrides_the_actor(tmp_path):
    started = str(tmp_path / "started")

    @shoal.remote(max_restarts=1, max_task_retries=0)
    class Mixed:
        def __init__(self):
            self.pid = os.getpid()

        def block(self):
            open(started, "w").close()
            time.sleep(60)

        def get_pid(self):
            return self.pid

        @shoal.method(max_task_retries=2)
        def retried_pid(self):
            return os.getpid()

    a = Mixed.remote()
    first = shoal.get(a.get_pid.remote(), timeout=30)
    blocked = a.block.options(max_task_retries=0).remote()
    by_decorator = a.retried_pid.remote()
    by_options = a.get_pid.options(max_task_retries=1).remote()
    plain = a.get_pid.remote()
    testing.wait_for(lambda: os.path.exists(started), timeout=30)
    _kill9(first)
    with pytest.raises(ActorUnavailableError):
        shoal.get(blocked, timeout=30)
    second = shoal.get(by_decorator, timeout=30)
    assert second != first
    assert shoal.get(by_options, timeout=30) == second
    with pytest.raises(ActorUnavailableError):
        shoal.get(plain, timeout=30)


def test_a_method_that_exits_the_process_restarts_the_actor(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).options(max_restarts=1).remote()
    with pytest.raises(ActorUnavailableError, match="exit code 3"):
        shoal.get(a.die.remote(), timeout=30)
    assert shoal.get(a.incr.remote(), timeout=30) == 1
    # Out of restarts now: the call that was running fails as every later one does.
    with pytest.raises(ActorDiedError, match="no restarts left"):
        shoal.get(a.die.remote(), timeout=30)
    err = _assert_fails_fast(lambda: a.incr.remote(), match="no restarts left")
    assert "exit code 3" in str(err)


def test_kill_with_no_restart_false_restarts_then_kill_ends_it(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).options(max_restarts=1).remote()
    first = shoal.get(a.pid.remote(), timeout=30)
    shoal.kill(a, no_restart=False)
    testing.wait_for(lambda: len([x for x in _lines(log) if x.startswith("init")]) == 2, 30)
    second = shoal.get(a.pid.remote(), timeout=30)
    assert second != first and shoal.get(a.incr.remote(), timeout=30) == 1
    shoal.kill(a)
    _assert_fails_fast(lambda: a.incr.remote(), match=r"killed with shoal.kill\(\)")


def test_kill_with_no_restart_false_and_no_restarts_left_ends_it(tmp_path):
    log = str(tmp_path / "log")
    a = _make_recorder(log).remote()  # max_restarts=0
    shoal.get(a.pid.remote(), timeout=30)
    shoal.kill(a, no_restart=False)
    testing.wait_for(lambda: _dead(a), timeout=30)
    err = _assert_fails_fast(lambda: a.incr.remote(), match="no_restart=False")
    assert "no restarts left" not in str(err)  # it never had any


def _dead(handle) -> bool:
    try:
        shoal.get(handle.pid.remote(), timeout=30)
    except ActorDiedError:
        return True
    return False


def test_constructor_failure_gives_its_traceback_and_is_not_restarted(tmp_path):
    log = str(tmp_path / "log")

    @shoal.remote(max_restarts=3)
    class Broken:
        def __init__(self):
            with open(log, "a") as f:
                f.write("init\n")
            raise RuntimeError("constructor-failed-here")

        def ping(self):
            return "pong"

    b = Broken.remote()
    with pytest.raises(ActorDiedError) as info:
        shoal.get(b.ping.remote(), timeout=30)
    text = str(info.value)
    assert "its constructor raised an exception" in text
    assert "RuntimeError" in text and "constructor-failed-here" in text
    assert 'raise RuntimeError("constructor-failed-here")' in text  # the traceback
    _assert_fails_fast(lambda: b.ping.remote(), match="constructor")
    assert _lines(log) == ["init"]


def test_named_and_detached_actors_keep_their_name_across_restarts(tmp_path):
    namespace = f"ft-{uuid.uuid4().hex[:8]}"
    log = str(tmp_path / "log")
    recorder = _make_recorder(log)
    named = recorder.options(name="svc", namespace=namespace, max_restarts=1).remote()
    detached = recorder.options(
        name="keeper", namespace=namespace, lifetime="detached", max_restarts=-1
    ).remote()
    for handle, name in ((named, "svc"), (detached, "keeper")):
        pid = shoal.get(handle.pid.remote(), timeout=30)
        _kill9(pid)
        found = shoal.get_actor(name, namespace=namespace)
        assert found == handle
        assert shoal.get(found.pid.remote(), timeout=30) != pid
    for _ in range(3):  # -1: no limit
        _kill9(shoal.get(detached.pid.remote(), timeout=30))
        assert shoal.get(detached.incr.remote(), timeout=30) == 1
    shoal.kill(detached)
    shoal.kill(named)

    def name_free() -> bool:
        try:
            shoal.get_actor("svc", namespace=namespace)
        except ValueError:
            return True
        return False

    testing.wait_for(name_free, timeout=15)  # once the head saw the worker go


def test_cancel_of_a_call_waiting_for_a_restarting_actor(tmp_path, gate):
    log, slow = str(tmp_path / "log"), gate()

    @shoal.remote(max_restarts=1)
    class SlowRestart:
        def __init__(self):
            with open(log, "a") as f:
                f.write("init\n")
            if shoal.get_runtime_context().was_current_actor_reconstructed:
                deadline = time.monotonic() + 60
                while not os.path.exists(slow) and time.monotonic() < deadline:
                    time.sleep(0.01)

        def pid(self):
            return os.getpid()

    a = SlowRestart.remote()
    _kill9(shoal.get(a.pid.remote(), timeout=30))
    testing.wait_for(lambda: len(_lines(log)) == 2, timeout=30)
    waiting, kept = a.pid.remote(), a.pid.remote()
    shoal.cancel(waiting)
    with pytest.raises(TaskCancelledError):
        shoal.get(waiting, timeout=30)
    Path(slow).touch()
    assert shoal.get(kept, timeout=30) > 0
