"""The head's store of runtime_env packages, for the life of the cluster.

    driver --PACKAGE_UPLOAD {uri, probe}--> control store: have it?  (REPLY {have})
    driver --PACKAGE_UPLOAD {uri} [zip]---> stored as <session>/packages/<hash>.zip
    node   --PACKAGE_FETCH {uri}----------> PACKAGE_DATA {uri} [zip] (or {e})

Files are kept in the session directory: a package lives as long as the cluster whose
drivers uploaded it. The store does not check the content against the URI: the node that
unpacks a package does (a node never trusts what it is sent), off the head's loop.
"""

from __future__ import annotations

import os

from ._packaging import URI_RE


class PackageStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, uri: str) -> str:
        m = URI_RE.match(uri)
        if m is None or m.group(2):
            raise ValueError(f"not a package URI: {uri!r}")
        return os.path.join(self.directory, m.group(1) + ".zip")

    def has(self, uri: str) -> bool:
        return os.path.exists(self._path(uri))

    def put(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, uri: str) -> bytes | None:
        try:
            with open(self._path(uri), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
