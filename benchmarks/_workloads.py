"""One benchmark workload, run for one system, in a fresh process.

Usage::

    python benchmarks/_workloads.py --system shoal|ray|none --bench NAME --duration SECONDS
    python benchmarks/_workloads.py --zmq-chunk-server PORT plain|hmac|aes   (internal helper)

Prints exactly one line starting with ``BENCH_RESULT `` followed by a JSON
object: ``{"bench": ..., "system": ..., "value": <float>, "unit": ..., ...}``
on success or ``{"bench": ..., "system": ..., "error": "<reason>"}`` on
failure. Everything else on stdout/stderr is noise (Ray forwards worker logs to
the driver's stdout), so the runner only looks at that line.

The workloads are the same code for both systems: the system under test is
imported as ``ray`` (``import shoal as ray`` or ``import ray``) and the module
global ``ray`` is what every workload, remote function and actor refers to.
Shapes follow Ray's own ``ray microbenchmark`` (``ray/_private/ray_perf.py``),
scaled to a 2-CPU local cluster: wherever Ray uses "n CPUs worth" of clients or
servers, this uses ``N_CLIENTS`` (2).

This module is also imported by ``run.py`` for the benchmark registry
(``BENCHMARKS``); importing it does not import either system.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

NUM_CPUS = 2
# Ray's ray_perf uses multiprocessing.cpu_count() // 2 actors for the 1:n and n:n
# shapes (and 4 clients for "multi client"); on a 2-CPU cluster that would be a
# single server, so every "n" here is 2.
N_CLIENTS = 2
TRIALS = 3
RESULT_PREFIX = "BENCH_RESULT "
COLD_START_PREFIX = "COLD_START_T "
COLD_START_RUNS = 3
# Marker put in the environment of every process the runner starts; inherited by
# the whole process tree of a workload (including Ray's raylet/gcs/workers),
# so the runner (and the memory workload) can find every one of them.
TAG_ENV = "SHOAL_BENCH_TAG"

ray = None  # the system under test, set by _import_system()


class WorkloadError(RuntimeError):
    """A failure whose message is already self-explanatory."""


@dataclass(frozen=True)
class Bench:
    name: str
    unit: str
    higher_is_better: bool = True
    systems: tuple[str, ...] = ("shoal", "ray")
    # For references (systems == ("none",)): what the "Reference: ..." line says.
    description: str = ""
    # In the default full run; if not, only run when `--only` names it.
    default: bool = True


# Names of Ray's workloads are exactly those printed by `ray microbenchmark`.
BENCHMARKS: list[Bench] = [
    Bench("single client get calls (Plasma Store)", "calls/s"),
    Bench("single client put calls (Plasma Store)", "calls/s"),
    Bench("single client put gigabytes", "GB/s"),
    Bench("multi client put gigabytes", "GB/s"),
    Bench("single client get object containing 10k refs", "calls/s"),
    Bench("single client wait 1k refs", "calls/s"),
    Bench("single client tasks sync", "tasks/s"),
    Bench("single client tasks async", "tasks/s"),
    Bench("multi client tasks async", "tasks/s"),
    Bench("1:1 actor calls sync", "calls/s"),
    Bench("1:1 actor calls async", "calls/s"),
    Bench("1:1 actor calls concurrent", "calls/s"),
    Bench("1:n actor calls async", "calls/s"),
    Bench("n:n actor calls async", "calls/s"),
    Bench("1:1 async-actor calls async", "calls/s"),
    Bench("cold start", "s", higher_is_better=False),
    Bench("idle cluster memory", "GB", higher_is_better=False),
    Bench("object transfer between two nodes", "GB/s"),
    # Client-server mode (not in the default run: `--only client-server`): the driver is
    # outside the cluster and talks to it over one connection to the head; Ray's column
    # is Ray Client (ray://). See client_server() below.
    Bench("client-server tasks sync", "tasks/s", default=False),
    Bench("client-server get calls", "calls/s", default=False),
    Bench("client-server 1:1 actor calls sync", "calls/s", default=False),
    Bench("client-server put gigabytes", "GB/s", default=False),
    Bench("client-server get gigabytes", "GB/s", default=False),
]
CLIENT_PREFIX = "client-server "
# References: no system under test, printed as "Reference: ..." lines under the table.
MEMCPY = Bench(
    "memcpy bandwidth",
    "GB/s",
    systems=("none",),
    description="machine memcpy bandwidth (numpy copy of a 1 GB array)",
)
ZMQ_RAW = Bench(
    "raw zmq transfer (tcp loopback)",
    "GB/s",
    systems=("none",),
    description="raw pyzmq stream between two processes over tcp loopback "
    "(512 MiB in 8 MiB messages, 4 in flight)",
)
ZMQ_HMAC = Bench(
    "raw zmq transfer + HMAC-SHA256",
    "GB/s",
    systems=("none",),
    description="the same stream with HMAC-SHA256 of every chunk (signed by the sender, "
    "verified by the receiver)",
)
ZMQ_AES = Bench(
    "raw zmq transfer + AES-256-GCM",
    "GB/s",
    systems=("none",),
    description="the same stream sealed with AES-256-GCM, as Shoal's tcp links are (the "
    "sender encrypts each chunk into a buffer it reuses, the receiver decrypts into one)",
)
REFERENCES: list[Bench] = [MEMCPY, ZMQ_RAW, ZMQ_HMAC, ZMQ_AES]
ALL_BENCHES = {b.name: b for b in [*BENCHMARKS, *REFERENCES]}

# Object transfer between two nodes (and its raw zmq references).
TRANSFER_BYTES = 512 << 20  # one object: a 64 Mi x int64 numpy array
TRANSFER_CHUNK = 8 << 20  # shoal._transfer.CHUNK_SIZE
TRANSFER_WINDOW = 4  # shoal._transfer.WINDOW: chunks in flight per pull
TRANSFER_STORE = 2 << 30  # object store of each node (bytes)
TRANSFER_STRIDE = (1 << 20) // 8  # the reader checks one int64 per MiB
RAW_TRIALS = 5  # timed pulls of the raw zmq references

# Client-server mode.
CLIENT_STORE = 2 << 30  # object store of the cluster (bytes), both systems
CLIENT_OBJECT = 256 << 20  # put/get gigabytes: one 32 Mi x int64 numpy array
CLIENT_MIN_ROUNDS = 2  # put/get gigabytes: rounds (best reported), at least this many,
CLIENT_MAX_ROUNDS = 5  # at most this many,
CLIENT_ROUNDS_BUDGET = 8.0  # and no new round once the rounds took this many seconds


# --------------------------------------------------------------------------
# helpers


def timeit(fn, multiplier: float, duration: float) -> dict:
    """Ray's microbenchmark loop: warm up ~1 s, then TRIALS timed trials of
    `duration` seconds each, calling `fn` in steps of ~1/10 of the warm-up
    count. Returns the mean rate (multiplier * calls / second)."""
    warmup = min(1.0, duration)
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < warmup:
        fn()
        count += 1
    step = count // 10 + 1
    stats = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < duration:
            for _ in range(step):
                fn()
            count += step
        end = time.perf_counter()
        stats.append(multiplier * count / (end - start))
    return {
        "value": statistics.fmean(stats),
        "sd": statistics.pstdev(stats),
        "trials": stats,
    }


def _import_system(system: str):
    global ray
    ray = importlib.import_module("shoal" if system == "shoal" else "ray")
    return ray


def _init_kwargs(system: str) -> dict:
    if system == "ray":
        # log_to_driver left at its default (True), like a user's ray.init().
        return {"num_cpus": NUM_CPUS, "include_dashboard": False}
    return {"num_cpus": NUM_CPUS}


def _describe(p) -> str:
    """Process name, or the script/module for Python interpreters."""
    name = p.name()
    if name.startswith("python"):
        args = p.cmdline()[1:]
        for i, a in enumerate(args):
            if a == "-m" and i + 1 < len(args):
                return f"python -m {args[i + 1]}"
            if not a.startswith("-"):
                return f"python {os.path.basename(a)}"
    return name


def _tagged_processes(tag: str):
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG_ENV) == tag:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


# --------------------------------------------------------------------------
# workloads that need a running cluster (system imported as `ray`)


def cluster_workloads(duration: float) -> dict:
    """Defines the remote functions/actors (with the system under test as
    `ray`) and returns {bench name: zero-arg callable returning a result}."""
    import numpy as np

    @ray.remote(num_cpus=0)
    class Actor:
        def small_value(self):
            return b"ok"

        def small_value_arg(self, x):
            return b"ok"

        def small_value_batch(self, n):
            ray.get([small_value.remote() for _ in range(n)])

    @ray.remote
    class AsyncActor:
        async def small_value(self):
            return b"ok"

    @ray.remote(num_cpus=0)
    class Client:
        def __init__(self, servers):
            if not isinstance(servers, list):
                servers = [servers]
            self.servers = servers

        def small_value_batch(self, n):
            results = []
            for s in self.servers:
                results.extend([s.small_value.remote() for _ in range(n)])
            ray.get(results)

    @ray.remote
    def small_value():
        return b"ok"

    @ray.remote
    def create_object_containing_ref():
        return [ray.put(1) for _ in range(10000)]

    def get_calls():
        value = ray.put(0)
        return timeit(lambda: ray.get(value), 1, duration)

    def put_calls():
        return timeit(lambda: ray.put(0), 1, duration)

    def put_gigabytes():
        arr = np.zeros(100 * 1024 * 1024, dtype=np.int64)  # 839 MB

        def put_large():
            ray.put(arr)

        return timeit(put_large, arr.nbytes / 1e9, duration)

    def multi_put_gigabytes():
        @ray.remote
        def do_put():
            for _ in range(10):
                ray.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))  # 84 MB

        def put_multi():
            ray.get([do_put.remote() for _ in range(10)])

        return timeit(put_multi, 10 * 10 * 10 * 1024 * 1024 * 8 / 1e9, duration)

    def get_containing_10k_refs():
        obj = create_object_containing_ref.remote()
        ray.get(obj)
        return timeit(lambda: ray.get(obj), 1, duration)

    def wait_1k_refs():
        def wait_multiple_refs():
            not_ready = [small_value.remote() for _ in range(1000)]
            for _ in range(1000):
                _ready, not_ready = ray.wait(not_ready, num_returns=1)

        return timeit(wait_multiple_refs, 1, duration)

    def tasks_sync():
        return timeit(lambda: ray.get(small_value.remote()), 1, duration)

    def tasks_async():
        def small_task_async():
            ray.get([small_value.remote() for _ in range(1000)])

        return timeit(small_task_async, 1000, duration)

    def multi_client_tasks_async():
        n = 2500  # Ray: 4 client actors x 10000 tasks; scaled to ~3 s per call here
        actors = [Actor.remote() for _ in range(N_CLIENTS)]

        def multi_task():
            ray.get([a.small_value_batch.remote(n) for a in actors])

        return timeit(multi_task, n * len(actors), duration)

    def actor_sync():
        a = Actor.remote()
        return timeit(lambda: ray.get(a.small_value.remote()), 1, duration)

    def actor_async():
        a = Actor.remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])

        return timeit(fn, 1000, duration)

    def actor_concurrent():
        a = Actor.options(max_concurrency=16).remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])

        return timeit(fn, 1000, duration)

    def actor_1_n_async():
        n = 5000
        actors = [Actor.remote() for _ in range(N_CLIENTS)]
        client = Client.remote(actors)

        def fn():
            ray.get(client.small_value_batch.remote(n))

        return timeit(fn, n * len(actors), duration)

    def actor_n_n_async():
        n = 2500  # Ray: 4 tasks x 5000 calls; scaled to ~3 s per call here
        m = 4
        actors = [Actor.remote() for _ in range(N_CLIENTS)]

        @ray.remote
        def work(actors):
            k = len(actors)
            ray.get([actors[i % k].small_value.remote() for i in range(n)])

        def fn():
            ray.get([work.remote(actors) for _ in range(m)])

        return timeit(fn, m * n, duration)

    def async_actor_async():
        a = AsyncActor.remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])

        return timeit(fn, 1000, duration)

    def idle_memory():
        import psutil

        ray.get(small_value.remote())
        time.sleep(3)  # let the cluster settle (prestarted workers etc.)
        me = psutil.Process()
        procs = {p.pid: p for p in me.children(recursive=True)}
        tag = os.environ.get(TAG_ENV)
        if tag:  # anything of ours that got re-parented (daemonized)
            for p in _tagged_processes(tag):
                if p.pid != me.pid and p.create_time() >= me.create_time() - 1:
                    procs.setdefault(p.pid, p)
        rss = pss = 0
        names = []
        for p in procs.values():
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                names.append(_describe(p))
            except psutil.Error:
                pass
        return {
            "value": rss / 1e9,
            "procs": len(names),
            "pss_gb": pss / 1e9,
            "process_names": sorted(names),
        }

    return {
        "single client get calls (Plasma Store)": get_calls,
        "single client put calls (Plasma Store)": put_calls,
        "single client put gigabytes": put_gigabytes,
        "multi client put gigabytes": multi_put_gigabytes,
        "single client get object containing 10k refs": get_containing_10k_refs,
        "single client wait 1k refs": wait_1k_refs,
        "single client tasks sync": tasks_sync,
        "single client tasks async": tasks_async,
        "multi client tasks async": multi_client_tasks_async,
        "1:1 actor calls sync": actor_sync,
        "1:1 actor calls async": actor_async,
        "1:1 actor calls concurrent": actor_concurrent,
        "1:n actor calls async": actor_1_n_async,
        "n:n actor calls async": actor_n_n_async,
        "1:1 async-actor calls async": async_actor_async,
        "idle cluster memory": idle_memory,
    }


# --------------------------------------------------------------------------
# workloads that manage their own processes


_COLD_START_CHILD = """
import time
import {module} as ray
ray.init(**{init_kwargs!r})

