"""``ClusterMonitor``: the cluster, live, in a notebook cell.

    thread "shoal-monitor", every ``interval`` seconds:
        one STATE request (kind "snapshot") to the control store    (~1 ms, O(nodes+actors+objects))
        render it as HTML                                           (_monitor_html)
        set the live HTML widget's value when it changed            -> one comm message
        when the failures changed (at most once a second): the failure accordion's titles
        and the changed slots                                       -> a few more

Comm messages may be sent from any thread in ipykernel, so the monitor keeps moving while
a cell blocks (in ``shoal.get``, say). The thread ends on ``stop()``/``close()``, when the
cluster it watches is shut down or replaced, and at interpreter exit; it never starts a
cluster (it talks to the core it was made with, not through ``shoal.state``, which would
start one after a shutdown).
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any

import ipywidgets

from . import _monitor_extras, _monitor_html, _monitor_text
from ._snapshot import EndRate, fetch_snapshot

DEFAULT_INTERVAL = 0.25  # 4 Hz
MIN_INTERVAL = 0.05
# A burst of failures changes the accordion at most this often (it is several messages).
FAILURES_MIN_SECONDS = 1.0

_running: set[ClusterMonitor] = set()
_running_lock = threading.Lock()


class ClusterMonitor(ipywidgets.VBox):
    """A live view of the connected cluster: per node CPU, memory and object-store bars;
    task counts by state and by function; actors; the largest objects and spilled bytes;
    the latest failures, each expandable to its remote traceback.

    ``interval`` is the time between updates in seconds (default 0.25: four a second);
    ``failures``, ``actors`` and ``objects`` bound how many of each are shown. The monitor
    updates from a background thread until ``stop()`` or ``close()``, or until the cluster
    is shut down. Frontends without widget support show the same content as HTML (or
    text), as it was when displayed.
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        *,
        failures: int = 10,
        actors: int = 20,
        objects: int = 5,
        start: bool = True,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"interval must be a number of seconds, got {interval!r}")
        if not interval >= MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL} s, got {interval!r}")
        for name, value in (("failures", failures), ("actors", actors), ("objects", objects)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        from shoal import _api

        cluster = _api._cluster
        if cluster is None:
            raise RuntimeError(
                "no Shoal cluster is connected: call shoal.init() (or %cluster start) first"
            )
        # A narrow output area scrolls the picture sideways rather than cutting it off.
        self._live = ipywidgets.HTML(layout=ipywidgets.Layout(overflow="auto"))
        self._failure_box = ipywidgets.Accordion()
        # Stacks of running work on request: a picker of live actors and nodes, a button,
        # and the text. Clicks reach the kernel between cells (or from another thread's
        # point of view, when the kernel is idle), like any widget event.
        self._stack_choice = ipywidgets.Dropdown(
            options=[], description="Stacks of", layout=ipywidgets.Layout(width="auto")
        )
        self._stack_button = ipywidgets.Button(description="Show stacks")
        self._stack_button.on_click(self._show_stacks)
        self._stack_text = ipywidgets.HTML()
        self._stack_choices: list[Any] = []
        self._stack_choices_at = 0.0
        stacks_row = ipywidgets.HBox([self._stack_choice, self._stack_button])
        super().__init__(children=[self._live, self._failure_box, stacks_row, self._stack_text])
        self.add_class("shoal-cluster-monitor")
        self.interval = float(interval)
        self._limits = {"failures": failures, "actors": actors, "objects": objects}
        self._cluster = cluster
        self._core = cluster.core
        self._slots: list[tuple[str, int] | None] = []
        self._slot_widgets: list[ipywidgets.HTML] = []
        self._failures_shown_at = 0.0
        self._failures_seen: tuple[Any, ...] = ()
        self._rate = EndRate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.snapshot: dict[str, Any] | None = None
        self.status = self._live_status() if start else "not started: .start() starts it"
        self.ticks = 0  # snapshots applied so far
        self.rate: float | None = None
        self._tick()  # the first picture is there as soon as the monitor is displayed
        if start and not self._stop.is_set():
            self.start()

    # -- lifetime ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start updating (done by the constructor unless ``start=False``)."""
        if self.running or self._stop.is_set():
            return
        self.status = self._live_status()
        with _running_lock:
            _running.add(self)
        self._thread = threading.Thread(target=self._run, name="shoal-monitor", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "stopped", timeout: float = 5.0) -> None:
        """Stop updating; the widget keeps showing the last picture, marked stopped."""
        if not hasattr(self, "_stop"):
            return  # the constructor raised
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if not self.status.startswith("stopped"):
            self._finish(reason)

    def close(self) -> None:
        """Stop updating and close the widget (and its parts) in the frontend."""
        try:
            self.stop("closed")
        except Exception:
            # ipywidgets closes widgets from __del__, also while the interpreter exits,
            # when modules may be half gone; the thread ended at exit anyway (stop_all).
            pass
        # getattr: ipywidgets also calls close() from __del__, on a monitor whose
        # constructor raised before it made its parts.
        parts = [*getattr(self, "_slot_widgets", ())]
        parts += [getattr(self, "_failure_box", None), getattr(self, "_live", None)]
        parts += [getattr(self, name, None) for name in ("_stack_choice", "_stack_button")]
        parts += [getattr(self, "_stack_text", None)]
        for widget in parts:
            if widget is not None:
                widget.close()
        super().close()

    def _live_status(self) -> str:
        return f"live, every {self.interval:g} s"

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay < 0:  # a slow tick: skip ahead rather than catch up in a burst
                    next_at, delay = time.monotonic(), 0.0
                if self._stop.wait(delay):
                    break
                if not self._tick():
                    break
        finally:
            with _running_lock:
                _running.discard(self)

    def _cluster_gone(self) -> bool:
        from shoal import _api

        return self._core.closed or _api._cluster is not self._cluster

    def _tick(self) -> bool:
        """Fetch, render, send. False when the monitor should stop."""
        if self._cluster_gone():
            self._finish("the cluster was shut down")
            return False
        try:
            snapshot = fetch_snapshot(self._core, **self._limits)
        except Exception as exc:
            if self._cluster_gone():
                self._finish("the cluster was shut down")
                return False
            self.status = f"no answer from the cluster: {exc}"
            self._render()
            return True
        self.rate = self._rate.note(snapshot)
        self.snapshot = snapshot
        self.ticks += 1
        if self.status.startswith("no answer"):
            self.status = self._live_status()
        self._render()
        return True

    def _finish(self, reason: str) -> None:
        self._stop.set()
        self.status = f"stopped: {reason}"
        self._render()

    # -- the metrics section: PLUG-IN POINT for shoal.util.metrics --------------------------
    # The snapshot's optional "metrics" key (added by the metrics work, on its own branch)
    # goes through these two methods, between the objects and the failures. Absent, they
    # render nothing; the metrics branch fills them in.
    def render_metrics(self, metrics: Any) -> str:
        """The metrics section as HTML: "" when the snapshot has no ``metrics`` key."""
        return _monitor_extras.metrics_html(metrics)

    def render_metrics_text(self, metrics: Any) -> str:
        """The metrics section as text ("" when absent); see ``render_metrics``."""
        return _monitor_extras.metrics_text(metrics)

    # -- rendering ---------------------------------------------------------------------------
    def html(self, inline_failures: bool = True) -> str:
        """The monitor's current picture as HTML (failures as ``<details>`` by default)."""
        metrics = (self.snapshot or {}).get("metrics")
        return _monitor_html.render(
            self.snapshot,
            status=self.status,
            rate=self.rate,
            inline_failures=inline_failures,
            metrics_html=self.render_metrics(metrics),
        )

    def text(self) -> str:
        """The monitor's current picture as plain text."""
        metrics = (self.snapshot or {}).get("metrics")
        return _monitor_text.render(
            self.snapshot,
            status=self.status,
            rate=self.rate,
            metrics_text=self.render_metrics_text(metrics),
        )

    def _render(self) -> None:
        failures = (self.snapshot or {}).get("failures") or []
        live = self.html(inline_failures=False) + _failures_heading(failures)
        if live != self._live.value:
            self._live.value = live  # the tick's one message
        self._show_failures(failures)
        self._offer_stacks()

    def _offer_stacks(self) -> None:
        """Keep the stacks picker's choices current: at most once a second, and only when
        they changed (a new actor, a node that came or went)."""
        now = time.monotonic()
        if now - self._stack_choices_at < FAILURES_MIN_SECONDS:
            return
        choices = _monitor_extras.stack_choices(self.snapshot)
        if choices != self._stack_choices:
            self._stack_choices = choices
            self._stack_choice.options = choices
        self._stack_choices_at = now

    def show_stacks(self, kind: str, ident: str) -> str:
        """Show (and return) the stacks of an actor's worker (``kind="actor"``) or of every
        worker of a node (``kind="node"``), as ``shoal stack`` prints them."""
        try:
            text = _monitor_extras.fetch_stacks(self._core, (kind, ident))
        except Exception as exc:
            text = f"could not take the stacks: {exc}"
        self._stack_text.value = _monitor_extras.stacks_html(text)
        return text

    def _show_stacks(self, _button: Any = None) -> None:
        choice = self._stack_choice.value
        if choice is None:
            self._stack_text.value = _monitor_extras.stacks_html(
                "nothing to show: no live actor or node"
            )
            return
        self.show_stacks(*choice)

    def _show_failures(self, failures: list[dict[str, Any]]) -> None:
        """Failures go in an accordion whose items the frontend opens and closes by itself
        (a new HTML value would close them 4 times a second). Each failure keeps its slot
        while it is shown, so an open item stays on its failure; a new failure takes the
        slot of one that left the list (the oldest), or a new slot. Only what changed is
        sent: traitlets drops an assignment of an equal value."""
        keys = [(str(f.get("task_id")), int(f.get("attempt") or 1)) for f in failures]
        # A record fills in as its events arrive (pid, duration, traceback): seen again.
        seen = tuple(
            (key, f.get("node_id"), f.get("pid"), f.get("duration"), bool(f.get("traceback")))
            for key, f in zip(keys, failures, strict=True)
        )
        if seen == self._failures_seen:
            return
        now = time.monotonic()
        if self._slots and now - self._failures_shown_at < FAILURES_MIN_SECONDS:
            return  # shown at a later tick
        self._failures_shown_at = now
        self._failures_seen = seen
        by_key = dict(zip(keys, failures, strict=True))
        slots = [k if k in by_key else None for k in self._slots]
        free = [i for i, k in enumerate(slots) if k is None]
        for key in reversed(keys):  # oldest first: a list that is not full reads in order
            if key in slots:
                continue
            if free:
                slots[free.pop(0)] = key
            else:
                slots.append(key)
        while slots and slots[-1] is None:
            slots.pop()
        self._slots = slots
        while len(self._slot_widgets) < len(slots):
            self._slot_widgets.append(ipywidgets.HTML())
        for widget, key in zip(self._slot_widgets, slots, strict=False):
            widget.value = _monitor_html.failure_body(by_key[key]) if key is not None else ""
        titles = tuple(
            _monitor_html.failure_title(by_key[k]) if k is not None else "(gone)" for k in slots
        )
        with self._failure_box.hold_sync():
            if len(self._failure_box.children) != len(slots):
                self._failure_box.children = tuple(self._slot_widgets[: len(slots)])
            self._failure_box.titles = titles

    # -- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
        # For frontends without widgets (and saved notebooks): the picture at display time.
        bundle["text/html"] = self.html(inline_failures=True)
        bundle["text/plain"] = self.text()
        return bundle

    def __repr__(self) -> str:
        return f"<ClusterMonitor ({self.status}), {self.ticks} updates>"


def _failures_heading(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return _monitor_html.title("Latest failures", "none")
    return _monitor_html.title(
        "Latest failures", f"{len(failures)} shown · click one for its remote traceback"
    )


def stop_all(timeout: float = 5.0) -> None:
    """Stop every running monitor of this process (at exit, and for tests)."""
    with _running_lock:
        monitors = list(_running)
    for monitor in monitors:
        monitor.stop("the process is exiting", timeout)


def running_monitors() -> list[ClusterMonitor]:
    with _running_lock:
        return list(_running)


atexit.register(stop_all)
