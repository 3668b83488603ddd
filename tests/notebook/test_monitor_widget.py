"""``shoal.widgets.ClusterMonitor`` in this process, against real clusters, with no kernel.

The widgets' comm messages are recorded through the ``comm`` package's own hook
(``comm.create_comm``, which ipywidgets calls for every widget; a kernel installs its own
there): what a frontend would receive, in order, with the thread that sent each one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comm
import pytest
import shoal
import shoal.state
from comm.base_comm import BaseComm
from shoal import testing

ipywidgets = pytest.importorskip("ipywidgets")

from shoal.widgets import ClusterMonitor  # noqa: E402
from shoal.widgets import _monitor as monitor_module  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@dataclass
class Sent:
    comm_id: str
    msg_type: str
    data: dict[str, Any]
    thread: str
    at: float = field(default_factory=time.monotonic)


class RecordingComm(BaseComm):
    """A comm whose messages go to a list instead of a kernel's iopub socket."""

    sent: list[Sent] = []

    def publish_msg(
        self,
        msg_type: str,
        data: Any = None,
        metadata: Any = None,
        buffers: Any = None,
        **keys: Any,
    ) -> None:
        RecordingComm.sent.append(
            Sent(self.comm_id, msg_type, dict(data or {}), threading.current_thread().name)
        )


@pytest.fixture
def comms() -> Iterator[list[Sent]]:
    previous = comm.create_comm
    RecordingComm.sent = []
    comm.create_comm = RecordingComm
    try:
        yield RecordingComm.sent
    finally:
        comm.create_comm = previous
        monitor_module.stop_all()


def updates(sent: list[Sent], widget: Any) -> list[Sent]:
    return [s for s in sent if s.comm_id == widget.comm.comm_id and s.msg_type == "comm_msg"]


def state_count(html: str, state: str) -> int | None:
    match = re.search(rf'data-state="{state}".*?<b>([\d,]+)</b>', html)
    return int(match.group(1).replace(",", "")) if match else None


def wait_monitor(monitor: ClusterMonitor, predicate: Any, timeout: float = 20) -> dict[str, Any]:
    return testing.wait_for(
        lambda: monitor.snapshot if monitor.snapshot and predicate(monitor.snapshot) else None,
        timeout=timeout,
        interval=0.02,
        message=f"the monitor never showed it; last: {monitor.text()}",
    )


def test_updates_arrive_while_the_main_thread_blocks_one_message_per_tick(
    make_cluster, comms, gate, wait_path
):
    make_cluster(num_cpus=2)
    release = gate()

    @shoal.remote
    def held(path):
        wait_path(path)
        return 1

    @shoal.remote
    def quick(i):
        return i

    monitor = ClusterMonitor(interval=0.1)
    live = monitor._live
    started = len(comms)
    seen_running = threading.Event()

    def open_gate_once_the_page_shows_running_tasks() -> None:
        # The gate opens only after a message that a frontend would render showed the held
        # tasks running: so that message was sent while the main thread was blocked below.
        def shown() -> bool:
            return any(
                state_count(s.data.get("state", {}).get("value", ""), "RUNNING") == 2
                for s in updates(comms[started:], live)
            )

        try:
            testing.wait_for(shown, timeout=20, interval=0.02)
            seen_running.set()
        finally:
            Path(release).touch()

    opener = threading.Thread(target=open_gate_once_the_page_shows_running_tasks)
    refs = [held.remote(release) for _ in range(2)] + [quick.remote(i) for i in range(300)]
    opener.start()
    t0 = time.monotonic()
    assert sum(shoal.get(refs)) == 2 + sum(range(300))  # blocks until the gate opened
    t1 = time.monotonic()
    opener.join(5)
    assert seen_running.is_set()
    wait_monitor(monitor, lambda s: s["tasks"]["by_state"].get("FINISHED", 0) >= 302)
    ticks_before_stop = monitor.ticks
    monitor.stop()

    mine = updates(comms[started:], live)
    during = [s for s in mine if t0 <= s.at <= t1]
    assert during and all(s.thread == "shoal-monitor" for s in during)
    finished = [state_count(s.data["state"]["value"], "FINISHED") for s in mine]
    assert finished[-1] == 302 and len(set(finished)) >= 2, finished  # the counts moved
    # One message per tick at most (none when nothing changed), each carrying one trait.
    assert all(set(s.data["state"]) == {"value"} for s in mine)
    assert len(mine) <= ticks_before_stop + 1  # +1: the "stopped" picture
    assert "stopped" in live.value and "FINISHED" in live.value
    # Nothing else sent per tick: no failures, so no accordion traffic after the start.
    others = [
        s for s in comms[started:] if s.comm_id != live.comm.comm_id and s.msg_type == "comm_msg"
    ]
    assert others == []
    monitor.close()