@ray.remote
def f():
    return 1

assert ray.get(f.remote()) == 1
print({prefix!r} + repr(time.monotonic()), flush=True)
ray.shutdown()
"""


def cold_start(system: str, timeout: float) -> dict:
    """Wall time from spawning a fresh interpreter to the first task result
    (import + init + one task; shutdown excluded). Median of 3 fresh runs.
    CLOCK_MONOTONIC is system-wide on Linux, so the child's timestamp is
    comparable with ours."""
    code = _COLD_START_CHILD.format(
        module="shoal" if system == "shoal" else "ray",
        init_kwargs=_init_kwargs(system),
        prefix=COLD_START_PREFIX,
    )
    times = []
    for _ in range(COLD_START_RUNS):
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise WorkloadError(f"cold start child timed out after {timeout:.0f}s") from None
        stamps = [
            line[len(COLD_START_PREFIX) :]
            for line in out.splitlines()
            if line.startswith(COLD_START_PREFIX)
        ]
        if not stamps:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise WorkloadError(f"cold start child rc={proc.returncode}: {last}")
        times.append(float(stamps[-1]) - t0)
    return {"value": statistics.median(times), "trials": times}


def memcpy_bandwidth(duration: float) -> dict:
    import numpy as np

    src = np.ones(125_000_000, dtype=np.int64)  # 1 GB
    dst = np.empty_like(src)
    dst.fill(0)  # fault the pages in before timing
    return timeit(lambda: np.copyto(dst, src), src.nbytes / 1e9, duration)


# --------------------------------------------------------------------------
# object transfer between two nodes on this machine


def _transfer_trials(deadline: float) -> dict:
    """With ``ray`` connected to a cluster of two nodes (one with the custom resource
    "node_b", the driver's node without it): puts a fresh TRANSFER_BYTES object on the
    driver's node and times a task pinned to node B that reads it, minus the same task
    on the same object once it is on node B. One warm-up round, then TRIALS rounds.

    The ref goes to the task inside a list, and the task calls ``get`` itself: a
    top-level ref argument is resolved by the caller, and Shoal's caller hands a worker
    the object's shared-memory path, which on a single machine the worker on node B can
    open directly, so no transfer would happen at all."""
    import numpy as np

    node_b = [n["NodeID"] for n in ray.nodes() if n.get("Resources", {}).get("node_b")]
    if len(node_b) != 1:
        raise WorkloadError(f"expected one node with resource node_b, found {len(node_b)}")

    @ray.remote(num_cpus=0, resources={"node_b": 1})
    def read(refs):
        x = ray.get(refs[0])
        return x.nbytes, int(x[::TRANSFER_STRIDE].sum()), ray.get_runtime_context().get_node_id()

    arr = np.arange(TRANSFER_BYTES // 8, dtype=np.int64)
    expected = (arr.nbytes, int(arr[::TRANSFER_STRIDE].sum()))

    def timed_read(ref) -> float:
        left = deadline - time.monotonic()
        if left <= 1:
            raise WorkloadError("object transfer: out of time")
        t0 = time.perf_counter()
        nbytes, check, node = ray.get(read.remote([ref]), timeout=left)
        elapsed = time.perf_counter() - t0
        if (nbytes, check) != expected:
            raise WorkloadError("object transfer: node B read different data")
        if node != node_b[0]:
            raise WorkloadError(f"object transfer: the reader ran on node {node}, not node B")
        return elapsed

    rates, fresh_s, baseline_s, put_s = [], [], [], []
    for i in range(1 + TRIALS):  # round 0 warms up: worker start, node connections
        t0 = time.perf_counter()
        ref = ray.put(arr)
        put = time.perf_counter() - t0
        fresh = timed_read(ref)  # pulls the object to node B
        baseline = min(timed_read(ref) for _ in range(2))  # already on node B
        del ref
        if i == 0:
            continue
        rates.append(arr.nbytes / 1e9 / max(fresh - baseline, 1e-9))
        fresh_s.append(fresh)
        baseline_s.append(baseline)
        put_s.append(put)
    return {
        "value": statistics.fmean(rates),
        "sd": statistics.pstdev(rates),
        "trials": rates,
        "fresh_s": fresh_s,
        "baseline_s": baseline_s,
        "put_s": put_s,
        "object_bytes": arr.nbytes,
    }


def _shoal_cli(args: list[str], tmpdir: str, log_path: str, timeout: float) -> str:
    """Runs ``shoal ARGS`` with SHOAL_TMPDIR=tmpdir; returns its stdout. Output goes to
    files, not pipes: `shoal start` leaves daemons behind that would inherit a pipe."""
    env = dict(os.environ, SHOAL_TMPDIR=tmpdir)
    with open(log_path, "w+b") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "shoal", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        last = (text.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise WorkloadError(f"`shoal {args[0]}` failed: {last}")
    return text


def _cleanup_shoal_dir(tmpdir: str) -> None:
    """Kill any head still running from a session under ``tmpdir`` (by pid, and only if
    that pid's command line names the session) and remove its shared-memory segments."""
    import glob

    for info_path in glob.glob(os.path.join(tmpdir, "session_2*", "head.json")):
        session = os.path.dirname(info_path)
        try:
            with open(info_path) as f:
                info = json.load(f)
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = session.encode() in f.read()
        except OSError:
            ours = False
        if ours:
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"killed a head left in {session}: pid {pid}", file=sys.stderr)
            except OSError:
                pass
        tag = str(info.get("tag") or "")
        if tag:
            for seg in glob.glob(f"/dev/shm/shoal-{glob.escape(tag)}-*"):
                try:
                    os.unlink(seg)
                except OSError:
                    pass


def _stop_shoal_dir(tmpdir: str, log_path: str) -> None:
    """`shoal stop` for the clusters under ``tmpdir`` only (never anyone else's), then
    whatever it left (see _cleanup_shoal_dir)."""
    try:
        _shoal_cli(["stop", "--timeout", "5"], tmpdir, log_path, 12)
    except (WorkloadError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"shoal stop in {tmpdir}: {exc}", file=sys.stderr)
    _cleanup_shoal_dir(tmpdir)


def _transfer_root_prefix(tag: str) -> str:
    # Short: a worker's ipc socket is <root>/b/session_<date>_<time>_<pid>_<tag>/w-<id>.sock,
    # and a unix socket path has at most 107 bytes (a longer one makes every worker of
    # the node fail at start, and the node restarts them forever).
    return os.path.join(tempfile.gettempdir(), f"sbx-{tag[:8]}-")


def cleanup_transfer_leftovers(tag: str) -> int:
    """For the runner, after it killed a run's processes: remove what a transfer or
    client-server workload killed mid-way left behind (shared-memory segments, its temporary directory).
    Returns how many directories it removed."""
    import glob

    roots = glob.glob(glob.escape(_transfer_root_prefix(tag)) + "*")
    for root in roots:
        for sub in ("b", "a"):
            _cleanup_shoal_dir(os.path.join(root, sub))
        shutil.rmtree(root, ignore_errors=True)
    return len(roots)


def transfer_shoal(timeout: float) -> dict:
    """A head and a node started with the CLI (own SHOAL_TMPDIR each, so they behave
    as two machines) joined over tcp loopback; the driver connects to the head."""
    # Leave time to stop both nodes before the runner's own timeout kills us.
    deadline = time.monotonic() + max(10.0, timeout - 30)
    prefix = _transfer_root_prefix(os.environ.get(TAG_ENV) or "manual")
    root = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    head_dir, node_dir = os.path.join(root, "a"), os.path.join(root, "b")
    longest = len(f"{node_dir}/session_20261122_144339_4194304_01234567/w-0123456789abcdef.sock")
    if longest > 107:
        shutil.rmtree(root, ignore_errors=True)
        raise WorkloadError(f"temporary directory {root} is too long for unix socket paths")
    key = os.path.join(root, "cluster.key")
    common = ["--num-cpus", "1", "--object-store-memory", str(TRANSFER_STORE)]
    started: list[str] = []
    connected = False
    try:
        started.append(head_dir)
        out = _shoal_cli(
            ["start", "--head", "--bind", "127.0.0.1", "--key-file", key, *common,
             "--resources", json.dumps({"node_a": 1})],
            head_dir, os.path.join(root, "head-start.log"), 60,
        )  # fmt: skip
        match = re.search(r"address:\s+(\S+)", out)
        if match is None:
            raise WorkloadError("`shoal start --head` printed no address")
        started.append(node_dir)
        _shoal_cli(
            ["start", "--address", match.group(1), "--key-file", key, *common,
             "--resources", json.dumps({"node_b": 1})],
            node_dir, os.path.join(root, "node-start.log"), 60,
        )  # fmt: skip
        os.environ["SHOAL_TMPDIR"] = head_dir  # the driver joins the head's session
        _import_system("shoal")
        ray.init(address="auto")
        connected = True
        for _ in range(100):  # the node has joined once the head lists it
            if len(ray.nodes()) >= 2:
                break
            time.sleep(0.1)
        result = _transfer_trials(deadline)
        result["address"] = match.group(1)
        return result
    except BaseException:
        keep = os.environ.get("SHOAL_BENCH_KEEP_LOGS")
        if keep:  # the nodes' logs, for debugging a failed run
            dest = os.path.join(keep, os.path.basename(root))
            shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.sock"), symlinks=True)
            print(f"logs of the failed run kept in {dest}", file=sys.stderr)
        raise
    finally:
        if connected:
            ray.shutdown()
        for d in reversed(started):
            _stop_shoal_dir(d, os.path.join(root, f"stop-{os.path.basename(d)}.log"))
        shutil.rmtree(root, ignore_errors=True)


def transfer_ray(timeout: float) -> dict:
    """Two Ray nodes on this machine with ray.cluster_utils.Cluster: the same processes
    as `ray start --head` plus `ray start --address` (a second raylet and object store
    joined to the head's GCS), stopped by pid; `ray stop` would kill every Ray process
    on the machine."""
    from ray.cluster_utils import Cluster

    deadline = time.monotonic() + max(10.0, timeout - 30)
    cluster = None
    connected = False
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "resources": {"node_a": 1},
                "object_store_memory": TRANSFER_STORE,
                "include_dashboard": False,
            },
        )
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=TRANSFER_STORE)
        _import_system("ray")
        ray.init(address=cluster.address)
        connected = True
        cluster.wait_for_nodes(timeout=60)
        return _transfer_trials(deadline)
    finally:
        if connected:
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


