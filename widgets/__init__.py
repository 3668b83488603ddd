"""Notebook widgets for Shoal: a live cluster monitor and progress bars.

    from shoal.widgets import ClusterMonitor, progress
    ClusterMonitor()              # (or %cluster monitor) the cluster, live, 4 times a second
    progress(refs)                # done of total, failures, rate, time left

``shoal.get`` of several refs shows a progress bar by itself in a notebook once it has
waited a second (the extension, ``%load_ext shoal``, turns that on). See docs/monitoring.md.

``ClusterMonitor`` needs ipywidgets (``pip install "shoal[jupyter]"``); it is imported on
first use, so ``import shoal.widgets`` and ``progress`` work without it (as text or HTML).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._progress import ProgressBar as ProgressBar
from ._progress import progress as progress

if TYPE_CHECKING:
    from ._monitor import ClusterMonitor as ClusterMonitor

__all__ = ["ClusterMonitor", "ProgressBar", "progress"]


def __getattr__(name: str) -> Any:
    if name == "ClusterMonitor":
        try:
            from ._monitor import ClusterMonitor
        except ImportError as exc:
            raise ImportError(
                f"shoal.widgets.ClusterMonitor needs ipywidgets ({exc}): "
                'pip install "shoal[jupyter]"'
            ) from exc
        return ClusterMonitor
    raise AttributeError(f"module 'shoal.widgets' has no attribute {name!r}")
