"""Progress of many refs: ``shoal.widgets.progress(refs)``, and the bar that ``shoal.get``
of a list shows in a notebook when it waits longer than a second.

The counting is the runtime's (``shoal._get_progress``); this module draws. The notebook
extension installs ``watch_get`` as the runtime's get watcher, so that the runtime never
imports IPython or ipywidgets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from shoal import _get_progress

from ._format import FONT, MUTED, TRACK, esc, format_count, format_duration, format_rate
from ._format import stacked_bar as _stacked
from ._progress_views import View, choose_view, in_kernel

_OUTCOMES = {
    "done": "done",
    "timeout": "timed out",
    "interrupted": "interrupted",
    "cluster gone": "stopped: the cluster is gone",
    "stopped": "stopped",
}

# Explicit bars (``progress()``) that are still following their refs: while one is, a get
# shows no bar of its own (it would mostly repeat the explicit one).
_live: set[ProgressBar] = set()
_live_lock = threading.Lock()


class ProgressBar:
    """Done of total, failures, rate and time left, for a set of refs; a one-line summary
    once they are all done. Made by ``progress(refs)`` and by ``shoal.get`` in notebooks."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "progress",
        started: float | None = None,
        view: Any = "auto",
    ) -> None:
        self.total = total
        self.label = label
        self.started = time.monotonic() if started is None else started
        self.done = 0
        self.failed = 0
        self.outcome: str | None = None  # set when finished
        self.elapsed: float | None = None
        self._view: View | None = choose_view() if view == "auto" else view
        self._finished = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._refs: list[Any] = []
        self._shown_in: int | None = None

    # -- the runtime's Reporter ---------------------------------------------------------
    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        if self._view is not None:
            self._view.show(self.html(), self.text())

    def finish(self, done: int, failed: int, outcome: str) -> None:
        self.done, self.failed = done, failed
        self.outcome = outcome
        self.elapsed = time.monotonic() - self.started
        self._refs = []
        with _live_lock:
            _live.discard(self)
        try:
            if self._view is not None:
                self._view.done(self.summary_html(), self.summary_text())
        finally:
            self._finished.set()

    # -- numbers ------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Refs done per second so far."""
        elapsed = self.elapsed if self.elapsed is not None else time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def time_left(self) -> float | None:
        rate = self.rate
        if self.done >= self.total:
            return 0.0
        return (self.total - self.done) / rate if rate > 0 else None

    # -- pictures ---------------------------------------------------------------------------
    def text(self) -> str:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        parts = [
            f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] "
            f"{format_count(self.done)}/{format_count(self.total)} done"
        ]
        if self.failed:
            parts.append(f"{format_count(self.failed)} failed")
        parts.append(format_rate(self.rate))
        left = self.time_left
        parts.append(f"{format_duration(left)} left" if left is not None else "time left ?")
        return " · ".join(parts)

    def html(self) -> str:
        ok = self.done - self.failed
        pending = self.total - self.done
        strip = _stacked(
            [(ok, "#43a047", "done"), (self.failed, "#e53935", "failed"), (pending, TRACK, "")],
            width=260,
        )
        facts = [f"<b>{format_count(self.done)}</b> / {format_count(self.total)} done"]
        if self.failed:
            facts.append(f'<span style="color:#e53935">{format_count(self.failed)} failed</span>')
        facts.append(format_rate(self.rate))
        left = self.time_left
        facts.append(f"{format_duration(left)} left" if left is not None else "time left ?")
        return (
            f'<div class="shoal-progress" style="{FONT}"><b>{esc(self.label)}</b> {strip} '
            f"{' · '.join(facts)}</div>"
        )

    def summary_text(self) -> str:
        outcome = _OUTCOMES.get(self.outcome or "", self.outcome or "running")
        failed = f", {format_count(self.failed)} failed" if self.failed else ""
        return (
            f"{self.label}: {format_count(self.done)} of {format_count(self.total)} {outcome}"
            f"{failed}, in {format_duration(self.elapsed)} ({format_rate(self.rate)})"
        )

    def summary_html(self) -> str:
        if self.outcome == "done" and not self.failed:
            mark = '<span style="color:#43a047">&#10004;</span>'
        else:
            mark = '<span style="color:#e53935">&#10008;</span>'
        return (
            f'<div class="shoal-progress-summary" style="{FONT}">{mark} '
            f'<span style="{MUTED}">{esc(self.summary_text())}</span></div>'
        )

    # -- following refs in a thread (progress()) ------------------------------------------
    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the refs are all done (or the bar is closed); False on timeout."""
        return self._finished.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop following the refs (the bar then says "stopped")."""
        self._closing.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _follow(self, core: Any, refs: list[Any], block: bool) -> None:
        counter = _get_progress.Counter(core, [r.binary() for r in refs])
        self._refs = refs  # the values must live until they are counted
        if block:
            _get_progress.run(counter, self, None, self._closing.is_set)
            return
        with _live_lock:
            _live.add(self)

        def follow() -> None:
            _get_progress.run(counter, self, None, self._closing.is_set)

        self._thread = threading.Thread(target=follow, name="shoal-progress", daemon=True)
        self._thread.start()

    # -- display -----------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython import get_ipython
        from IPython.display import display

        shell = get_ipython()
        count = getattr(shell, "execution_count", None)
        if self._shown_in is not None and count == self._shown_in:
            return  # progress(refs) as a cell's last line: the bar is on the page already
        self._shown_in = count
        if self._view is not None and not self._view_shown():
            self._view.show(self.html(), self.text())
            return
        html, text = (
            (self.summary_html(), self.summary_text())
            if self.finished
            else (self.html(), self.text())
        )
        display({"text/html": html, "text/plain": text}, raw=True)

    def _view_shown(self) -> bool:
        return bool(getattr(self._view, "shown", True))

    def __repr__(self) -> str:
        return self.summary_text() if self.finished else self.text()