# --------------------------------------------------------------------------
# client-server mode: a driver outside the cluster, over one connection to the head


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
                tail = (f.read().strip().splitlines() or ["no output"])[-1]
            state = "exited" if proc.poll() is not None else "did not listen in time"
            raise WorkloadError(f"Ray Client server {state}: {tail}")
        time.sleep(0.1)


def _client_trials(bench: str, duration: float) -> dict:
    """The client-server workloads, with ``ray`` connected as an outside client."""
    import numpy as np

    n = CLIENT_OBJECT // 8
    stride = (1 << 20) // 8  # one int64 per MiB is checked

    @ray.remote
    def small_value():
        return b"ok"

    @ray.remote(num_cpus=0)
    class Actor:
        def small_value(self):
            return b"ok"

    @ray.remote
    def make_array(i):
        return np.arange(n, dtype=np.int64) + i

    @ray.remote
    def checksum(x):
        return x.nbytes, int(x[::stride].sum())

    def expected(i: int) -> tuple[int, int]:
        return CLIENT_OBJECT, int(np.arange(0, n, stride, dtype=np.int64).sum()) + i * (
            (n + stride - 1) // stride
        )

    def rounds(one_round) -> dict:
        """Best of a few rounds (each timing one transfer of CLIENT_OBJECT bytes)."""
        times: list[float] = []
        start = time.monotonic()
        while len(times) < CLIENT_MAX_ROUNDS and (
            len(times) < CLIENT_MIN_ROUNDS or time.monotonic() - start < CLIENT_ROUNDS_BUDGET
        ):
            times.append(one_round(len(times)))
        rates = [CLIENT_OBJECT / 1e9 / t for t in times]
        return {
            "value": max(rates),
            "mean": statistics.fmean(rates),
            "trials": rates,
            "object_bytes": CLIENT_OBJECT,
        }

    if bench == "client-server tasks sync":
        ray.get(small_value.remote())
        return timeit(lambda: ray.get(small_value.remote()), 1, duration)
    if bench == "client-server get calls":
        value = ray.put(0)
        return timeit(lambda: ray.get(value), 1, duration)
    if bench == "client-server 1:1 actor calls sync":
        a = Actor.remote()
        ray.get(a.small_value.remote())
        return timeit(lambda: ray.get(a.small_value.remote()), 1, duration)
    if bench == "client-server put gigabytes":
        ray.get(checksum.remote(np.zeros(1, dtype=np.int64)))  # start a worker

        def put_round(i: int) -> float:
            arr = np.arange(n, dtype=np.int64) + i
            t0 = time.perf_counter()
            ref = ray.put(arr)
            elapsed = time.perf_counter() - t0
            if ray.get(checksum.remote(ref)) != expected(i):  # the cluster has the data
                raise WorkloadError("client put: the cluster read different data")
            del ref
            return elapsed

        return rounds(put_round)
    if bench == "client-server get gigabytes":

        def get_round(i: int) -> float:
            ref = make_array.remote(i)  # a fresh object in the cluster's store
            ray.wait([ref], timeout=60)
            t0 = time.perf_counter()
            x = ray.get(ref)
            elapsed = time.perf_counter() - t0
            if (x.nbytes, int(x[::stride].sum())) != expected(i):
                raise WorkloadError("client get: got different data")
            del x, ref
            return elapsed

        return rounds(get_round)
    raise WorkloadError(f"unknown client-server workload {bench!r}")


