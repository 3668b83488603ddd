"""The head's worker processes: starting them (zygote or fresh interpreter), watching them
through pidfds, reaping them, and killing them.

    WorkerProcesses.start(wid) --> zygote fork (pid reported later) or Popen
    pidfd readable             --> reap, then on_exit(wid, "exit code 1" / "killed by signal SIGKILL (9)")

Only IO here; what a death means (leases, actors, objects) is the head's business.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _config
from ._ioloop import IOLoop
from ._zygote import Zygote

log = logging.getLogger("shoal.head")


class WorkerProc:
    """A worker process that is our child, however it was started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL  # reaped elsewhere; it is gone
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class WorkerProcesses:
    def __init__(
        self,
        loop: IOLoop,
        logs_dir: str,
        zygote: Zygote | None,
        on_exit: Callable[[bytes, str], None],
    ) -> None:
        self.loop = loop
        self.logs_dir = logs_dir
        self.zygote = zygote
        self.on_exit = on_exit
        self.procs: dict[bytes, WorkerProc] = {}
        self.fds: dict[bytes, int] = {}
        self.spawning: set[bytes] = set()  # asked of the zygote, pid not known yet
        self.env = dict(os.environ)
        # Children that are not workers (runtime env builds run pip): reap_strays leaves
        # them to their own wait. Taken by whoever starts one, until it is registered.
        self.child_lock = threading.Lock()
        self.other_children: set[int] = set()
        self.launches: dict[bytes, Any] = {}  # for workers asked of the zygote
        if zygote is not None:
            loop.add_reader(zygote.replies, self._zygote_replies)

    def known(self, wid: bytes) -> bool:
        return wid in self.procs or wid in self.spawning

    def start(self, wid: bytes, launch: Any = None) -> None:
        """Start worker ``wid``; ``launch`` (a runtime_env WorkerLaunch) says how, for a
        worker of a runtime env: forked from the zygote and set up there, unless it needs
        an interpreter of its own."""
        needs_exec = launch is not None and launch.needs_exec()
        if self.zygote is not None and not needs_exec:
            setup = None
            if launch is not None:
                setup = {"env": launch.env, "cwd": launch.cwd, "path": launch.path}
            try:
                self.zygote.spawn(wid.hex(), setup)
                self.spawning.add(wid)
                if launch is not None:
                    self.launches[wid] = launch  # to start it again if the zygote goes
                return
            except OSError:
                self._zygote_gone()
        env = dict(self.env)
        if launch is not None:
            env.update(launch.env)
        env["SHOAL_WORKER_ID"] = wid.hex()
        python = launch.python if launch is not None and launch.python else sys.executable
        with open(os.path.join(self.logs_dir, f"worker-{wid.hex()}.log"), "ab") as logf:
            proc = subprocess.Popen(
                [python, "-m", "shoal._worker"],
                env=env,
                cwd=launch.cwd if launch is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self._watch(wid, proc.pid)

    def kill(self, wid: bytes) -> None:
        proc = self.procs.get(wid)
        if proc is not None:
            proc.signal(signal.SIGKILL)

    def reap_strays(self) -> None:
        """As a subreaper the head inherits orphans (a task's own subprocesses); reap them."""
        known = {p.pid for p in self.procs.values()}
        if self.zygote is not None:
            known.add(self.zygote.pid)
        with self.child_lock:
            known |= self.other_children
            while True:
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return
                if info is None or info.si_pid in known:
                    return
                try:
                    os.waitpid(info.si_pid, 0)
                except ChildProcessError:
                    return

    def stop_all(self) -> None:
        """SIGTERM every worker, wait a little, SIGKILL the rest; stop the zygote."""
        if self.zygote is not None:
            self.loop.remove_reader(self.zygote.replies)
            self.zygote.close()
            self.zygote = None
        for proc in self.procs.values():
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + _config.KILL_GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.signal(signal.SIGKILL)
                proc.wait()

    def _watch(self, wid: bytes, pid: int) -> None:
        self.procs[wid] = WorkerProc(pid)
        fd = os.pidfd_open(pid)
        self.fds[wid] = fd
        self.loop.add_reader(fd, lambda: self._exited(wid))

    def _exited(self, wid: bytes) -> None:
        proc = self.procs.pop(wid)
        fd = self.fds.pop(wid)
        self.loop.remove_reader(fd)
        os.close(fd)
        code = proc.wait()
        self.on_exit(wid, exit_reason(code))

    def _zygote_replies(self) -> None:
        assert self.zygote is not None
        replies = self.zygote.read_replies()
        if replies is None:
            self._zygote_gone()
            return
        for worker_hex, pid in replies:
            wid = bytes.fromhex(worker_hex)
            self.spawning.discard(wid)
            self.launches.pop(wid, None)
            try:
                self._watch(wid, pid)
            except OSError:  # gone already
                self.on_exit(wid, "exited at start")

    def _zygote_gone(self) -> None:
        """Fall back to starting workers with a fresh interpreter each."""
        if self.zygote is None:
            return
        log.warning("the worker zygote exited; starting workers the slow way from now on")
        self.loop.remove_reader(self.zygote.replies)
        self.zygote.close()
        self.zygote = None
        pending, self.spawning = self.spawning, set()
        for wid in pending:
            self.start(wid, self.launches.pop(wid, None))


def exit_reason(code: int) -> str:
    """How a process ended, from its exit code as ``waitstatus_to_exitcode`` gives it."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal"
        return f"killed by signal {name} ({-code})"
    return f"exit code {code}"


_PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec a child may not take locks that
# another thread of the head (a runtime env build) may have held at the fork (dlopen's).
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In a child before exec: get SIGKILL when the head dies, however it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)
