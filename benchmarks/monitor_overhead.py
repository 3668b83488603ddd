#!/usr/bin/env python
"""What an open ClusterMonitor costs the work: task throughput with and without one.

Runs a real kernel (through nbclient, which receives the widget messages as a frontend
would), starts a 2-CPU cluster there without a monitor, and times ``shoal.get`` of N small
tasks in alternating rounds: no monitor, a monitor open (4 Hz, displayed). Prints each
round and the medians::

    python benchmarks/monitor_overhead.py [--tasks 2000] [--rounds 8] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import nbclient
import nbformat

SETUP = """\
%load_ext shoal
%cluster start --cpus 2 --no-monitor
import time, json, shoal
from shoal.widgets import ClusterMonitor

@shoal.remote
def tiny(i):
    return i

shoal.get([tiny.remote(i) for i in range(2000)])  # warm the workers
"""

ROUNDS = """\
rows = []
for r in range({rounds}):
    for with_monitor in (False, True) if r % 2 == 0 else (True, False):
        monitor = ClusterMonitor(interval={interval}) if with_monitor else None
        if monitor is not None:
            display(monitor)
            time.sleep(0.5)  # a few ticks first: measure it running, not starting
        t0 = time.perf_counter()
        shoal.get([tiny.remote(i) for i in range({tasks})])
        elapsed = time.perf_counter() - t0
        ticks = 0
        if monitor is not None:
            ticks = monitor.ticks
            monitor.close()
        rows.append({{"monitor": with_monitor, "rate": {tasks} / elapsed, "ticks": ticks}})
print("ROWS " + json.dumps(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP),
        nbformat.v4.new_code_cell(
            ROUNDS.format(rounds=args.rounds, tasks=args.tasks, interval=args.interval)
        ),
        nbformat.v4.new_code_cell("%cluster stop"),
    ]
    client = nbclient.NotebookClient(nb, kernel_name=args.kernel, timeout=600)
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs if o["output_type"] == "stream")
    line = next((x for x in text.splitlines() if x.startswith("ROWS ")), None)
    if line is None:
        sys.exit(f"no result; the cell's outputs: {nb.cells[1].outputs}")
    rows = json.loads(line[5:])
    for row in rows:
        print(f"{'monitor' if row['monitor'] else 'none   '} {row['rate']:8,.0f} tasks/s")
    without = statistics.median(r["rate"] for r in rows if not r["monitor"])
    with_ = statistics.median(r["rate"] for r in rows if r["monitor"])
    # Each round ran both, back to back: the ratio within a round is less exposed to the
    # machine's drift (other work on it) than the medians are.
    pairs = [rows[i : i + 2] for i in range(0, len(rows) - 1, 2)]
    slower = [
        1
        - next(r["rate"] for r in p if r["monitor"])
        / next(r["rate"] for r in p if not r["monitor"])
        for p in pairs
    ]
    print(
        f"median without a monitor {without:,.0f}/s, with one {with_:,.0f}/s; "
        f"slower with a monitor, median of the rounds: {100 * statistics.median(slower):+.1f}% "
        f"(rounds from {100 * min(slower):+.1f}% to {100 * max(slower):+.1f}%; "
        f"{args.tasks} tasks a round, {args.rounds} rounds, monitor every {args.interval} s)"
    )


if __name__ == "__main__":
    main()