def _out_of_time(signum, frame):
    raise WorkloadError("client-server: out of time")


def client_server(system: str, bench: str, duration: float, timeout: float) -> dict:
    """One client-server workload: start a cluster, connect to it as an outside client,
    run, and stop everything in a ``finally``. A SIGALRM (at the runner's ``--timeout``
    minus 30 s) makes a stuck run end there too, leaving time to stop the cluster."""
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(10, int(timeout - 30)))
    try:
        if system == "shoal":
            return _client_shoal(bench, duration)
        return _client_ray(bench, duration)
    finally:
        signal.alarm(0)


def _client_shoal(bench: str, duration: float) -> dict:
    """A head started with the CLI (its own SHOAL_TMPDIR); the driver runs with another,
    empty SHOAL_TMPDIR, so it cannot find the head's session on this machine and connects
    as an outside client: shoal.init("tcp://HOST:PORT", key_file=K)."""
    prefix = _transfer_root_prefix(os.environ.get(TAG_ENV) or "manual")
    root = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    head_dir, client_dir = os.path.join(root, "a"), os.path.join(root, "c")
    os.makedirs(client_dir)
    key = os.path.join(root, "cluster.key")
    connected = False
    try:
        out = _shoal_cli(
            ["start", "--head", "--port", "0", "--bind", "127.0.0.1", "--key-file", key,
             "--num-cpus", str(NUM_CPUS), "--object-store-memory", str(CLIENT_STORE)],
            head_dir, os.path.join(root, "head-start.log"), 60,
        )  # fmt: skip
        match = re.search(r"address:\s+(\S+)", out)
        if match is None:
            raise WorkloadError("`shoal start --head` printed no address")
        os.environ["SHOAL_TMPDIR"] = client_dir  # not the head's: an outside client
        _import_system("shoal")
        ray.init(f"tcp://{match.group(1)}", key_file=key)
        connected = True
        result = _client_trials(bench, duration)
        result["address"] = match.group(1)
        return result
    finally:
        if connected:
            ray.shutdown()
        _stop_shoal_dir(head_dir, os.path.join(root, "stop.log"))
        shutil.rmtree(root, ignore_errors=True)


