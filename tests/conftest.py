"""Fixtures shared by Shoal's tests.

- A session-wide leak check: when the session ends, no Shoal process and no
  ``/dev/shm/shoal-*`` segment may be left (``shoal.testing.assert_no_leaks``). A leak is an
  error of the last test and the session exits non-zero.
- ``cluster``: one local cluster per test module, ``shoal.init(num_cpus=2)`` unless the
  module sets ``CLUSTER_KWARGS``. Modules that use it must not also use ``make_cluster``:
  a process holds one cluster at a time.
- ``make_cluster(**init_kwargs)`` and ``fresh_cluster`` (init kwargs from
  ``@pytest.mark.parametrize("fresh_cluster", [{...}], indirect=True)``): a cluster of the
  test's own, shut down and leak-checked at teardown.
- ``start_driver`` / ``run_driver``: driver scripts in subprocesses, killed at teardown.
- ``shoal_cli``: runs the ``shoal`` command line.
- ``make_wheel(directory, name, version, source)``: a pure-Python wheel written directly, for
  runtime_env pip tests that must not touch the network.
- ``gate``, ``wait_path`` and ``rendezvous``: cross-process synchronisation through files, so
  that tests release tasks instead of sleeping. A gate still closed at teardown is opened,
  so a failed test never leaves a task holding a CPU.

Functions that tasks call are built inside factories: cloudpickle then ships them by value,
so workers never need to import this file or a test module.

Every process this session starts inherits ``SHOAL_TEST_SESSION``; after a leak, only
processes carrying it (or descending from this process) are killed, never another
session's. The session also gets a private session directory (``SHOAL_TMPDIR``, where the
runtime keeps cluster sockets and keys): `shoal stop` and ``address="auto"`` then see only
this session's clusters, and another person's `shoal stop` cannot stop ours.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import shoal
from shoal import testing

SESSION_VAR = "SHOAL_TEST_SESSION"
os.environ.setdefault(SESSION_VAR, uuid.uuid4().hex)

# How long after a shutdown processes and segments may take to disappear.
LEAK_TIMEOUT = 15.0


# --------------------------------------------------------------------------- leak checks


def _started_by_this_session(proc: psutil.Process) -> bool:
    try:
        if proc.environ().get(SESSION_VAR) == os.environ[SESSION_VAR]:
            return True
    except psutil.Error:
        pass
    try:
        return any(parent.pid == os.getpid() for parent in proc.parents())
    except psutil.Error:
        return False


def _describe(procs: list[psutil.Process]) -> list[tuple[int, str]]:
    described = []
    for proc in procs:
        try:
            described.append((proc.pid, " ".join(proc.cmdline())))
        except psutil.Error:
            described.append((proc.pid, "<gone>"))
    return described


class LeakGuard:
    """Checks that Shoal processes and segments are gone.

    While no other Shoal session runs on the machine (the usual case, and CI), the check is
    exactly ``shoal.testing.assert_no_leaks``. While another one runs (someone working on
    the machine), only what this session started is blamed: processes that carry
    ``SHOAL_TEST_SESSION`` or descend from this process, and segments that are new and do
    not carry the tag of a live foreign head (names are ``shoal-<tag>-...``).

    Invariant: processes and segments of other sessions are never blamed nor touched.
    """

    def __init__(self) -> None:
        self.initial_segments = set(testing.shm_segments())
        # Segments already reported as leaked: blamed once, not again by every later check.
        self.reported_segments: set[str] = set()
        self.failures: list[str] = []

    @staticmethod
    def _foreign_processes() -> list[psutil.Process]:
        return [
            p for p in testing.shoal_processes(all_sessions=True) if not _started_by_this_session(p)
        ]

    @staticmethod
    def _our_processes() -> list[psutil.Process]:
        return [
            p for p in testing.shoal_processes(all_sessions=True) if _started_by_this_session(p)
        ]

    def _our_segments(self) -> list[str]:
        tags = set()
        for proc in self._foreign_processes():
            try:
                cmdline = proc.cmdline()
                tags.add(proc.environ().get("SHOAL_SHM_TAG"))
            except psutil.Error:
                continue
            tags.update(cmdline[i + 1] for i, arg in enumerate(cmdline[:-1]) if arg == "--tag")
        foreign = tuple(f"{testing.SHM_PREFIX}{tag}-" for tag in tags if tag)
        known = self.initial_segments | self.reported_segments
        return [s for s in testing.shm_segments() if s not in known and not s.startswith(foreign)]

    def _strict(self) -> bool:
        return not (self.initial_segments or self.reported_segments or self._foreign_processes())

    def check(self, where: str, timeout: float = LEAK_TIMEOUT) -> None:
        if self._strict():
            try:
                testing.assert_no_leaks(timeout=timeout)
                return
            except AssertionError as exc:
                failure = str(exc)
        else:
            try:
                testing.wait_for(
                    lambda: not self._our_processes() and not self._our_segments(), timeout
                )
                return
            except TimeoutError:
                failure = (
                    f"leaked processes {_describe(self._our_processes())} "
                    f"and segments {self._our_segments()} (other Shoal sessions are running: "
                    "only what this session started is counted)"
                )
        self.reported_segments.update(self._our_segments())
        self.reap()
        message = f"{where}: {failure}"
        self.failures.append(message)
        raise AssertionError(message)

    def reap(self) -> None:
        """Kill the Shoal processes this session started and left behind."""
        ours = self._our_processes()
        for proc in ours:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ours, timeout=5)

    def remove_orphan_segments(self) -> None:
        """Remove segments this session leaked, once no Shoal process at all could own them."""
        if testing.shoal_processes(all_sessions=True):
            return
        for name in self.reported_segments | set(self._our_segments()):
            try:
                os.unlink(os.path.join(testing.SHM_DIR, name))
            except OSError:
                pass


@pytest.fixture(scope="session", autouse=True)
def _private_session_dir() -> Iterator[str]:
    # Short, under /tmp: ipc socket paths inside it must stay below ~100 characters.
    path = tempfile.mkdtemp(prefix="shoal-tests-", dir="/tmp")
    previous = os.environ.get("SHOAL_TMPDIR")
    os.environ["SHOAL_TMPDIR"] = path
    yield path
    if previous is None:
        del os.environ["SHOAL_TMPDIR"]
    else:
        os.environ["SHOAL_TMPDIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _leak_guard(_private_session_dir: str) -> Iterator[LeakGuard]:
    guard = LeakGuard()
    yield guard
    try:
        guard.check("after the test session")
    except AssertionError:
        pass  # recorded in guard.failures
    finally:
        guard.remove_orphan_segments()
    if guard.failures:
        pytest.fail(
            "Shoal leaked processes or shared-memory segments during this session:\n"
            + "\n".join(guard.failures),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def leak_check(_leak_guard: LeakGuard) -> Callable[..., None]:
    """``leak_check(where="...", timeout=15)``: fail if Shoal processes or segments remain."""

    def check(where: str = "leak check", timeout: float = LEAK_TIMEOUT) -> None:
        _leak_guard.check(where, timeout)

    return check


# ------------------------------------------------------------------------------ clusters


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, _leak_guard: LeakGuard) -> Iterator[Any]:
    """One cluster for the whole module: ``init(**CLUSTER_KWARGS)``, default num_cpus=2."""
    kwargs = dict(getattr(request.module, "CLUSTER_KWARGS", {"num_cpus": 2}))
    with testing.local_cluster(**kwargs) as context:
        yield context
    _leak_guard.check(f"after the cluster of {request.module.__name__}")


@pytest.fixture
def make_cluster(_leak_guard: LeakGuard) -> Iterator[Callable[..., Any]]:
    """A factory: ``make_cluster(**init_kwargs)`` runs ``shoal.init(**init_kwargs)``; teardown
    shuts the cluster down (if the test did not) and checks that nothing is left."""
    started = False

    def make(**init_kwargs: Any) -> Any:
        nonlocal started
        if shoal.is_initialized():
            raise RuntimeError(
                "a cluster is already initialized in this process; a module that uses the "
                "module-scoped `cluster` fixture cannot also use make_cluster/fresh_cluster"
            )
        started = True
        return shoal.init(**init_kwargs)

    yield make
    if started:
        if shoal.is_initialized():
            shoal.shutdown()
        _leak_guard.check("after a test's own cluster")


@pytest.fixture
def fresh_cluster(request: pytest.FixtureRequest, make_cluster: Callable[..., Any]) -> Any:
    """A cluster of the test's own; init kwargs come from indirect parametrization."""
    return make_cluster(**getattr(request, "param", {"num_cpus": 2}))


