"""``@shoal.remote`` on a class: ActorClass, ActorHandle, ActorMethod.

An actor is one worker process that holds one instance of the class. The process that
creates it owns it: when the owner's last handle goes (and no handle was passed on), or the
owner exits, the actor ends, unless it is ``lifetime="detached"``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _worker_context
from ._options import ACTOR_OPTIONS, METHOD_OPTIONS, resource_request, scheduling, validate
from ._protocol import Message, MsgType
from ._remote_function import _is_async, encode_call_args, make_returns
from ._serialization import pickle_definition
from ._task_submitter import STREAMING, TaskSpec, _Stream, encode_args
from .runtime_env._state import call_env

M = MsgType


def method(**options: Any) -> Any:
    """Decorate an actor method with defaults, e.g. ``@shoal.method(num_returns=2)``."""
    validate(options, METHOD_OPTIONS, "@method")

    def decorate(fn: Any) -> Any:
        fn.__shoal_method_options__ = options
        return fn

    return decorate


def _method_meta(cls: type) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    # Retry options given with @method: name -> [max_task_retries or None, retry_exceptions
    # as a bool or a list of exception class names]. Names, so that the meta travels as it
    # is (a handle got with get_actor has them too).
    retries: dict[str, Any] = {}
    is_async = False
    for name in dir(cls):
        if name.startswith("__") and name != "__call__":
            continue
        member = getattr(cls, name, None)
        if not callable(member):
            continue
        opts = getattr(member, "__shoal_method_options__", {})
        methods[name] = opts.get("num_returns", 1)
        if "max_task_retries" in opts or "retry_exceptions" in opts:
            retries[name] = [
                opts.get("max_task_retries"),
                exception_names(opts.get("retry_exceptions", False)),
            ]
        if _is_async(member):
            is_async = True
    meta: dict[str, Any] = {"methods": methods, "async": is_async}
    if retries:
        meta["retries"] = retries
    return meta


def exception_names(retry_exceptions: Any) -> Any:
    """``retry_exceptions`` as it travels: a bool, or the classes' qualified names (the
    worker reports the qualified names of a failed call's exception class and its bases)."""
    if isinstance(retry_exceptions, (list, tuple)):
        return [f"{t.__module__}.{t.__qualname__}" for t in retry_exceptions]
    return bool(retry_exceptions)


