"""The log router that lets a %%remote cell's output land under it (jupyter_ext/_output.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from shoal.jupyter_ext import _output
from shoal.jupyter_ext._output import DISPLAY, CellTags, LogRouter, new_marker, router_for

pytestmark = pytest.mark.timeout(10)


class Printed:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> None:
        self.bodies.append(body)

    @property
    def lines(self) -> list[list[Any]]:
        return [line for body in self.bodies for line in body["l"]]


def test_marker_wakes_the_cell_and_is_not_printed():
    printed = Printed()
    router = LogRouter(printed)
    token, marker = new_marker()
    event = router.expect(token, ["%%remote In[3]"])
    router(
        {
            "j": 1,
            "l": [[1, "(%%remote In[3] pid=7) hello\n"], [1, f"(%%remote In[3] pid=7) {marker}\n"]],
        }
    )
    assert event.is_set()
    assert printed.lines == [[1, "hello\n"]]  # the waited-for cell's prefix is dropped
    assert printed.bodies[0]["j"] == 1


def test_other_tasks_keep_their_prefix_and_late_lines_too():
    printed = Printed()
    router = LogRouter(printed)
    token, _marker = new_marker()
    router.expect(token, ["%%remote In[3]"])
    router({"l": [[2, "(f pid=8) from a task\n"]]})
    router.done(token, ["%%remote In[3]"])
    router({"l": [[1, "(%%remote In[3] pid=7) late\n"]]})
    assert printed.lines == [[2, "(f pid=8) from a task\n"], [1, "(%%remote In[3] pid=7) late\n"]]


def test_unfinished_last_line_before_the_marker_is_kept():
    printed = Printed()
    router = LogRouter(printed)
    token, marker = new_marker()
    event = router.expect(token, ["c"])
    router({"l": [[1, f"(c pid=1) no newline{marker}\n"]]})
    assert event.is_set() and printed.lines == [[1, "no newline\n"]]


def test_several_tasks_each_print_the_marker():
    router = LogRouter(Printed())
    token, marker = new_marker()
    event = router.expect(token, [], count=2)
    router({"l": [[1, f"(a pid=1) {marker}\n"]]})
    assert not event.is_set()
    router({"l": [[1, f"(b pid=2) {marker}\n"]]})
    assert event.is_set()


def test_installed_once_and_not_without_forwarding():
    class Core:
        on_log: Any = None

    core = Core()
    assert router_for(core) is None  # init(log_to_driver=False): nothing to wait for
    printed = Printed()
    core.on_log = printed
    router = router_for(core)
    assert isinstance(router, LogRouter) and router.previous is printed
    assert router_for(core) is router


# -- in a kernel: cells and rate limits ----------------------------------------------------
class Published:
    """What the router hands the kernel: (parent, entries) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[list[Any]]]] = []

    def __call__(self, parent: Any, entries: list[list[Any]]) -> None:
        self.calls.append((parent, entries))

    def texts(self, fd: int | None = None) -> list[str]:
        return [e[1] for _, es in self.calls for e in es if fd is None or e[0] == fd]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Cells:
    """A shell as CellTags sees it: the parent message of the running cell."""

    def __init__(self) -> None:
        self.parent: dict[str, Any] = {}
        self.execution_count = 1

    def get_parent(self) -> dict[str, Any]:
        return self.parent

    def run(self, msg_id: str) -> None:
        self.parent = {"header": {"msg_id": msg_id}, "content": {}}


def test_lines_go_to_the_cell_of_their_tag():
    shell = Cells()
    tags = CellTags(shell)
    shell.run("cell-1")
    first = tags.current()
    shell.run("cell-2")
    second = tags.current()
    assert first != second and tags.current() == second and tags.lookup() == second
    published = Published()
    router = LogRouter(None, tags=tags, publish=published, clock=Clock())
    router({"l": [[1, "(f pid=1) a\n", first], [1, "(g pid=2) b\n", second], [2, "(h pid=3) c\n"]]})
    by_parent = {
        (p or {}).get("header", {}).get("msg_id"): [e[1] for e in es] for p, es in published.calls
    }
    assert by_parent == {
        "cell-1": ["(f pid=1) a\n"],
        "cell-2": ["(g pid=2) b\n"],
        None: ["(h pid=3) c\n"],  # no tag: the running cell
    }


def test_cell_tags_are_bounded(monkeypatch):
    monkeypatch.setattr(_output, "MAX_CELLS", 3)
    shell = Cells()
    tags = CellTags(shell)
    made = []
    for i in range(5):
        shell.run(f"cell-{i}")
        made.append(tags.current())
    assert [tags.parent(t) is not None for t in made] == [False, False, True, True, True]


def test_a_flood_is_held_back_and_counted():
    clock = Clock()
    published = Published()
    router = LogRouter(None, publish=published, clock=clock)
    n = _output.LINES_BURST + 500
    router({"l": [[1, f"(flood pid=9) {i}\n", 5] for i in range(n)]})
    assert len(published.texts(1)) == _output.LINES_BURST
    router.flush_summaries()
    assert published.texts(2) == [
        "... 500 more lines from task flood (pid=9) suppressed (Shoal shows a cell at most "
        f"{_output.LINES_PER_SECOND} lines a second)\n"
    ]
    router.flush_summaries()
    assert len(published.texts(2)) == 1  # nothing new to say
    clock.now += 2  # two seconds later, 200 more lines may go
    router({"l": [[1, f"(flood pid=9) again {i}\n", 5] for i in range(300)]})
    assert len(published.texts(1)) == _output.LINES_BURST + 2 * _output.LINES_PER_SECOND
    # Another cell has a budget of its own.
    router({"l": [[1, "(other pid=8) fine\n", 6]]})
    assert published.texts(1)[-1] == "(other pid=8) fine\n"


def test_large_lines_are_limited_by_bytes():
    clock = Clock()
    published = Published()
    router = LogRouter(None, publish=published, clock=clock)
    line = "(big pid=1) " + "x" * 16_000 + "\n"
    router({"l": [[1, line, 1]] * 100})
    shown = len(published.texts(1))
    assert shown == _output.BYTES_BURST // len(line)


def test_marker_flushes_the_summary_before_waking_the_cell():
    published = Published()
    woke_after: list[int] = []
    router = LogRouter(None, publish=published, clock=Clock())
    token, marker = new_marker()
    event = router.expect(token, ["%%remote In[2]"])
    lines = [[1, f"(%%remote In[2] pid=4) {i}\n", 3] for i in range(_output.LINES_BURST + 7)]
    lines.append([1, f"(%%remote In[2] pid=4) {marker}\n", 3])

    def watch() -> None:
        event.wait(5)
        woke_after.append(len(published.texts(2)))

    waiter = threading.Thread(target=watch)
    waiter.start()
    router({"l": lines})
    waiter.join(5)
    assert woke_after == [1]  # the summary was out before the cell woke
    assert published.texts(1)[0] == "0\n"  # the waited-for cell's prefix is dropped
    assert "7 more lines from task %%remote In[2] (pid=4)" in published.texts(2)[0]


def test_display_entries_reach_the_kernel_with_their_bundle():
    published = Published()
    router = LogRouter(None, publish=published, clock=Clock())
    bundle = {"data": {"text/plain": "x", "text/html": "<b>x</b>"}, "metadata": {}}
    router({"l": [[DISPLAY, "(f pid=1) x\n", 4, bundle]]})
    assert published.calls[0][1] == [[DISPLAY, "(f pid=1) x\n", 4, bundle]]
