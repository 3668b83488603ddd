"""A node's runtime environments: built once per key, in background threads.

    node manager                                EnvManager
    lease for env X --key_of(wire)-------------> X known (not built yet)
    scheduler PrepareEnv(X) --prepare(X)-------> thread: for each field, plugin.create
                                                    packages: PACKAGE_FETCH up to the head,
                                                    PACKAGE_DATA back (on_package)
    <--on_ready(X) / on_failed(X, text)--------- then plugin.apply -> WorkerLaunch
    StartWorker(env=X) --launch(X)-------------> how the worker starts

States of an environment: new -> building -> ready, or -> failed. A failed environment is
reported at once to whoever asks again within FAILED_RETRY_SECONDS, then tried afresh
(a user may have fixed what was wrong), so a failure never turns into a retry loop.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .._protocol import Message, MsgType
from ..exceptions import RuntimeEnvSetupError
from ._cache import EnvCache, default_root, max_cache_bytes
from ._plugin import WorkerLaunch
from ._registry import ordered
from ._setup import Setup, log_tail
from ._spec import check_wire, describe, setup_timeout
from ._state import ENV_VAR, env_key

log = logging.getLogger("shoal.runtime_env")

M = MsgType

FAILED_RETRY_SECONDS = 10.0
# Workers of a ready env that may exit before registering, in a row, before it fails.
START_FAILURES = 3
BUILD_THREADS = 2


class _Env:
    __slots__ = (
        "attempts",
        "error",
        "key",
        "launch",
        "setup",
        "since",
        "start_failures",
        "state",
        "wire",
    )

    def __init__(self, key: str, wire: dict[str, Any]) -> None:
        self.key = key
        self.wire = wire
        self.state = "new"  # new | building | ready | failed
        self.since = time.monotonic()
        self.error = ""
        self.launch: WorkerLaunch | None = None
        self.setup: Setup | None = None
        self.attempts = 0
        self.start_failures = 0  # workers that exited before registering, in a row


class ChildGuard:
    """Where processes that the node starts besides its workers (pip) are registered, so
    that the node's reaping of orphans leaves them to their own ``wait``. The node's
    WorkerProcesses is one; this one is for using an EnvManager on its own."""

    def __init__(self) -> None:
        self.child_lock = threading.Lock()
        self.other_children: set[int] = set()


class EnvManager:
    def __init__(
        self,
        loop: Any,
        node_hex: str,
        send_up: Callable[[Message], None],
        children: Any,  # .child_lock, .other_children: see ChildGuard
        on_ready: Callable[[str], None],
        on_failed: Callable[[str, str], None],
        on_change: Callable[[], None],
        root: str | None = None,
    ) -> None:
        self.loop = loop
        self.node_hex = node_hex
        self.send_up = send_up
        self.children = children
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.on_change = on_change
        self.cache = EnvCache(root or default_root(), max_cache_bytes())
        self.envs: dict[str, _Env] = {}
        self.fetches: dict[str, list[concurrent.futures.Future[bytes]]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.closed = False

    # -- the node manager's side (loop thread) -----------------------------------------
    def key_of(self, wire: Any) -> str:
        """The key of an env as a lease request carries it (ValueError when malformed)."""
        key = env_key(check_wire(wire))
        if key and key not in self.envs:
            self.envs[key] = _Env(key, wire)
        return key

    def failure(self, key: str) -> str | None:
        """The error of a recent failed setup of ``key``, to give at once."""
        env = self.envs.get(key)
        if env is None or env.state != "failed":
            return None
        if time.monotonic() - env.since < FAILED_RETRY_SECONDS:
            return env.error
        env.state = "new"
        return None

    def prepare(self, key: str) -> None:
        """Start building ``key`` unless it is built or being built."""
        env = self.envs.get(key)
        if env is None or env.state in ("building", "ready") or self.closed:
            return
        env.state, env.since, env.error = "building", time.monotonic(), ""
        env.attempts += 1
        env.start_failures = 0
        timeout = setup_timeout(env.wire)
        deadline = None if timeout is None else time.monotonic() + timeout
        setup = env.setup = Setup(key, deadline, self.cache, self.fetch, self.children)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                BUILD_THREADS, thread_name_prefix="shoal-env"
            )
        future = self._pool.submit(self._build, env.wire, setup)
        future.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(self._built, env, setup, f)
        )
        if timeout is not None:
            self.loop.call_later(timeout + 0.5, self._timed_out, env, setup, timeout)
        self.on_change()

    def worker_failed(self, key: str, reason: str, log_path: str) -> None:
        """A worker of ``key`` exited before it registered. After a few in a row the env
        counts as failed (with the last worker's log), instead of workers being started
        again and again."""
        env = self.envs.get(key)
        if env is None or env.state != "ready":
            return
        env.start_failures += 1
        if env.start_failures < START_FAILURES:
            return
        tail = log_tail(log_path, 0)
        self._fail(
            env,
            f"its workers exit as they start ({reason}); the end of the last one's log "
            f"({log_path}):\n{tail}",
        )

    def worker_started(self, key: str) -> None:
        env = self.envs.get(key)
        if env is not None:
            env.start_failures = 0

    def launch(self, key: str) -> WorkerLaunch | None:
        env = self.envs.get(key)
        return env.launch if env is not None else None

    def spec(self, key: str) -> dict[str, Any] | None:
        env = self.envs.get(key)
        return env.wire if env is not None else None

    def status(self, workers: dict[str, int]) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "key": env.key,
                "what": describe(env.wire),
                "state": env.state,
                "for": round(now - env.since, 1),
                "workers": workers.get(env.key, 0),
                "error": env.error.splitlines()[0][:300] if env.error else "",
            }
            for env in self.envs.values()
            if env.state != "new" or env.attempts
        ]

    def on_package(self, body: Any, frames: Any) -> None:
        """PACKAGE_DATA from the head: the bytes of a package, or why there are none."""
        waiters = self.fetches.pop(str(body["uri"]), [])
        for fut in waiters:
            if fut.done():
                continue
            if body.get("e") or len(frames) != 1:
                fut.set_exception(RuntimeEnvSetupError(str(body.get("e") or "no data")))
            else:
                fut.set_result(bytes(frames[0]))

    def close(self) -> None:
        self.closed = True
        for env in self.envs.values():
            if env.setup is not None:
                env.setup.cancel()
        for waiters in self.fetches.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(RuntimeEnvSetupError("the node is shutting down"))
        self.fetches.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()

    def _built(self, env: _Env, setup: Setup, future: concurrent.futures.Future[Any]) -> None:
        if env.setup is not setup:
            return  # timed out (and reported) meanwhile
        env.setup = None
        try:
            env.launch = future.result()
        except BaseException as exc:
            if isinstance(exc, RuntimeEnvSetupError):
                text = str(exc)
            else:
                log.error("setting up runtime env %s failed:\n%s", env.key, traceback.format_exc())
                text = f"{type(exc).__name__}: {exc}"
            self._fail(env, text)
            return
        env.state, env.since = "ready", time.monotonic()
        log.info("runtime env %s (%s) is ready", env.key, describe(env.wire))
        self.on_ready(env.key)
        self.on_change()

    def _timed_out(self, env: _Env, setup: Setup, timeout: float) -> None:
        if env.setup is not setup:
            return
        env.setup = None
        setup.cancel()
        self._fail(env, f"its setup took longer than setup_timeout_seconds={timeout:g}")

    def _fail(self, env: _Env, text: str) -> None:
        env.state, env.since = "failed", time.monotonic()
        env.error = (
            f"the runtime environment ({describe(env.wire)}) could not be set up on node "
            f"{self.node_hex[:12]}: {text}"
        )
        log.warning("%s", env.error)
        self.on_failed(env.key, env.error)
        self.on_change()

    # -- packages ----------------------------------------------------------------------
    def fetch(self, uri: str, timeout: float | None) -> bytes:
        """(A build thread.) The bytes of a package, from the head."""
        fut: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self._request_package, uri, fut)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self.loop.call_soon_threadsafe(self._forget_fetch, uri, fut)
            raise RuntimeEnvSetupError(f"the package {uri} did not arrive in time") from None

    def _request_package(self, uri: str, fut: concurrent.futures.Future[bytes]) -> None:
        if self.closed:
            fut.set_exception(RuntimeEnvSetupError("the node is shutting down"))
            return
        waiters = self.fetches.setdefault(uri, [])
        waiters.append(fut)
        if len(waiters) == 1:
            self.send_up(Message(M.PACKAGE_FETCH, {"uri": uri}))

    def _forget_fetch(self, uri: str, fut: concurrent.futures.Future[bytes]) -> None:
        waiters = self.fetches.get(uri, [])
        if fut in waiters:
            waiters.remove(fut)
        if not waiters:
            self.fetches.pop(uri, None)

    # -- building (a build thread) -----------------------------------------------------
    def _build(self, wire: dict[str, Any], setup: Setup) -> WorkerLaunch:
        plugins = ordered(wire)
        states = {}
        for name, plugin in plugins:
            setup.check()
            states[name] = plugin.create(wire[name], setup)
        launch = WorkerLaunch(env={ENV_VAR: json.dumps(wire, sort_keys=True)})
        for name, plugin in plugins:
            plugin.apply(wire[name], states[name], launch)
        if launch.path and "PYTHONPATH" not in wire.get("env_vars", {}):
            inherited = os.environ.get("PYTHONPATH", "")
            launch.env["PYTHONPATH"] = os.pathsep.join([*launch.path, *filter(None, [inherited])])
        setup.check()
        try:
            self.cache.evict()
        except OSError as exc:
            log.warning("could not evict from the runtime env cache: %s", exc)
        return launch
