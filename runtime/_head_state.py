"""What a head keeps on disk so that a head restarted after a crash can recover it.

Only detached actors are kept (with ``SHOAL_HEAD_STATE_DIR`` set): everything else in the
control store belongs to drivers, and drivers do not survive their head (they get
ClusterGoneError). A detached actor is recorded when it is created (its creation message:
class, arguments, options) and forgotten when it dies; a restarted head creates the
recorded actors again (their constructors run again, as after an actor restart: their
state is not kept).

    <dir>/actors/<actor id>.msgpack     one record per live detached actor (0600)

The directory must be private (0700, ours): a record holds a pickled class that a worker
will unpickle, so whoever can write there can run code in the cluster.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

import msgpack

log = logging.getLogger("shoal.head")


class HeadState:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.actors_dir = os.path.join(self.path, "actors")
        os.makedirs(self.path, mode=0o700, exist_ok=True)  # (the mode is for the leaf only)
        os.makedirs(self.actors_dir, mode=0o700, exist_ok=True)
        for directory in (self.path, self.actors_dir):
            st = os.stat(directory)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
                raise PermissionError(
                    f"the head state directory {directory} must be a directory of this user "
                    "that nobody else can read or write (chmod 700): its records hold code "
                    "that workers run"
                )

    def _file(self, actor_id: bytes) -> str:
        return os.path.join(self.actors_dir, actor_id.hex() + ".msgpack")

    def save_actor(self, record: dict[str, Any]) -> None:
        """Write one actor's record (replacing an older one) atomically."""
        path = self._file(record["aid"])
        tmp = path + ".tmp"
        data = msgpack.packb(record, use_bin_type=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.error("could not save detached actor %s: %s", record["aid"].hex(), exc)

    def forget_actor(self, actor_id: bytes) -> None:
        try:
            os.unlink(self._file(actor_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not forget detached actor %s: %s", actor_id.hex(), exc)

    def load_actors(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(self.actors_dir)):
            path = os.path.join(self.actors_dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # a write that a crash cut short
                continue
            if not name.endswith(".msgpack"):
                continue
            try:
                with open(path, "rb") as f:
                    record = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
                if not isinstance(record, dict) or not isinstance(record.get("aid"), bytes):
                    raise ValueError("not an actor record")
            except (OSError, ValueError, msgpack.UnpackException) as exc:
                log.error("skipped the unreadable actor record %s: %s", path, exc)
                continue
            out.append(record)
        return out
