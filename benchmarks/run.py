#!/usr/bin/env python
"""Shoal vs Ray core microbenchmarks.

Runs every workload of ``_workloads.py`` once for Shoal and once for Ray, each
in its own fresh subprocess (its own local 2-CPU cluster), one at a time, and
prints a comparison table::

    python benchmarks/run.py [--only NAME_SUBSTRING] [--no-ray]
                             [--duration SECONDS] [--markdown FILE]

ratio > 1 always means Shoal is better (shoal/ray for rates, ray/shoal for
"lower is better" rows such as cold start and idle memory).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _workloads as wl  # noqa: E402  (registry only; imports neither system)

WORKLOADS = HERE / "_workloads.py"
_current: tuple[str, int] | None = None  # (tag, pgid) of the running workload
_tags: list[str] = []


# --------------------------------------------------------------------------
# process management


def _kill_tree(tag: str, pgid: int | None = None) -> int:
    """Kill every process of one workload run: those carrying its environment
    tag (inherited by the whole tree, also by anything that daemonized
    itself), those in its process group, and all their descendants (some of
    Ray's agents are started with a scrubbed environment). Everything is
    collected before anything is killed, so nothing gets re-parented away.
    Returns how many processes were killed."""
    try:
        import psutil
    except ImportError:
        if pgid is not None:
            _kill_group(pgid)
        return 0
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if p.pid == me:
                continue
            if (pgid is not None and os.getpgid(p.pid) == pgid) or p.environ().get(
                wl.TAG_ENV
            ) == tag:
                found[p.pid] = p
        except (psutil.Error, OSError):
            pass
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.pid != me:
                    found.setdefault(c.pid, c)
        except psutil.Error:
            pass
    for p in found.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(found.values()), timeout=5)
    return len(found)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _cleanup_all() -> None:
    cur = _current
    for tag in _tags:
        _kill_tree(tag, cur[1] if cur is not None and cur[0] == tag else None)
        wl.cleanup_transfer_leftovers(tag)


def run_one(system: str, bench: str, duration: float, timeout: float) -> dict:
    """Run one workload for one system in a fresh process group; always
    returns a result dict (with "error" on failure)."""
    global _current
    tag = uuid.uuid4().hex
    _tags.append(tag)
    env = dict(os.environ, **{wl.TAG_ENV: tag, "PYTHONUNBUFFERED": "1"})
    cmd = [
        sys.executable,
        str(WORKLOADS),
        "--system", system,
        "--bench", bench,
        "--duration", str(duration),
        "--timeout", str(timeout),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # own process group, killed as a whole
        cwd=str(HERE.parent),
    )
    _current = (tag, proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(tag, proc.pid)
        proc.communicate()
        wl.cleanup_transfer_leftovers(tag)
        return {"error": f"timeout after {timeout:.0f}s", "wall_s": time.monotonic() - t0}
    except BaseException:
        _kill_tree(tag, proc.pid)
        raise
    finally:
        _current = None
    # The workload shuts its cluster down itself; anything left is a leak.
    leaked = _kill_tree(tag, proc.pid)
    wl.cleanup_transfer_leftovers(tag)  # no-op unless a transfer run was cut short
    result = None
    for line in out.splitlines():
        if line.startswith(wl.RESULT_PREFIX):
            try:
                result = json.loads(line[len(wl.RESULT_PREFIX) :])
            except ValueError:
                pass
    if result is None:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}, no output"
        result = {"error": reason[:200]}
    result["wall_s"] = time.monotonic() - t0
    if leaked:
        result["leaked_processes"] = leaked
    if "error" in result and err.strip():
        result["stderr_tail"] = err.strip().splitlines()[-15:]
    return result


# --------------------------------------------------------------------------
# formatting


def fmt_value(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def fmt_cell(res: dict | None) -> str:
    if res is None:
        return "-"
    if res.get("na"):
        return "n/a"
    if "error" in res:
        reason = " ".join(str(res["error"]).split())
        if len(reason) > 60:
            reason = reason[:57] + "..."
        return f"error: {reason}"
    cell = fmt_value(res["value"])
    if "procs" in res:
        cell += f" ({res['procs']} procs)"
    return cell


def ratio(bench: wl.Bench, shoal: dict | None, ray: dict | None) -> str:
    try:
        s, r = shoal["value"], ray["value"]
        val = s / r if bench.higher_is_better else r / s
    except (TypeError, KeyError, ZeroDivisionError):
        return "-"
    return f"{val:.2f}x"


def build_rows(benches, results, with_ray: bool):
    header = ["benchmark", "shoal"] + (["ray", "ratio"] if with_ray else []) + ["unit"]
    rows = []
    for b in benches:
        res = results.get(b.name, {})
        unit = b.unit + ("" if b.higher_is_better else " (lower is better)")
        row = [b.name, fmt_cell(res.get("shoal"))]
        if with_ray:
            row += [fmt_cell(res.get("ray")), ratio(b, res.get("shoal"), res.get("ray"))]
        row.append(unit)
        rows.append(row)
    return header, rows


def text_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = {i for i, h in enumerate(header) if h in ("shoal", "ray", "ratio")}

    def line(r):
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def markdown_table(header, rows) -> str:
    numeric = {i for i, h in enumerate(header) if h in ("shoal", "ray", "ratio")}
    out = ["| " + " | ".join(header) + " |"]
    out.append(
        "| " + " | ".join("---:" if i in numeric else "---" for i in range(len(header))) + " |"
    )
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}; "
        f"shoal {_version('shoal')}; ray {_version('ray')}"
    )


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Shoal vs Ray core microbenchmarks (ratio > 1 means Shoal is better)."
    )
    parser.add_argument(
        "--only",
        metavar="NAME_SUBSTRING",
        help="run benchmarks whose name contains this, also those not in the default run "
        "(e.g. --only client-server)",
    )
    parser.add_argument("--no-ray", action="store_true", help="run Shoal only")
    parser.add_argument(
        "--duration", type=float, default=2.0, help="seconds per timed trial (default 2)"
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="per-subprocess timeout (default 120)"
    )
    args = parser.parse_args(argv)

    atexit.register(_cleanup_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with_ray = not args.no_ray and importlib.util.find_spec("ray") is not None
    if not args.no_ray and not with_ray:
        print("ray is not importable: reporting shoal only", file=sys.stderr)

    def wanted(b: wl.Bench) -> bool:  # without --only: the default set
        return args.only.lower() in b.name.lower() if args.only else b.default

    benches = [b for b in wl.BENCHMARKS if wanted(b)]
    references = [r for r in wl.REFERENCES if wanted(r)]
    if not benches and not references:
        parser.error(f"no benchmark matches {args.only!r}")
    systems = ["shoal"] + (["ray"] if with_ray else [])

    started = time.monotonic()
    results: dict[str, dict[str, dict]] = {}
    for b in benches:  # a system the benchmark does not apply to shows "n/a"
        for s in systems:
            if s not in b.systems:
                results.setdefault(b.name, {})[s] = {"na": True}
    jobs = [(b, s) for b in benches for s in systems if s in b.systems]
    for i, (b, system) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {b.name} / {system} ...", end=" ", file=sys.stderr, flush=True)
        res = run_one(system, b.name, args.duration, args.timeout)
        results.setdefault(b.name, {})[system] = res
        extra = (
            f" (killed {res['leaked_processes']} leftover processes)"
            if res.get("leaked_processes")
            else ""
        )
        print(
            f"{fmt_cell(res)} {b.unit}  [{res['wall_s']:.1f}s]{extra}", file=sys.stderr, flush=True
        )

    ref_results: dict[str, dict] = {}
    for r in references:
        print(f"[ref] {r.name} ...", end=" ", file=sys.stderr, flush=True)
        res = ref_results[r.name] = run_one("none", r.name, args.duration, args.timeout)
        print(f"{fmt_cell(res)} {r.unit}  [{res['wall_s']:.1f}s]", file=sys.stderr, flush=True)
    total = time.monotonic() - started

    header, rows = build_rows(benches, results, with_ray)
    ref_lines = [
        f"Reference: {r.description}: {fmt_cell(ref_results[r.name])} {r.unit}" for r in references
    ]
    print()
    if rows:
        print(text_table(header, rows))
        print()
    for line in ref_lines:
        print(line)
    print(f"Total benchmark time: {total:.0f} s (--duration {args.duration:g})")

    if args.markdown:
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        md = [
            f"Run {now} on {machine_info()}.",
            f"Local cluster with num_cpus={wl.NUM_CPUS}; {wl.TRIALS} trials of {args.duration:g} s each "
            f"(mean reported); `python benchmarks/run.py` took {total:.0f} s.",
            "ratio > 1 means Shoal is better.",
            "",
        ]
        if rows:
            md += [markdown_table(header, rows), ""]
        for line in ref_lines:
            md += [line, ""]
        Path(args.markdown).write_text("\n".join(md))
        print(f"Markdown written to {args.markdown}")
    if args.json:
        payload = {
            "duration": args.duration,
            "total_s": total,
            "results": results,
            "references": ref_results,
            "memcpy": ref_results.get(wl.MEMCPY.name),  # also in "references"
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        _cleanup_all()
        sys.exit(130)
