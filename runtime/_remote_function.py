"""``@shoal.remote`` on a function: RemoteFunction, its options and task submission."""

from __future__ import annotations

from typing import Any

from . import _config, _worker_context
from ._ids import return_id
from ._options import TASK_OPTIONS, resource_request, scheduling, validate
from ._refs import ObjectRef, ObjectRefGenerator
from ._serialization import check_picklable, pickle_definition
from ._task_submitter import STREAMING, TaskSpec
from .runtime_env._state import call_env


def encode_call_args(
    core: Any, spec: TaskSpec, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> None:
    """Serialize the arguments of a call into ``spec`` (user thread).

    Top-level ObjectRefs become dependencies (the callee receives their values); large
    values are put in the store once and passed by reference; refs nested inside values
    are kept alive until the call is over and made readable by other processes.
    """
    if not args and not kwargs:
        return
    values = list(args) + list(kwargs.values())
    spec.kwnames = list(kwargs)
    for i, value in enumerate(values):
        if type(value) is ObjectRef:
            spec.deps.append(value)
            spec.args.append((1, value))
            continue
        try:
            sv = check_picklable(value, "")
        except TypeError as exc:
            raise TypeError(
                f"could not serialize {_arg_name(fn, i, len(args), spec.kwnames)} of {what}: {exc.__cause__ or exc}"
            ) from exc
        if sv.contained:
            spec.pins.extend(ObjectRef(oid, core) for oid in sv.contained)
            core.mark_escaped(sv.contained)
        if sv.nbytes >= _config.INLINE_THRESHOLD:
            oid = core.ids.put_id()
            core.put_serialized(oid, sv)
            ref = ObjectRef(oid, core)
            spec.deps.append(ref)
            spec.args.append((1, ref))
        else:
            spec.args.append((0, sv))


def _arg_name(fn: Any, index: int, npos: int, kwnames: list[str]) -> str:
    if index >= npos:
        return f"argument {kwnames[index - npos]!r}"
    import inspect

    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if index < len(params):
            return f"argument {params[index]!r} (position {index})"
    except (TypeError, ValueError):
        pass
    return f"argument {index}"


_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200


def _is_async(fn: Any) -> bool:
    """inspect.iscoroutinefunction without importing inspect (slow to import)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and bool(code.co_flags & (_CO_COROUTINE | _CO_ASYNC_GENERATOR))


def make_returns(core: Any, spec: TaskSpec) -> Any:
    nr = spec.num_returns
    if nr == 1:  # the common case, without the lists
        oid = return_id(spec.task_id, 1)
        spec.return_ids = [oid]
        return ObjectRef(oid, core)
    if nr == STREAMING:
        spec.return_ids = []
        return ObjectRefGenerator(spec.task_id, core)
    spec.return_ids = [return_id(spec.task_id, i + 1) for i in range(nr)]
    refs = [ObjectRef(oid, core) for oid in spec.return_ids]
    if nr == 1:
        return refs[0]
    if nr == 0:
        return None
    return refs


class RemoteFunction:
    """A function that runs as a task: ``f.remote(*args)`` returns ObjectRefs at once."""

    def __init__(self, fn: Any, options: dict[str, Any], _pickled: list[Any] | None = None) -> None:
        if _is_async(fn):
            raise TypeError(
                f"{fn.__qualname__} is an async function; tasks must be plain functions (use an async actor)"
            )
        self._function = fn
        self._options = validate(dict(options), TASK_OPTIONS, f"@remote on {fn.__qualname__}")
        self._pickled = _pickled if _pickled is not None else [None]  # shared by .options() copies
        self._env_cache: list[Any] = [None]  # its runtime env, resolved at the first call
        self._resources = resource_request(self._options, default_cpus=1)
        self._scheduling = scheduling(self._options, self._resources)
        self.__name__ = getattr(fn, "__name__", "task")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = fn.__doc__
        self.__module__ = getattr(fn, "__module__", "")
        # The name tasks show in logs and errors: "f", or "Outer.f", never "<locals>".
        self._display_name = self.__qualname__.split(".<locals>.")[-1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"remote function {self.__qualname__} cannot be called directly; "
            f"use {self.__name__}.remote(...) to run it as a task"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The resolved env belongs to this process (another inherits another env).
        return {k: v for k, v in self.__dict__.items() if k != "_env_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._env_cache = [None]

    def options(self, **options: Any) -> RemoteFunction:
        merged = {**self._options, **options}
        return RemoteFunction(self._function, merged, self._pickled)

    def _definition(self) -> tuple[bytes, bytes]:
        pickled = self._pickled[0]
        if pickled is None:
            try:
                pickled = pickle_definition(self._function)
            except Exception as exc:
                raise TypeError(
                    f"could not serialize the function {self.__qualname__}: {exc}"
                ) from exc
            self._pickled[0] = pickled
        return pickled

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        from ._api import _auto_init

        core = _auto_init()
        opts = self._options
        spec = TaskSpec()
        spec.task_id = core.ids.task_id()
        spec.name = opts.get("name") or self._display_name
        spec.fn_hash, spec.fn_bytes = self._definition()
        nr = opts.get("num_returns", 1)
        spec.num_returns = STREAMING if nr == "streaming" else nr
        spec.resources, spec.strategy = self._scheduling
        spec.runtime_env, spec.env_key = call_env(core, opts.get("runtime_env"), self._env_cache)
        spec.max_retries = opts.get("max_retries", _config.DEFAULT_MAX_RETRIES)
        spec.key = (
            tuple(sorted(spec.resources.items())),
            _strategy_key(spec.strategy),
            spec.env_key,
            # Leases say whether their tasks can be retried (the memory monitor stops
            # workers of retriable tasks first), so such tasks do not share leases.
            spec.max_retries != 0,
        )
        re = opts.get("retry_exceptions", False)
        spec.retry_exceptions = tuple(re) if isinstance(re, (list, tuple)) else bool(re)
        spec.job = core.job_id
        spec.parent = _worker_context.current.task_id
        spec.out_tag = _worker_context.current_output_tag()
        encode_call_args(core, spec, self._function, args, kwargs, f"{self.__qualname__}()")
        result = make_returns(core, spec)
        core.tasks.submit(spec)
        return result

    def __repr__(self) -> str:
        return f"RemoteFunction({self.__qualname__})"


def _strategy_key(strategy: Any) -> Any:
    """Tasks share leases only when their strategies are the same."""
    return None if strategy is None else tuple(sorted(strategy.items()))
