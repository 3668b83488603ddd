"""Task fault tolerance: retries on worker death (max_retries, default 3), application
errors (retry_exceptions), cancel (graceful, forced, recursive or not; never retried) and
get(timeout=).

Workers are killed for real, from this process (SIGKILL) or by the task itself. Each test
has a cluster of its own, shut down and checked for leaks at teardown (fresh_cluster).
Tasks record their attempts as files (one per attempt, named by pid), so that the test
can count and kill them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import shoal
from shoal import testing
from shoal.exceptions import GetTimeoutError, TaskCancelledError, WorkerCrashedError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fresh_cluster")]


def _attempt_pids(directory: str) -> list[int]:
    """The pids of the attempts so far, oldest first."""
    entries = sorted(Path(directory).iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return [int(p.name) for p in entries]


def _wait_attempts(directory: str, n: int) -> list[int]:
    return testing.wait_for(
        lambda: len(_attempt_pids(directory)) >= n and _attempt_pids(directory), 30
    )


def _kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    testing.wait_for(lambda: not psutil.pid_exists(pid), timeout=15)


def _cluster_is_healthy() -> None:
    @shoal.remote
    def square(x):
        return x * x

    assert shoal.get([square.remote(i) for i in range(8)], timeout=30) == [i * i for i in range(8)]


def _make_waiting_task(directory: str, go: str):
    """A task that records its attempt and waits for ``go``, then returns 2 * x."""

    @shoal.remote
    def work(x):
        open(os.path.join(directory, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                raise TimeoutError("never told to go")
            time.sleep(0.01)
        return 2 * x

    return work


# ---------------------------------------------------------------------- worker deaths


def test_worker_killed_mid_task_is_retried_with_the_right_result(tmp_path):
    attempts, go = tmp_path / "attempts", str(tmp_path / "go")
    attempts.mkdir()
    work = _make_waiting_task(str(attempts), go)
    ref = work.remote(21)
    [first] = _wait_attempts(str(attempts), 1)
    _kill9(first)
    pids = _wait_attempts(str(attempts), 2)
    Path(go).touch()
    assert shoal.get(ref, timeout=30) == 42
    assert len(pids) == 2 and pids[0] != pids[1]


def test_worker_killed_four_times_gives_a_clear_crash_error(tmp_path):
    attempts, go = tmp_path / "attempts", str(tmp_path / "go")
    attempts.mkdir()
    work = _make_waiting_task(str(attempts), go)  # default max_retries: 3
    ref = work.remote(1)
    for n in range(1, 5):
        pids = _wait_attempts(str(attempts), n)
        assert len(pids) == n  # the next attempt starts only after this one died
        _kill9(pids[-1])
    with pytest.raises(WorkerCrashedError) as info:
        shoal.get(ref, timeout=30)
    err, last = info.value, pids[-1]
    text = str(err)
    assert "task work failed" in text
    assert f"pid {last}" in text and "killed by signal SIGKILL (9)" in text
    assert "it ran 4 times (max_retries=3)" in text
    assert (err.task_name, err.pid, err.attempts) == ("work", last, 4)
    assert err.reason == "killed by signal SIGKILL (9)"
    assert err.worker_id[:12] in text
    assert len(_attempt_pids(str(attempts))) == 4  # no fifth attempt
    _cluster_is_healthy()


def test_a_task_that_exits_its_worker_stops_after_its_retries(tmp_path):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    directory = str(attempts)

    @shoal.remote(max_retries=2)
    def exits():
        open(os.path.join(directory, str(os.getpid())), "w").close()
        os._exit(7)

    with pytest.raises(WorkerCrashedError, match=r"exit code 7.*it ran 3 times \(max_retries=2\)"):
        shoal.get(exits.remote(), timeout=60)
    assert len(_attempt_pids(directory)) == 3
    _cluster_is_healthy()


def test_a_task_that_kills_every_worker_it_touches_never_takes_the_cluster_down(tmp_path):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    directory = str(attempts)

    @shoal.remote
    def poison():
        open(os.path.join(directory, str(os.getpid())), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    refs = [poison.remote() for _ in range(3)]
    for ref in refs:
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            shoal.get(ref, timeout=90)
    assert len(_attempt_pids(directory)) == 12  # 3 tasks x (1 + 3 retries), no more
    _cluster_is_healthy()


# ----------------------------------------------------------------- application errors


def _make_flaky(directory: str, fail_times: int, exc_type: type):
    @shoal.remote
    def flaky():
        open(os.path.join(directory, f"{time.monotonic_ns()}"), "w").close()
        if len(os.listdir(directory)) <= fail_times:
            raise exc_type("not yet")
        return "done"

    return flaky


def test_application_error_is_not_retried_by_default(tmp_path):
    flaky = _make_flaky(str(tmp_path), 1, ValueError)
    with pytest.raises(ValueError, match="not yet"):
        shoal.get(flaky.remote(), timeout=30)
    assert len(os.listdir(tmp_path)) == 1


def test_retry_exceptions_true_retries_application_errors(tmp_path):
    flaky = _make_flaky(str(tmp_path), 2, ValueError)
    assert shoal.get(flaky.options(retry_exceptions=True).remote(), timeout=30) == "done"
    assert len(os.listdir(tmp_path)) == 3


def test_retry_exceptions_gives_up_after_max_retries_with_the_last_error(tmp_path):
    flaky = _make_flaky(str(tmp_path), 100, ValueError)
    with pytest.raises(ValueError, match="not yet"):
        shoal.get(flaky.options(retry_exceptions=True, max_retries=2).remote(), timeout=30)
    assert len(os.listdir(tmp_path)) == 3


def test_retry_exceptions_list_retries_only_those_classes(tmp_path):
    listed, other = tmp_path / "listed", tmp_path / "other"
    listed.mkdir()
    other.mkdir()

    class Transient(ValueError):
        pass

    # A subclass of a listed class is retried too.
    flaky = _make_flaky(str(listed), 2, Transient).options(retry_exceptions=[ValueError])
    assert shoal.get(flaky.remote(), timeout=30) == "done"
    assert len(os.listdir(listed)) == 3
    not_listed = _make_flaky(str(other), 2, KeyError).options(retry_exceptions=[ValueError])
    with pytest.raises(KeyError):
        shoal.get(not_listed.remote(), timeout=30)
    assert len(os.listdir(other)) == 1


def test_actor_method_retry_exceptions(tmp_path):
    @shoal.remote
    class Flaky:
        def __init__(self):
            self.calls = 0

        @shoal.method(retry_exceptions=[ZeroDivisionError], max_task_retries=3)
        def divide(self):
            self.calls += 1
            if self.calls < 3:
                return 1 / 0
            return self.calls

        def plain(self):
            self.calls += 1
            raise ZeroDivisionError("plain")

        def count(self):
            return self.calls

    f = Flaky.remote()
    assert shoal.get(f.divide.remote(), timeout=30) == 3
    with pytest.raises(ZeroDivisionError):
        shoal.get(f.plain.remote(), timeout=30)  # not retried: 4 calls
    retried = f.plain.options(retry_exceptions=True, max_task_retries=1)
    with pytest.raises(ZeroDivisionError):
        shoal.get(retried.remote(), timeout=30)  # run twice: 6 calls
    assert shoal.get(f.count.remote(), timeout=30) == 6
    shoal.kill(f)


# ----------------------------------------------------------------------------- cancel


def _make_blocked(directory: str, **options):
    @shoal.remote(**options)
    def blocked():
        open(os.path.join(directory, str(os.getpid())), "w").close()
        time.sleep(60)
        return "finished"

    return blocked


@pytest.mark.parametrize("force", [False, True], ids=["interrupt", "force"])
def test_cancelled_tasks_are_never_retried(tmp_path, force):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    directory = str(attempts)
    blocked = _make_blocked(directory, max_retries=3, retry_exceptions=True)
    ref = blocked.remote()
    [pid] = _wait_attempts(directory, 1)
    shoal.cancel(ref, force=force)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
    if force:
        testing.wait_for(lambda: not psutil.pid_exists(pid), timeout=15)  # its worker is gone
    else:
        assert psutil.pid_exists(pid)  # interrupted: the worker lives on
    # A retry would have been queued before anything submitted now, on the same lease
    # shape: once this one ran, a retry would have shown.
    (tmp_path / "after").mkdir()
    (tmp_path / "go").touch()
    after = _make_waiting_task(str(tmp_path / "after"), str(tmp_path / "go"))
    assert shoal.get(after.remote(1), timeout=30) == 2
    assert len(_attempt_pids(directory)) == 1


@pytest.mark.parametrize("recursive", [True, False])
def test_cancel_recursive_reaches_children_and_not_otherwise(tmp_path, recursive):
    child_started, child_done, child_stopped = (
        str(tmp_path / "child-started"),
        str(tmp_path / "child-done"),
        str(tmp_path / "child-stopped"),
    )
    go = str(tmp_path / "go")

    @shoal.remote(max_retries=0)
    def child():
        open(child_started, "w").close()
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
            open(child_done, "w").close()
        finally:
            open(child_stopped, "w").close()
        return "child"

    # The child asks for more than its parent holds, so that it runs on a worker of its
    # own (a blocked parent runs a child that fits in its resources itself, in its own
    # thread, where interrupting the parent stops it too: see test_tasks.py).
    @shoal.remote(max_retries=0, num_cpus=0.5)
    def parent():
        return shoal.get(child.options(num_cpus=1).remote())

    ref = parent.remote()
    testing.wait_for(lambda: os.path.exists(child_started), timeout=30)
    shoal.cancel(ref, recursive=recursive)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
    if recursive:
        testing.wait_for(lambda: os.path.exists(child_stopped), timeout=30)
        assert not os.path.exists(child_done)  # interrupted while it waited
        Path(go).touch()
    else:
        Path(go).touch()
        testing.wait_for(lambda: os.path.exists(child_done), timeout=30)  # ran on to its end
    _cluster_is_healthy()


def test_cancel_of_a_queued_retry_stops_it(tmp_path):
    attempts, go = tmp_path / "attempts", str(tmp_path / "go")
    attempts.mkdir()
    work = _make_waiting_task(str(attempts), go).options(max_retries=-1)
    ref = work.remote(1)
    [first] = _wait_attempts(str(attempts), 1)
    _kill9(first)
    shoal.cancel(ref)  # queued again, or already running its second attempt
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
    tried = len(_attempt_pids(str(attempts)))
    assert tried in (1, 2)
    Path(go).touch()
    _cluster_is_healthy()
    assert len(_attempt_pids(str(attempts))) == tried  # and never again


def test_get_with_timeout_on_a_task_blocked_forever(tmp_path):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    blocked = _make_blocked(str(attempts), max_retries=0)
    ref = blocked.remote()
    start = time.monotonic()
    with pytest.raises(GetTimeoutError, match="timed out after 0.5s"):
        shoal.get(ref, timeout=0.5)
    assert 0.45 < time.monotonic() - start < 5
    assert isinstance(GetTimeoutError("x"), TimeoutError)  # as in Ray, a TimeoutError too
    shoal.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