def test_failures_expand_to_their_tracebacks_and_keep_their_slots(make_cluster, comms):
    make_cluster(num_cpus=2)

    @shoal.remote
    def explode(tag):
        raise ValueError(f"<script>alert({tag})</script> went wrong")

    monitor = ClusterMonitor(interval=0.1)
    first = explode.remote(1)
    with pytest.raises(ValueError):
        shoal.get(first)
    box = monitor._failure_box
    testing.wait_for(lambda: len(box.titles) == 1, timeout=20, interval=0.02)
    assert "explode: ValueError: <script>alert(1)</script> went wrong" in box.titles[0]
    body = box.children[0].value
    assert "Traceback (most recent call last)" in body and "raise ValueError" in body
    assert "<script>" not in body and "&lt;script&gt;alert(1)" in body  # escaped markup

    second = explode.remote(2)
    with pytest.raises(ValueError):
        shoal.get(second)
    testing.wait_for(lambda: len(box.titles) == 2, timeout=20, interval=0.02)
    # The first failure stays where the user may have opened it; the new one goes below.
    assert "alert(1)" in box.titles[0] and "alert(2)" in box.titles[1]
    assert "alert(1)" in box.children[0].value and "alert(2)" in box.children[1].value

    bundle = monitor._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/html"].count("<details>") == 2
    assert "Latest failures (newest first):" in bundle["text/plain"]
    assert "explode: ValueError" in bundle["text/plain"]
    monitor.close()


def test_close_ends_the_thread_and_closes_the_widgets(make_cluster, comms):
    make_cluster(num_cpus=1)
    monitor = ClusterMonitor(interval=0.05)
    thread = monitor._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    assert monitor in monitor_module.running_monitors()
    testing.wait_for(lambda: monitor.ticks >= 3, timeout=10)
    parts = [monitor, monitor._live, monitor._failure_box, monitor._stack_choice]
    ids = {w.comm.comm_id for w in parts}
    monitor.close()
    assert not thread.is_alive()
    assert monitor_module.running_monitors() == []
    closed = {s.comm_id for s in comms if s.msg_type == "comm_close"}
    assert ids <= closed


def test_cluster_shutdown_stops_the_monitor_without_starting_another(make_cluster, comms):
    make_cluster(num_cpus=1)
    monitor = ClusterMonitor(interval=0.05)
    thread = monitor._thread
    testing.wait_for(lambda: monitor.ticks >= 2, timeout=10)
    shoal.shutdown()
    testing.wait_for(lambda: not thread.is_alive(), timeout=10)
    assert monitor.status == "stopped: the cluster was shut down"
    assert "stopped: the cluster was shut down" in monitor._live.value
    assert not shoal.is_initialized()  # the monitor did not start a cluster to ask
    assert monitor_module.running_monitors() == []
    monitor.close()


