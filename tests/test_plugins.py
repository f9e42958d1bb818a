"""The plugin manager: built-ins, entry points, blocking, tracing, validation, docs."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading

import pytest

from fleetrun import hookimpl
from fleetrun.core import executor as executor_module
from fleetrun.core import hookspecs
from fleetrun.core.errors import PluginError
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.transport import Transport

from conftest import REPO, wait_until


def all_hookspecs() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("fleetrun_")]


def test_every_hook_is_documented_in_docs_plugins_md():
    docs = (REPO / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### `(fleetrun_\w+)\(", docs, flags=re.M))
    assert set(all_hookspecs()) == headings
    for name in all_hookspecs():
        spec = getattr(hookspecs, name)
        params = ", ".join(inspect.signature(spec).parameters)
        assert f"### `{name}({params})`" in docs, f"docs/plugins.md: wrong signature for {name}"


def test_every_hookspec_has_a_full_docstring():
    for name in all_hookspecs():
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc.splitlines()) >= 3, name
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_builtins_are_registered_and_listed():
    manager = PluginManager(autoload=False)
    assert set(manager.transports) == {"local", "ssh"}
    info = {p.name: p for p in manager.plugins()}
    assert info["fleetrun.transports.local"].source == "built-in"
    assert info["fleetrun.transports.local"].hooks == ("fleetrun_register_transports",)


def test_blocked_plugins_are_not_loaded_and_are_listed_with_what_each_name_matched():
    manager = PluginManager(autoload=False, environ={"FLEETRUN_DISABLE_PLUGINS": "fleetrun.transports.local, fleetrun.transport.ssh"})
    assert set(manager.transports) == {"ssh"}
    assert [(p.name, p.source, p.hooks, p.blocked) for p in manager.plugins()] == [
        ("fleetrun.transports.ssh", "built-in", ("fleetrun_register_transports",), False),
        ("fleetrun.transports.local", "built-in", (), True),
        # A misspelt name blocks nothing; the listing shows it.
        ("fleetrun.transport.ssh", "matched no plugin", (), True),
    ]


class _Listener:
    @hookimpl
    def fleetrun_task_created(self, task):
        pass


class _Typo:
    @hookimpl
    def fleetrun_task_complete(self, task, result):  # missing "d"
        pass


class _ExtraArgument:
    def __init__(self) -> None:
        self.cancels: list[str] = []

    @hookimpl
    def fleetrun_task_cancelled(self, task, reason):  # fits, and pluggy takes it before the next one
        self.cancels.append(reason)

    @hookimpl
    def fleetrun_task_created(self, task, retries):
        pass


@pytest.mark.parametrize(
    "plugin, message",
    [
        # An unknown hook name, with the nearest hook.
        (_Typo(), "plugin 'test_plugins._Typo' does not fit fleetrun's hooks: it implements 'fleetrun_task_complete', "
                  "which is not a fleetrun hook (did you mean 'fleetrun_task_completed'?)"),
        # A hook taking an argument its spec does not offer (pluggy's traceback before).
        (_ExtraArgument(), "plugin 'test_plugins._ExtraArgument' does not fit fleetrun's hooks: hookimpl definition: "
                           "fleetrun_task_created(task, retries); "
                           "Argument(s) {'retries'} are declared in the hookimpl but can not be found in the hookspec"),
        # A class, whose hooks would have no `self`.
        (_Listener, "plugin 'test_plugins._Listener' does not fit fleetrun's hooks: it is the class test_plugins._Listener, "
                    "whose hooks would have no `self`: use an instance of it, or a module"),
    ],
    ids=["unknown-hook", "extra-argument", "class"],
)
def test_a_plugin_that_does_not_fit_the_hooks_is_refused_at_load_saying_why(plugin, message):
    with pytest.raises(PluginError) as raised:
        PluginManager(plugins=[plugin], autoload=False)
    assert str(raised.value) == message


@pytest.mark.parametrize("misfit", [_Typo, _ExtraArgument])
def test_a_plugin_register_refuses_leaves_nothing_behind(misfit, recorder):
    manager = PluginManager(plugins=[recorder], autoload=False)
    before = [p.name for p in manager.plugins()]
    refused = misfit()
    with pytest.raises(PluginError, match="^plugin 'misfit' does not fit fleetrun's hooks: "):
        manager.register(refused, name="misfit")
    assert manager.get("misfit") is None
    assert [p.name for p in manager.plugins()] == before
    manager.register(_Listener(), name="later")  # the manager still takes plugins that fit
    manager.task_created(_task())
    manager.task_cancelled(_task(), "stop")
    assert recorder.names() == ["task.created", "task.cancelled"]
    assert getattr(refused, "cancels", []) == []


def test_tracing_switch_logs_hook_calls(caplog):
    manager = PluginManager(plugins=[_Listener()], autoload=False, environ={"FLEETRUN_TRACE": "1"})
    with caplog.at_level(logging.INFO, logger="fleetrun.trace"):
        manager.task_created(_task())
    traced = [r.getMessage() for r in caplog.records if r.name == "fleetrun.trace"]
    assert any("fleetrun_task_created" in line for line in traced), traced
    quiet = PluginManager(plugins=[_Listener()], autoload=False, environ={})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fleetrun.trace"):
        quiet.task_created(_task())
    assert not [r for r in caplog.records if r.name == "fleetrun.trace"]


def _registering(transport: type[Transport]) -> object:
    """A plugin that adds ``transport``."""

    class Plugin:
        @hookimpl
        def fleetrun_register_transports(self, register):
            register(transport)

    return Plugin()


def _task():
    from fleetrun.core.models import Task

    return Task(id="0123456789ab", host="local", transport="local", command="true", status=TaskStatus.QUEUED, created_at=0.0)


def test_a_transport_that_cannot_describe_a_host_still_plans_and_runs_it(make_executor, caplog):
    class MuddledTransport(Transport):
        name = "muddled"

        def describe(self):
            raise KeyError("region")

        async def execute(self, execution):
            return 0

    executor = make_executor(plugins=[_registering(MuddledTransport)], hosts_yaml="hosts:\n  fake:\n    transport: muddled\n")
    plan = executor.plan(TaskRequest(host="fake", command="true"))
    assert plan.transport_details == {"error": "the muddled transport could not describe this host: KeyError: 'region'"}
    assert "the muddled transport could not describe host 'fake'" in caplog.text
    assert executor.run(TaskRequest(host="fake", command="true")).status is TaskStatus.SUCCEEDED


def test_a_plugin_can_add_a_transport(make_executor):
    class EchoTransport(Transport):
        name = "echo"

        async def execute(self, execution):
            execution.stdout.write(f"would run: {execution.command}\n".encode())
            return 0

    executor = make_executor(plugins=[_registering(EchoTransport)], hosts_yaml="hosts:\n  fake:\n    transport: echo\n")
    task = executor.run(TaskRequest(host="fake", command="rm -rf /"))
    assert task.status is TaskStatus.SUCCEEDED and task.transport == "echo"
    assert executor.read_output(task.id).data == b"would run: rm -rf /\n"


def test_a_transport_that_breaks_fails_its_task_and_nothing_else(make_executor, recorder, caplog):
    class BrokenTransport(Transport):
        name = "broken"

        async def execute(self, execution):
            execution.stdout.write(b"partial\n")
            raise KeyError("token=hunter2-in-the-message")  # a bug, not a TransportError

    executor = make_executor(
        plugins=[_registering(BrokenTransport)],
        hosts_yaml="hosts:\n  flaky:\n    transport: broken\n  local:\n    transport: local\n",
    )
    with caplog.at_level(logging.ERROR, logger="fleetrun.executor"):
        task = executor.run(TaskRequest(host="flaky", command="true"))
    assert (task.status, task.exit_code, task.error_category) == (TaskStatus.FAILED, None, "internal")
    # Only the exception's type: its message may carry anything, the log has the traceback.
    assert task.error == "the broken transport failed unexpectedly (KeyError; see the log)"
    assert executor.read_output(task.id).data == b"partial\n"
    assert recorder.names(task.id) == ["task.created", "task.progress", "task.completed"]
    assert recorder[-1].result.error == task.error
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
    assert executor.run(TaskRequest(host="local", command="true")).status is TaskStatus.SUCCEEDED


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_a_transport_that_swallows_its_cancellation_still_ends_its_task_as_stopped(make_executor, recorder, ending):
    class StubbornTransport(Transport):
        name = "stubborn"

        async def execute(self, execution):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:  # a third-party transport that stops late, and says all went well
                await asyncio.sleep(0.05)
            return 0

    executor = make_executor(plugins=[_registering(StubbornTransport)], hosts_yaml="hosts:\n  mule:\n    transport: stubborn\n")
    if ending == "timeout":
        task = executor.run(TaskRequest(host="mule", command="true", timeout_s=0.2))
        # Before: succeeded, with exit code 0, though it was stopped for running too long.
        assert (task.status, task.exit_code, task.error) == (TaskStatus.TIMED_OUT, None, "timed out after 0.2 s")
    else:
        handle = executor.submit(TaskRequest(host="mule", command="true"))
        wait_until(lambda: executor.get(handle.id).status is TaskStatus.RUNNING)
        executor.cancel(handle.id, "no longer needed")
        task = handle.wait(10)
        assert (task.status, task.exit_code, task.cancel_reason) == (TaskStatus.CANCELLED, None, "no longer needed")
    assert recorder.names(task.id)[-1] == ("task.completed" if ending == "timeout" else "task.cancelled")


def test_a_transport_that_never_stops_does_not_hold_its_task_or_the_executor_open(make_executor, recorder, monkeypatch, caplog):
    monkeypatch.setattr(executor_module, "_STOP_GRACE_SECONDS", 0.3)
    released = threading.Event()

    class DeafTransport(Transport):
        name = "deaf"

        async def execute(self, execution):
            while not released.is_set():  # a third-party transport that ignores cancellation
                try:
                    await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    pass
            return 0

    executor = make_executor(plugins=[_registering(DeafTransport)], hosts_yaml="hosts:\n  deaf:\n    transport: deaf\n")
    try:
        with caplog.at_level(logging.ERROR, logger="fleetrun.executor"):
            timed = executor.submit(TaskRequest(host="deaf", command="true", timeout_s=0.2)).wait(10)
        # Before: the task never ended (and run() waited for ever).
        assert (timed.status, timed.error_category) == (TaskStatus.TIMED_OUT, "internal")
        assert timed.error == "timed out after 0.2 s; the deaf transport did not stop within 0.3 s (see the log)"
        assert f"task {timed.id}: the deaf transport did not stop within 0.3 s" in caplog.text
        handle = executor.submit(TaskRequest(host="deaf", command="true"))
        wait_until(lambda: executor.get(handle.id).status is TaskStatus.RUNNING)
        executor.cancel(handle.id, "enough")
        cancelled = handle.wait(10)
        assert (cancelled.status, cancelled.cancel_reason) == (TaskStatus.CANCELLED, "enough")
        assert cancelled.error == "the deaf transport did not stop within 0.3 s (see the log)"
        assert recorder.names(cancelled.id) == ["task.created", "task.cancelled"]  # once, though its runner lives on
        stuck = executor.submit(TaskRequest(host="deaf", command="true"))
        wait_until(lambda: executor.get(stuck.id).status is TaskStatus.RUNNING)
        executor.close()  # before: waited for ever for that runner
        assert stuck.wait(0).status is TaskStatus.CANCELLED
    finally:
        released.set()


def test_two_transports_with_one_name_is_an_error():
    class Other(Transport):
        name = "local"

        async def execute(self, execution):
            return 0

    class Clash:
        @hookimpl
        def fleetrun_register_transports(self, register):
            register(Other)

    with pytest.raises(PluginError, match="two transports are named 'local'"):
        PluginManager(plugins=[Clash()], autoload=False).transports


def test_register_takes_only_transport_classes():
    class Wrong:
        @hookimpl
        def fleetrun_register_transports(self, register):
            register(object)

    with pytest.raises(PluginError, match="register\\(\\) takes a Transport subclass"):
        PluginManager(plugins=[Wrong()], autoload=False).transports


def test_a_transport_registration_that_raises_is_a_plugin_error_naming_the_plugin():
    class NoSocket:
        @hookimpl
        def fleetrun_register_transports(self, register):
            raise OSError("no docker socket")

    manager = PluginManager(plugins=[NoSocket()], autoload=False)
    with pytest.raises(PluginError) as raised:
        manager.transports
    assert str(raised.value) == (
        "plugin 'test_plugins.test_a_transport_registration_that_raises_is_a_plugin_error_naming_the_plugin"
        ".<locals>.NoSocket' failed in fleetrun_register_transports: OSError: no docker socket"
    )
