"""Shoal: Ray's programming model for Python clusters, with the notebook as its home.

import shoal
shoal.init()

@shoal.remote
def square(x):
    return x * x

shoal.get([square.remote(i) for i in range(4)])   # [0, 1, 4, 9]
"""

from __future__ import annotations

from typing import Any

from . import exceptions as exceptions
from ._actor import ActorClass
from ._actor import ActorHandle as ActorHandle
from ._actor import method as method
from ._api import (
    available_resources as available_resources,
)
from ._api import (
    cancel as cancel,
)
from ._api import (
    cluster_resources as cluster_resources,
)
from ._api import (
    get as get,
)
from ._api import (
    get_actor as get_actor,
)
from ._api import (
    get_runtime_context as get_runtime_context,
)
from ._api import (
    init as init,
)
from ._api import (
    is_initialized as is_initialized,
)
from ._api import (
    kill as kill,
)
from ._api import (
    nodes as nodes,
)
from ._api import (
    put as put,
)
from ._api import (
    shutdown as shutdown,
)
from ._api import (
    wait as wait,
)
from ._refs import ObjectRef as ObjectRef
from ._refs import ObjectRefGenerator as ObjectRefGenerator
from ._remote_function import RemoteFunction

__version__ = "0.1.0"

__all__ = [
    "ActorHandle",
    "ObjectRef",
    "ObjectRefGenerator",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "wait",
]


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a task, or a class an actor: ``@remote`` or ``@remote(num_cpus=2, ...)``."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@remote takes either one function or class, or only keyword options")

    def decorate(target: Any) -> Any:
        return _make_remote(target, options)

    return decorate


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    if isinstance(target, type):
        return ActorClass(target, options)
    if callable(target):
        return RemoteFunction(target, options)
    raise TypeError(f"@remote expects a function or a class, got {type(target).__name__}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext shoal``: hands over to shoal.jupyter_ext, imported only now."""
    from .jupyter_ext import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .jupyter_ext import unload_ipython_extension as unload

    unload(ipython)
