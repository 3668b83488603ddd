"""Validation of ``@remote(...)`` and ``.options(...)`` keyword arguments.

Every option is checked when it is given, so that a typo or a bad value is reported at the
decorator or the ``.options()`` call, naming the option, not later inside the cluster.
"""

from __future__ import annotations

from typing import Any

from . import _resources

_COMMON = {
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "runtime_env",
    "scheduling_strategy",
    "name",
    "accelerator_type",
    "label_selector",
    "_metadata",
    "enable_task_events",
}
TASK_OPTIONS = _COMMON | {"num_returns", "max_retries", "retry_exceptions", "max_calls"}
ACTOR_OPTIONS = _COMMON | {
    "namespace",
    "get_if_exists",
    "lifetime",
    "max_concurrency",
    "max_restarts",
    "max_task_retries",
    "max_pending_calls",
    "concurrency_groups",
    "object_store_memory",
}
METHOD_OPTIONS = {
    "num_returns",
    "name",
    "concurrency_group",
    "max_task_retries",
    "retry_exceptions",
}


# Options accepted for compatibility with Ray code that have no effect yet; a warning says
# so once per option, rather than silently doing nothing.
_NOT_YET = {
    "max_calls": "workers are not recycled after max_calls yet",
    "concurrency_groups": "concurrency groups are not supported yet; max_concurrency applies",
    "max_pending_calls": "max_pending_calls is not enforced yet",
}
_warned: set[str] = set()


def warn_not_yet(key: str, value: Any) -> None:
    if key in _NOT_YET and value not in (None, {}, [], 0, -1) and key not in _warned:
        import warnings

        _warned.add(key)
        warnings.warn(
            f"{key}={value!r} has no effect: {_NOT_YET[key]}", stacklevel=_user_stacklevel()
        )


def _user_stacklevel() -> int:
    """The stacklevel that points a warning at the first caller outside this package."""
    import os
    import sys

    here = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def validate(options: dict[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    for key in options:
        warn_not_yet(key, options[key])
        if key not in allowed:
            raise TypeError(
                f"{what} got an unknown option {key!r}; valid options are: {', '.join(sorted(allowed))}"
            )
    if "num_returns" in options:
        nr = options["num_returns"]
        if nr != "streaming" and (isinstance(nr, bool) or not isinstance(nr, int) or nr < 0):
            raise ValueError(f"num_returns must be an int >= 0 or 'streaming', got {nr!r}")
    for key in ("max_retries", "max_restarts", "max_task_retries"):
        if key in options:
            v = options[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                raise ValueError(f"{key} must be an int >= -1 (-1 means forever), got {v!r}")
    if "retry_exceptions" in options:
        re = options["retry_exceptions"]
        if not isinstance(re, bool) and not (
            isinstance(re, (list, tuple))
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in re)
        ):
            raise TypeError(
                f"retry_exceptions must be a bool or a list of exception classes, got {re!r}"
            )
    if "max_concurrency" in options:
        mc = options["max_concurrency"]
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {mc!r}")
    if "lifetime" in options and options["lifetime"] not in (None, "detached", "non_detached"):
        raise ValueError(
            f"lifetime must be None, 'detached' or 'non_detached', got {options['lifetime']!r}"
        )
    if (
        "resources" in options
        and options["resources"] is not None
        and not isinstance(options["resources"], dict)
    ):
        raise TypeError(
            f"resources must be a dict of name to amount, got {type(options['resources']).__name__}"
        )
    if options.get("name") is not None and not isinstance(options["name"], str):
        raise TypeError(f"name must be a string, got {type(options['name']).__name__}")
    if options.get("namespace") is not None and not isinstance(options["namespace"], str):
        raise TypeError(f"namespace must be a string, got {type(options['namespace']).__name__}")
    strategy = options.get("scheduling_strategy")
    if strategy is not None and isinstance(strategy, str) and strategy not in ("DEFAULT", "SPREAD"):
        raise ValueError(
            f"scheduling_strategy must be 'DEFAULT', 'SPREAD' or a strategy object, got {strategy!r}"
        )
    if options.get("runtime_env") is not None:
        from .runtime_env._spec import validate as validate_env

        # Checked and normalized now (paths made absolute, requirement files read), so that
        # a missing directory or a typo in a field is reported at the decorator.
        options["runtime_env"] = validate_env(options["runtime_env"])
    # Resources are checked now too, so errors point at the decorator.
    resource_request(options, default_cpus=1)
    return options


def resource_request(options: dict[str, Any], default_cpus: float) -> dict[str, int]:
    return _resources.request(
        options.get("num_cpus"),
        options.get("num_gpus"),
        options.get("memory"),
        options.get("resources"),
        default_cpus,
    )


def scheduling(options: dict[str, Any], resources: dict[str, int]) -> tuple[dict[str, int], Any]:
    """The resources to ask for and the strategy to send, from ``scheduling_strategy``.

    A placement group strategy becomes a request for the group's bundle resources (as in
    Ray, a bundle is a set of resources named after its group), so that the ordinary
    resource scheduling places the work on the bundle's node. The others travel to the
    node manager as a small dict (None for the default).
    """
    from . import _placement
    from .util.scheduling_strategies import PlacementGroupSchedulingStrategy, strategy_to_wire

    strategy = options.get("scheduling_strategy")
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        pg = strategy.placement_group
        return _placement.translate_request(
            resources, pg.id, strategy.placement_group_bundle_index
        ), None
    wire = strategy_to_wire(strategy)
    if wire is None or wire.get("kind") == "default":
        return resources, None
    return resources, wire
