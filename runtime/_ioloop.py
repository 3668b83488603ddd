"""A small single-threaded event loop over zmq sockets, file descriptors and timers.

Readers are called when a socket or fd is readable (or has an error or hang-up, so that the
reader sees it in its next read); writers, registered only while a socket has queued output,
when it is writable again.

Every process role runs its IO in one of these: the head's loop is its main thread, a
driver's or worker's loop is a background thread. Other threads hand it work only through
``call_soon_threadsafe`` (a deque plus an eventfd), so sockets are only ever touched by the
loop's own thread, as zmq requires.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

Callback = Callable[..., Any]


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
        self._poller = zmq.Poller()
        self._readers: dict[Any, Callback] = {}
        self._writers: dict[Any, Callback] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_seq = itertools.count()
        self._calls: collections.deque[tuple[Callback, tuple[Any, ...]]] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._stopped = False
        self.thread: threading.Thread | None = None
        self.add_reader(self._wake_fd, self._on_wake)

    # -- registration ------------------------------------------------------------------
    def add_reader(self, sock_or_fd: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``sock_or_fd`` is readable."""
        self._readers[sock_or_fd] = callback
        self._update(sock_or_fd)

    def remove_reader(self, sock_or_fd: Any) -> None:
        if self._readers.pop(sock_or_fd, None) is not None:
            self._update(sock_or_fd)

    def add_writer(self, sock_or_fd: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``sock_or_fd`` is writable (until removed)."""
        self._writers[sock_or_fd] = callback
        self._update(sock_or_fd)

    def remove_writer(self, sock_or_fd: Any) -> None:
        if self._writers.pop(sock_or_fd, None) is not None:
            self._update(sock_or_fd)

    def _update(self, sock_or_fd: Any) -> None:
        # zmq.Poller.register with new flags replaces the old ones; flags 0 unregisters.
        flags = (_POLLIN if sock_or_fd in self._readers else 0) | (
            _POLLOUT if sock_or_fd in self._writers else 0
        )
        self._poller.register(sock_or_fd, flags)

    def call_later(self, delay: float, callback: Callback, *args: Any) -> TimerHandle:
        handle = TimerHandle(self.clock() + delay, callback, args)
        heapq.heappush(self._timers, (handle.when, next(self._timer_seq), handle))
        return handle

    def call_soon(self, callback: Callback, *args: Any) -> None:
        """From the loop's own thread: run ``callback`` on the next iteration."""
        self._calls.append((callback, args))

    def call_soon_threadsafe(self, callback: Callback, *args: Any) -> None:
        """From any thread: run ``callback`` in the loop's thread soon."""
        self._calls.append((callback, args))
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
        return self.thread is threading.current_thread()

    # -- running -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stopped = True
        self.call_soon_threadsafe(lambda: None)

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

        False when the loop cannot go on (its zmq context was terminated, or it was stopped
        while polling failed). Tests drive a loop with this directly.
        """
        try:
            events = self._poller.poll(timeout)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM or self._stopped:
                return False
            raise
        readers = self._readers
        for sock, ev in events:
            if ev & _POLLOUT:
                cb = self._writers.get(sock)
                if cb is not None:
                    self._run_callback(cb, ())
                if ev == _POLLOUT:
                    continue
            # POLLIN, or POLLERR (hang-up, error): the reader's next read reports it (or,
            # for an fd watched for writing only, the writer's next write).
            cb = readers.get(sock)
            if cb is None and not ev & _POLLOUT:
                cb = self._writers.get(sock)
            if cb is not None:
                self._run_callback(cb, ())
        if self._timers:
            self._run_timers()
        calls = self._calls
        while calls:
            cb, args = calls.popleft()
            self._run_callback(cb, args)
        return True

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