def _client_ray(bench: str, duration: float) -> dict:
    """A Ray head (ray.cluster_utils.Cluster: the processes of `ray start --head`, stopped
    by pid; `ray stop` would kill every Ray process on the machine) and a Ray Client
    server process in front of it (``python -m ray.util.client.server --mode=legacy``:
    a driver of the cluster serving Ray Client connections on a tcp port); the workload
    connects with ray.init("ray://127.0.0.1:PORT").

    Not `ray start --ray-client-server-port` (proxy mode): its proxy forks a server per
    client while gRPC threads run, and on this machine about half of the connections
    failed after 30 s with a server that never started. The legacy server is the same
    server without the proxy in front: one gRPC hop less per call."""
    import psutil
    from ray.cluster_utils import Cluster

    prefix = _transfer_root_prefix(os.environ.get(TAG_ENV) or "manual")
    log_dir = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    log_path = os.path.join(log_dir, "ray_client_server.log")
    cluster = server = None
    connected = False
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": NUM_CPUS,
                "object_store_memory": CLIENT_STORE,
                "include_dashboard": False,
            },
        )
        port = _free_port()
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "ray.util.client.server", f"--address={cluster.address}",
                 "--host=127.0.0.1", f"--port={port}", "--mode=legacy"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_port(port, server, log_path, 60)
        _import_system("ray")
        ray.init(f"ray://127.0.0.1:{port}")
        connected = True
        return _client_trials(bench, duration)
    finally:
        left = psutil.Process().children(recursive=True)  # everything we started
        if connected:
            ray.shutdown()
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if cluster is not None:
            cluster.shutdown()
        for p in left:  # anything the above did not stop, by pid
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    print(f"killing a leftover Ray process {p.pid}", file=sys.stderr)
                    p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        shutil.rmtree(log_dir, ignore_errors=True)


