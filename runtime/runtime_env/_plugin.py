"""The one interface every runtime_env field implements, and what a worker start is made of.

    driver:  validate(value) --> resolve(value, uploader) --> the wire value (JSON)
    node:    create(wire value, ctx) in a background thread --> state
             apply(wire value, state, launch)  --> how workers of the environment start

A plugin never sees the scheduler: the node manager builds an environment once per key
(the hash of all wire values) and pools workers per key. See docs/runtime_env.md.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class WorkerLaunch:
    """How a worker of one environment starts. Plugins fill it in ``apply``.

    A worker is forked from the node's pre-imported template (milliseconds) unless the
    environment needs its own interpreter (``python``) or variables read at interpreter
    start-up (``fresh``); then it runs ``python -m shoal._worker`` (a fraction of a second).
    """

    env: dict[str, str] = field(default_factory=dict)  # variables set in the worker
    cwd: str | None = None  # its working directory
    path: list[str] = field(default_factory=list)  # put first on sys.path (and PYTHONPATH)
    python: str | None = None  # its interpreter; None: the node's own
    fresh: bool = False  # needs a fresh interpreter even without ``python``

    def needs_exec(self) -> bool:
        return self.fresh or self.python is not None


class Uploader(Protocol):
    """The driver side of a package: made from local files, uploaded once to the cluster,
    named by its URI. ``excludes`` are the env's patterns for directories."""

    excludes: list[str]

    def upload_dir(self, path: str, keep_name: bool) -> str: ...

    def upload_file_module(self, path: str) -> str: ...

    def upload_zip(self, path: str) -> str: ...


class CacheEntry(Protocol):
    path: str
    ready: bool

    def mark_ready(self) -> None: ...


class SetupContext(Protocol):
    """What a plugin's ``create`` may use on the node (in a background thread)."""

    key: str  # the environment's key
    node_python: str  # the node's interpreter

    def remaining(self) -> float:
        """Seconds left before setup_timeout_seconds; create must give up by then."""
        ...

    def package(self, uri: str) -> str:
        """The local directory of a package (fetched from the cluster and unpacked once
        per node, shared by every environment that names it)."""
        ...

    def entry(self, kind: str, name: str) -> AbstractContextManager[CacheEntry]:
        """An entry of the node's cache (``<cache>/<kind>/<name>``), held exclusively
        (threads and processes) inside the ``with``, then kept as in use."""
        ...

    def run(self, argv: list[str], log_path: str, env: dict[str, str] | None = None) -> int:
        """Run a command, its output appended to ``log_path``; its exit code. Killed when
        the time is up (the setup then fails)."""
        ...

    def log_tail(self, log_path: str, since: int) -> str:
        """The end of what was written to ``log_path`` after offset ``since``."""
        ...


class RuntimeEnvPlugin:
    """One field of a runtime_env (``env_vars``, ``working_dir``, ``pip`` ...)."""

    name = ""  # the runtime_env field
    order = 50  # create and apply in this order, lowest first

    def validate(self, value: Any) -> Any:
        """Driver, at the decorator or ``init``: check the user's value and return it
        normalized (JSON-able; may still name local paths). Raise TypeError or ValueError
        naming the problem."""
        return value

    def check(self, value: Any) -> None:
        """Node: a light check of a wire value as it arrives (its shape and types; no IO),
        so that a malformed message is refused with a reason. Raise ValueError."""

    def resolve(self, value: Any, uploader: Uploader) -> Any:
        """Driver, before first use: the value as it travels (local things uploaded and
        replaced by URIs). Workers report it, and it makes the environment's key."""
        return value

    def key(self, value: Any) -> str:
        """A cache key for what ``create`` makes from ``value``, for resources that several
        environments may share (one virtual environment per requirement set)."""
        return value_key(value)

    def create(self, value: Any, ctx: SetupContext) -> Any:
        """Node, in a background thread, once per environment key: make what the workers
        need (fetch, unpack, build). Returns a state for ``apply``. Raise
        RuntimeEnvSetupError with a message for the user when it cannot be done."""
        return None

    def apply(self, value: Any, state: Any, launch: WorkerLaunch) -> None:
        """Node: how a worker of the environment starts (variables, directory, path,
        interpreter)."""

    def describe(self, value: Any) -> str:
        """A few words for `shoal status`."""
        return self.name


def require(ok: bool, what: str) -> None:
    """For ``check``: ValueError(what) unless ``ok``."""
    if not ok:
        raise ValueError(what)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def value_key(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
