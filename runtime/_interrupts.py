"""Keeping KeyboardInterrupt out of loop work that the main thread does.

A thread that borrows an IO loop (``IOLoop.try_enter``) pushes messages and reads replies
itself. Stopped half-way by an exception, that work could lose a message or leave half of
one in a socket, after which the connection is useless. Python raises a signal's exception
in the main thread only, between any two bytecodes; so while the main thread holds a loop,
SIGINT is noted and its handler runs when the thread lets go.

That needs our own handler in front of the user's: installed when the main thread first
borrows a loop while the handler is Python's default (re-installed when something, such as
a Jupyter kernel before each cell, puts the default back). The main thread does not
borrow at all while a handler that is neither the default nor ours is installed: it may
raise, and we cannot defer it. A worker wraps its own handler (task cancellation) with
``guarded``.
"""

from __future__ import annotations

# The C module under ``signal``: signal.getsignal converts its result to an enum, 50 times
# the cost of the look-up itself, and enter() is on the path of every synchronous call.
import _signal
import threading
from collections.abc import Callable
from typing import Any

_Handler = Callable[[int, Any], Any]


class _State:
    depth = 0  # how many loops the main thread holds
    pending: tuple[_Handler, int, Any] | None = None


_state = _State()


def guarded(handler: _Handler) -> _Handler:
    """A SIGINT handler that runs ``handler`` at once, or, while the main thread holds a
    loop, as soon as it lets go."""
    if getattr(handler, "_shoal_guarded", False):
        return handler

    def on_sigint(signum: int, frame: Any) -> Any:
        if _state.depth:
            _state.pending = (handler, signum, frame)
            return None
        return handler(signum, frame)

    on_sigint._shoal_guarded = True  # type: ignore[attr-defined]
    return on_sigint


def is_main_thread() -> bool:
    return threading.get_ident() == threading.main_thread().ident


def enter() -> bool:
    """The main thread is about to hold a loop; False when it must not (see above)."""
    handler = _signal.getsignal(_signal.SIGINT)
    if not getattr(handler, "_shoal_guarded", False):
        if handler is _signal.default_int_handler:
            _signal.signal(_signal.SIGINT, guarded(handler))
        elif callable(handler):
            return False
        # SIG_IGN, SIG_DFL or a handler set outside Python: no exception is raised.
    _state.depth += 1
    return True


def leave() -> None:
    """The main thread let go of a loop: run a SIGINT handler that waited for it."""
    _state.depth -= 1
    if not _state.depth and _state.pending is not None:
        handler, signum, frame = _state.pending
        _state.pending = None
        handler(signum, frame)
