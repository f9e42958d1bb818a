"""A long-running executor follows edits of the hosts file and the policy (ConfigFiles), and
what changes with them: transports of changed hosts, a host's share of running tasks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from fleetrun import hookimpl
from fleetrun.core import config_files as config_files_module
from fleetrun.core.batch import BatchOutcome, BatchRequest, run_batch
from fleetrun.core.config_files import ConfigFiles
from fleetrun.core.errors import FleetrunError, PolicyDenied
from fleetrun.core.executor import Executor
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.policy import read_only_policy
from fleetrun.core.slots import Slots
from fleetrun.core.transport import Transport

from conftest import wait_until

HOSTS = "hosts:\n  local: {}\n"
ALLOW_ECHO = "rules:\n  - allow: [echo *, sleep *, hold *]\n"
_ages = itertools.count(1)


def write(path: Path, text: str) -> None:
    """Write ``path`` as an editor would, and date it in the past, as a file saved a moment
    ago and no longer being written (each write gets its own time, so no two look alike)."""
    path.write_text(text)
    past = time.time() - 10 - next(_ages)
    os.utime(path, (past, past))


class _Held(Transport):
    """Runs nothing: a task's command names an event it waits for (``hold NAME``), or it
    ends at once. Records the transports made and closed, to follow them across edits."""

    name = "held"
    events: dict[str, threading.Event] = {}
    made: list["_Held"] = []
    closed: list["_Held"] = []

    def __init__(self, host):  # type: ignore[no-untyped-def]
        super().__init__(host)
        self.made.append(self)

    async def execute(self, execution):  # type: ignore[no-untyped-def]
        words = execution.command.split()
        if words[0] == "hold":
            event = self.events.setdefault(words[1], threading.Event())
            while not event.is_set():
                await asyncio.sleep(0.005)
        return 0

    async def aclose(self) -> None:
        self.closed.append(self)


class _RegisterHeld:
    @hookimpl
    def fleetrun_register_transports(self, register):  # type: ignore[no-untyped-def]
        register(_Held)


@pytest.fixture
def held():  # type: ignore[no-untyped-def]
    _Held.events, _Held.made, _Held.closed = {}, [], []
    yield _Held
    for event in _Held.events.values():
        event.set()


@pytest.fixture
def following(tmp_path, store):  # type: ignore[no-untyped-def]
    """An executor over hosts.yaml and policy.yaml in tmp_path, as `fleetrun serve` makes it."""
    made: list[Executor] = []
    hosts, policy = tmp_path / "hosts.yaml", tmp_path / "policy.yaml"

    def build(hosts_text: str | None = HOSTS, policy_text: str | None = ALLOW_ECHO):  # type: ignore[no-untyped-def]
        """None for a file: none given, so the config dir's is used, if there is one."""
        if hosts_text is not None:
            write(hosts, hosts_text)
        if policy_text is not None:
            write(policy, policy_text)
        manager = PluginManager(plugins=[_RegisterHeld()], autoload=False)
        files = ConfigFiles(
            hosts=hosts if hosts_text is not None else None, policy=policy if policy_text is not None else None,
            transports=manager.transports, fallback_policy=read_only_policy,
        )
        executor = Executor(config_files=files, store=store, plugins=manager)
        made.append(executor)
        return executor

    yield build
    for executor in made:
        executor.close()


def test_an_edited_policy_judges_the_next_request(following, tmp_path):
    executor = following()
    assert executor.run(TaskRequest(host="local", command="echo before")).status is TaskStatus.SUCCEEDED

    write(tmp_path / "policy.yaml", "rules:\n  - allow: sleep *\n  - deny: echo *\n")
    with pytest.raises(PolicyDenied) as denied:
        executor.submit(TaskRequest(host="local", command="echo after"))
    assert str(denied.value) == (
        f"denied on host 'local': 'echo after' is denied [rule 2 of {tmp_path / 'policy.yaml'}, line 3: deny: echo *]"
    )
    plan = executor.plan(TaskRequest(host="local", command="echo after"))
    assert plan.decision is not None and not plan.decision.allowed

    write(tmp_path / "policy.yaml", ALLOW_ECHO)
    assert executor.run(TaskRequest(host="local", command="echo again")).status is TaskStatus.SUCCEEDED
    assert [t.command for t in executor.list()] == ["echo again", "echo before"]


