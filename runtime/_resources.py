"""Resource quantities in fixed point, so that 0.1 + 0.2 CPUs adds up exactly.

A ``Resources`` is a plain dict from name ("CPU", "GPU", "memory", custom names) to an int
in units of 1/10,000. GPUs are also tracked per device, so that a task can be told which
device ids it holds (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import math
from typing import Any

UNIT = 10_000

Resources = dict[str, int]


def to_fixed(amount: float) -> int:
    return int(round(amount * UNIT))


def to_float(amount: int) -> float:
    return amount / UNIT


def request(
    num_cpus: float | None,
    num_gpus: float | None,
    memory: float | None,
    resources: dict[str, float] | None,
    default_cpus: float,
) -> Resources:
    """Validate a task's or actor's resource options and return them in fixed point."""
    out: Resources = {}
    for name, value in (
        ("num_cpus", num_cpus if num_cpus is not None else default_cpus),
        ("num_gpus", num_gpus or 0),
        ("memory", memory or 0),
    ):
        _check_amount(name, value)
    cpus = num_cpus if num_cpus is not None else default_cpus
    if cpus:
        out["CPU"] = to_fixed(cpus)
    if num_gpus:
        if num_gpus > 1 and not float(num_gpus).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number, got {num_gpus}")
        out["GPU"] = to_fixed(num_gpus)
    if memory:
        out["memory"] = int(memory) * UNIT
    for name, value in (resources or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"resource names must be non-empty strings, got {name!r}")
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(
                f"use num_cpus, num_gpus or memory instead of resources={{{name!r}: ...}}"
            )
        _check_amount(f"resources[{name!r}]", value)
        if value:
            out[name] = to_fixed(value)
    return out


def _check_amount(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def fits(available: Resources, needed: Resources) -> bool:
    for name, amount in needed.items():
        if available.get(name, 0) < amount:
            return False
    return True


def subtract(available: Resources, amount: Resources) -> None:
    for name, value in amount.items():
        available[name] = available.get(name, 0) - value


def add(available: Resources, amount: Resources) -> None:
    for name, value in amount.items():
        available[name] = available.get(name, 0) + value


def as_floats(res: Resources) -> dict[str, float]:
    out = {}
    for name, value in res.items():
        out[name] = (
            float(value // UNIT) if name in ("memory", "object_store_memory") else to_float(value)
        )
    return out


def describe(res: Resources) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(as_floats(res).items())) or "nothing"


class GpuSet:
    """Which fraction of each GPU device is free."""

    def __init__(self, count: int) -> None:
        self.free = [UNIT] * count

    def acquire(self, amount: int) -> list[int] | None:
        if amount <= 0:
            return []
        if amount >= UNIT:
            whole = amount // UNIT
            ids = [i for i, f in enumerate(self.free) if f == UNIT][:whole]
            if len(ids) < whole:
                return None
            for i in ids:
                self.free[i] = 0
            return ids
        # A fraction: best fit, the device with the least room that still fits.
        candidates = [(f, i) for i, f in enumerate(self.free) if f >= amount]
        if not candidates:
            return None
        _, i = min(candidates)
        self.free[i] -= amount
        return [i]

    def release(self, ids: list[int], amount: int) -> None:
        if amount >= UNIT:
            for i in ids:
                self.free[i] = UNIT
        else:
            for i in ids:
                self.free[i] = min(UNIT, self.free[i] + amount)
