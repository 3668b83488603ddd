"""Shoal's errors as IPython shows them (``_render_traceback_``).

A task error renders like a local error: the original exception's type and message, the
caller's frames in the notebook, then the frames of the task where it failed, each with its
source lines, and the task's name and where it ran. Frames of Shoal itself are left out.
Code that came from a notebook cell is shown as ``Cell In[3], line 4``, as IPython does:
the notebook has the cell's source even when the worker did not.

Layout (colors as IPython's "Linux" scheme):

    ---------------------------------------------------------------------------
    ZeroDivisionError                         Traceback (most recent call last)
    Cell In[4], line 1
    ----> 1 shoal.get(f.remote(0))

    Task f failed on node 1a2b3c4d5e6f (pid 4242):
    Cell In[3], line 3, in f
          1 @shoal.remote
          2 def f(x):
    ----> 3     return 1 / x

    ZeroDivisionError: division by zero
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+)$')
_CONTEXT = 2  # lines shown before the failing one
_WIDTH = 75


@dataclass
class Frame:
    filename: str
    lineno: int
    name: str
    line: str = ""  # the source line as the side that raised saw it ("" when unknown)
    extra: list[str] = field(default_factory=list)  # carets, "[Previous line repeated]"


@dataclass
class RemoteTraceback:
    frames: list[Frame]
    exception: str  # "ZeroDivisionError: division by zero" (may span lines)


def parse_remote_traceback(text: str) -> RemoteTraceback:
    """Frames and exception text of a traceback formatted by ``traceback.format_*``."""
    frames: list[Frame] = []
    lines = text.splitlines()
    i = 0
    if lines and lines[0].startswith("Traceback (most recent call last)"):
        i = 1
    while i < len(lines):
        line = lines[i]
        match = _FRAME.match(line)
        if match is not None:
            frames.append(Frame(match["file"], int(match["line"]), match["name"]))
            i += 1
            if i < len(lines) and lines[i].startswith("    ") and not _FRAME.match(lines[i]):
                frames[-1].line = lines[i].strip()
                i += 1
            continue
        if frames and line.startswith("    "):
            frames[-1].extra.append(line)  # carets under the source line
            i += 1
            continue
        if line.startswith("  [") and frames:
            frames[-1].extra.append(line.strip())
            i += 1
            continue
        break
    return RemoteTraceback(frames, "\n".join(lines[i:]).strip())


def location(filename: str, lineno: int) -> str:
    """``Cell In[3], line 4`` for a notebook cell's code, else ``path:line``."""
    try:
        label = _label(filename)
    except Exception:
        label = None
    if label is not None:
        return f"{label[0]} {label[1]}, line {lineno}"
    return f"{_short_path(filename)}:{lineno}"


def notebook_text(text: str) -> str:
    """A remote traceback's text as the notebook shows it, without colour (for HTML): frames
    of notebook cells named ``Cell In[3], line 4`` with their source lines, Shoal's frames
    left out. The text as it came when it has no frames, or cannot be read."""
    try:
        remote = parse_remote_traceback(text)
        if not remote.frames:
            return text
        style = _Style(False)
        out = ["Traceback (most recent call last):"]
        out += [
            _format_frame(frame, style, remote=True)
            for frame in remote.frames
            if not _is_runtime_file(frame.filename)
        ]
        out.append(remote.exception)
        return "\n".join(out)
    except Exception:
        return text


def render(err: BaseException) -> list[str]:
    """IPython's traceback lines for a Shoal error; never raises."""
    try:
        return _render(err)
    except Exception:
        return _fallback(err)


def _fallback(err: BaseException) -> list[str]:
    import traceback

    try:
        shell = _shell()
        if shell is not None:
            return list(shell.InteractiveTB.structured_traceback(type(err), err, err.__traceback__))
    except Exception:
        pass
    return traceback.format_exception(type(err), err, err.__traceback__)


def _render(err: BaseException) -> list[str]:
    from shoal.exceptions import TaskError

    style = _Style(_use_color())
    if isinstance(err, TaskError):
        remote = parse_remote_traceback(err.remote_traceback or "")
        type_name = err.cause_type_name or type(err).__name__
        exception = remote.exception or f"{type_name}: {err}"
    else:
        remote = None
        type_name = type(err).__name__
        exception = f"{type_name}: {err}" if str(err) else type_name
    out = [
        style.red("-" * _WIDTH),
        style.red(type_name)
        + " " * max(1, 42 - len(type_name))
        + "Traceback (most recent call last)",
    ]
    if not getattr(err, "_shoal_hide_local_frames", False):
        for frame in _local_frames(err):
            out.append(_format_frame(frame, style, remote=False))
    if remote is not None:
        assert isinstance(err, TaskError)
        if len(out) > 2:
            _blank_line(out)
        out.append(_where(err, style))
        for frame in remote.frames:
            if _is_runtime_file(frame.filename):
                continue
            out.append(_format_frame(frame, style, remote=True))
    _blank_line(out)
    out.append(_format_exception(exception, style))
    also = getattr(err, "_shoal_also_failed", "")
    if also:
        out.append(also)
    # Notes, as Python prints them after the exception: get() adds one that counts the
    # other refs that failed.
    out.extend(str(note) for note in getattr(err, "__notes__", None) or ())
    return out


def _blank_line(out: list[str]) -> None:
    """IPython joins the entries with newlines; frames end with one already."""
    if not out[-1].endswith("\n"):
        out.append("")