def test_a_rule_that_lets_any_command_through_is_named_when_the_policy_is_read_and_reread(tmp_path, caplog):
    policy = tmp_path / "policy.yaml"
    write(policy, "rules:\n  - allow: [uptime *, awk *]\n")
    with caplog.at_level(logging.WARNING, logger="fleetrun.config"):
        files = ConfigFiles(policy=policy)
        write(policy, "rules:\n  - allow: uptime *\n  - allow: tar -tzf *\n")
        files.refresh()
        write(policy, "rules:\n  - allow: uptime *\n")  # nothing to warn about: nothing logged
        files.refresh()
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [
        f"rule 1 of {policy}, line 2: allow: awk *: awk runs commands through system() and pipes in its program, "
        "so this rule lets any command through; allow the forms you mean instead, such as 'awk -F: '{print $1}' /etc/passwd'",
        f"rule 2 of {policy}, line 3: allow: tar -tzf *: tar runs commands (--to-command, --checkpoint-action=exec=…), "
        "so this rule lets any command through; allow the forms you mean instead, such as 'tar -tzf /backups/*.tar.gz'",
    ]


def test_a_policy_edited_during_a_batch_leaves_out_the_hosts_it_now_denies(following, tmp_path, held):
    executor = following(hosts_text="hosts:\n  a: {transport: held}\n  b: {transport: held}\n", policy_text="rules:\n  - allow: hold *\n")
    batch = BatchRequest(hosts=("a", "b"), command="hold go", max_parallel=1)
    outcome: list[BatchOutcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run_batch(executor, batch)))
    runner.start()
    wait_until(lambda: [t.status for t in executor.list()] == [TaskStatus.RUNNING])
    write(tmp_path / "policy.yaml", "rules:\n  - allow: hold *\n    hosts: [a]\n")
    held.events.setdefault("go", threading.Event()).set()
    runner.join(10)
    (ended,) = outcome
    assert [(t.host, t.status) for t in ended.tasks] == [("a", TaskStatus.SUCCEEDED)]
    assert ended.not_started == ("b",)
    assert ended.why_not_started["b"].startswith("denied on host 'b': 'hold go' matches no rule")


def test_a_file_edited_into_a_mistake_stops_new_tasks_until_fixed_and_started_ones_go_on(following, tmp_path, marker, caplog):
    executor = following()
    running = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
    wait_until(lambda: executor.get(running.id).status is TaskStatus.RUNNING)

    write(tmp_path / "policy.yaml", "rules:\n  - allow: echo *\n    hots: [web1]\n")
    with caplog.at_level(logging.ERROR, logger="fleetrun.config"):
        for _ in range(3):
            with pytest.raises(FleetrunError) as broken:
                executor.submit(TaskRequest(host="local", command="echo hi"))
            assert str(broken.value).startswith(f"{tmp_path / 'policy.yaml'}:3: rule 1, field 'hots': unknown field")
            assert str(broken.value).endswith(
                "(the file changed while fleetrun was running: nothing new runs until it is fixed, "
                "and no restart is needed; tasks already started go on)"
            )
        with pytest.raises(FleetrunError, match="field 'hots'"):
            executor.plan(TaskRequest(host="local", command="echo hi"))
        with pytest.raises(FleetrunError, match="field 'hots'"):
            executor.inventory  # noqa: B018 -- what the MCP server lists hosts from
    assert [r.getMessage().split(": ", 1)[0] for r in caplog.records] == ["the configuration changed and cannot be used"]

    # The task started before goes on, and can be followed and cancelled.
    assert executor.get(running.id).status is TaskStatus.RUNNING
    assert executor.cancel(running.id) is True
    assert running.wait(10).status is TaskStatus.CANCELLED

    write(tmp_path / "hosts.yaml", "hosts:\n  local:\n    max_seconds: soon\n")  # a mistake in the other file too
    write(tmp_path / "policy.yaml", ALLOW_ECHO)
    with pytest.raises(FleetrunError) as hosts_broken:  # fixing one file leaves the other's mistake
        executor.submit(TaskRequest(host="local", command="echo hi"))
    assert str(hosts_broken.value).startswith(f"{tmp_path / 'hosts.yaml'}:3: host 'local', field 'max_seconds': expected a number")
    write(tmp_path / "hosts.yaml", HOSTS)
    assert executor.run(TaskRequest(host="local", command="echo fixed")).status is TaskStatus.SUCCEEDED


