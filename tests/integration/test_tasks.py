"""Tasks: .remote(), .options(), num_returns, refs as arguments, nested tasks, cancel,
streaming generators, redefinition.

Remote functions are defined inside the tests, so that cloudpickle ships them by value.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import shoal
from shoal import testing
from shoal.exceptions import TaskCancelledError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("cluster")]


def test_spec_example_square():
    @shoal.remote
    def square(x):
        return x * x

    assert shoal.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]


def test_remote_returns_an_object_ref():
    @shoal.remote
    def one():
        return 1

    ref = one.remote()
    assert isinstance(ref, shoal.ObjectRef)
    assert shoal.get(ref, timeout=30) == 1


def test_positional_keyword_and_variadic_arguments():
    @shoal.remote
    def combine(a, b=0, *rest, c=None, **extra):
        return a, b, rest, c, extra

    result = shoal.get(combine.remote(1, 2, 3, c=4, d=5), timeout=30)
    assert result == (1, 2, (3,), 4, {"d": 5})


def test_get_of_a_list_that_names_a_ref_twice(tmp_path, wait_path):
    go = str(tmp_path / "go")

    @shoal.remote
    def first():
        open(go, "w").close()
        return "first"

    @shoal.remote
    def second():
        wait_path(go)  # ends after `first`
        return "second"

    a, b = first.remote(), second.remote()
    assert shoal.get([a, a, b], timeout=30) == ["first", "first", "second"]


def test_task_output_reaches_the_driver_prefixed(capsys):
    """Outside IPython, what tasks (and their children) print comes out of the driver's own
    stdout and stderr, each line prefixed with the task's name and pid."""

    @shoal.remote
    def child():
        print("from the child")
        return 1

    @shoal.remote
    def talk():
        print("to stdout")
        print("to stderr", file=sys.stderr)
        return shoal.get(child.remote())

    assert shoal.get(talk.remote(), timeout=30) == 1
    seen = ["", ""]

    def arrived() -> bool:
        out, err = capsys.readouterr()
        seen[0] += out
        seen[1] += err
        return "from the child" in seen[0] and "to stdout" in seen[0] and "to stderr" in seen[1]

    testing.wait_for(arrived, timeout=20)
    assert re.search(r"^\(talk pid=\d+\) to stdout$", seen[0], re.M)
    assert re.search(r"^\(child pid=\d+\) from the child$", seen[0], re.M)
    assert re.search(r"^\(talk pid=\d+\) to stderr$", seen[1], re.M)


def test_runs_in_another_process():
    @shoal.remote
    def pid():
        return os.getpid()

    assert shoal.get(pid.remote(), timeout=30) != os.getpid()


def test_num_returns_in_decorator():
    @shoal.remote(num_returns=3)
    def three():
        return "a", "b", "c"

    refs = three.remote()
    assert len(refs) == 3
    assert all(isinstance(ref, shoal.ObjectRef) for ref in refs)
    assert shoal.get(list(refs), timeout=30) == ["a", "b", "c"]


def test_num_returns_in_options():
    @shoal.remote
    def pair(x):
        return x, x + 1

    first, second = pair.options(num_returns=2).remote(10)
    assert shoal.get(second, timeout=30) == 11
    assert shoal.get(first, timeout=30) == 10


def test_options_leave_the_original_function_unchanged():
    @shoal.remote
    def pair():
        return 1, 2

    assert len(pair.options(num_returns=2).remote()) == 2
    assert shoal.get(pair.remote(), timeout=30) == (1, 2)


def test_ref_argument_arrives_as_its_value():
    @shoal.remote
    def describe(x):
        return type(x).__name__, x

    assert shoal.get(describe.remote(shoal.put(41)), timeout=30) == ("int", 41)


def test_task_waits_for_an_argument_still_being_computed(gate, wait_path):
    release = gate()

    @shoal.remote
    def produce():
        wait_path(release)
        return 20

    @shoal.remote
    def add_one(x):
        return x + 1

    result = add_one.remote(produce.remote())
    ready, not_ready = shoal.wait([result], num_returns=1, timeout=0.5)
    assert (ready, not_ready) == ([], [result])
    Path(release).touch()
    assert shoal.get(result, timeout=30) == 21


def test_refs_nested_in_containers_arrive_as_refs():
    @shoal.remote
    def inspect(items, mapping):
        in_list, in_dict = items[0], mapping["key"]
        return (
            isinstance(in_list, shoal.ObjectRef),
            isinstance(in_dict, shoal.ObjectRef),
            shoal.get(in_list),
            shoal.get(in_dict),
        )

    a, b = shoal.put("a"), shoal.put("b")
    assert shoal.get(inspect.remote([a], {"key": b}), timeout=30) == (True, True, "a", "b")


def test_task_submits_tasks_and_gets_them():
    @shoal.remote
    def square(x):
        return x * x

    @shoal.remote
    def sum_of_squares(n):
        return sum(shoal.get([square.remote(i) for i in range(n)]))

    assert shoal.get(sum_of_squares.remote(5), timeout=30) == 30