def _aes():  # an AESGCM (imported here: the runner itself does not need it)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(b"k" * 32)


def _zmq_chunk_server(port: int, mode: str) -> None:
    """The sending end of the raw zmq stream: a ROUTER that answers each request with one
    TRANSFER_CHUNK message (zero-copy from one buffer), preceded by its HMAC-SHA256 in
    "hmac" mode, sealed with AES-256-GCM in "aes" mode (a counter as the nonce). Exits on
    b"stop", when its parent dies, or after 5 idle minutes."""
    import hashlib
    import hmac

    import zmq

    parent = os.getppid()
    data = os.urandom(TRANSFER_CHUNK)
    keyed = hmac.new(b"k" * 32, digestmod=hashlib.sha256)
    sealer, sealed, counter = _aes(), [bytearray(TRANSFER_CHUNK + 16) for _ in range(8)], 0
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < 300 and os.getppid() == parent:
            if not sock.poll(1000):
                continue
            idle_since = time.monotonic()
            ident, request = sock.recv_multipart()
            if request == b"stop":
                break
            if mode == "hmac":
                h = keyed.copy()
                h.update(data)
                sock.send_multipart([ident, h.digest(), data], copy=False)
            elif mode == "aes":
                counter += 1
                # At most TRANSFER_WINDOW chunks are unsent: a buffer is free when it comes round.
                out = sealed[counter % len(sealed)]
                sealer.encrypt_into(counter.to_bytes(12, "little"), data, b"", out)
                sock.send_multipart([ident, counter.to_bytes(12, "little"), out], copy=False)
            else:
                sock.send_multipart([ident, data], copy=False)
    finally:
        sock.close(0)
        ctx.term()


