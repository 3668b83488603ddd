"""A node's cache of environments on disk, outside any session, so it outlives a restart.

    <root> ($SHOAL_RUNTIME_ENV_DIR, default $SHOAL_TMPDIR/runtime_env_cache)/
        pkgs/<hash>/  <hash>.ready  <hash>.lock      unpacked packages (working_dir, py_modules)
        venvs/<key>/  <key>.ready   <key>.lock  <key>.log     pip environments

Invariants:
- An entry is complete when its ``.ready`` file exists; it is written last.
- An entry is made under an exclusive flock on its ``.lock`` (and a thread lock), so it is
  made once even when several threads or node processes on this machine want it at once.
- A process that uses an entry holds a shared flock on it for as long as it lives; eviction
  takes only entries it can lock exclusively without waiting, least recently used first,
  until the cache is under its size bound (``SHOAL_RUNTIME_ENV_CACHE_BYTES``, 10 GiB).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator

from .. import _session
from ._packaging import total_size

log = logging.getLogger("shoal.runtime_env")

KINDS = ("pkgs", "venvs")
_NAME = re.compile(r"^[0-9a-f]{8,64}$")


def default_root() -> str:
    return os.environ.get("SHOAL_RUNTIME_ENV_DIR") or os.path.join(
        _session.base_dir(), "runtime_env_cache"
    )


def max_cache_bytes() -> int:
    text = os.environ.get("SHOAL_RUNTIME_ENV_CACHE_BYTES", "")
    return int(text) if text.strip() else 10 << 30


class Entry:
    def __init__(self, path: str) -> None:
        self.path = path
        self.ready = os.path.exists(path + ".ready")

    def mark_ready(self) -> None:
        with open(self.path + ".ready", "w") as f:
            f.write(f"{time.time()}\n")
        self.ready = True


class Timeout(Exception):
    pass


class EnvCache:
    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._fds: dict[tuple[str, str], int] = {}  # entries in use here (shared flock held)

    @contextlib.contextmanager
    def entry(
        self,
        kind: str,
        name: str,
        deadline: float | None = None,
        abort: Callable[[], bool] | None = None,
    ) -> Iterator[Entry]:
        """Hold entry ``kind/name`` exclusively; afterwards it stays marked in use.
        Raises Timeout when the entry is not free by ``deadline`` (time.monotonic), or
        when ``abort()`` says to stop waiting."""
        if kind not in KINDS or not _NAME.match(name):
            raise ValueError(f"bad cache entry {kind}/{name}")
        directory = os.path.join(self.root, kind)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with self._guard:
            tlock = self._locks.setdefault((kind, name), threading.Lock())
        while not tlock.acquire(timeout=0.1):
            if (deadline is not None and time.monotonic() > deadline) or (abort and abort()):
                raise Timeout(f"{kind}/{name} is busy")
        try:
            fd = self._fds.pop((kind, name), None)
            if fd is None:
                fd = _open_locked(os.path.join(directory, name + ".lock"), deadline, abort=abort)
            else:
                try:
                    _flock(fd, fcntl.LOCK_EX, deadline, abort=abort)
                except BaseException:
                    self._fds[(kind, name)] = fd  # still held shared: in use
                    raise
            try:
                entry = Entry(os.path.join(directory, name))
                yield entry
            finally:
                fcntl.flock(fd, fcntl.LOCK_SH)  # from exclusive to shared: in use
                self._fds[(kind, name)] = fd
                with contextlib.suppress(OSError):
                    os.utime(os.path.join(directory, name + ".lock"))  # last used
        finally:
            tlock.release()

    def evict(self) -> list[str]:
        """Remove unused entries, least recently used first, until under the bound."""
        entries = []
        for kind in KINDS:
            directory = os.path.join(self.root, kind)
            try:
                names = [n[:-5] for n in os.listdir(directory) if n.endswith(".lock")]
            except FileNotFoundError:
                continue
            for name in names:
                base = os.path.join(directory, name)
                try:
                    used = os.stat(base + ".lock").st_mtime
                except OSError:
                    continue
                size = total_size([base]) + _file_size(base + ".log")
                entries.append((used, kind, name, base, size))
        total = sum(e[4] for e in entries)
        removed: list[str] = []
        for _, kind, name, base, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if (kind, name) in self._fds:
                continue  # in use here
            try:
                fd = _open_locked(base + ".lock", None, blocking=False)
            except (Timeout, OSError):
                continue  # in use by another process on this machine
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base + ".ready")
                shutil.rmtree(base, ignore_errors=True)
                for suffix in (".log", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(base + suffix)
            finally:
                os.close(fd)
            total -= size
            removed.append(f"{kind}/{name}")
            log.info("evicted %s/%s (%d bytes) from the runtime env cache", kind, name, size)
        return removed

    def close(self) -> None:
        with self._guard:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _flock(
    fd: int,
    op: int,
    deadline: float | None,
    blocking: bool = True,
    abort: Callable[[], bool] | None = None,
) -> None:
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if (
                not blocking
                or (deadline is not None and time.monotonic() > deadline)
                or (abort is not None and abort())
            ):
                raise Timeout("locked") from None
            time.sleep(0.05)


def _open_locked(
    path: str,
    deadline: float | None,
    blocking: bool = True,
    abort: Callable[[], bool] | None = None,
) -> int:
    """Open and exclusively lock ``path``, making sure the lock is on the file that is at
    ``path`` now (an eviction may unlink a lock file that another process opened)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock(fd, fcntl.LOCK_EX, deadline, blocking, abort)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