def test_task_submits_tasks_and_waits_on_them():
    @shoal.remote
    def square(x):
        return x * x

    @shoal.remote
    def count_ready(n):
        refs = [square.remote(i) for i in range(n)]
        ready, not_ready = shoal.wait(refs, num_returns=n, timeout=30)
        return len(ready), len(not_ready)

    assert shoal.get(count_ready.remote(4), timeout=30) == (4, 0)


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "force"])
def test_cancel_running_task(tmp_path, gate, wait_path, force):
    started, never = str(tmp_path / "started"), gate()

    @shoal.remote(max_retries=0)
    def blocked():
        open(started, "w").close()
        wait_path(never, timeout=50)
        return "finished"

    ref = blocked.remote()
    testing.wait_for(lambda: os.path.exists(started), timeout=30)
    shoal.cancel(ref, force=force)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)


@pytest.mark.parametrize("inline", [True, False], ids=["child-run-inline", "child-elsewhere"])
def test_cancel_reaches_the_child_a_task_waits_for(tmp_path, gate, wait_path, inline):
    """A task blocked on its child runs the child itself when it fits in its own resources
    (in its own thread, nested): cancelling the task must stop that child too, and a child
    on another worker through the recursive cancel."""
    base = str(tmp_path / "p")
    blocker_started, release = str(tmp_path / "blocker"), gate()

    @shoal.remote(max_retries=0)
    def blocker():
        open(blocker_started, "w").close()
        wait_path(release)

    if inline:
        # The other CPU is taken, so the child cannot get a worker of its own: its parent,
        # blocked on it, runs it (rather than racing the lease for it).
        held = blocker.remote()
        testing.wait_for(lambda: os.path.exists(blocker_started), timeout=30)

    @shoal.remote(max_retries=0)
    def child(path):
        try:
            with open(path + ".started", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
        finally:
            open(path + ".stopped", "w").close()

    @shoal.remote(max_retries=0, num_cpus=1 if inline else 0.5)
    def parent(path):
        try:
            with open(path + ".pid", "w") as f:
                f.write(str(os.getpid()))
            return shoal.get(child.remote(path + ".child"))
        finally:
            open(path + ".stopped", "w").close()

    ref = parent.remote(base)
    testing.wait_for(lambda: os.path.exists(base + ".child.started"), timeout=30)
    shoal.cancel(ref)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
    testing.wait_for(
        lambda: os.path.exists(base + ".stopped") and os.path.exists(base + ".child.stopped"),
        timeout=15,
    )
    same_process = Path(base + ".pid").read_text() == Path(base + ".child.started").read_text()
    assert same_process == inline  # the case this test is about did happen
    if inline:
        Path(release).touch()
        shoal.get(held, timeout=30)


def test_cancel_queued_task(tmp_path, gate, rendezvous, wait_path):
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    arrived_dir, release, ran = str(arrivals), gate(), str(tmp_path / "ran")

    @shoal.remote
    def hold():
        rendezvous(arrived_dir, 2)
        wait_path(release)
        return "held"

    @shoal.remote
    def queued():
        open(ran, "w").close()
        return "ran"

    holders = [hold.remote() for _ in range(2)]  # both CPUs of the cluster
    testing.wait_for(lambda: len(os.listdir(arrived_dir)) == 2, timeout=30)
    ref = queued.remote()
    shoal.cancel(ref)
    with pytest.raises(TaskCancelledError):
        shoal.get(ref, timeout=30)
    Path(release).touch()
    assert shoal.get(holders, timeout=30) == ["held", "held"]
    assert not os.path.exists(ran)


def test_streaming_generator_yields_refs_as_items_are_produced(gate, wait_path):
    release = gate()

    @shoal.remote(num_returns="streaming")
    def produce(n):
        yield 0
        wait_path(release, timeout=20)  # the first item must arrive before this returns
        yield from range(1, n)

    gen = produce.remote(3)
    assert isinstance(gen, shoal.ObjectRefGenerator)
    items = iter(gen)
    first = next(items)
    assert isinstance(first, shoal.ObjectRef)
    assert shoal.get(first, timeout=30) == 0
    Path(release).touch()
    rest = list(items)
    assert all(isinstance(ref, shoal.ObjectRef) for ref in rest)
    assert shoal.get(rest, timeout=30) == [1, 2]


@pytest.mark.parametrize("n", [0, 5])
def test_streaming_generator_through_options(n):
    @shoal.remote
    def produce(n):
        for i in range(n):
            yield i * 10

    gen = produce.options(num_returns="streaming").remote(n)
    assert isinstance(gen, shoal.ObjectRefGenerator)
    assert [shoal.get(ref, timeout=30) for ref in gen] == [i * 10 for i in range(n)]


def test_redefined_function_runs_its_new_definition():
    @shoal.remote
    def version():
        return "old"

    assert shoal.get(version.remote(), timeout=30) == "old"

    @shoal.remote
    def version():  # the point: same name, new body
        return "new"

    assert shoal.get(version.remote(), timeout=30) == "new"


def test_remote_function_defined_in_a_module_next_to_the_driver(tmp_path, run_driver):
    """Ray compatibility: code split into modules. A function at the top of an importable
    module is pickled by reference; workers import it from the driver script's directory,
    which Ray adds to their sys.path."""
    (tmp_path / "mylib.py").write_text(
        "import shoal\n\n@shoal.remote\ndef add(a, b):\n    return a + b\n"
    )
    stdout = run_driver(
        """
        import shoal
        import mylib
        shoal.init(num_cpus=1)
        print(f"RESULT {shoal.get(mylib.add.remote(2, 3), timeout=60)}")
        shoal.shutdown()
        """
    )
    assert "RESULT 5" in stdout
