"""Where a progress bar appears: a notebook widget, notebook HTML, or a line of text.

    WidgetView   ipykernel with ipywidgets: one HTML widget, one comm message per update;
                 the display also carries text/html and text/plain of the start, for
                 frontends without widgets; when done, the whole display is replaced by
                 the one-line summary (update_display_data), which every frontend shows
    HtmlView     ipykernel without ipywidgets: HTML, replaced in place on each update
    TextView     a terminal or plain Python: one line on stderr, redrawn with \\r when
                 it is a terminal; otherwise only the summary is written

``choose_view()`` picks one for the running process; ``SHOAL_PROGRESS`` (auto, widget,
html, text, off) overrides the choice.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Protocol, TextIO

MODES = ("auto", "widget", "html", "text", "off")


class View(Protocol):
    def show(self, html: str, text: str) -> None: ...

    def done(self, html: str, text: str) -> None: ...


def mode() -> str:
    value = os.environ.get("SHOAL_PROGRESS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"SHOAL_PROGRESS must be one of {', '.join(MODES)}, got {value!r}")
    return value


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a kernel)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def choose_view(stream: TextIO | None = None) -> View | None:
    """The view for this process (None when progress is turned off)."""
    chosen = mode()
    if chosen == "off":
        return None
    if chosen == "auto":
        if in_kernel():
            chosen = "widget" if widgets_available() else "html"
        else:
            chosen = "text"
    if chosen == "widget":
        return WidgetView()
    if chosen == "html":
        return HtmlView()
    return TextView(stream if stream is not None else sys.stderr)


def _display(bundle: dict[str, Any], display_id: str, update: bool = False) -> None:
    from IPython.display import display, update_display

    if update:
        update_display(bundle, raw=True, display_id=display_id)
    else:
        display(bundle, raw=True, display_id=display_id)


class WidgetView:
    def __init__(self) -> None:
        import ipywidgets

        self.widget = ipywidgets.HTML()
        self.widget.add_class("shoal-progress")
        self.display_id = uuid.uuid4().hex
        self.shown = False

    def show(self, html: str, text: str) -> None:
        if not self.shown:
            self.shown = True
            self.widget.value = html
            bundle = dict(self.widget._repr_mimebundle_() or {})
            bundle["text/html"] = html
            bundle["text/plain"] = text
            _display(bundle, self.display_id)
        elif html != self.widget.value:
            self.widget.value = html  # one comm message

    def done(self, html: str, text: str) -> None:
        if self.shown:
            _display({"text/html": html, "text/plain": text}, self.display_id, update=True)
        else:
            _display({"text/html": html, "text/plain": text}, self.display_id)
        self.widget.close()


class HtmlView:
    def __init__(self) -> None:
        self.display_id = uuid.uuid4().hex
        self.shown = False
        self.last = ""

    def show(self, html: str, text: str) -> None:
        if html == self.last:
            return
        self.last = html
        _display({"text/html": html, "text/plain": text}, self.display_id, update=self.shown)
        self.shown = True

    def done(self, html: str, text: str) -> None:
        _display({"text/html": html, "text/plain": text}, self.display_id, update=self.shown)
        self.shown = True


class TextView:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.live = stream.isatty()
        except (AttributeError, ValueError):
            self.live = False
        self.width = 0

    def show(self, html: str, text: str) -> None:
        if not self.live:
            return
        line = text[:200]
        pad = max(0, self.width - len(line))
        self.width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def done(self, html: str, text: str) -> None:
        if self.live:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
