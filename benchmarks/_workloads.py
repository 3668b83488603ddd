"""One benchmark workload, run for one system, in a fresh process.

Usage::

    python benchmarks/_workloads.py --system shoal|ray|none --bench NAME --duration SECONDS

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
import statistics
import subprocess
import sys
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
]
MEMCPY = Bench("memcpy bandwidth", "GB/s", systems=("none",))
ALL_BENCHES = {b.name: b for b in [*BENCHMARKS, MEMCPY]}


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


def run(system: str, bench: str, duration: float, timeout: float) -> dict:
    if bench == MEMCPY.name:
        return memcpy_bandwidth(duration)
    if bench == "cold start":
        return cold_start(system, timeout)
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
        "--timeout", type=float, default=120.0, help="per cold-start child (seconds)"
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
    sys.exit(main())
