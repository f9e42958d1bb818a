"""fleetrun's pytest plugin (entry point ``pytest11``): fixtures to run real tasks in tests.

* ``fleetrun_executor``: an :class:`~fleetrun.Executor` on the embedded default inventory
  (host ``local``, local transport), with a task store of its own in a temporary
  directory and no third-party plugins;
* ``fleetrun_events``: the :class:`~fleetrun.core.events.EventRecorder` plugged into
  that executor; its ``events`` are the lifecycle events fired, in order.

Example (the README's, which a test runs)::

    from fleetrun import TaskRequest, TaskStatus

    def test_deploy_script(fleetrun_executor, fleetrun_events):
        task = fleetrun_executor.run(TaskRequest(host="local", command="./deploy.sh --check"))
        assert task.status is TaskStatus.SUCCEEDED
        assert fleetrun_events.names(task.id)[-1] == "task.completed"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from fleetrun.core.events import EventRecorder
    from fleetrun.core.executor import Executor


@pytest.fixture
def fleetrun_events() -> EventRecorder:
    """Lifecycle events fired by ``fleetrun_executor``, in the order they fired."""
    from fleetrun.core.events import EventRecorder

    return EventRecorder()


@pytest.fixture
def fleetrun_executor(tmp_path_factory: pytest.TempPathFactory, fleetrun_events: EventRecorder) -> Iterator[Executor]:
    """An executor on the local transport with an isolated store; closed after the test."""
    from fleetrun.core.executor import Executor
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.store import TaskStore

    store = TaskStore(tmp_path_factory.mktemp("fleetrun-store"))
    plugins = PluginManager(plugins=[fleetrun_events], autoload=False)
    executor = Executor(store=store, plugins=plugins, heartbeat_s=1.0)
    try:
        yield executor
    finally:
        executor.close()
        store.close()
