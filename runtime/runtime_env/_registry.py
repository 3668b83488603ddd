"""The plugins, by the runtime_env field each handles. A new field (conda, a container) is a
module with a RuntimeEnvPlugin subclass, added here; nothing else changes."""

from __future__ import annotations

from ._env_vars import EnvVarsPlugin
from ._pip import PipPlugin
from ._plugin import RuntimeEnvPlugin
from ._py_modules import PyModulesPlugin
from ._working_dir import WorkingDirPlugin

PLUGINS: dict[str, RuntimeEnvPlugin] = {
    p.name: p for p in (WorkingDirPlugin(), PyModulesPlugin(), PipPlugin(), EnvVarsPlugin())
}


def ordered(wire: dict[str, object]) -> list[tuple[str, RuntimeEnvPlugin]]:
    """The plugins of the fields ``wire`` sets, in the order they create and apply."""
    return sorted(
        ((name, plugin) for name, plugin in PLUGINS.items() if name in wire),
        key=lambda item: item[1].order,
    )