@pytest.fixture
def track_actor() -> Iterator[Callable[[Any], Any]]:
    """``track_actor(handle)`` returns the handle and kills the actor at teardown."""
    handles: list[Any] = []

    def track(handle: Any) -> Any:
        handles.append(handle)
        return handle

    yield track
    for handle in handles:
        try:
            shoal.kill(handle)
        except Exception:
            pass  # already dead, or the cluster is gone: nothing left to free


# ------------------------------------------------------------ cross-process synchronisation


def _make_wait_path() -> Callable[..., None]:
    def wait_path(path: str, timeout: float = 30.0) -> None:
        """Block until ``path`` exists; raise TimeoutError after ``timeout`` seconds."""
        import os
        import time

        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear within {timeout}s")
            time.sleep(0.005)

    return wait_path


def _make_rendezvous() -> Callable[..., None]:
    def rendezvous(directory: str, count: int, timeout: float = 20.0) -> None:
        """Arrive at ``directory`` and block until ``count`` callers have arrived."""
        import os
        import time
        import uuid

        open(os.path.join(directory, uuid.uuid4().hex), "w").close()
        deadline = time.monotonic() + timeout
        while len(os.listdir(directory)) < count:
            if time.monotonic() > deadline:
                arrived = len(os.listdir(directory))
                raise TimeoutError(f"only {arrived} of {count} arrived within {timeout}s")
            time.sleep(0.005)

    return rendezvous


