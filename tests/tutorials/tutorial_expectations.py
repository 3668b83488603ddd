"""What each tutorial must show: the numbers and messages its prose explains.

``EXPECTED`` maps a notebook to pairs of a fragment of a code cell's source (the cell whose
source is exactly that, else the one cell that contains it) and text that cell's outputs
must contain. ``CHECKS`` adds a function for notebooks whose point needs more than that.
Shared by the tutorial tests and the Binder check.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import nbformat
from tutorial_runner import cell_with, output_text

REPO = Path(__file__).resolve().parents[2]
TUTORIALS = REPO / "tutorials"

# notebook -> [(fragment of a cell's source, text that cell must show)]
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "01_first_tasks": [
        ("results = [slow_square(i) for i in range(4)]", "[0, 1, 4, 9]"),
        ("ref = slow_square.remote(3)", "ObjectRef("),
        ("shoal.get(ref)", "9"),
        ("refs = [slow_square.remote(i) for i in range(4)]", "[0, 1, 4, 9] in"),
        ("total = combine.remote(a, b)", "1500"),
        ("pending = [measure.remote(i) for i in range(6)]", "finished: 5"),
        ("num_cpus=2).remote(i)", "CPUs in the cluster: 2.0"),
        ("def ratio(a, b):", "ZeroDivisionError: division by zero"),
        ("except ZeroDivisionError", "caught a ZeroDivisionError: ratio() failed"),
    ],
    "02_actors": [
        ("counter = Counter.remote(start=10)", "[11, 12, 13, 14, 15]"),
        ("shoal.get(counter.read.remote())", "15"),
        ("tally = Counter.remote()", "55"),
        ('shoal.get_actor("registry", namespace="tutorial")', "42"),
        ("fetcher = Fetcher.remote()", "10 pages in"),
        ("third = Model.remote()", "the third model ran within a second: False"),
        ("shoal.kill(models[0])", "[-0.5, -0.5, -0.5]"),
        ("account = Account.remote()", "refused: cannot withdraw 500, the balance is 100"),
        ("shoal.kill(account)", "ActorDiedError"),
    ],
    "03_objects_and_numpy": [
        ("view = shoal.get(ref)", "same values: True"),
        ("mine = view.copy()", "writeable: False"),
        ("describe.remote(ref)", "'writeable': False"),
        ('obj["call_site"]', "shared_memory"),
        ("!shoal memory", "15.3 MiB"),
        ("del ref, view", "objects left in the store: 0"),
        ("refs = [shoal.put(", "spilled to disk:"),
        ('obj["object_id"]', "spilled"),
        ("first_value.remote(r)", "[0.0, 1.0, 2.0, 3.0, 4.0]"),
    ],
    "04_remote_cells": [
        ("%cluster start --cpus 2", "1 node, 2 CPUs"),
        ("stats = summarize(measurements)", "'mean': 20.0"),
        ("back in the notebook", "values above 30"),
        ('threshold = limits["medium"]', "KeyError: 'medium'"),
        ("table[12_345], calls", "(152399025, 1)"),
        ("table[99_999], calls", "(9999800001, 2)"),
        ("%%remote --all --pull python_version", "hello from"),
        ("slow_job.get()", "42"),
        ("%cluster status", "%%remote sessions (--actor): lab"),
        ("%cluster stop", "Stopped the Shoal cluster"),
    ],
    "05_monitoring": [
        ("%cluster start --cpus 2", "1 node, 2 CPUs"),
        ("%cluster monitor --interval 0.5", "Tasks: pending args"),
        ("total = sum(shoal.get(refs))", "shoal.get: 40 of 40 done"),
        ("total = sum(shoal.get(refs))", "sum of squares: 20540"),
        ("bar = progress(refs", "all done: True - 20 of 20"),
        ("failed = shoal.state.list_tasks(", "check FAILED ValueError - bad input 3"),
        ("failed = shoal.state.list_tasks(", "check FAILED ValueError - bad input 7"),
        ('shoal.state.summarize_tasks()["by_name"]', "'FAILED': 2"),
        ("greeter = Greeter.options(", "Greeter greeter ALIVE pid"),
        ("metrics = shoal.state.list_metrics()", "requests {'kind': 'odd'} 5.0"),
        ("metrics = shoal.state.list_metrics()", "latency_s count 10 buckets [5, 5, 0]"),
        ("shoal list tasks --limit 5", "more not shown"),
        ("!shoal stack --task {task_id}", "line 3, in stuck"),
        ("shoal.cancel(stuck_ref)", "the task was cancelled"),
        ("%cluster stop", "Stopped the Shoal cluster"),
    ],
    "06_when_things_fail": [
        ('shoal.get(parse.remote("forty-two"))', "invalid literal for int()"),
        ('shoal.get(parse.remote("forty-two"))', "----> 3     return int(text)"),
        ("def flaky(path):", "succeeded on attempt 3"),
        ("shoal.get(crash.remote())", "WorkerCrashedError: task crash failed"),
        ("shoal.get(crash.remote())", "(exit code 3)"),
        ("def fetch(path):", "'fetched on attempt 3'"),
        ("class Cache:", "'items': 5, 'restarted': False"),
        ("os.kill(record[", "'items': 0, 'restarted': True"),
        ("os.kill(record[", "state: ALIVE - restarts: 1"),
        ("shoal.get(job)", "TaskCancelledError: task long_job was cancelled"),
        ("shoal.get(slow, timeout=0.5)", "GetTimeoutError"),
        ("shoal.cancel(slow)", "the slow job was cancelled"),
    ],
    "07_runtime_envs": [
        ("shoal.get(settings.remote())", "{'STAGE': 'tutorial', 'LOG_LEVEL': 'info'}"),
        ('"LOG_LEVEL": "debug"', "{'STAGE': 'tutorial', 'LOG_LEVEL': 'debug'}"),
        ("def price_list(prices):", "'prices': [12.0, 119.4]"),
        ("def price_list(prices):", "'STAGE': 'tutorial'"),
        ("def count_words(text):", "8"),
        ("importlib.util.find_spec", "the notebook can import greetings: False"),
        ("def greet(name):", "hello, pip - in a virtual environment: True"),
    ],
    "08_many_machines": [
        ("started = !shoal start --head", "Started a Shoal head"),
        ("!shoal start --address", "Started a Shoal node"),
        ('run_line_magic("cluster"', "2 nodes, 2 CPUs"),
        ("%%remote --all", "sees"),
        ("!shoal stop --temp-dir {node_dir}", "Stopped 1 Shoal cluster."),
    ],
    "09_automl_service": [
        ('shoal.init(f"tcp://{address}", key_file=key_file)', "tcp://127.0.0.1:"),
        ("proxy = AutoMLProxy.options(", "[]"),
        (
            "client = subprocess.Popen(",
            "jobs at the end: [{'job': 'job-1', 'state': 'done', 'done': 7, 'total': 7}]",
        ),
        ("monitor = ClusterMonitor()", "Shoal cluster · 1 node · 2 CPUs"),
        ("client = subprocess.Popen(", "best model:"),
        ("client = subprocess.Popen(", "exit code 0 )"),
        ("!shoal stop --temp-dir {work_dir}", "Stopped 1 Shoal cluster."),
    ],
}


def _check_actors(nb: nbformat.NotebookNode) -> None:
    """Tutorial 02: an async actor overlaps its calls (one after another would take 3 s)."""
    shown = output_text(cell_with(nb, "fetcher = Fetcher.remote()"))
    seconds = float(shown.split("pages in", 1)[1].split()[0])
    assert seconds < 2.0, shown


def _check_many_machines(nb: nbformat.NotebookNode) -> None:
    """The point of tutorial 08: work ran on two nodes, and data moved between them."""
    spread = output_text(cell_with(nb, "nodes_used = shoal.get("))
    per_node = ast.literal_eval(spread.split("tasks per node:", 1)[1].strip())
    assert len(per_node) == 2 and sum(per_node.values()) == 8, spread
    moved = output_text(cell_with(nb, "NodeAffinitySchedulingStrategy as on_node"))
    made, read = moved.split("made on ", 1)[1].split(":")[0].split(", summed on ")
    assert made != read and moved.strip().endswith(": 1000000.0"), moved
    labels = {
        line.split("@", 1)[1].split()[0]
        for line in output_text(cell_with(nb, "%%remote --all")).splitlines()
        if line.startswith("(%%remote")
    }
    assert len(labels) == 2, labels


def _check_automl(nb: nbformat.NotebookNode) -> None:
    """Tutorial 09: every candidate was trained, by worker tasks, and ranked."""
    rows = output_text(cell_with(nb, 'proxy.result.remote("job-1")')).strip().splitlines()
    assert len(rows) == 7, rows
    accuracies = [float(row.split()[0]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > 0.9, rows


def _check_failures(nb: nbformat.NotebookNode) -> None:
    """Tutorial 06: the restarted actor answers from a new process."""
    shown = output_text(cell_with(nb, "os.kill(record["))
    killed = int(shown.split("killing the actor's process", 1)[1].split()[0])
    after = ast.literal_eval(shown.split("after the restart:", 1)[1].split("\n")[0].strip())
    assert after["pid"] != killed, shown


CHECKS: dict[str, Callable[[nbformat.NotebookNode], None]] = {
    "02_actors": _check_actors,
    "06_when_things_fail": _check_failures,
    "08_many_machines": _check_many_machines,
    "09_automl_service": _check_automl,
}
