"""Separate hosts on one machine, for multi-node tests: Linux network namespaces on a bridge.

    with Network(hosts=2) as net:              # or Network(), then net.add_host("head")
        a, b = net.hosts
        server = a.popen([sys.executable, "server.py", a.ip])
        b.wait_for_port(5000, a.ip, proc=server)
        b.python("...")                        # CompletedProcess; raises on a non-zero exit

Each ``Host`` has
- its own network namespace (``host.ns``) with loopback up and ``eth0`` at ``host.ip`` on
  the network's /24, plugged into a bridge in the root namespace. The root namespace gets
  ``net.root_ip`` (the .1) on the bridge, so the test process can reach the hosts too.
  Nothing is routed beyond the bridge: hosts have no default route.
- its own mount namespace, shared by all its processes: ``/dev/shm`` is a fresh tmpfs
  (``shm_size``), and ``/etc/hosts`` names every host of the network.
- its own UTS namespace: ``socket.gethostname()`` is the host's name.
- its own directories: ``SHOAL_TMPDIR`` (session files) and ``TMPDIR``.
Processes share the machine's file system (but /dev/shm) and its pid namespace, so the
test session's leak check still sees them.

Processes are started as (see ``Host.command``)

    nsenter --net=/proc/PID/fd/N --mount=/proc/PID/fd/M --uts=/proc/PID/fd/U --wd=CWD -- ARGV

where PID is the test process and N, M, U are descriptors it holds on the host's network,
mount and UTS namespaces (no descriptor leaks into the host's processes); `nsenter` execs
ARGV, so a Popen's pid is the program's own. The mount and UTS namespaces are made once per
host (``ip netns exec NS unshare --mount --uts --propagation private sh -c 'mount -t tmpfs
... /dev/shm && ...'``), and the held descriptor keeps them alive: the host's /dev/shm lives
as long as the ``Network`` (or a process inside), never longer, and never shows in the
machine's /dev/shm.

Teardown (``Network.close``, run by ``__exit__`` whatever happened) kills every process in a
host's namespaces (SIGTERM, then SIGKILL after ``kill_grace``), waits for them with a
deadline, then deletes veths, the bridge and the namespaces, and raises ``HostError`` if
anything is left.

Concurrent sessions never collide: the network's third octet X (subnet 10.231.X.0/24) is
held by an flock on ``/run/shoal-netns/X.lock`` for the network's lifetime, and every name
derives from X (namespaces ``shoalnetX-NAME``, bridge ``shoalnetXbr``, veths
``shoalnetXvI``, directory ``/tmp/shoalnetX``). What a session that died without tearing down
left behind (after SIGKILL, or pytest-timeout's method=thread) is under an unlocked X: every
new network removes such leftovers first.

Needs root, iproute2 (``ip``) and util-linux (``unshare``, ``nsenter``, ``mount``); see
``unavailable_reason()``.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SUBNET_PREFIX = "10.231"
NAME_PREFIX = "shoalnet"
LOCK_DIR = Path("/run/shoal-netns")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts its names
TOOLS = ("ip", "unshare", "nsenter", "mount")
HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")
SETUP_TIMEOUT = 10.0


class HostError(RuntimeError):
    """The harness could not set up or tear down a network."""


class CommandError(HostError):
    """A command in a host failed (non-zero exit or timeout); the message has its output."""

    def __init__(
        self, message: str, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
    ) -> None:
        super().__init__(
            f"{message}: {' '.join(argv)}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@functools.cache
def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing commands {missing} (Debian packages iproute2, util-linux, mount)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--uts", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    if check and result.returncode != 0:
        raise HostError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _ns_id(path: str | int) -> tuple[int, int] | None:
    """(device, inode) of a namespace file or descriptor; None if it is gone or unreadable."""
    try:
        st = os.stat(path)
    except OSError:  # gone, a zombie (its ns links are gone), or not ours to read
        return None
    return st.st_dev, st.st_ino


def _pids_in(namespaces: Iterable[tuple[int, int]]) -> set[int]:
    """Live processes that belong to any of ``namespaces`` (network or mount), like `ip netns
    pids`; zombies are not counted (they hold no namespace)."""
    wanted = set(namespaces)
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            for kind in ("net", "mnt"):
                if _ns_id(f"/proc/{entry}/ns/{kind}") in wanted:
                    found.add(int(entry))
                    break
    return found


def _signal_if_inside(pid: int, namespaces: set[tuple[int, int]], sig: int) -> None:
    """Signal ``pid`` if it is still in ``namespaces``. The pidfd pins the process before the
    check, so a recycled pid is never signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        inside = {_ns_id(f"/proc/{pid}/ns/net"), _ns_id(f"/proc/{pid}/ns/mnt")} & namespaces
        if inside:
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


