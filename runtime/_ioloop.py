"""A small single-threaded event loop over sockets, file descriptors and timers.

Readers are called when a socket or fd is readable (or has an error or hang-up, so that the
reader sees it in its next read); writers, registered only while a socket has queued output,
when it is writable again.

Every process role runs its IO in one of these: the head's loop is its main thread, a
driver's or worker's loop is a background thread. Other threads hand it work through
``call_soon_threadsafe`` (a deque plus an eventfd), or do the work themselves while they
hold the loop ("borrow" it, see ``try_enter``): all loop work (callbacks, timers, calls) runs
under one lock, so sockets and the state of handlers are only ever touched by one thread at
a time. Borrowing is for hot paths where waking the loop thread would cost
more than the work itself (a synchronous actor call).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _interrupts

log = logging.getLogger(__name__)

_SELECT_IN = select.POLLIN
_SELECT_OUT = select.POLLOUT


class _Poller:
    """select.poll over file descriptors. Keys are what the loop registers: an int fd, or
    an object with fileno()."""

    def __init__(self) -> None:
        self._select: Any = select.poll()
        self._fd_of: dict[Any, int] = {}
        self._key_of: dict[int, Any] = {}

    def set(self, key: Any, read: bool, write: bool) -> None:
        if read or write:
            fd = self._fd_of.get(key)
            if fd is None:
                fd = key if isinstance(key, int) else key.fileno()
                self._fd_of[key] = fd
                self._key_of[fd] = key
            self._select.register(fd, (_SELECT_IN if read else 0) | (_SELECT_OUT if write else 0))
        else:
            fd = self._fd_of.pop(key, None)
            if fd is not None:
                self._key_of.pop(fd, None)
                self._select.unregister(fd)

    def poll(self, timeout: int | None) -> list[tuple[Any, bool, bool]]:
        """(key, readable or in error, writable) for each ready key."""
        key_of = self._key_of
        return [
            (key_of.get(fd), bool(ev & ~_SELECT_OUT), bool(ev & _SELECT_OUT))
            for fd, ev in self._select.poll(timeout)
        ]


Callback = Callable[..., Any]


def _nothing() -> None:
    pass


class TimerHandle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback, args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class IOLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._poller = _Poller()
        self._readers: dict[Any, Callback] = {}
        self._writers: dict[Any, Callback] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_seq = itertools.count()
        self._calls: collections.deque[tuple[Callback, tuple[Any, ...]]] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._stopped = False
        self.thread: threading.Thread | None = None
        # Held while loop work runs, by the loop thread or a borrower (``_owner``).
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._owner_main = False  # the owner is the main thread (see _interrupts)
        # A borrower registered something the loop thread's current poll does not watch
        # (a reader, a writer, a timer): wake it when the borrower leaves.
        self._dirty = False
        self.add_reader(self._wake_fd, self._on_wake)

    # -- registration ------------------------------------------------------------------
    def add_reader(self, sock_or_fd: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``sock_or_fd`` is readable."""
        self._readers[sock_or_fd] = callback
        self._update(sock_or_fd)
        self._note_change()

    def remove_reader(self, sock_or_fd: Any) -> None:
        if self._readers.pop(sock_or_fd, None) is not None:
            self._update(sock_or_fd)

    def add_writer(self, sock_or_fd: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``sock_or_fd`` is writable (until removed)."""
        self._writers[sock_or_fd] = callback
        self._update(sock_or_fd)
        self._note_change()

    def remove_writer(self, sock_or_fd: Any) -> None:
        if self._writers.pop(sock_or_fd, None) is not None:
            self._update(sock_or_fd)

    def _update(self, sock_or_fd: Any) -> None:
        self._poller.set(sock_or_fd, sock_or_fd in self._readers, sock_or_fd in self._writers)

    def _note_change(self) -> None:
        # A removal needs no wake-up: a poll that still watches the fd returns at worst once
        # for nothing. An addition (or a timer) must be seen by the loop thread's next poll.
        if self._owner is not None and self.thread is not None and not self.in_own_thread():
            self._dirty = True

    def call_later(self, delay: float, callback: Callback, *args: Any) -> TimerHandle:
        handle = TimerHandle(self.clock() + delay, callback, args)
        heapq.heappush(self._timers, (handle.when, next(self._timer_seq), handle))
        self._note_change()
        return handle

    def call_soon(self, callback: Callback, *args: Any) -> None:
        """From the loop's own thread: run ``callback`` on the next iteration."""
        self._calls.append((callback, args))

    def call_soon_threadsafe(self, callback: Callback, *args: Any) -> None:
        """From any thread: run ``callback`` in the loop's thread soon."""
        self._calls.append((callback, args))
        if self._owner == threading.get_ident():
            return  # this thread holds the loop: it runs the calls before it lets go
        # Invariant: when _wake_pending is True, a wake-up is on its way, and the loop will
        # drain the deque after clearing the flag; so an append seen with the flag set is
        # never stranded.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass  # closed during shutdown

    def in_loop_thread(self) -> bool:
        """True in the loop's thread, and in a thread that borrows the loop right now."""
        return self.in_own_thread() or self._owner == threading.get_ident()

    def in_own_thread(self) -> bool:
        """True in the loop's own thread only (not in a borrower)."""
        return self.thread is threading.current_thread()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    # -- borrowing ---------------------------------------------------------------------
    def try_enter(self) -> bool:
        """From a thread other than the loop's: hold the loop if nobody does, and run loop
        work in this thread until ``leave``. False when the loop is busy or stopped, or
        when this is the main thread and a SIGINT could not be held off (_interrupts)."""
        return self._enter(blocking=False)

    def enter(self) -> bool:
        """Like ``try_enter``, but waits for the loop thread to finish what it runs (loop
        work is short: it never blocks)."""
        return self._enter(blocking=True)

    def _enter(self, blocking: bool) -> bool:
        if self._stopped:
            return False
        main = _interrupts.is_main_thread()
        # Before the lock: an interrupt between taking it and noting it would keep it.
        if main and not _interrupts.enter():
            return False
        if not self._lock.acquire(blocking):
            if main:
                _interrupts.leave()
            return False
        self._owner = threading.get_ident()
        self._owner_main = main
        return True

    def leave(self) -> None:
        """Run the calls scheduled meanwhile, let go, and wake the loop thread if what it
        polls for changed."""
        calls = self._calls
        try:
            while calls:
                cb, args = calls.popleft()
                self._run_callback(cb, args)
        finally:
            self._owner = None
            main = self._owner_main
            wake, self._dirty = self._dirty, False
            self._lock.release()
            if wake:
                self._wake()
            if main:
                _interrupts.leave()  # may raise the KeyboardInterrupt held off meanwhile

    def run_inline(self, callback: Callback, *args: Any) -> None:
        """Run ``callback`` now in this thread, as loop work (waiting for the loop thread to
        finish what it runs, rather than handing over and waking it later).

        Calls scheduled before run first, so the order of a thread's calls is kept.
        """
        if self.in_loop_thread():
            self._run_callback(callback, args)
        elif self.enter():
            try:
                calls = self._calls
                while calls:
                    cb, cargs = calls.popleft()
                    self._run_callback(cb, cargs)
                self._run_callback(callback, args)
            finally:
                self.leave()
        else:
            self.call_soon_threadsafe(callback, *args)

    # -- running -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stopped = True
        self._calls.append((_nothing, ()))
        self._wake()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def run(self) -> None:
        self.thread = threading.current_thread()
        while not self._stopped:
            if not self.run_once(self._next_timeout()):
                break

    def run_once(self, timeout: int | None) -> bool:
        """One iteration: poll (``timeout`` in ms, None for ever), then run what is due.

        False when the loop cannot go on (it was stopped while polling failed). Tests drive a loop with this directly.
        """
        try:
            events = self._poller.poll(timeout)
        except Exception:
            if self._stopped:
                return False
            raise
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self._dispatch(events)
            finally:
                self._owner = None
        return True

    def _dispatch(self, events: list[tuple[Any, bool, bool]]) -> None:
        readers = self._readers
        for sock, readable, writable in events:
            if writable:
                cb = self._writers.get(sock)
                if cb is not None:
                    self._run_callback(cb, ())
            if not readable:
                continue
            # POLLIN, or an error or hang-up: the reader's next read reports it (or, for an
            # fd watched for writing only, the writer's next write).
            cb = readers.get(sock)
            if cb is None and not writable:
                cb = self._writers.get(sock)
            if cb is not None:
                self._run_callback(cb, ())
        if self._timers:
            self._run_timers()
        calls = self._calls
        while calls:
            cb, args = calls.popleft()
            self._run_callback(cb, args)

    def close(self) -> None:
        for sock in list(self._writers):
            self.remove_writer(sock)
        for sock in list(self._readers):
            self.remove_reader(sock)
        try:
            os.close(self._wake_fd)
        except OSError:
            pass

    def _next_timeout(self) -> int | None:
        if self._calls:
            return 0
        if not self._timers:
            return None
        delay = self._timers[0][0] - self.clock()
        return max(0, int(delay * 1000) + 1)

    def _run_timers(self) -> None:
        now = self.clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handle = heapq.heappop(timers)
            if not handle.cancelled:
                self._run_callback(handle.callback, handle.args)

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._wake_pending = False

    def _run_callback(self, cb: Callback, args: tuple[Any, ...]) -> None:
        try:
            cb(*args)
        except Exception:
            # A bug in one handler must not take the process's IO down with it.
            log.exception("error in IO loop callback %r", cb)
