"""The session directory: where a cluster on this machine keeps its key, sockets and logs.

    $SHOAL_TMPDIR (default /tmp/shoal-sessions)/
        session_latest -> session_<time>_<pid>_<tag>     the newest cluster, for address="auto"
        session_<time>_<pid>_<tag>/      0700
            cluster.key                  0600, 32 random bytes, the HMAC key
            head.json                    address, pid, shm tag of the running head
            h.sock, w-<worker>.sock      ipc sockets
            logs/                        one file per process

Shared-memory segments are named ``/dev/shm/shoal-<tag>-<object id>``, so the segments of a
cluster that was killed can be found and removed by the next start.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

KEY_FILE = "cluster.key"
HEAD_FILE = "head.json"
LATEST = "session_latest"
SHM_DIR = "/dev/shm"
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def base_dir() -> str:
    # Not "/tmp/shoal": a directory named like the package would shadow it for scripts run
    # from /tmp (an editable install resolves after the script's directory).
    return os.environ.get("SHOAL_TMPDIR") or "/tmp/shoal-sessions"


@dataclass
class Session:
    path: str
    tag: str

    @property
    def key_path(self) -> str:
        return os.path.join(self.path, KEY_FILE)

    @property
    def logs(self) -> str:
        return os.path.join(self.path, "logs")

    def socket_address(self, name: str) -> str:
        return f"ipc://{os.path.join(self.path, name)}.sock"

    def read_key(self) -> bytes:
        return read_key_file(self.key_path)

    def write_head_info(self, info: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, HEAD_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(self.path, HEAD_FILE))

    def head_info(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.path, HEAD_FILE)) as f:
                info: dict[str, Any] = json.load(f)
                return info
        except (OSError, ValueError):
            return None


def create_session(key: bytes | None = None) -> Session:
    """A new session directory; ``key`` is the cluster's (a node joining a head), or fresh."""
    base = base_dir()
    tag = secrets.token_hex(4)
    name = f"session_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}_{tag}"
    path = os.path.join(base, name)
    # ipc sockets live in the session directory, and a Unix socket path has at most 107
    # bytes: a worker's is the longest. Fail here, clearly, rather than in every worker.
    longest = len(os.fsencode(os.path.join(path, "w-" + "0" * 16 + ".sock")))
    if longest > MAX_SOCKET_PATH:
        raise ValueError(
            f"the session directory {base!r} (SHOAL_TMPDIR or --temp-dir) is too long: socket "
            f"paths in it would have {longest} bytes, and the limit is {MAX_SOCKET_PATH}; "
            f"use a directory of at most {len(base) - (longest - MAX_SOCKET_PATH)} characters"
        )
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.mkdir(path, 0o700)
    os.mkdir(os.path.join(path, "logs"), 0o700)
    write_key_file(os.path.join(path, KEY_FILE), key or secrets.token_bytes(32))
    latest = os.path.join(base, LATEST)
    tmp_link = latest + f".{tag}"
    os.symlink(name, tmp_link)
    os.replace(tmp_link, latest)
    return Session(path, tag)


def open_session(path: str) -> Session:
    info_path = os.path.join(path, HEAD_FILE)
    tag = ""
    try:
        with open(info_path) as f:
            tag = json.load(f).get("tag", "")
    except (OSError, ValueError):
        pass
    return Session(path, tag)


def write_key_file(path: str, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.hex().encode())


def read_key_file(path: str) -> bytes:
    with open(path, "rb") as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        raise ValueError(f"the key file {path} does not hold a hex key") from None
    if len(key) < 16:
        raise ValueError(f"the key in {path} is shorter than 16 bytes")
    return key


def cluster_key(key_file: str | None) -> bytes | None:
    """The cluster key a node or client brings: from ``key_file``, else from the
    SHOAL_CLUSTER_KEY variable (the key's hex text), else None."""
    if key_file is not None:
        return read_key_file(os.path.abspath(os.path.expanduser(key_file)))
    text = os.environ.get("SHOAL_CLUSTER_KEY", "").strip()
    if not text:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("SHOAL_CLUSTER_KEY does not hold a hex key") from None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the command name, which is in parentheses and may hold spaces.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def find_running_session() -> Session | None:
    """The newest session on this machine whose head is alive, for ``address="auto"``."""
    latest = os.path.join(base_dir(), LATEST)
    candidates = []
    if os.path.islink(latest):
        candidates.append(os.path.realpath(latest))
    candidates.extend(sorted(list_session_dirs(), reverse=True))
    for path in candidates:
        session = open_session(path)
        info = session.head_info()
        if info and pid_alive(int(info.get("pid", 0))):
            return session
    return None


def list_session_dirs() -> list[str]:
    base = base_dir()
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    return [os.path.join(base, n) for n in names if n.startswith("session_2")]


def remove_segments(tag: str) -> int:
    """Remove the shared-memory segments of the session with ``tag``; returns how many."""
    if not tag:
        return 0
    prefix = f"shoal-{tag}-"
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


# The directory of a cluster that died without cleaning up (its logs tell why) is kept
# this long for a post-mortem, then removed by the next start.
KEEP_DEAD_SESSION_SECONDS = 24 * 3600


def clean_dead_sessions() -> None:
    """Remove what killed clusters left: their segments at once, their directories later."""
    import shutil

    for path in list_session_dirs():
        session = open_session(path)
        info = session.head_info()
        try:
            age = time.time() - os.stat(path).st_mtime
        except OSError:
            continue
        if info is None:
            # A session that never became ready: a start may be in progress right now.
            if age > 60:
                shutil.rmtree(path, ignore_errors=True)
            continue
        if pid_alive(int(info.get("pid", 0))):
            continue
        remove_segments(session.tag)
        if age > KEEP_DEAD_SESSION_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
