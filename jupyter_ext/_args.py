"""Arguments of ``%cluster`` and ``%%remote``: parsed with argparse, bad input is one line.

Every mistake raises IPython's ``UsageError``, which IPython shows as a single line
(``UsageError: %cluster start: --cpus must be a number >= 0, got 'x'``), never a traceback.
``-h`` shows the help and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError


class HelpShown(Exception):
    """``-h`` was given: the help is printed, nothing else happens."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog=prog, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} -h)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise UsageError(f"{self.prog}: {message or 'bad arguments'}")
        raise HelpShown()


# -- values ----------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# Decimal units as their names say (GB = 10^9), binary units likewise (GiB = 2^30); a bare
# K/M/G/T is binary, as `free -h`, Docker's --shm-size and Ray's docs use them.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 10**3,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 10**12,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Bytes from ``2GB``, ``512MiB``, ``1.5G`` or ``1000000``."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 2GB, 512MiB or a number of bytes, got {text!r}"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the size must be more than 0 bytes, got {text!r}")
    return size


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also catches nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return int(value) if value.is_integer() else value


def _gpus(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"accelerator\": 1}}', got {text!r} ({exc.msg})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of numbers, got {text!r}")
    for name, amount in value.items():
        if name in ("CPU", "GPU"):
            raise argparse.ArgumentTypeError(
                f"use --cpus / --gpus instead of {name!r} in --resources"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise argparse.ArgumentTypeError(
                f"resource {name!r} must be a number >= 0, got {amount!r}"
            )
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.05:  # also catches nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0.05, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not name.isidentifier():
            raise argparse.ArgumentTypeError(f"{name!r} is not a variable name")
    return names


def _identifier_or_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name")
    return text


# -- splitting -------------------------------------------------------------------------
def split(line: str, prog: str) -> list[str]:
    """Shell-like words; a JSON object written bare (``--resources {"a": 1}``) stays one
    word, quotes and all."""
    objects: list[str] = []
    out = []
    i = 0
    while i < len(line):
        if line[i] == "{" and (i == 0 or line[i - 1].isspace()):
            end = _object_end(line, i)
            if end is None:
                raise UsageError(f"{prog}: unbalanced braces in {line[i:]!r}")
            objects.append(line[i:end])
            out.append(f" \x00{len(objects) - 1}\x00 ")
            i = end
        else:
            out.append(line[i])
            i += 1
    try:
        words = shlex.split("".join(out))
    except ValueError as exc:
        raise UsageError(f"{prog}: {exc} in {line!r}") from None
    return [objects[int(w[1:-1])] if re.fullmatch("\x00\\d+\x00", w) else w for w in words]


def _object_end(text: str, start: int) -> int | None:
    depth = 0
    in_string = False
    i = start
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


# -- %cluster --------------------------------------------------------------------------
CLUSTER_USAGE = """\
%cluster start [--cpus N] [--gpus N] [--resources JSON] [--object-store-memory SIZE] [--restart] [--no-monitor]
%cluster connect ADDRESS [--key-file FILE]
%cluster stop
%cluster status
%cluster monitor [--interval SECONDS]"""


def _cluster_parsers() -> dict[str, _Parser]:
    start = _Parser(
        "%cluster start",
        description="Start a local cluster with this kernel as its driver.",
    )
    start.add_argument("--cpus", type=_cpus, help="CPUs of the node (default: all cores)")
    start.add_argument("--gpus", type=_gpus, help="GPUs of the node (default: 0)")
    start.add_argument(
        "--resources", type=_resources, help='custom resources as JSON: {"accelerator": 1}'
    )
    start.add_argument(
        "--object-store-memory",
        type=parse_size,
        dest="object_store_memory",
        metavar="SIZE",
        help="size of the object store: 2GB, 512MiB, or bytes",
    )
    start.add_argument(
        "--restart", action="store_true", help="stop the running cluster first, if any"
    )
    start.add_argument(
        "--no-monitor",
        dest="monitor",
        action="store_false",
        help="show the summary without the live monitor below it",
    )
    connect = _Parser(
        "%cluster connect",
        description="Join an existing cluster (client-server mode for HOST:PORT addresses).",
    )
    connect.add_argument("address", help="HOST:PORT, tcp://HOST:PORT, or auto")
    connect.add_argument(
        "--key-file",
        dest="key_file",
        help="the cluster's key file (else $SHOAL_CLUSTER_KEY, the key as hex)",
    )
    stop = _Parser("%cluster stop", description="Stop the cluster (or disconnect from it).")
    status = _Parser("%cluster status", description="Show the cluster's nodes and resources.")
    monitor = _Parser(
        "%cluster monitor",
        description="Show a live monitor of the cluster (shoal.widgets.ClusterMonitor); "
        "it replaces the one the previous %cluster monitor or start showed.",
    )
    monitor.add_argument(
        "--interval",
        type=_interval,
        default=0.25,
        metavar="SECONDS",
        help="time between updates (default 0.25: four a second)",
    )
    return {"start": start, "connect": connect, "stop": stop, "status": status, "monitor": monitor}


def parse_cluster(line: str) -> tuple[str, argparse.Namespace]:
    words = split(line, "%cluster")
    if not words or words[0] in ("-h", "--help", "help"):
        raise UsageError(f"%cluster needs a subcommand:\n{CLUSTER_USAGE}")
    parsers = _cluster_parsers()
    command = words[0]
    if command not in parsers:
        raise UsageError(
            f"%cluster: unknown subcommand {command!r}; use one of start, connect, stop, status, "
            "monitor"
        )
    return command, parsers[command].parse_args(words[1:])


# -- %%remote --------------------------------------------------------------------------
def _remote_parser() -> _Parser:
    p = _Parser(
        "%%remote",
        description="Run the cell on the cluster: the variables it reads are shipped, the "
        "names it assigns come back, its last expression is shown.",
    )
    p.add_argument("--cpus", type=_cpus, help="CPUs for the cell (default: 1)")
    p.add_argument("--gpus", type=_gpus, help="GPUs for the cell")
    p.add_argument(
        "--resources", type=_resources, help='custom resources as JSON: {"accelerator": 1}'
    )
    p.add_argument("--node", help="run on this node (its id, or a unique prefix of it)")
    p.add_argument(
        "--actor",
        type=_identifier_or_name,
        metavar="NAME",
        help="run in the persistent session NAME, whose variables live on from cell to cell",
    )
    p.add_argument("--all", action="store_true", help="run once on every alive node")
    p.add_argument(
        "--async",
        dest="async_name",
        nargs="?",
        const="_remote",
        default=None,
        metavar="NAME",
        help="return at once; NAME (default _remote) holds the running cell: NAME.get() "
        "waits, brings back its names and returns its value",
    )
    p.add_argument("--push", type=_names, metavar="A,B", help="ship exactly these variables")
    p.add_argument("--pull", type=_names, metavar="X,Y", help="bring back exactly these names")
    return p


def parse_remote(line: str) -> argparse.Namespace:
    args = _remote_parser().parse_args(split(line, "%%remote"))
    if args.all and args.node:
        raise UsageError("%%remote: --all runs on every node; it cannot be combined with --node")
    if args.all and args.actor:
        raise UsageError("%%remote: --all cannot be combined with --actor")
    if args.async_name is not None and not args.async_name.isidentifier():
        raise UsageError(f"%%remote: --async NAME must be a variable name, got {args.async_name!r}")
    return args