def test_a_file_changed_a_moment_ago_is_taken_once_it_has_been_still(following, tmp_path, monkeypatch):
    executor = following()
    monkeypatch.setattr(config_files_module, "SETTLE_SECONDS", 5.0)  # write() dates files >= 10 s ago
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - deny: echo *\n")  # dated now: perhaps still being written
    assert executor.run(TaskRequest(host="local", command="echo still the old policy")).status is TaskStatus.SUCCEEDED
    past = time.time() - 7200
    os.utime(policy, (past, past))
    with pytest.raises(PolicyDenied):
        executor.submit(TaskRequest(host="local", command="echo now the new one"))

    # A fix being written does not lift a mistake early: nothing runs until the fix is still.
    write(policy, "rules: [")
    with pytest.raises(FleetrunError, match="no restart is needed"):
        executor.submit(TaskRequest(host="local", command="echo hi"))
    policy.write_text(ALLOW_ECHO)
    with pytest.raises(FleetrunError, match="no restart is needed"):
        executor.submit(TaskRequest(host="local", command="echo hi"))
    os.utime(policy, (past - 1, past - 1))
    assert executor.run(TaskRequest(host="local", command="echo hi")).status is TaskStatus.SUCCEEDED


def test_a_file_missing_for_the_moment_of_a_save_keeps_its_previous_version(following, tmp_path, monkeypatch):
    # vim saves by renaming the file away and writing a new one: for a moment there is none,
    # which must not bring in the default inventory (a host `local` the file left out).
    hosts = tmp_path / "config" / "fleetrun" / "hosts.yaml"
    hosts.parent.mkdir(parents=True)
    write(hosts, "hosts:\n  web: {}\n")
    executor = following(hosts_text=None)
    write(hosts, "hosts:\n  web: {description: edited}\n")
    assert executor.inventory.hosts["web"].description == "edited"
    monkeypatch.setattr(config_files_module, "SETTLE_SECONDS", 5.0)  # write() dates files >= 10 s ago
    hosts.rename(hosts.with_name("hosts.yaml~"))  # the directory changes now
    assert sorted(executor.inventory.hosts) == ["web"]
    past = time.time() - 60
    os.utime(hosts.parent, (past, past))  # gone for good
    assert sorted(executor.inventory.hosts) == ["local"]


def test_the_config_dir_policy_may_appear_and_go_and_a_given_one_must_stay(following, tmp_path, store):
    executor = following(policy_text=None)  # none given: the config dir's, else the built-in one
    assert executor.policy == read_only_policy()
    with pytest.raises(PolicyDenied, match="built-in read-only policy"):
        executor.submit(TaskRequest(host="local", command="sleep 0"))
    configured = tmp_path / "config" / "fleetrun" / "policy.yaml"  # XDG_CONFIG_HOME is tmp_path/config
    configured.parent.mkdir(parents=True)
    write(configured, "rules:\n  - allow: sleep *\n")
    assert executor.run(TaskRequest(host="local", command="sleep 0")).status is TaskStatus.SUCCEEDED
    configured.unlink()
    past = time.time() - 60
    os.utime(configured.parent, (past, past))  # gone a while ago, not in the middle of a save
    with pytest.raises(PolicyDenied, match="built-in read-only policy"):
        executor.submit(TaskRequest(host="local", command="sleep 0"))

    given = following()
    (tmp_path / "policy.yaml").unlink()
    os.utime(tmp_path, (past, past))
    with pytest.raises(FleetrunError) as gone:
        given.submit(TaskRequest(host="local", command="echo hi"))
    assert str(gone.value).startswith(f"{tmp_path / 'policy.yaml'}: policy file not found (given by --policy)")


def test_hosts_come_and_go_and_a_changed_host_gets_a_new_transport_after_its_tasks_end(following, tmp_path, held):
    executor = following(hosts_text="hosts:\n  box: {transport: held, description: first}\n")
    with pytest.raises(FleetrunError, match="unknown host 'new'"):
        executor.submit(TaskRequest(host="new", command="echo hi"))

    holding = executor.submit(TaskRequest(host="box", command="hold first"))
    wait_until(lambda: executor.get(holding.id).status is TaskStatus.RUNNING)
    (first,) = held.made
    write(tmp_path / "hosts.yaml", "hosts:\n  box: {transport: held, description: second}\n  new: {transport: held}\n")
    assert sorted(executor.inventory.hosts) == ["box", "new"]
    assert executor.run(TaskRequest(host="box", command="echo hi")).status is TaskStatus.SUCCEEDED
    assert executor.run(TaskRequest(host="new", command="echo hi")).status is TaskStatus.SUCCEEDED
    second = held.made[1]
    assert (first.host.description, second.host.description, held.made[2].host.name) == ("first", "second", "new")
    assert held.closed == []  # the first still runs a task: closing it would end that task

    # An unchanged entry keeps its transport (its connection); the first closes after its task.
    write(tmp_path / "hosts.yaml", "hosts:\n  box: {transport: held, description: second}\n  new: {transport: held}\n# a comment\n")
    assert executor.run(TaskRequest(host="box", command="echo hi")).status is TaskStatus.SUCCEEDED
    assert len(held.made) == 3
    held.events["first"].set()
    assert holding.wait(10).status is TaskStatus.SUCCEEDED
    wait_until(lambda: held.closed == [first])

    executor.close()
    assert sorted(t.host.name for t in held.closed[1:]) == ["box", "new"]


