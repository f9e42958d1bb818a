"""fleetrun: run shell commands as tasks on hosts, through pluggable transports.

Plugin authors need only :data:`hookimpl`::

    from fleetrun import hookimpl

    @hookimpl
    def fleetrun_task_completed(task, result):
        ...

Everything else is importable from here lazily, so ``import fleetrun`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetrun.core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

_LAZY = {
    "Executor": "fleetrun.core.executor",
    "TaskHandle": "fleetrun.core.executor",
    "TaskRequest": "fleetrun.core.models",
    "Task": "fleetrun.core.models",
    "TaskResult": "fleetrun.core.models",
    "TaskStatus": "fleetrun.core.models",
    "Progress": "fleetrun.core.models",
    "Limits": "fleetrun.core.models",
    "Inventory": "fleetrun.core.inventory",
    "Host": "fleetrun.core.inventory",
    "load_inventory": "fleetrun.core.inventory",
    "Transport": "fleetrun.core.transport",
    "TransportError": "fleetrun.core.transport",
    "PluginManager": "fleetrun.core.plugin_manager",
    "TaskStore": "fleetrun.core.store",
    "FleetrunError": "fleetrun.core.errors",
    "PluginError": "fleetrun.core.errors",
}

__all__ = ["hookimpl", "hookspec", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from fleetrun.core.errors import FleetrunError, PluginError
    from fleetrun.core.executor import Executor, TaskHandle
    from fleetrun.core.inventory import Host, Inventory, load_inventory
    from fleetrun.core.models import Limits, Progress, Task, TaskRequest, TaskResult, TaskStatus
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.store import TaskStore
    from fleetrun.core.transport import Transport, TransportError


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fleetrun' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