def raw_zmq_transfer(mode: str, timeout: float) -> dict:
    """Pulls TRANSFER_BYTES from a server process in TRANSFER_CHUNK messages with
    TRANSFER_WINDOW requests in flight (the shape of Shoal's pull), over tcp loopback;
    in "hmac" mode the receiver verifies each chunk's HMAC-SHA256, in "aes" mode it
    decrypts (and so verifies) each AES-256-GCM sealed chunk. One warm-up pull,
    then RAW_TRIALS timed pulls (each well under a second, so more than TRIALS)."""
    import hashlib
    import hmac

    import zmq

    deadline = time.monotonic() + max(10.0, timeout - 10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--zmq-chunk-server", str(port), mode],
        stdin=subprocess.DEVNULL,
    )
    keyed = hmac.new(b"k" * 32, digestmod=hashlib.sha256)
    opener = _aes() if mode == "aes" else None
    plain = bytearray(TRANSFER_CHUNK)
    n = TRANSFER_BYTES // TRANSFER_CHUNK

    def pull() -> float:
        t0 = time.perf_counter()
        sent = received = 0
        while sent < min(TRANSFER_WINDOW, n):
            sock.send(b"r")
            sent += 1
        while received < n:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise WorkloadError("raw zmq transfer: out of time")
            frames = sock.recv_multipart(copy=False)
            if mode == "hmac":
                h = keyed.copy()
                h.update(frames[1].buffer)
                if not hmac.compare_digest(h.digest(), frames[0].bytes):
                    raise WorkloadError("raw zmq transfer: bad signature")
            elif opener is not None:
                opener.decrypt_into(frames[0].bytes, frames[1].buffer, b"", plain)
            if frames[-1].buffer.nbytes != TRANSFER_CHUNK + (16 if opener else 0):
                raise WorkloadError("raw zmq transfer: short chunk")
            received += 1
            if sent < n:
                sock.send(b"r")
                sent += 1
        return time.perf_counter() - t0

    try:
        pull()  # warm-up (and waits for the server to connect)
        rates = [TRANSFER_BYTES / 1e9 / pull() for _ in range(RAW_TRIALS)]
        return {"value": statistics.fmean(rates), "sd": statistics.pstdev(rates), "trials": rates}
    finally:
        try:
            sock.send(b"stop", zmq.NOBLOCK)
            server.wait(5)
        except (zmq.ZMQError, subprocess.TimeoutExpired):
            server.kill()
            server.wait()
        sock.close(0)
        ctx.term()