def test_a_changed_max_concurrent_applies_to_the_hosts_queued_tasks(following, tmp_path, held):
    executor = following(hosts_text="hosts:\n  box: {transport: held, max_concurrent: 1}\n")

    def statuses(handles):  # type: ignore[no-untyped-def]
        return [executor.get(h.id).status.value for h in handles]

    first = [executor.submit(TaskRequest(host="box", command=f"hold {n}")) for n in range(3)]
    wait_until(lambda: statuses(first) == ["running", "queued", "queued"])
    write(tmp_path / "hosts.yaml", "hosts:\n  box: {transport: held, max_concurrent: 4}\n")
    later = executor.submit(TaskRequest(host="box", command="hold 3"))  # the host's next task brings the new limit
    wait_until(lambda: statuses([*first, later]) == ["running"] * 4)

    write(tmp_path / "hosts.yaml", "hosts:\n  box: {transport: held, max_concurrent: 2}\n")
    last = [executor.submit(TaskRequest(host="box", command=f"hold {n}")) for n in (4, 5)]
    time.sleep(0.2)
    assert statuses(last) == ["queued", "queued"]  # four hold slots; two may
    for n in range(3):
        held.events.setdefault(str(n), threading.Event()).set()
    wait_until(lambda: statuses(last) == ["running", "queued"])  # the two left: 3 and 4
    held.events.setdefault("3", threading.Event()).set()
    wait_until(lambda: statuses(last) == ["running", "running"])


def test_reconfigure_by_hand_holds_until_the_files_change_again(following, tmp_path):
    executor = following()
    executor.reconfigure(inventory=executor.inventory, policy=read_only_policy())
    assert executor.policy == read_only_policy()
    with pytest.raises(PolicyDenied, match="built-in read-only policy"):
        executor.submit(TaskRequest(host="local", command="sleep 0"))
    write(tmp_path / "policy.yaml", "rules:\n  - allow: sleep *\n")
    assert executor.policy is not None and executor.policy.source == str(tmp_path / "policy.yaml")
    assert executor.run(TaskRequest(host="local", command="sleep 0")).status is TaskStatus.SUCCEEDED
    with pytest.raises(ValueError, match="not both"):
        Executor(config_files=ConfigFiles(), inventory=executor.inventory)


# -- slots whose limit changes ----------------------------------------------------------------


def test_slots_let_waiters_in_first_come_first_served_as_the_limit_rises_and_falls():
    async def scenario() -> list[str]:
        slots, order, release = Slots(1), [], {n: asyncio.Event() for n in range(5)}

        async def hold(n: int) -> None:
            async with slots:
                order.append(f"in {n}")
                await release[n].wait()

        tasks = [asyncio.create_task(hold(n)) for n in range(5)]
        await asyncio.sleep(0.01)
        assert (order, slots.held) == (["in 0"], 1)
        slots.resize(3)
        await asyncio.sleep(0.01)
        assert (order, slots.held) == (["in 0", "in 1", "in 2"], 3)
        slots.resize(1)
        release[0].set()
        release[1].set()
        await asyncio.sleep(0.01)
        assert slots.held == 1 and order[-1] == "in 2"  # two left; the limit of one is still taken by 2
        tasks[3].cancel()  # a waiter that gives up leaves its place to the next
        release[2].set()
        await asyncio.sleep(0.01)
        assert order[-1] == "in 4" and slots.held == 1
        release[4].set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert slots.held == 0
        return order

    assert asyncio.run(scenario()) == ["in 0", "in 1", "in 2", "in 4"]


def test_slots_given_to_a_waiter_cancelled_at_that_moment_pass_on():
    async def scenario() -> None:
        slots = Slots(1)
        await slots.__aenter__()
        first = asyncio.create_task(slots.__aenter__())
        second = asyncio.create_task(slots.__aenter__())
        await asyncio.sleep(0)
        await slots.__aexit__(None, None, None)  # the slot goes to the first waiter...
        first.cancel()  # ...which is cancelled before it runs again
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)  # so the second gets it
        assert slots.held == 1

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        Slots(0)