def _where(err: Any, style: _Style) -> str:
    task = err.task_name or "task"
    node = (err.node_id or "")[:12] or "?"
    return f"Task {style.cyan(task)} failed on node {node} (pid {err.pid}):"


def _format_exception(text: str, style: _Style) -> str:
    first, _, rest = text.partition("\n")
    name, sep, message = first.partition(":")
    if sep and " " not in name.strip():
        first = style.red(name) + sep + message
    return first + ("\n" + rest if rest else "")


# -- frames ----------------------------------------------------------------------------
def _local_frames(err: BaseException) -> list[Frame]:
    """The caller's frames of ``err``: neither Shoal's nor IPython's own."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _is_runtime_file(code.co_filename) and not _is_ipython_file(code.co_filename):
            frames.append(Frame(code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    return frames


def _format_frame(frame: Frame, style: _Style, remote: bool) -> str:
    label = _label(frame.filename)
    if label is not None:
        head = f"{label[0]} {style.green(f'{label[1]}, line {frame.lineno}')}"
    else:
        head = f"File {style.green(f'{_short_path(frame.filename)}:{frame.lineno}')}"
    if frame.name != "<module>":
        head += f", in {style.cyan(frame.name)}"
    lines = [head]
    context = _context_lines(frame, remote)
    if context:
        width = len(str(frame.lineno))
        for lineno, text in context:
            if lineno == frame.lineno:
                lines.append(f"{style.green('---->' + ' ' + str(lineno).rjust(width))} {text}")
            else:
                lines.append(f"{' ' * 6}{str(lineno).rjust(width)} {text}")
    elif frame.line:
        lines.append(f"{style.green('---->')} {frame.line}")
    lines.extend(x for x in frame.extra if x.lstrip().startswith("["))
    return "\n".join(lines) + "\n"


def _context_lines(frame: Frame, remote: bool) -> list[tuple[int, str]]:
    """The failing line and a few before it, from this process's linecache (which holds
    the notebook's cells). For a remote frame, only if the local file agrees with the line
    the worker saw (the same cell, or the same version of a file)."""
    here = linecache.getline(frame.filename, frame.lineno)
    if not here.strip():
        return []
    if remote and frame.line and here.strip() != frame.line.strip():
        return []
    out = []
    for lineno in range(max(1, frame.lineno - _CONTEXT), frame.lineno + 1):
        text = linecache.getline(frame.filename, lineno).rstrip("\n")
        if lineno < frame.lineno and not text.strip() and not out:
            continue  # no leading blank lines
        out.append((lineno, text))
    return out


def _label(filename: str) -> tuple[str, str] | None:
    """("Cell", "In[3]") for a notebook cell's code, as IPython's tracebacks say."""
    shell = _shell()
    if shell is None:
        return None
    try:
        label = shell.compile.format_code_name(filename)
    except Exception:
        return None
    return tuple(label) if label else None  # type: ignore[return-value]


def _short_path(path: str) -> str:
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home) :]
    return path


# Frames that belong to Shoal: the runtime's private modules and this extension's (on the
# worker, the cell runs inside jupyter_ext/_runner.py). Paths may be another machine's in
# remote frames, so the check is on the path's last two parts.
_RUNTIME_DIRS = ("shoal", "runtime", "jupyter_ext")


def _is_runtime_file(filename: str) -> bool:
    parent = os.path.basename(os.path.dirname(filename))
    base = os.path.basename(filename)
    if parent in _RUNTIME_DIRS and base.startswith("_") and base != "_demo.py":
        return True
    return _in_dir(filename, _shoal_dirs())


def _shoal_dirs() -> tuple[str, ...]:
    import shoal
    import shoal.jupyter_ext

    return (
        os.path.dirname(shoal.__file__ or ""),
        os.path.dirname(shoal.jupyter_ext.__file__ or ""),
    )


def _is_ipython_file(filename: str) -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None or not getattr(ipython, "__file__", None):
        return False
    return _in_dir(filename, (os.path.dirname(ipython.__file__),))


def _in_dir(filename: str, dirs: tuple[str, ...]) -> bool:
    path = os.path.abspath(filename)
    return any(d and path.startswith(d + os.sep) for d in dirs)


# -- style -----------------------------------------------------------------------------
def _shell() -> Any:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        return ipython.get_ipython()
    except Exception:
        return None


def _use_color() -> bool:
    shell = _shell()
    colors = str(getattr(shell, "colors", "nocolor")).lower()
    return shell is not None and colors != "nocolor"


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def red(self, text: str) -> str:
        return self._wrap("0;31", text)

    def green(self, text: str) -> str:
        return self._wrap("0;32", text)

    def cyan(self, text: str) -> str:
        return self._wrap("0;36", text)


# -- what the notebook's error message says --------------------------------------------
def local_face(err: BaseException) -> tuple[type, BaseException] | None:
    """For a task error: the (type, value) a local error would have had, so that the
    notebook's error output names ``ZeroDivisionError: division by zero`` rather than
    Shoal's wrapper. None for other errors."""
    from shoal.exceptions import TaskError

    if not isinstance(err, TaskError):
        return None
    cause: Any = err
    while isinstance(cause, TaskError) and cause.cause is not None and cause.cause is not cause:
        cause = cause.cause
    if not isinstance(cause, TaskError):
        return type(cause), cause
    text = parse_remote_traceback(err.remote_traceback or "").exception
    name, _, message = text.partition("\n")[0].partition(": ")
    name = name.strip().rsplit(".", 1)[-1] or err.cause_type_name or "TaskError"
    if not name.isidentifier():
        return None
    return type(name, (Exception,), {}), Exception(message.strip())
