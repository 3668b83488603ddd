"""A strict parser of Prometheus' text exposition format (0.0.4), for tests.

Written from the format's description, independently of shoal._prometheus, so that a test
reads the text as a scraper would: ``parse(text)`` returns the families by name, each
``{"type", "help", "samples": [(sample name, labels, value)]}``, and raises ValueError on
anything a scraper would refuse: a malformed line, a bad escape, a sample outside its
family, a TYPE given twice, a histogram whose buckets are not cumulative or do not end
with le="+Inf" equal to its _count.
"""

from __future__ import annotations

import math
import re
from typing import Any

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _unescape(text: str, quote: bool) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt == "\\":
                out.append("\\")
            elif nxt == "n":
                out.append("\n")
            elif nxt == '"' and quote:
                out.append('"')
            else:
                raise ValueError(f"bad escape \\{nxt} in {text!r}")
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _value(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    return float(text)  # ValueError for anything else


def _labels(text: str, line: str) -> tuple[dict[str, str], str]:
    """Parse ``k="v",...}`` after the opening brace; return the labels and the rest."""
    labels: dict[str, str] = {}
    i = 0
    while True:
        if text[i : i + 1] == "}":
            return labels, text[i + 1 :]
        m = _LABEL.match(text, i)
        if m is None:
            raise ValueError(f"bad label name in {line!r}")
        name = m.group()
        i = m.end()
        if text[i : i + 2] != '="':
            raise ValueError(f"label {name} has no quoted value in {line!r}")
        i += 2
        j = i
        while True:
            if j >= len(text):
                raise ValueError(f"unterminated label value in {line!r}")
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                break
            j += 1
        if name in labels:
            raise ValueError(f"label {name} repeated in {line!r}")
        labels[name] = _unescape(text[i:j], quote=True)
        i = j + 1
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] != "}":
            raise ValueError(f"expected ',' or '}}' after label {name} in {line!r}")


def parse(text: str) -> dict[str, dict[str, Any]]:
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    if text and not text.endswith("\n"):
        raise ValueError("the text must end with a newline")
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _NAME.fullmatch(name):
                    raise ValueError(f"bad metric name in {line!r}")
                family = families.setdefault(name, {"type": None, "help": None, "samples": []})
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    if family["help"] is not None:
                        raise ValueError(f"HELP given twice for {name}")
                    family["help"] = _unescape(rest, quote=False)
                else:
                    if family["type"] is not None or family["samples"]:
                        raise ValueError(f"TYPE given twice, or after samples, for {name}")
                    if rest not in _TYPES:
                        raise ValueError(f"unknown type {rest!r} for {name}")
                    family["type"] = rest
                current = name
            continue  # any other comment is ignored
        m = _NAME.match(line)
        if m is None:
            raise ValueError(f"bad sample line {line!r}")
        sample = m.group()
        rest = line[m.end() :]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _labels(rest[1:], line)
        if not rest.startswith(" "):
            raise ValueError(f"no value in {line!r}")
        fields = rest.split()
        if len(fields) not in (1, 2):
            raise ValueError(f"bad value in {line!r}")
        value = _value(fields[0])
        owner = _family_of(sample, current, families)
        families[owner]["samples"].append((sample, labels, value))
    for name, family in families.items():
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _family_of(sample: str, current: str | None, families: dict[str, dict[str, Any]]) -> str:
    if current is not None:
        kind = families[current]["type"]
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ()
        if sample == current and kind != "histogram":
            return current
        if any(sample == current + s for s in suffixes):
            return current
    if sample in families:
        raise ValueError(f"sample {sample} is not next to its family's TYPE line")
    families[sample] = {"type": "untyped", "help": None, "samples": []}
    return sample


def _check_histogram(name: str, samples: list[tuple[str, dict[str, str], float]]) -> None:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sample == name + "_bucket":
            entry["buckets"].append((_value(labels["le"]), value))
        elif sample == name + "_sum":
            entry["sum"] = value
        else:
            entry["count"] = value
    for key, entry in series.items():
        buckets = entry["buckets"]
        if not buckets or buckets[-1][0] != math.inf:
            raise ValueError(f"histogram {name}{dict(key)} does not end with le=+Inf")
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        if bounds != sorted(bounds) or counts != sorted(counts):
            raise ValueError(f"histogram {name}{dict(key)} buckets are not cumulative: {buckets}")
        if entry["count"] != counts[-1] or entry["sum"] is None:
            raise ValueError(f"histogram {name}{dict(key)}: _count {entry['count']} != +Inf bucket")


def value(families: dict[str, dict[str, Any]], sample: str, **labels: str) -> float | None:
    """The value of the sample with exactly these labels, or None."""
    for family in families.values():
        for name, got, v in family["samples"]:
            if name == sample and got == labels:
                return float(v)
    return None
