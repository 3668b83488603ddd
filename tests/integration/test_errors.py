"""Errors: remote exceptions raised as their own type, their message, unpicklable
arguments and exceptions, and worker and actor deaths."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import threading
import traceback
from pathlib import Path

import pytest
import shoal
from shoal.exceptions import ActorDiedError, TaskError, WorkerCrashedError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]


@pytest.fixture(scope="module")
def remote_error(cluster, tmp_path_factory):
    """One ZeroDivisionError raised in a task, and the pid of the worker that raised it."""
    pid_file = str(tmp_path_factory.mktemp("remote_error") / "pid")

    @shoal.remote
    def explode_with_context(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        return 1 / 0

    with pytest.raises(ZeroDivisionError) as info:
        shoal.get(explode_with_context.remote(pid_file), timeout=30)
    return info.value, int(Path(pid_file).read_text())


def test_remote_exception_is_caught_by_its_own_type():
    @shoal.remote
    def divide(a, b):
        return a / b

    with pytest.raises(ZeroDivisionError) as info:
        shoal.get(divide.remote(1, 0), timeout=30)
    assert isinstance(info.value, TaskError)


def test_message_shows_the_remote_traceback(remote_error):
    message = str(remote_error[0])
    assert "ZeroDivisionError" in message
    assert "test_errors.py" in message
    assert "return 1 / 0" in message  # the source line of the frame that raised


def test_message_has_no_runtime_frames(remote_error):
    message = str(remote_error[0])
    runtime_dir = os.path.dirname(os.path.abspath(shoal.__file__))
    assert "shoal/_" not in message
    # An editable install runs the runtime from runtime/, not from a shoal/ directory.
    assert runtime_dir + os.sep + "_" not in message, message


def test_message_names_the_task(remote_error):
    error = remote_error[0]
    assert "explode_with_context" in str(error)
    assert "explode_with_context" in error.task_name


def test_message_shows_the_pid(remote_error):
    error, pid = remote_error
    assert re.search(rf"\b{pid}\b", str(error)), str(error)
    assert error.pid == pid


def test_message_shows_the_node(remote_error):
    error = remote_error[0]
    node = shoal.nodes()[0]
    assert error.node_id == node["NodeID"]
    names = {node["NodeID"][:8], socket.gethostname(), node.get("NodeManagerAddress")} - {None, ""}
    assert any(name in str(error) for name in names), (names, str(error))


def test_exception_through_a_dependent_task():
    @shoal.remote
    def fail():
        raise KeyError("missing-key")

    @shoal.remote
    def consume(value):
        return value

    with pytest.raises(KeyError):
        shoal.get(consume.remote(fail.remote()), timeout=30)


def test_exception_through_a_nested_get():
    @shoal.remote
    def inner():
        return 1 / 0

    @shoal.remote
    def outer():
        return shoal.get(inner.remote())

    # The outer task's error wraps the inner one, keeps the innermost exception class (a
    # project decision; Ray gives a plain RayTaskError here) and shows both tasks.
    with pytest.raises(ZeroDivisionError) as info:
        shoal.get(outer.remote(), timeout=30)
    assert isinstance(info.value, TaskError)
    message = str(info.value)
    assert "inner" in message and "outer" in message


def test_exception_through_await_and_future():
    @shoal.remote
    def fail():
        raise ValueError("bad-value")

    async def wait_for_it():
        return await fail.remote()

    with pytest.raises(ValueError, match="bad-value"):
        asyncio.run(asyncio.wait_for(wait_for_it(), timeout=30))
    with pytest.raises(ValueError, match="bad-value"):
        fail.remote().future().result(timeout=30)


def test_get_of_many_failed_refs_raises_one_and_counts_the_others():
    @shoal.remote
    def check(i):
        if i == 0:
            return "fine"
        if i % 2:
            raise ValueError(i)
        return 1 / 0

    refs = [check.remote(i) for i in range(6)]  # 0 fine, 1 3 5 ValueError, 2 4 division
    with pytest.raises(ValueError) as info:
        shoal.get(refs + [refs[1]], timeout=30)  # a ref named twice counts once
    # The first failure in the list is raised; the note counts the others, by kind.
    assert "ValueError: 1" in str(info.value)
    note = "4 more of the 6 refs failed: 2 ValueError, 2 ZeroDivisionError"
    assert info.value.__notes__ == [note]
    assert traceback.format_exception(info.value)[-1] == note + "\n"  # as Python prints it
    # Raised again, the stored error does not collect a second note.
    with pytest.raises(ValueError) as again:
        shoal.get(refs, timeout=30)
    assert again.value.__notes__ == [note]
    with pytest.raises(ValueError) as alone:
        shoal.get(refs[1], timeout=30)
    assert not hasattr(alone.value, "__notes__")
    with pytest.raises(ValueError) as pair:
        shoal.get(refs[:2], timeout=30)
    assert not hasattr(pair.value, "__notes__")  # nothing else failed


def test_unpicklable_keyword_argument_raises_type_error_naming_it():
    @shoal.remote
    def use(value, my_lock_arg=None):
        return value

    with pytest.raises(TypeError, match="my_lock_arg"):
        use.remote(1, my_lock_arg=threading.Lock())


def test_unpicklable_positional_argument_raises_type_error_naming_it():
    @shoal.remote
    def use(value, lock_param):
        return value

    with pytest.raises(TypeError) as info:
        use.remote(1, threading.Lock())
    # Named by parameter name or by position.
    assert re.search(r"lock_param|arg(ument)?s?\W{0,2}\[?#?1\b", str(info.value)), str(info.value)


def test_unpicklable_exception_arrives_as_text():
    class LockedError(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.lock = threading.Lock()

    @shoal.remote
    def fail():
        raise LockedError("the-original-message-42")

    with pytest.raises(TaskError) as info:
        shoal.get(fail.remote(), timeout=30)
    assert "the-original-message-42" in str(info.value)


def test_actor_method_exception_keeps_the_actor_alive(track_actor):
    @shoal.remote
    class Picky:
        def __init__(self):
            self.calls = 0

        def check(self, value):
            self.calls += 1
            if value < 0:
                raise ValueError("negative")
            return self.calls

    p = track_actor(Picky.remote())
    with pytest.raises(ValueError, match="negative"):
        shoal.get(p.check.remote(-1), timeout=30)
    assert shoal.get(p.check.remote(1), timeout=30) == 2


# ------------------------------------------------------------------------- worker deaths


def _ok():
    @shoal.remote
    def ok():
        return "ok"

    return shoal.get(ok.remote(), timeout=30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("how", "max_retries", "attempts"),
    [("exit", None, 4), ("sigkill", 1, 2), ("exit", 0, 1)],
    ids=["exit-default-retries", "sigkill-1-retry", "exit-no-retry"],
)
def test_crashing_task_is_retried_then_fails(tmp_path, how, max_retries, attempts):
    attempts_dir = tmp_path / "attempts"
    attempts_dir.mkdir()
    directory = str(attempts_dir)

    @shoal.remote
    def crash():
        import uuid

        open(os.path.join(directory, uuid.uuid4().hex), "w").close()
        if how == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)

    task = crash if max_retries is None else crash.options(max_retries=max_retries)
    with pytest.raises(WorkerCrashedError):
        shoal.get(task.remote(), timeout=75)
    assert len(os.listdir(directory)) == attempts
    assert _ok() == "ok"  # the cluster is still up


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_task_that_dies_only_once_succeeds_on_retry(tmp_path, how):
    marker = str(tmp_path / "died-once")

    @shoal.remote
    def flaky():
        if not os.path.exists(marker):
            open(marker, "w").close()
            if how == "exit":
                os._exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        return "survived"

    assert shoal.get(flaky.remote(), timeout=45) == "survived"


def test_actor_whose_process_dies_raises_actor_died_error():
    @shoal.remote
    class Fragile:
        def ping(self):
            return "pong"

        def die(self):
            os._exit(1)

    f = Fragile.remote()
    assert shoal.get(f.ping.remote(), timeout=30) == "pong"
    with pytest.raises(ActorDiedError):
        shoal.get(f.die.remote(), timeout=30)
    with pytest.raises(ActorDiedError):
        shoal.get(f.ping.remote(), timeout=30)
    assert _ok() == "ok"


def test_actor_whose_constructor_fails_raises_actor_died_error():
    @shoal.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("constructor-failed")

        def ping(self):
            return "pong"

    b = Broken.remote()
    with pytest.raises(ActorDiedError):
        shoal.get(b.ping.remote(), timeout=30)
