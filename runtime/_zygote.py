"""Worker processes forked from a pre-imported template (a zygote), in milliseconds.

    head (a child subreaper) --fork at start-up--> zygote: imports shoal._worker, then
        waits on a pipe; it has no threads and no zmq context, so forking it is safe
    head --"<worker id> [setup]\\n"--> zygote --fork--> helper --fork--> worker
        the helper reports "<worker id> <pid>" and exits at once, so the worker is
        re-parented to the head (PR_SET_CHILD_SUBREAPER): the head reaps it and reads its
        exit status like any child's, and the worker's parent-death signal follows the head

Starting a worker this way skips the interpreter start and the imports (about 150 ms on
this class of machine, against a few ms), which is most of `shoal.init()`'s cold start and
of the delay before a new actor or a blocked task's extra worker can run. (Python's
`random` reseeds itself in a forked child, so workers do not share a random sequence.)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, arg, 0, 0, 0)


def become_subreaper() -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


class Zygote:
    """The head's side: ask for workers, read back their pids."""

    def __init__(self, logs_dir: str) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        head_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the zygote
            try:
                os.close(req_w)
                os.close(resp_r)
                _zygote_main(req_r, resp_w, head_pid, logs_dir)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(resp_w)
        self.pid = pid
        self.requests = req_w
        self.replies = resp_r
        self._buffer = b""

    def spawn(self, worker_hex: str, setup: dict[str, Any] | None = None) -> None:
        """Ask for a worker; ``setup`` (a runtime env's variables, working directory and
        import path) is applied in the worker before it starts."""
        line = worker_hex if setup is None else f"{worker_hex} {json.dumps(setup)}"
        os.write(self.requests, f"{line}\n".encode())

    def read_replies(self) -> list[tuple[str, int]] | None:
        """Started workers as (worker id hex, pid); None once the zygote is gone."""
        data = os.read(self.replies, 65536)
        if not data:
            return None
        self._buffer += data
        out = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            worker_hex, pid = line.decode().split()
            out.append((worker_hex, int(pid)))
        return out

    def close(self) -> None:
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _zygote_main(requests: int, replies: int, head_pid: int, logs_dir: str) -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != head_pid:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    import shoal._worker  # noqa: F401  (the point of the zygote: imported once, shared by all)

    if os.environ.get("SHOAL_NODE_IP"):
        # This node's workers take tcp connections (from other nodes), which are sealed:
        # import ``cryptography`` once here rather than in each worker's first call (~8 ms).
        from shoal._sealing import preload

        preload()

    buffer = b""
    while True:
        data = os.read(requests, 4096)
        if not data:
            return  # the head is gone
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            worker_hex, _, setup = line.decode().partition(" ")
            helper = os.fork()
            if helper == 0:
                worker = os.fork()
                if worker == 0:
                    os.close(requests)
                    os.close(replies)
                    _become_worker(worker_hex, head_pid, logs_dir, setup)
                os.write(replies, f"{worker_hex} {worker}\n".encode())
                os._exit(0)
            os.waitpid(helper, 0)


def _become_worker(worker_hex: str, head_pid: int, logs_dir: str, setup: str) -> None:
    code = 1
    try:
        # The helper exits right after forking us; wait to be the head's child before
        # tying our life to our parent's.
        deadline = time.monotonic() + 5
        while os.getppid() != head_pid:
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.0002)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != head_pid:
            os._exit(1)
        os.setpgid(0, 0)
        log_fd = os.open(
            os.path.join(logs_dir, f"worker-{worker_hex}.log"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o600,
        )
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, 1 << 16)
        os.environ["SHOAL_WORKER_ID"] = worker_hex
        if setup:
            _apply_setup(json.loads(setup))
        from shoal._worker import main

        main()
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _apply_setup(setup: dict[str, Any]) -> None:
    """A runtime env, in a forked worker: what a fresh process would get at its start."""
    os.environ.update(setup.get("env") or {})
    if setup.get("cwd"):
        os.chdir(setup["cwd"])
    sys.path[0:0] = list(setup.get("path") or [])
