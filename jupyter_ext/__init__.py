"""IPython extension for Shoal: `%cluster` and `%%remote` magics (in development).

Importing this package must stay cheap for workers, which never import it: IPython is
imported only when the extension is loaded.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext shoal``: the magics are not released yet; say so instead of nothing."""
    print(
        "shoal: the %cluster and %%remote magics are not available in this version yet; use the Python API."
    )
