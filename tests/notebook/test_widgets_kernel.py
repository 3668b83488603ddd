"""The monitor and the progress bars in a real kernel, through nbclient, as a saved notebook
would hold them (``store_widget_state``: the widget models' last state), and in the order
the frontend received them (every iopub message of a cell is logged here, so that widget
updates can be placed between the lines a cell printed). One kernel for the module: the
tests run in order."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import nbclient
import pytest
from kernel_helpers import NotebookKernel, displays, no_error, stream

pytest.importorskip("ipywidgets")
pytestmark = pytest.mark.timeout(120)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class RecordingClient(nbclient.NotebookClient):
    """nbclient, also keeping every message of a cell: (msg_type, content)."""

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        log = self.__dict__.setdefault("message_log", [])
        log.append((msg["msg_type"], msg["content"], time.monotonic()))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def nb(
    kernel_name: str, tmp_path_factory: pytest.TempPathFactory, _leak_guard: Any
) -> Iterator[NotebookKernel]:
    kernel = NotebookKernel(
        kernel_name, tmp_path_factory.mktemp("nb"), client_class=RecordingClient
    ).start()
    try:
        yield kernel
    finally:
        kernel.stop()
        _leak_guard.check("after the widget kernel's shutdown")


def run_logged(nb: NotebookKernel, source: str) -> tuple[Any, list[tuple[str, Any, float]]]:
    log = nb.client.__dict__.setdefault("message_log", [])
    start = len(log)
    cell = no_error(nb.run(source))
    return cell, log[start:]


def widget_states(nb: NotebookKernel) -> dict[str, dict[str, Any]]:
    """Model id -> last state, as the executed notebook saves it (nbclient's
    ``store_widget_state``, on by default, writes it to the notebook's metadata)."""
    assert nb.client.store_widget_state
    nb.client.set_widgets_metadata()
    saved = nb.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return {model_id: entry["state"] for model_id, entry in saved.items()}


def html_models(nb: NotebookKernel, marker: str) -> dict[str, str]:
    return {
        model_id: state["value"]
        for model_id, state in widget_states(nb).items()
        if isinstance(state.get("value"), str) and marker in state["value"]
    }


def count(html: str, state: str) -> int | None:
    match = re.search(rf'data-state="{state}".*?<b>([\d,]+)</b>', html)
    return int(match.group(1).replace(",", "")) if match else None


def test_start_shows_a_live_monitor_under_the_summary(nb):
    cell, _ = run_logged(nb, "%load_ext shoal\n%cluster start --cpus 2")
    summary, monitor = displays(cell)
    assert "(started by this kernel)" in summary
    assert monitor.startswith("Shoal cluster · 1 node · 2 CPUs")
    [view] = displays(cell, WIDGET_VIEW)
    fallback = displays(cell, "text/html")[1]
    assert 'class="shoal-monitor"' in fallback and "Nodes" in fallback  # no widgets: HTML
    box = widget_states(nb)[view["model_id"]]
    assert "shoal-cluster-monitor" in box["_dom_classes"]
    live = html_models(nb, 'class="shoal-monitor"')
    assert len(live) == 1 and "live, every 0.25 s" in next(iter(live.values()))


def test_the_monitor_moves_while_a_cell_blocks(nb):
    cell, log = run_logged(
        nb,
        """\
import shoal, time
from shoal import testing

@shoal.remote
def work(i):
    time.sleep(0.004)
    if i % 500 == 499:
        raise ValueError(f"task {i} failed on purpose")
    return i

monitor = get_ipython()._shoal_magics.monitor
ticks = monitor.ticks
print("get starts", flush=True)
try:
    shoal.get([work.remote(i) for i in range(2000)])
except ValueError as exc:
    print("get raised", type(exc).__name__, flush=True)
# Until the page was sent the final counts (the widget's value is what was sent).
shown = lambda: "<b>1,996</b>" in monitor._live.value and len(monitor._failure_box.titles) == 4
testing.wait_for(shown, timeout=30)
print("ticks", monitor.ticks - ticks, flush=True)
""",
    )
    out = stream(cell)
    assert "get starts\nget raised TaskError(ValueError)\n" in out
    ticks = int(re.search(r"ticks (\d+)", out).group(1))
    [live_id] = html_models(nb, 'class="shoal-monitor"')
    texts = [m[1]["text"] for m in log if m[0] == "stream"]
    begin = next(i for i, m in enumerate(log) if m[0] == "stream" and "get starts" in m[1]["text"])
    end = next(i for i, m in enumerate(log) if m[0] == "stream" and "get raised" in m[1]["text"])
    assert texts
    live_updates = [
        (i, m[1]["data"]["state"]["value"])
        for i, m in enumerate(log)
        if m[0] == "comm_msg"
        and m[1]["comm_id"] == live_id
        and "value" in m[1]["data"].get("state", {})
    ]
    during = [count(value, "FINISHED") for i, value in live_updates if begin < i < end]
    assert len(set(during)) >= 3, during  # the counts moved while the get blocked the cell
    assert during == sorted(during)
    # One message per tick, at most (none when the picture did not change).
    assert len(live_updates) <= ticks + 1
    # The saved notebook holds the live numbers of the end of the cell.
    saved = widget_states(nb)[live_id]["value"]
    assert count(saved, "FINISHED") == 1996 and count(saved, "FAILED") == 4
    titles = [
        s["titles"] for s in widget_states(nb).values() if s.get("_model_name") == "AccordionModel"
    ]
    assert any(len(t) == 4 and all("work: ValueError: task" in x for x in t) for t in titles)
    tracebacks = html_models(nb, 'class="shoal-traceback"')
    assert any("failed on purpose" in v and "Traceback" in v for v in tracebacks.values())


def test_a_slow_get_shows_a_bar_that_becomes_a_summary(nb):
    cell, log = run_logged(
        nb,
        "@shoal.remote\ndef nap(s):\n    time.sleep(s)\n    return s\n"
        "values = shoal.get([nap.remote(0.6) for _ in range(4)])",
    )
    # The bar was a widget with an HTML and a text fallback...
    [shown] = [m[1]["data"] for m in log if m[0] == "display_data"]
    assert WIDGET_VIEW in shown and "shoal-progress" in shown["text/html"]
    assert shown["text/plain"].startswith("shoal.get: [")
    bar_id = shown[WIDGET_VIEW]["model_id"]
    values = [
        m[1]["data"]["state"]["value"]
        for m in log
        if m[0] == "comm_msg"
        and m[1]["comm_id"] == bar_id
        and "value" in m[1]["data"].get("state", {})
    ]
    assert values and all("/ 4 done" in v for v in values)
    # ...and the cell keeps the one-line summary in its place (update_display_data).
    assert [m[0] for m in log if "display" in m[0]] == ["display_data", "update_display_data"]
    [summary] = displays(cell)
    assert re.fullmatch(r"shoal\.get: 4 of 4 done, in \d\.\d s \([\d.]+/s\)", summary)
    assert "&#10004;" in displays(cell, "text/html")[0]
    assert displays(cell, WIDGET_VIEW) == []


def test_a_quick_get_shows_nothing(nb):
    cell, _ = run_logged(nb, "values = shoal.get([nap.remote(0) for _ in range(50)])")
    assert cell.outputs == []


def test_explicit_progress_returns_at_once_and_follows_the_refs(nb):
    cell, _ = run_logged(
        nb,
        "from shoal.widgets import progress\n"
        "bar = progress([nap.remote(0.2) for _ in range(6)], label='naps')\n"
        "print('returned before the end:', not bar.finished)\n"
        "assert bar.wait(30)\n"
        "bar",
    )
    assert "returned before the end: True" in stream(cell)
    [summary] = displays(cell)  # and no second display for `bar` as the last line
    assert summary.startswith("naps: 6 of 6 done, in ")


def test_cluster_monitor_replaces_the_previous_one(nb):
    cell, _ = run_logged(
        nb, "old = get_ipython()._shoal_magics.monitor\n%cluster monitor --interval 0.5"
    )
    [text] = displays(cell)
    assert text.startswith("Shoal cluster · 1 node")
    cell, _ = run_logged(
        nb,
        "from shoal.widgets._monitor import running_monitors\n"
        "new = get_ipython()._shoal_magics.monitor\n"
        "print(old.status, '|', new.status, '|', running_monitors() == [new])",
    )
    assert stream(cell) == "stopped: a newer monitor replaced it | live, every 0.5 s | True\n"


def test_stopping_the_cluster_stops_every_monitor_thread(nb):
    no_error(nb.run("%cluster stop"))
    cell = no_error(
        nb.run(
            "import threading\n"
            "testing.wait_for(lambda: not running_monitors(), timeout=10)\n"
            "print(new.status)\n"
            "print([t.name for t in threading.enumerate() if t.name.startswith('shoal')])"
        )
    )
    assert stream(cell) == "stopped: the cluster was shut down\n[]\n"
