"""The control store's task log is bounded: a cluster whose log keeps 20 tasks runs 60,
keeps the last 20, says it dropped 40, and still counts all 60 in its summary."""

from __future__ import annotations

import pytest
import shoal
import shoal.state as state
from shoal import testing

pytestmark = pytest.mark.timeout(90)


def test_a_full_log_drops_the_oldest_finished_tasks_and_says_so(make_cluster, monkeypatch):
    monkeypatch.setenv("SHOAL_TASK_LOG_SIZE", "20")  # read by the head it starts
    make_cluster(num_cpus=2)

    @shoal.remote
    def one_of_sixty(i):
        return i

    first = one_of_sixty.remote(0)
    assert shoal.get(first) == 0
    testing.wait_for(lambda: state.get_task(first), timeout=20)
    assert shoal.get([one_of_sixty.remote(i) for i in range(1, 60)]) == list(range(1, 60))

    def all_counted():
        summary = state.summarize_tasks()
        return summary if summary["by_state"].get("FINISHED") == 60 else None

    summary = testing.wait_for(all_counted, timeout=30)
    assert summary["by_name"] == {"one_of_sixty": {"FINISHED": 60}}
    assert (summary["capacity"], summary["kept"], summary["evicted"]) == (20, 20, 40)
    assert summary["evicted_unfinished"] == 0
    listed = state.list_tasks(limit=100)
    assert listed.total == 20 and len(listed) == 20 and not listed.truncated
    assert state.get_task(first) is None  # the oldest finished went first