def test_actors_objects_and_nodes_are_shown(make_cluster, comms, track_actor):
    make_cluster(num_cpus=2, object_store_memory=256 << 20)

    @shoal.remote
    class Keeper:
        def ping(self):
            return "pong"

    keeper = track_actor(Keeper.options(name="the-keeper").remote())
    assert shoal.get(keeper.ping.remote()) == "pong"
    big = shoal.put(b"x" * (3 << 20))
    monitor = ClusterMonitor(interval=0.1)
    snap = wait_monitor(
        monitor,
        lambda s: (
            s["actors"] and s["objects"]["largest"] and s["nodes"][0]["cpu_percent"] is not None
        ),
    )
    html = monitor.html()
    assert "<code>Keeper</code>" in html and "the-keeper" in html and "alive" in html
    assert "3.0 MiB" in html and snap["objects"]["largest"][0]["size"] >= 3 << 20
    assert "object store" in html and "256.0 MiB" in html
    node = snap["nodes"][0]["node_id"][:8]
    assert node in html and node in monitor.text()
    assert "Keeper the-keeper ALIVE" in monitor.text()
    del big
    monitor.close()


def test_bad_arguments_and_no_cluster(comms):
    assert not shoal.is_initialized()
    with pytest.raises(RuntimeError, match=r"no Shoal cluster is connected: call shoal.init\(\)"):
        ClusterMonitor()
    with pytest.raises(ValueError, match="interval must be at least 0.05 s, got 0"):
        ClusterMonitor(interval=0)
    with pytest.raises(TypeError, match="interval must be a number of seconds, got '1'"):
        ClusterMonitor(interval="1")
    with pytest.raises(ValueError, match="failures must be an int >= 0, got -1"):
        ClusterMonitor(failures=-1)


def test_the_metrics_section_is_empty_without_metrics(make_cluster, comms):
    make_cluster(num_cpus=1)
    monitor = ClusterMonitor(start=False)
    assert monitor.snapshot is not None and "metrics" not in monitor.snapshot
    assert monitor.render_metrics(None) == "" and monitor.render_metrics_text(None) == ""
    assert not monitor.running and monitor.ticks == 1  # start=False: one picture, no thread
    monitor.close()


def test_user_metrics_are_shown(make_cluster, comms):
    make_cluster(num_cpus=1)

    @shoal.remote
    def counted():
        from shoal.util.metrics import Counter, Histogram

        Counter("monitor_calls", "Calls.", tag_keys=("kind",)).inc(tags={"kind": "demo"})
        Histogram("monitor_sizes", "Sizes.", boundaries=[10]).observe(4)

    shoal.get([counted.remote() for _ in range(3)])
    monitor = ClusterMonitor(interval=0.05)
    try:
        testing.wait_for(
            lambda: "monitor_calls" in monitor._live.value and "3 observed" in monitor._live.value,
            timeout=10,
        )
        assert "kind=demo" in monitor._live.value
        assert "monitor_calls{kind=demo} 3" in monitor.text()
    finally:
        monitor.close()


def test_stacks_of_an_actor_and_of_a_node_on_request(make_cluster, comms, gate, wait_path):
    make_cluster(num_cpus=2)
    release = gate()

    @shoal.remote
    class Waiter:
        def wait_in_a_named_frame(self, path):
            wait_path(path)
            return 1

    @shoal.remote
    def task_in_a_named_frame(path):
        wait_path(path)
        return 2

    waiter = Waiter.options(name="stacked").remote()
    refs = [waiter.wait_in_a_named_frame.remote(release), task_in_a_named_frame.remote(release)]
    testing.wait_for(
        lambda: len(shoal.state.list_tasks(filters=[("state", "=", "RUNNING")])) == 2,
        timeout=20,
    )
    monitor = ClusterMonitor(interval=0.05)
    try:
        testing.wait_for(lambda: len(monitor._stack_choice.options) == 2, timeout=10)
        labels = [label for label, _ in monitor._stack_choice.options]
        assert labels[0] == "actor Waiter stacked" and labels[1].startswith("tasks and actors on")
        monitor._stack_choice.value = monitor._stack_choice.options[0][1]
        monitor._stack_button.click()  # what a click in the frontend runs
        assert "wait_in_a_named_frame" in monitor._stack_text.value
        text = monitor.show_stacks(*monitor._stack_choice.options[1][1])
        assert "task_in_a_named_frame" in text and "wait_in_a_named_frame" in text
    finally:
        monitor.close()
    Path(release).touch()
    assert shoal.get(refs, timeout=30) == [1, 2]  # the stacks did not stop the work