class ActorClass:
    """A class whose instances live in their own worker process: ``Cls.remote(...)``."""

    def __init__(
        self, cls: type, options: dict[str, Any], _pickled: list[Any] | None = None
    ) -> None:
        self._cls = cls
        self._options = validate(
            dict(options), ACTOR_OPTIONS, f"@remote on class {cls.__qualname__}"
        )
        self._pickled: list[Any] = _pickled if _pickled is not None else [None]
        self._meta = _method_meta(cls)
        self._env_cache: list[Any] = [None]  # its runtime env, resolved at the first call
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__
        self._display_name = self.__qualname__.split(".<locals>.")[-1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor class {self.__qualname__} cannot be instantiated directly; use {self.__name__}.remote(...)"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The resolved env belongs to this process (another inherits another env).
        return {k: v for k, v in self.__dict__.items() if k != "_env_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._env_cache = [None]

    def options(self, **options: Any) -> ActorClass:
        return ActorClass(self._cls, {**self._options, **options}, self._pickled)

    def _definition(self) -> tuple[bytes, bytes]:
        if self._pickled[0] is None:
            try:
                self._pickled[0] = pickle_definition(self._cls)
            except Exception as exc:
                raise TypeError(
                    f"could not serialize the class {self.__qualname__}: {exc}"
                ) from exc
        pickled: tuple[bytes, bytes] = self._pickled[0]
        return pickled

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        from ._api import _auto_init

        core = _auto_init()
        opts = self._options
        # An actor holds no CPU while it lives unless it asks for some (as in Ray), so that
        # idle actors never starve tasks.
        resources, strategy = scheduling(opts, resource_request(opts, default_cpus=0))
        meta = dict(self._meta)
        mc = opts.get("max_concurrency")
        meta["mc"] = mc if mc is not None else (1000 if meta["async"] else 1)
        max_restarts = opts.get("max_restarts") or 0
        if opts.get("max_task_retries"):
            meta["mtr"] = opts["max_task_retries"]  # what callers resend after a restart
        name = opts.get("name") or ""
        namespace = opts.get("namespace")
        if namespace is None:
            namespace = core.namespace
        detached = opts.get("lifetime") == "detached"
        if detached and not name:
            raise ValueError("a detached actor must have a name, so that it can be found again")
        spec = TaskSpec()
        init = getattr(self._cls, "__init__", None)
        encode_call_args(core, spec, init, args, kwargs, f"{self.__qualname__}.__init__")
        # The actor's worker reads argument refs from the store, so they must be there.
        core.mark_escaped([ref.binary() for ref in spec.deps])
        frames: list[Any] = [self._definition()[1]]
        aid = os.urandom(16)
        body: dict[str, Any] = {
            "aid": aid,
            "cls": self._display_name,
            "name": name,
            "ns": namespace,
            "detached": detached,
            "gie": bool(opts.get("get_if_exists")),
            "res": resources,
            "st": strategy,
            "meta": meta,
            "job": core.job_id,
            "kw": spec.kwnames,
        }
        if max_restarts:
            body["mr"] = max_restarts
        tag = _worker_context.current_output_tag()
        if tag is not None:
            body["o"] = tag  # what __init__ prints goes to the cell that created the actor
        runtime_env, _ = call_env(core, opts.get("runtime_env"), self._env_cache)
        if runtime_env is not None:
            body["env"] = runtime_env  # its worker is one of that env's
        # The actor may be placed on any node: its worker reads stored arguments by id.
        body["a"] = encode_args(core, spec, frames, local=False)
        handle_meta = {"cls": self._display_name, **meta}
        if name:
            handle_meta["name"] = name
        # A restartable actor's arguments stay pinned while it may be created again.
        core.actors.created(aid, spec, keep=max_restarts != 0)
        if name:
            reply = core.request(Message(M.CREATE_ACTOR, body, frames))
            if "e" in reply.body:
                raise ValueError(reply.body["e"])
            info = reply.body["info"]
            if reply.body.get("existing"):
                core.actors.pending_creation.pop(aid, None)
                return ActorHandle(
                    info["aid"], {"cls": info["cls"], "name": name, **info["meta"]}, owned=False
                )
        else:
            core.send_head(Message(M.CREATE_ACTOR, body, frames))
        return ActorHandle(aid, handle_meta, owned=True)

    def __repr__(self) -> str:
        return f"ActorClass({self.__qualname__})"


class _HandleCounts:
    """How many handles this process holds to each actor it owns, and which ones escaped."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # __del__ may run while this thread holds it
        self.counts: dict[bytes, int] = {}
        self.escaped: set[bytes] = set()


_handles = _HandleCounts()


class ActorHandle:
    """A handle on a live actor. ``handle.method.remote(...)`` calls a method."""

    def __init__(self, actor_id: bytes, meta: dict[str, Any], owned: bool = False) -> None:
        self._actor_id = actor_id
        self._meta = meta
        self._owned = owned
        if owned:
            with _handles.lock:
                _handles.counts[actor_id] = _handles.counts.get(actor_id, 0) + 1

    def __getattr__(self, name: str) -> ActorMethod:
        methods = self.__dict__.get("_meta", {}).get("methods", {})
        if name in methods:
            return ActorMethod(self, name, methods[name])
        raise AttributeError(f"actor {self._meta.get('cls', '')} has no method {name!r}")

    def __reduce__(self) -> Any:
        if self._owned:
            with _handles.lock:
                _handles.escaped.add(self._actor_id)
        return (_rebuild_handle, (self._actor_id, self._meta))

    def __del__(self) -> None:
        if not self.__dict__.get("_owned"):
            return
        aid = self._actor_id
        with _handles.lock:
            n = _handles.counts.get(aid, 0) - 1
            if n > 0:
                _handles.counts[aid] = n
                return
            _handles.counts.pop(aid, None)
            if aid in _handles.escaped:
                return
        maybe_core = _worker_context.maybe_core
        if maybe_core is None:
            return  # the interpreter is exiting: module globals are gone, and so is the core
        core = maybe_core()
        if core is not None and not core.closed:
            core.send_head(Message(M.RELEASE_ACTOR, {"aid": aid}))

    def __repr__(self) -> str:
        return f"ActorHandle({self._meta.get('cls', '')}, {self._actor_id.hex()})"

    def _repr_html_(self) -> str:
        """For notebooks: class, name, state and node, from what this process knows."""
        from .jupyter_ext._reprs import actor_html

        return actor_html(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)

    @property
    def actor_id(self) -> str:
        return self._actor_id.hex()


def _rebuild_handle(actor_id: bytes, meta: dict[str, Any]) -> ActorHandle:
    return ActorHandle(actor_id, meta, owned=False)


class ActorMethod:
    def __init__(
        self,
        handle: ActorHandle,
        name: str,
        num_returns: Any,
        options: dict[str, Any] | None = None,
    ) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._options = options or {}
        self._call_name = self._options.get("name") or f"{handle._meta.get('cls', '')}.{name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor method {self._name} cannot be called directly; use .{self._name}.remote(...)"
        )

    def options(self, **options: Any) -> ActorMethod:
        validate(options, METHOD_OPTIONS, f"{self._name}.options()")
        return ActorMethod(
            self._handle, self._name, self._num_returns, {**self._options, **options}
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        core = _worker_context.maybe_core()
        if core is None:
            from ._api import _auto_init

            core = _auto_init()
        spec = TaskSpec()
        spec.task_id = core.ids.task_id()
        spec.actor_id = self._handle._actor_id
        spec.method = self._name
        spec.name = self._call_name
        nr = self._options.get("num_returns", self._num_returns)
        spec.num_returns = STREAMING if nr == "streaming" else nr
        retries = self._handle._meta.get("retries", {}).get(self._name) or (None, False)
        mtr = self._options.get("max_task_retries", retries[0])
        spec.max_retries = int(mtr if mtr is not None else self._handle._meta.get("mtr", 0))
        if "retry_exceptions" in self._options:
            spec.retry_exceptions = _as_spec_retry(self._options["retry_exceptions"])
        else:
            spec.retry_exceptions = _as_spec_retry(retries[1])
        spec.job = core.job_id
        spec.parent = _worker_context.current.task_id
        spec.out_tag = _worker_context.current_output_tag()
        if args or kwargs:
            encode_call_args(core, spec, None, args, kwargs, f"{spec.name}()")
        result = make_returns(core, spec)
        if spec.num_returns == STREAMING:
            core.tasks.streams[spec.task_id] = _Stream()
        core.actors.call(spec)
        return result


def _as_spec_retry(value: Any) -> bool | tuple[Any, ...]:
    """retry_exceptions for a TaskSpec: a bool, or classes and qualified class names."""
    return tuple(value) if isinstance(value, (list, tuple)) else bool(value)