class Host:
    """One host of a ``Network``; made by ``Network.add_host``."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network = network
        self.name = name
        self.ns = f"{network.prefix}-{name}"
        self.veth = f"{network.prefix}v{index}"
        self.ip = f"{network.subnet_prefix}.{index + 2}"
        self.dir = network.dir / name
        self.shoal_tmpdir = self.dir / "shoal"
        self.tmpdir = self.dir / "tmp"
        self._fds: dict[str, int] = {}  # namespace kind -> descriptor held on it
        self._popens: list[subprocess.Popen[Any]] = []
        self._outputs = itertools.count()

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    # ------------------------------------------------------------------------ set up

    def _create(self) -> None:
        for path in (self.shoal_tmpdir, self.tmpdir, self.dir / "output"):
            path.mkdir(parents=True)
        net = self.network
        _ip("netns", "add", self.ns)
        self._fds["net"] = os.open(NETNS_DIR / self.ns, os.O_RDONLY | os.O_CLOEXEC)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("link", "set", self.veth, "master", net.bridge, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        _ip("-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        self._make_mount_and_uts_namespaces()

    def _make_mount_and_uts_namespaces(self) -> None:
        # A short-lived process makes the namespaces and sets them up; holding descriptors on
        # them keeps them (and the tmpfs) alive after it exits, for `nsenter` to join.
        script = (
            f"printf %s {self.name} > /proc/sys/kernel/hostname"
            f" && mount -t tmpfs -o size={self.network.shm_size},mode=1777 shoal-shm /dev/shm"
            f" && mount --bind {self.network.hosts_file} /etc/hosts"
            " && echo ready && exec cat > /dev/null"
        )
        argv = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts"]
        argv += ["--propagation", "private", "--", "sh", "-c", script]
        # `ip netns exec` and `unshare` exec (no fork): the pid is the shell's.
        anchor = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert anchor.stdout is not None and anchor.stdin is not None
            ready, _, _ = select.select([anchor.stdout], [], [], SETUP_TIMEOUT)
            if not ready or anchor.stdout.readline() != b"ready\n":
                anchor.kill()
                _, err = anchor.communicate(timeout=SETUP_TIMEOUT)
                raise HostError(f"could not set up host {self.name}: {err.decode().strip()}")
            for kind in ("mnt", "uts"):
                self._fds[kind] = os.open(
                    f"/proc/{anchor.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC
                )
            anchor.stdin.close()  # the shell's `cat` exits
            anchor.wait(timeout=SETUP_TIMEOUT)
        finally:
            if anchor.poll() is None:
                anchor.kill()
                anchor.wait()
            for stream in (anchor.stdin, anchor.stdout, anchor.stderr):
                if stream is not None:
                    stream.close()

    # -------------------------------------------------------------------- processes

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of processes in this host: the test process's (so
        ``SHOAL_TEST_SESSION`` too), the host's ``SHOAL_TMPDIR`` and ``TMPDIR``, then ``extra``."""
        env = dict(os.environ)
        env["SHOAL_TMPDIR"] = str(self.shoal_tmpdir)
        env["TMPDIR"] = str(self.tmpdir)
        env.update(extra or {})
        return env

    def command(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """``argv`` wrapped to run inside this host (the ``nsenter`` line in the module doc);
        a leading ``shoal`` is this interpreter's ``python -m shoal``."""
        if not self._fds:
            raise HostError(f"host {self.name} is not running (its network was closed)")
        me = os.getpid()
        if list(argv[:1]) == ["shoal"]:
            # The `shoal` on PATH may be another checkout's; run this interpreter's.
            argv = [sys.executable, "-m", "shoal", *argv[1:]]
        return [
            "nsenter",
            f"--net=/proc/{me}/fd/{self._fds['net']}",
            f"--mount=/proc/{me}/fd/{self._fds['mnt']}",
            f"--uts=/proc/{me}/fd/{self._fds['uts']}",
            f"--wd={os.path.abspath(cwd or os.getcwd())}",
            "--",
            *map(str, argv),
        ]

    def popen(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host; ``kwargs`` go to ``subprocess.Popen`` (stdin defaults to
        /dev/null). The Popen's pid is the program's own (`nsenter` execs it). The process is
        killed when the network closes, if it has not exited by then."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(argv, kwargs.get("cwd")), env=self.env(env), **kwargs)
        self._popens.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host to completion; return its exit code and output (text).

        Output goes through files, not pipes, so a daemon it leaves behind cannot hang us.
        Raises ``CommandError`` (with stdout and stderr) on timeout, and when ``check`` and the
        exit code is not 0."""
        n = next(self._outputs)
        out_path = self.dir / "output" / f"{n}.stdout"
        err_path = self.dir / "output" / f"{n}.stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
            proc = self.popen(argv, env, stdin=stdin, stdout=out, stderr=err, text=True, **kwargs)
            try:
                proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise CommandError(
                    f"timed out after {timeout}s in host {self.name}",
                    argv,
                    None,
                    out_path.read_text(errors="replace"),
                    err_path.read_text(errors="replace"),
                ) from None
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace")
        if check and proc.returncode != 0:
            raise CommandError(
                f"exit code {proc.returncode} in host {self.name}",
                argv,
                proc.returncode,
                stdout,
                stderr,
            )
        return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``run([sys.executable, "-c", code, *args], **kwargs)``."""
        return self.run([sys.executable, "-c", code, *args], **kwargs)

    def wait_for_port(
        self,
        port: int,
        address: str = "127.0.0.1",
        timeout: float = 10.0,
        proc: subprocess.Popen[Any] | None = None,
    ) -> None:
        """Wait until ``address:port`` accepts TCP connections from inside this host (poll with
        a deadline); fail at once if ``proc`` (the server, say) exits first. Raises
        ``CommandError`` on timeout."""
        args = [address, str(port), str(timeout), str(proc.pid if proc else 0)]
        self.python(_WAIT_FOR_PORT, *args, timeout=timeout + 10)

    def pids(self) -> set[int]:
        """Live processes in this host's network or mount namespace."""
        return _pids_in(self._namespace_ids())

    def _namespace_ids(self) -> set[tuple[int, int]]:
        return {ns for fd in self._fds.values() if (ns := _ns_id(fd)) is not None}

    # ---------------------------------------------------------------------- teardown

    def _release(self) -> None:
        for proc in self._popens:
            proc.poll()  # reap, so no zombie of ours is left
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_WAIT_FOR_PORT = """
import socket, sys, time
address, port, timeout, pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False

deadline = time.monotonic() + timeout
while True:
    try:
        socket.create_connection((address, port), timeout=1.0).close()
        break
    except OSError as exc:
        error = exc
    if pid and not alive():
        sys.exit(f"process {pid} exited before {address}:{port} accepted connections ({error})")
    if time.monotonic() > deadline:
        sys.exit(f"{address}:{port} did not accept connections within {timeout}s ({error})")
    time.sleep(0.01)
"""


class Network:
    """A bridge and hosts on it; a context manager that tears everything down on exit.

    ``hosts``: a number (hosts ``host0``, ``host1``, ...) or names, added on entry.
    ``shm_size``: size of each host's /dev/shm tmpfs (``mount -o size=``).
    ``root_address``: give the root namespace ``root_ip`` (the .1) on the bridge.
    ``kill_grace``: at teardown, seconds between SIGTERM and SIGKILL.
    ``teardown_timeout``: seconds for every process to be gone after SIGKILL.
    """

    def __init__(
        self,
        hosts: int | Sequence[str] = 0,
        *,
        shm_size: str = "512M",
        root_address: bool = True,
        kill_grace: float = 1.0,
        teardown_timeout: float = 10.0,
    ) -> None:
        if not re.fullmatch(r"\d+[kKmMgG%]?", shm_size):
            raise ValueError(f"shm_size must be like 512M, not {shm_size!r}")
        self._initial_hosts = (
            [f"host{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        )
        self.shm_size = shm_size
        self.root_address = root_address
        self.kill_grace = kill_grace
        self.teardown_timeout = teardown_timeout
        self.hosts: list[Host] = []
        self.octet: int | None = None  # X in 10.231.X.0/24, once entered
        self._lock_fd: int | None = None
        self._closed = False

    # names, all derived from the octet
    @property
    def prefix(self) -> str:
        return f"{NAME_PREFIX}{self.octet}"

    @property
    def subnet_prefix(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}"

    @property
    def subnet(self) -> str:
        return f"{self.subnet_prefix}.0/24"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def root_ip(self) -> str | None:
        return f"{self.subnet_prefix}.1" if self.root_address else None

    @property
    def dir(self) -> Path:
        """The hosts' directories (short, under /tmp: ipc socket paths must stay short)."""
        return Path("/tmp") / self.prefix

    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts"

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Network({self.subnet if self.octet is not None else 'not started'}, {self.hosts})"

    # ------------------------------------------------------------------------ set up

    def __enter__(self) -> Network:
        reason = unavailable_reason()
        if reason:
            raise HostError(reason)
        try:
            self._take_octet()
            self.dir.mkdir()
            self.hosts_file.write_text("")
            _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
            if self.root_ip:
                _ip("addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name in self._initial_hosts:
                self.add_host(name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take_octet(self) -> None:
        _remove_dead_networks()
        in_use = _ip("-o", "-4", "addr", "show").stdout.splitlines()
        candidates = list(range(1, 255))
        random.shuffle(candidates)
        for octet in candidates:
            if any(f" {SUBNET_PREFIX}.{octet}." in line for line in in_use):
                continue  # an address of someone else's (dead networks are gone by now)
            fd = _lock(octet)
            if fd is None:
                continue
            self._lock_fd, self.octet = fd, octet
            leftovers = _leftovers(octet)  # of a network that died after the sweep above
            if leftovers:
                raise HostError(f"cannot remove leftovers of {self.prefix}: {leftovers}")
            return
        raise HostError(f"no free subnet {SUBNET_PREFIX}.X.0/24")

    def add_host(self, name: str) -> Host:
        """Add a host named ``name`` (lowercase letters, digits, dashes); return it."""
        if self.octet is None or self._closed:
            raise HostError("add hosts to a network inside its `with` block")
        if not HOST_NAME.fullmatch(name):
            raise ValueError(f"host names are like 'head' or 'node-1', not {name!r}")
        if any(host.name == name for host in self.hosts):
            raise ValueError(f"there is already a host {name!r}")
        if len(self.hosts) >= 250:
            raise HostError("at most 250 hosts")
        host = Host(self, name, len(self.hosts))
        self.hosts.append(host)
        self._write_hosts_file()  # in place: hosts already up see the new name
        host._create()
        return host

    def _write_hosts_file(self) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{host.ip}\t{host.name}" for host in self.hosts]
        with open(self.hosts_file, "r+") as f:
            f.write("\n".join(lines) + "\n")
            f.truncate()

    # ---------------------------------------------------------------------- teardown

    def close(self) -> None:
        """Kill every process in the hosts, delete the hosts and the bridge; idempotent.
        Raises ``HostError`` if a process or a namespace or link is left."""
        if self._closed or self.octet is None:
            self._closed = True
            return
        self._closed = True
        try:
            survivors = self._kill_processes()
        finally:
            for host in self.hosts:
                host._release()
            _remove(self.octet)
            leftovers = _leftovers(self.octet)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the octet
                self._lock_fd = None
        if survivors or leftovers:
            raise HostError(
                f"teardown of {self.prefix} left processes {sorted(survivors)} "
                f"and namespaces, links or directories {leftovers}"
            )

    def _kill_processes(self) -> set[int]:
        """SIGTERM, then SIGKILL after ``kill_grace``, every process in a host; return those
        still alive after ``teardown_timeout``."""
        namespaces = set().union(*(host._namespace_ids() for host in self.hosts))
        if not namespaces:
            return set()
        pids = _pids_in(namespaces)
        for pid in pids:
            _signal_if_inside(pid, namespaces, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()
            pids = _pids_in(namespaces)
        deadline = time.monotonic() + self.teardown_timeout
        while pids:
            for pid in pids:  # again and again: a process may fork meanwhile
                _signal_if_inside(pid, namespaces, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
            self._reap()
            pids = _pids_in(namespaces)
        return pids

    def _reap(self) -> None:
        for host in self.hosts:
            for proc in host._popens:
                proc.poll()


# ---------------------------------------------------------------- leftovers of dead networks


def _lock(octet: int) -> int | None:
    """A descriptor holding the lock of ``octet``, or None if a live network holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{octet}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _all_leftovers() -> dict[int, list[str]]:
    """Namespaces, links and directories of every octet: {octet: names}."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        names = []
    names += [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]
    names += [str(path) for path in Path("/tmp").glob(f"{NAME_PREFIX}*")]
    pattern = re.compile(rf"(?:/tmp/)?{NAME_PREFIX}(\d+)(?:-[a-z0-9-]+|br|v\d+)?")
    found: dict[int, list[str]] = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.setdefault(int(match[1]), []).append(name)
    return found


def _leftovers(octet: int) -> list[str]:
    return _all_leftovers().get(octet, [])


def _remove(octet: int) -> None:
    """Delete the links, namespaces (killing what still runs inside) and directory of
    ``octet``. Links first: deleting a namespace destroys its end of a veth asynchronously."""
    namespace_prefix = f"{NAME_PREFIX}{octet}-"
    for name in sorted(
        _leftovers(octet),
        key=lambda name: (name.startswith("/tmp/"), name.startswith(namespace_prefix)),
    ):
        if name.startswith("/tmp/"):
            shutil.rmtree(name, ignore_errors=True)
        elif name.startswith(namespace_prefix):
            namespace = _ns_id(str(NETNS_DIR / name))
            if namespace is not None:
                for pid in _pids_in({namespace}):
                    _signal_if_inside(pid, {namespace}, signal.SIGKILL)
            _ip("netns", "delete", name, check=False)
        else:
            _ip("link", "delete", name, check=False)


def _remove_dead_networks() -> None:
    """Remove what networks of dead processes left behind (their locks are free)."""
    for octet in _all_leftovers():
        fd = _lock(octet)
        if fd is not None:
            try:
                _remove(octet)
            finally:
                os.close(fd)


def require_netns() -> None:
    """Skip (or fail, with SHOAL_REQUIRE_NETNS=1) when network namespaces are unavailable.

    Here rather than in conftest.py: test modules import it, and ``import conftest`` finds
    whichever conftest.py came first on sys.path (tests/notebook has one too).
    """
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("SHOAL_REQUIRE_NETNS") == "1":
        pytest.fail(f"SHOAL_REQUIRE_NETNS=1 but {reason}", pytrace=False)
    pytest.skip(reason)