def progress(
    refs: Iterable[Any], *, label: str = "progress", block: bool | None = None
) -> ProgressBar:
    """Show the progress of ``refs`` (ObjectRefs): done of total, failures, rate, time
    left, then a one-line summary.

    In a notebook the bar is a widget that follows the refs from a thread, and this
    returns at once (``bar.wait()`` waits). Elsewhere it writes a line of text to stderr
    (redrawn in place on a terminal) and, unless ``block=False``, returns when all are
    done. Getting the values is still ``shoal.get(refs)``."""
    from shoal import _api
    from shoal._refs import ObjectRef

    refs = list(refs)
    for i, ref in enumerate(refs):
        if not isinstance(ref, ObjectRef):
            raise TypeError(
                f"progress() expects ObjectRefs, but item {i} is a {type(ref).__name__}"
            )
    core = _api._auto_init()
    kernel = in_kernel()
    if block is None:
        block = not kernel
    bar = ProgressBar(len({r.binary() for r in refs}), label=label)
    if kernel and bar._view is not None:
        from IPython.display import display

        display(bar)
    bar._follow(core, refs, block)
    return bar


def watch_get(total: int, started: float) -> ProgressBar | None:
    """The runtime's get watcher in a notebook: a bar for a get of the main thread (the
    cell's), unless an explicit bar already follows refs."""
    if threading.current_thread() is not threading.main_thread():
        return None
    with _live_lock:
        if _live:
            return None
    bar = ProgressBar(total, label="shoal.get", started=started)
    if bar._view is None:
        return None
    return bar


def install() -> None:
    """Let ``shoal.get`` of several refs show its progress (the notebook extension)."""
    from shoal import _api

    _api._get_watcher = watch_get


def uninstall() -> None:
    from shoal import _api

    if _api._get_watcher is watch_get:
        _api._get_watcher = None
