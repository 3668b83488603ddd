"""The log router that lets a %%remote cell's output land under it (jupyter_ext/_output.py)."""

from __future__ import annotations

from typing import Any

import pytest
from shoal.jupyter_ext._output import LogRouter, new_marker, router_for

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
