"""``shoal.util.state``: the state API under Ray's ``ray.util.state`` name (see shoal.state)."""

from ..state import *  # noqa: F403  (the same names, listed once, in shoal.state)
from ..state import __all__  # noqa: F401