@pytest.fixture
def wait_path() -> Callable[..., None]:
    """A function for tasks: ``wait_path(path, timeout=30)`` blocks until the file exists."""
    return _make_wait_path()


@pytest.fixture
def rendezvous() -> Callable[..., None]:
    """A function for tasks: ``rendezvous(directory, count)`` waits for ``count`` arrivals."""
    return _make_rendezvous()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """``gate()`` returns a fresh path (a str) to pass to tasks; ``Path(p).touch()`` opens it.

    Closures must capture the str, never a fixture object: tasks are pickled by value.
    """
    paths: list[str] = []
    counter = itertools.count()

    def make() -> str:
        path = str(tmp_path / f"gate-{next(counter)}")
        paths.append(path)
        return path

    yield make
    for path in paths:
        Path(path).touch()


# ------------------------------------------------------------------------------ drivers


def _subprocess_env(unbuffered: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


class Driver:
    """A driver script in a subprocess. stdout and stderr go to files (never pipes: a
    daemon that inherited a pipe would keep it open and hang the reader)."""

    def __init__(
        self, script: str, directory: Path, name: str, args: tuple[str, ...], unbuffered: bool
    ) -> None:
        self.name = name
        self.script_path = directory / f"{name}.py"
        self.script_path.write_text(textwrap.dedent(script))
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        self._descendants: dict[int, psutil.Process] = {}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *(["-u"] if unbuffered else []), str(self.script_path), *args],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=directory,
                env=_subprocess_env(unbuffered),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return (
            f"driver {self.name} (pid {self.pid}, exit code {self.proc.poll()})\n"
            f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"
        )

    def remember_descendants(self) -> None:
        """Note the driver's process tree, so teardown can stop what it left behind."""
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                self._descendants.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def wait_for_stdout(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` is in stdout; fail at once if the driver exits without it."""

        def seen() -> bool:
            self.remember_descendants()
            if text in self.stdout():
                return True
            if self.proc.poll() is not None and text not in self.stdout():
                raise AssertionError(f"{text!r} never printed:\n{self.describe()}")
            return False

        try:
            testing.wait_for(seen, timeout=timeout, interval=0.02)
        except TimeoutError:
            raise AssertionError(
                f"{text!r} not printed within {timeout}s:\n{self.describe()}"
            ) from None
        return self.stdout()

    def wait_for_line(self, prefix: str, timeout: float = 60.0) -> str:
        """Wait for a complete stdout line starting with ``prefix``; return it (no newline)."""

        def line() -> str | None:
            for candidate in self.stdout().splitlines(keepends=True):
                if candidate.startswith(prefix) and candidate.endswith("\n"):
                    return candidate.rstrip("\n")
            return None

        self.wait_for_stdout(prefix, timeout)
        try:
            return testing.wait_for(line, timeout=5, interval=0.02)
        except TimeoutError:
            raise AssertionError(f"no complete line {prefix!r}...:\n{self.describe()}") from None

    def finish(self, timeout: float = 60.0, check: bool = True) -> str:
        """Close stdin (scripts may block reading it), wait for exit; return stdout."""
        self.remember_descendants()
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"driver did not exit within {timeout}s:\n{self.describe()}"
            ) from None
        if check and self.proc.returncode != 0:
            raise AssertionError(f"driver failed:\n{self.describe()}")
        return self.stdout()

    def sigkill(self) -> None:
        self.remember_descendants()
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Kill the driver and whatever of its process tree is still alive."""
        self.remember_descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        alive = []
        for proc in self._descendants.values():
            try:
                proc.kill()  # psutil refuses if the pid was reused meanwhile
                alive.append(proc)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def start_driver(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    """``start_driver(script, *args, unbuffered=True)`` starts ``python [-u] script args`` in
    tmp_path. ``unbuffered`` sets PYTHONUNBUFFERED, which the cluster's processes inherit."""
    drivers: list[Driver] = []
    counter = itertools.count()

    def start(script: str, *args: str, unbuffered: bool = True) -> Driver:
        driver = Driver(script, tmp_path, f"driver{next(counter)}", args, unbuffered)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.stop()


@pytest.fixture
def run_driver(start_driver: Callable[..., Driver]) -> Callable[..., str]:
    """``run_driver(script, *args, timeout=60)``: run to completion, require exit 0, return stdout."""

    def run(script: str, *args: str, timeout: float = 60.0) -> str:
        return start_driver(script, *args).finish(timeout=timeout)

    return run


# ---------------------------------------------------------------------------------- CLI


def cli_command() -> list[str]:
    """The ``shoal`` script next to this interpreter, else on PATH, else ``python -m shoal``."""
    beside = Path(sys.executable).with_name("shoal")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("shoal")
    if found:
        return [found]
    return [sys.executable, "-m", "shoal"]


@pytest.fixture(scope="session")
def shoal_cli(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., subprocess.CompletedProcess]:
    """``shoal_cli(*args, timeout=60)`` runs ``shoal ARGS``; returns a CompletedProcess (text)."""
    directory = tmp_path_factory.mktemp("cli")
    counter = itertools.count()

    def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        n = next(counter)
        out_path, err_path = directory / f"{n}.stdout", directory / f"{n}.stderr"
        command = [*cli_command(), *args]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Files, not pipes: `shoal start` leaves daemons behind that may inherit them.
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_subprocess_env()
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"`{' '.join(command)}` did not finish within {timeout}s\n"
                    f"stdout: {out_path.read_text(errors='replace')}\n"
                    f"stderr: {err_path.read_text(errors='replace')}"
                ) from None
        return subprocess.CompletedProcess(
            command,
            returncode,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
        )

    return run


# -------------------------------------------------------------------------------- wheels


def _write_wheel(directory: Path, name: str, version: str, source: str) -> str:
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: shoal-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={encoded},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = Path(directory) / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return str(path)


@pytest.fixture
def make_wheel() -> Callable[[Path, str, str, str], str]:
    """``make_wheel(directory, name, version, source)``: the path of a wheel of one package
    ``name`` whose ``__init__.py`` is ``source``, written without any build tool."""
    return _write_wheel
