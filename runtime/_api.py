"""The public functions: init, shutdown, get, put, wait, cancel, kill, get_actor, ...

Their names and semantics are Ray's, so that ``import shoal as ray`` runs Ray core code.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

from . import _config, _machine, _session, _worker_context
from ._core import CoreWorker, print_log_lines
from ._protocol import Message, MsgType
from ._refs import ObjectRef, ObjectRefGenerator
from ._runtime_context import RuntimeContext
from ._serialization import check_picklable
from .exceptions import GetTimeoutError, ShoalError, TaskError

M = MsgType
log = logging.getLogger("shoal")

_init_lock = threading.RLock()


class _Cluster:
    """What ``init`` started or joined, so that ``shutdown`` can undo it."""

    def __init__(
        self,
        core: CoreWorker,
        address: str,
        session_dir: str,
        head: subprocess.Popen[bytes] | None,
        parent_fd: int | None,
    ) -> None:
        self.core = core
        self.address = address
        self.session_dir = session_dir
        self.head = head
        self.parent_fd = parent_fd


_cluster: _Cluster | None = None


class ClusterContext(dict[str, Any]):
    """What ``init`` returns: a dict of facts (as Ray's ``address_info``), usable with ``with``."""

    @property
    def address_info(self) -> dict[str, Any]:
        return dict(self)

    def __enter__(self) -> ClusterContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        shutdown()

    def _repr_html_(self) -> str:
        """For notebooks: the cluster's nodes and resources while it is connected."""
        from .jupyter_ext._reprs import context_html

        return context_html(self)


_INIT_ARGS = {
    "address",
    "num_cpus",
    "num_gpus",
    "resources",
    "object_store_memory",
    "namespace",
    "ignore_reinit_error",
    "log_to_driver",
    "runtime_env",
    "include_dashboard",
    "logging_level",
    "configure_logging",
    "_temp_dir",
    "dashboard_host",
    "dashboard_port",
    "local_mode",
    "_system_config",
    "object_spilling_directory",
    "key_file",
    "metrics_export_port",
    "_metrics_export_port",
}


def init(address: str | None = None, **kwargs: Any) -> ClusterContext:
    """Start a local cluster (no address), or join one (``"auto"`` or an address)."""
    global _cluster
    for key in kwargs:
        if key not in _INIT_ARGS:
            raise TypeError(f"init() got an unknown argument {key!r}")
    job_env = None
    if kwargs.get("runtime_env") is not None:
        from .runtime_env._spec import validate as validate_env

        job_env = validate_env(kwargs["runtime_env"])  # before anything starts
    with _init_lock:
        if _cluster is not None:
            if kwargs.get("ignore_reinit_error"):
                return _context()
            raise RuntimeError(
                "Shoal is already initialized; call shoal.shutdown() first, or pass ignore_reinit_error=True"
            )
        namespace = kwargs.get("namespace")
        if namespace is None:
            namespace = uuid.uuid4().hex  # an anonymous namespace per driver, as in Ray
        if address is None:
            address = os.environ.get("SHOAL_ADDRESS") or None
        if address is None:
            _cluster = _start_local(kwargs, namespace)
        else:
            for key in (
                "num_cpus",
                "num_gpus",
                "resources",
                "object_store_memory",
                "metrics_export_port",
                "_metrics_export_port",
            ):
                if kwargs.get(key) is not None:
                    raise ValueError(
                        f"{key} cannot be set when joining an existing cluster (address={address!r})"
                    )
            _cluster = _connect(address, namespace, kwargs.get("key_file"))
        core = _cluster.core
        if job_env:
            from .runtime_env._driver import set_job_env

            try:
                set_job_env(core, job_env)  # packages uploaded now: their errors show here
            except BaseException:
                shutdown()
                raise
        _worker_context.set_core(core)
        if kwargs.get("log_to_driver", True):
            core.on_log = print_log_lines
        atexit.register(shutdown)
        if "IPython" in sys.modules:  # inside IPython: %cluster and %%remote (jupyter_ext)
            from .jupyter_ext import register_if_in_ipython

            register_if_in_ipython()
        return _context()


def _context() -> ClusterContext:
    assert _cluster is not None
    core = _cluster.core
    context = ClusterContext(
        address=_cluster.address,
        session_dir=_cluster.session_dir,
        node_id=core.node_id.hex(),
        job_id=f"{core.job_id:08x}",
        namespace=core.namespace,
    )
    if _cluster.session_dir:
        # A head started with metrics_export_port (or --metrics-port) says where it serves.
        info = _session.open_session(_cluster.session_dir).head_info() or {}
        if info.get("metrics"):
            context["metrics_export_url"] = info["metrics"]
    return context


def _default_store_memory() -> int:
    """30% of the RAM we may use, but no more than 90% of what /dev/shm has free: a store
    larger than its filesystem fails writes with ENOSPC while it believes it has room."""
    want = int(_machine.memory_total() * 0.3)
    shm_free = _machine.shm_free()
    if shm_free is not None and int(shm_free * 0.9) < want:
        want = int(shm_free * 0.9)
        if want < 1 << 30 and not _warned_small_shm:
            _warn_small_shm(want)
    return max(want, 1 << 20)


_warned_small_shm = False


def _warn_small_shm(store: int) -> None:
    global _warned_small_shm
    _warned_small_shm = True  # once per process: a notebook restarts clusters often
    warnings.warn(
        f"the object store holds {store / 2**20:.0f} MiB, what /dev/shm has free; larger "
        "sets of objects spill to disk (in Docker, --shm-size gives /dev/shm more room)",
        stacklevel=4,
    )


def _start_local(kwargs: dict[str, Any], namespace: str) -> _Cluster:
    _config.memory_monitor_settings()  # a malformed setting is reported here, not by the head
    num_cpus = kwargs.get("num_cpus")
    if num_cpus is None:
        num_cpus = _machine.cpu_count()
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
        raise ValueError(f"num_cpus must be a number >= 0, got {num_cpus!r}")
    num_gpus = kwargs.get("num_gpus") or 0
    if (
        isinstance(num_gpus, bool)
        or not isinstance(num_gpus, (int, float))
        or num_gpus < 0
        or not float(num_gpus).is_integer()
    ):
        raise ValueError(f"num_gpus must be a whole number >= 0, got {num_gpus!r}")
    resources = kwargs.get("resources") or {}
    if not isinstance(resources, dict):
        raise TypeError(f"resources must be a dict, got {type(resources).__name__}")
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"use num_cpus / num_gpus instead of resources={{{name!r}: ...}}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"resource {name!r} must be a number >= 0, got {amount!r}")
    store = kwargs.get("object_store_memory")
    if store is None:
        store = _default_store_memory()
    elif isinstance(store, bool) or not isinstance(store, int) or store <= 0:
        raise ValueError(f"object_store_memory must be a positive number of bytes, got {store!r}")
    metrics_port = kwargs.get("metrics_export_port", kwargs.get("_metrics_export_port"))
    if metrics_port is not None and (
        isinstance(metrics_port, bool)
        or not isinstance(metrics_port, int)
        or not 0 <= metrics_port < 65536
    ):
        raise ValueError(
            f"metrics_export_port must be a port number (0: any free port), got {metrics_port!r}"
        )
    spill_dir = kwargs.get("object_spilling_directory")
    if spill_dir is not None:
        spill_dir = os.path.abspath(os.path.expanduser(str(spill_dir)))
        os.makedirs(spill_dir, mode=0o700, exist_ok=True)
    head, session = start_head_process(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        object_store_memory=store,
        embedded=True,
        spill_dir=spill_dir,
        metrics_port=metrics_port,
    )
    parent_fd = head.parent_fd  # type: ignore[attr-defined]
    try:
        core = CoreWorker(
            role="driver",
            head_address=session.socket_address("h"),
            key=session.read_key(),
            namespace=namespace,
            head_pid=head.pid,
        )
    except BaseException:
        os.close(parent_fd)
        head.kill()
        head.wait()
        raise
    return _Cluster(core, session.socket_address("h"), session.path, head, parent_fd)


def start_head_process(
    *,
    num_cpus: float,
    num_gpus: float,
    resources: dict[str, float],
    object_store_memory: int,
    embedded: bool,
    port: int | None = None,
    spill_dir: str | None = None,
    bind: str | None = None,
    join: str | None = None,
    node_ip: str | None = None,
    key: bytes | None = None,
    metrics_port: int | None = None,
    metrics_bind: str | None = None,
) -> tuple[subprocess.Popen[bytes], _session.Session]:
    """Start a head (or, with ``join``, a node of the head at that address) in a new
    process and wait until it serves. Used by init() and the CLI."""
    import json

    session = _session.create_session(key)
    ready_r, ready_w = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "shoal._head",
        "--session",
        session.path,
        "--tag",
        session.tag,
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        "--resources",
        json.dumps(resources),
        "--object-store-memory",
        str(object_store_memory),
        "--ready-fd",
        str(ready_w),
    ]
    if port is not None:
        cmd += ["--port", str(port)]
    if bind is not None:
        cmd += ["--bind", bind]
    if join is not None:
        cmd += ["--address", join]
    if node_ip is not None:
        cmd += ["--node-ip", node_ip]
    if spill_dir is not None:
        cmd += ["--spill-dir", spill_dir]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    if metrics_bind is not None:
        cmd += ["--metrics-bind", metrics_bind]
    pass_fds = [ready_w]
    parent_r = parent_w = None
    if embedded:
        # The head watches this pipe: when the driver dies, however it dies, the pipe closes
        # and the head cleans up. Only the head gets the read end.
        parent_r, parent_w = os.pipe()
        cmd += ["--parent-fd", str(parent_r)]
        pass_fds.append(parent_r)
    logf = open(os.path.join(session.logs, "head.log"), "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        logf.close()
        os.close(ready_w)
        if parent_r is not None:
            os.close(parent_r)
    try:
        _wait_ready(ready_r, proc, session)
    except BaseException:
        if parent_w is not None:
            os.close(parent_w)
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(ready_r)
    proc.parent_fd = parent_w  # type: ignore[attr-defined]
    return proc, session


def _wait_ready(fd: int, proc: subprocess.Popen[bytes], session: _session.Session) -> None:
    readable, _, _ = select.select([fd], [], [], _config.START_TIMEOUT_SECONDS)
    data = os.read(fd, 4096) if readable else b""
    if data.startswith(b"ready"):
        return
    if data.startswith(b"error:"):
        raise ConnectionError(data[6:].decode(errors="replace").strip())
    try:
        with open(os.path.join(session.logs, "head.log"), errors="replace") as f:
            tail = f.read()[-3000:]
    except OSError:
        tail = ""
    state = (
        "did not become ready in time"
        if proc.poll() is None
        else f"exited with code {proc.returncode}"
    )
    raise RuntimeError(f"the head process {state}. Its log ({session.logs}/head.log):\n{tail}")


def _connect(address: str, namespace: str, key_file: str | None = None) -> _Cluster:
    if address != "auto" and not os.path.isdir(address):
        tcp = address if address.startswith("tcp://") else "tcp://" + address
        if key_file is not None or not _local_session_at(tcp):
            return _connect_client(tcp, namespace, key_file)
        address = tcp
    if address == "auto":
        session = _session.find_running_session()
        if session is None:
            raise ConnectionError(
                "no running Shoal cluster was found on this machine; start one with `shoal start --head` "
                "or call shoal.init() without an address"
            )
    elif os.path.isdir(address):
        session = _session.open_session(address)
    else:
        session = _find_session_by_address(address)
    info = session.head_info() or {}
    core = CoreWorker(
        role="driver",
        head_address=info["address"],
        key=session.read_key(),
        namespace=namespace,
        head_pid=int(info["pid"]),
    )
    return _Cluster(core, info["address"], session.path, None, None)


def _local_session_at(address: str) -> bool:
    try:
        _find_session_by_address(address)
    except ConnectionError:
        return False
    return True


def _connect_client(address: str, namespace: str, key_file: str | None) -> _Cluster:
    """Client-server mode: drive a cluster this machine is not part of, over one
    connection to its head (see _client.py)."""
    host_port = address.removeprefix("tcp://")
    if ":" not in host_port or not host_port.rsplit(":", 1)[1].isdigit():
        raise ValueError(f"a cluster address is HOST:PORT or tcp://HOST:PORT, got {address!r}")
    key = _session.cluster_key(key_file)
    if key is None:
        raise ValueError(
            f"connecting to the cluster at {host_port} needs its key: pass key_file= (the path "
            "`shoal start --head` printed) or set SHOAL_CLUSTER_KEY to the key's hex text"
        )
    core = CoreWorker(
        role="driver", head_address=address, key=key, namespace=namespace, client=True
    )
    return _Cluster(core, address, "", None, None)


def _find_session_by_address(address: str) -> _session.Session:
    for path in _session.list_session_dirs():
        session = _session.open_session(path)
        info = session.head_info()
        if (
            info
            and address in (info.get("address"), info.get("tcp"))
            and _session.pid_alive(int(info["pid"]))
        ):
            return session
    raise ConnectionError(f"no running Shoal cluster on this machine has the address {address!r}")


def shutdown() -> None:
    """Disconnect; stop the cluster if ``init`` started it. Safe to call twice."""
    global _cluster
    with _init_lock:
        cluster, _cluster = _cluster, None
        if cluster is None:
            return
        _worker_context.set_core(None)
        cluster.core.close()
        if cluster.head is not None:
            if cluster.parent_fd is not None:
                os.close(cluster.parent_fd)
            try:
                cluster.head.wait(_config.KILL_GRACE_SECONDS + 5)
            except subprocess.TimeoutExpired:
                cluster.head.kill()
                cluster.head.wait()
            # The head removes its segments as it exits; if it died first, we do.
            _session.remove_segments(_session.open_session(cluster.session_dir).tag)


def is_initialized() -> bool:
    return _cluster is not None


def _auto_init() -> CoreWorker:
    core = _worker_context.maybe_core()
    if core is None:
        with _init_lock:
            if _cluster is None:
                init()
        core = _worker_context.core()
    return core


# -- objects ---------------------------------------------------------------------------
def put(value: Any) -> ObjectRef:
    """Store ``value`` in the cluster and return a reference to it."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself instead")
    core = _auto_init()
    try:
        sv = check_picklable(value, "the value")
    except TypeError as exc:
        raise TypeError(
            f"put() could not serialize a value of type {type(value).__name__}: {exc.__cause__ or exc}"
        ) from exc
    oid = core.ids.put_id()
    core.put_serialized(oid, sv, _call_site())
    return ObjectRef(oid, core)


def _call_site() -> str:
    """Where the user called us from: the first frame outside this package."""
    frame = sys._getframe(1)
    here = os.path.dirname(__file__)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    cell = _notebook_cell(frame.f_code.co_filename)
    if cell:
        where = f"{cell}, line {frame.f_lineno}"  # as IPython's tracebacks name a cell
    return f"put() at {where} in {frame.f_code.co_name}"


def _notebook_cell(filename: str) -> str:
    """'Cell In[3]' when ``filename`` is a notebook cell's code, else ''."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    try:
        label = shell.compile.format_code_name(filename) if shell is not None else None
    except Exception:  # an IPython without it, or a shell without a compiler
        return ""
    return " ".join(label) if label else ""


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """The value of a ref, or a list of values for a list of refs; raises task errors."""
    core = _worker_context.maybe_core() or _auto_init()
    if type(refs) is ObjectRef:
        # One ref, the synchronous call's case: no lists on the way.
        _check_timeout(timeout)
        oid = refs._id
        value = core.wait_value(oid, timeout)
        if value is None:
            raise GetTimeoutError(f"get() timed out after {timeout}s: 1 of 1 objects are not ready")
        return core.materialize(value, oid)
    if isinstance(refs, ObjectRef):
        return _get_list(core, [refs], timeout)[0]
    if isinstance(refs, ObjectRefGenerator):
        return _get_list(core, list(refs), timeout)
    if not isinstance(refs, (list, tuple)):
        raise TypeError(
            f"get() expects an ObjectRef or a list of ObjectRefs, got {type(refs).__name__}"
        )
    for i, r in enumerate(refs):
        if not isinstance(r, ObjectRef):
            raise TypeError(f"get() expects ObjectRefs, but item {i} is a {type(r).__name__}")
    return _get_list(core, list(refs), timeout)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")


# Set by the notebook extension (shoal.widgets): shows the progress of a get of several
# refs that waits longer than a second (see _get_progress.py). None: nothing is shown.
_get_watcher: Any = None


def _get_list(core: CoreWorker, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
    _check_timeout(timeout)
    oids = [r.binary() for r in refs]
    # Once each: a ref named twice would be counted twice as it arrived, and the wait
    # would end one value short.
    unique = list(dict.fromkeys(oids))
    watcher = _get_watcher
    if watcher is not None and len(unique) > 1:
        from ._get_progress import wait_values

        values = wait_values(core, unique, timeout, watcher)
    else:
        values = core.wait_values(unique, len(unique), timeout)
    missing = [oid for oid in oids if oid not in values]
    if missing:
        raise GetTimeoutError(
            f"get() timed out after {timeout}s: {len(missing)} of {len(oids)} objects are not ready"
        )
    out = []
    for oid in oids:
        try:
            out.append(core.materialize(values[oid], oid))
        except ShoalError as exc:
            if len(values) > 1:
                _note_other_failures(core, exc, oid, values)
            raise
    return out


def _note_other_failures(
    core: CoreWorker, exc: BaseException, failed: bytes, values: dict[bytes, Any]
) -> None:
    """One error is raised; a note on it counts the other refs that failed, by kind:
    "3 more of the 10 refs failed: 2 ZeroDivisionError, 1 ValueError".

    ``get`` waits for every ref before it raises, so this counts all of them, and waits for
    nothing more. Each ref counts once, however often the list names it."""
    kinds: dict[str, int] = {}
    for oid, value in values.items():
        if oid == failed or not _is_error(value):
            continue
        try:
            core.materialize(value, oid)
            continue
        except TaskError as other:
            kind = other.cause_type_name or type(other).__name__
        except BaseException as other:
            kind = type(other).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
    count = sum(kinds.values())
    if not count:
        return
    listed = ", ".join(
        f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    note = f"{count} more of the {len(values)} refs failed: {listed}"
    try:
        # A list of its own: a stored error's copy may share its notes with the original.
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
    except Exception:
        pass  # an error without a __dict__ goes as it is


def _is_error(value: Any) -> bool:
    kind = value[0]
    if kind == "x":
        return True
    if kind == "v":
        return bool(value[1].is_error)
    return kind == "s" and bool(value[2] & 1)


def wait(
    refs: Sequence[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready; returns (ready, not ready)."""
    core = _auto_init()
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError(f"wait() expects a list of ObjectRefs, got {type(refs).__name__}")
    for i, r in enumerate(refs):
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait() expects ObjectRefs, but item {i} is a {type(r).__name__}")
    if len({r.binary() for r in refs}) != len(refs):
        raise ValueError("wait() got the same ObjectRef more than once")
    if (
        isinstance(num_returns, bool)
        or not isinstance(num_returns, int)
        or num_returns < 1
        and refs
    ):
        raise ValueError(f"num_returns must be an int >= 1, got {num_returns!r}")
    if num_returns > len(refs):
        raise ValueError(
            f"num_returns ({num_returns}) is more than the number of refs ({len(refs)})"
        )
    _check_timeout(timeout)
    if not refs:
        return [], []
    values = core.wait_values([r.binary() for r in refs], num_returns, timeout)
    ready: list[ObjectRef] = []
    not_ready: list[ObjectRef] = []
    for r in refs:
        if r.binary() in values and len(ready) < num_returns:
            ready.append(r)
        else:
            not_ready.append(r)
    return ready, not_ready


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref``: unqueue it, interrupt it, or (force) kill it."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() expects an ObjectRef, got {type(ref).__name__}")
    core = _auto_init()
    core.post(core.tasks.cancel, ref.task_id(), bool(force), bool(recursive))


# -- actors ----------------------------------------------------------------------------
def kill(actor: Any, *, no_restart: bool = True) -> None:
    """End an actor now; its pending and later calls fail with ActorDiedError.

    With ``no_restart=False`` its worker is stopped as if it had crashed: an actor with
    restarts left (``max_restarts``) is restarted, and its calls behave as after a crash.
    """
    from ._actor import ActorHandle

    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() expects an ActorHandle, got {type(actor).__name__}")
    core = _auto_init()
    if no_restart:
        core.post(core.actors.mark_killed, actor._actor_id)
    core.send_head(Message(M.KILL_ACTOR, {"aid": actor._actor_id, "no_restart": bool(no_restart)}))


def get_actor(name: str, namespace: str | None = None) -> Any:
    """The handle of the live actor called ``name`` (ValueError when there is none)."""
    from ._actor import ActorHandle

    if not isinstance(name, str) or not name:
        raise ValueError("get_actor() needs a non-empty actor name")
    core = _auto_init()
    ns = core.namespace if namespace is None else namespace
    reply = core.request(Message(M.GET_ACTOR, {"name": name, "ns": ns}))
    info = reply.body.get("info")
    if info is None:
        raise ValueError(f"no live actor named {name!r} in namespace {ns!r}")
    return ActorHandle(info["aid"], {"cls": info["cls"], "name": name, **info["meta"]}, owned=False)


# -- the cluster -----------------------------------------------------------------------
def nodes() -> list[dict[str, Any]]:
    core = _auto_init()
    reply = core.request(Message(M.CLUSTER_INFO, {}))
    return list(reply.body["nodes"])


def cluster_resources() -> dict[str, float]:
    return _sum_resources("Resources")


def available_resources() -> dict[str, float]:
    return _sum_resources("Available")


def _sum_resources(field: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes():
        if node.get("Alive"):
            for name, amount in node[field].items():
                total[name] = total.get(name, 0.0) + amount
    return {k: v for k, v in total.items() if v > 0 or field == "Resources"}


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(_auto_init())
