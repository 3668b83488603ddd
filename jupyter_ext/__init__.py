"""IPython extension for Shoal: the ``%cluster`` and ``%%remote`` magics, task errors that
read like local ones, rich reprs of refs, actors and the cluster.

    %load_ext shoal                 (or shoal.init() inside IPython) registers the magics
    %cluster start --cpus 4         a local cluster, driven by this kernel
    %%remote                        run a cell on it

See docs/notebook.md. Importing this package is cheap and never imports IPython: workers
import its ``_runner``, ``_shipping`` and ``_reprs`` modules; IPython comes in only when
the extension is loaded.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext shoal`` (or ``%load_ext shoal.jupyter_ext``): register the magics."""
    from ._magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from ._magics import unregister

    unregister(ipython)


def register_if_in_ipython() -> None:
    """Called by ``shoal.init()``: inside IPython, make the magics available."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return  # not in IPython; importing it here would cost a worker 100 ms for nothing
    try:
        shell = ipython.get_ipython()
        if shell is not None:
            load_ipython_extension(shell)
            from shoal import _worker_context

            from ._output import install

            core = _worker_context.maybe_core()
            if core is not None:
                install(core, shell)  # tasks' output goes to the cells that started them
    except Exception as exc:  # never let the magics stop init()
        import warnings

        warnings.warn(f"shoal: the notebook magics could not be registered: {exc}", stacklevel=3)