# --------------------------------------------------------------------------


def run(system: str, bench: str, duration: float, timeout: float) -> dict:
    if bench == MEMCPY.name:
        return memcpy_bandwidth(duration)
    if bench == ZMQ_RAW.name:
        return raw_zmq_transfer("plain", timeout)
    if bench == ZMQ_HMAC.name:
        return raw_zmq_transfer("hmac", timeout)
    if bench == ZMQ_AES.name:
        return raw_zmq_transfer("aes", timeout)
    if bench == "object transfer between two nodes":
        return transfer_shoal(timeout) if system == "shoal" else transfer_ray(timeout)
    if bench == "cold start":
        return cold_start(system, timeout)
    if bench.startswith(CLIENT_PREFIX):
        return client_server(system, bench, duration, timeout)
    _import_system(system)
    ray.init(**_init_kwargs(system))
    try:
        return cluster_workloads(duration)[bench]()
    finally:
        ray.shutdown()


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if isinstance(exc, WorkloadError):
        return first[:200]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:200]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, choices=["shoal", "ray", "none"])
    parser.add_argument("--bench", required=True, choices=sorted(ALL_BENCHES))
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="per cold-start child; the whole budget of a transfer workload (seconds)",
    )
    args = parser.parse_args(argv)
    bench = ALL_BENCHES[args.bench]
    result = {"bench": bench.name, "system": args.system, "unit": bench.unit}
    t0 = time.monotonic()
    try:
        result.update(run(args.system, bench.name, args.duration, args.timeout))
        rc = 0
    except BaseException as exc:  # report any failure as a cell
        traceback.print_exc()
        result["error"] = _short(exc)
        rc = 1
    result["wall_s"] = time.monotonic() - t0
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return rc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zmq-chunk-server"]:
        _zmq_chunk_server(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    sys.exit(main())
