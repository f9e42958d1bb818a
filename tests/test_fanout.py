"""Fan-out: one command on several hosts, through the core API and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleetrun.core.batch import BatchRequest, run_batch, run_batch_async, select_hosts
from fleetrun.core.errors import FleetrunError, UnknownHostError
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.models import TaskRequest, TaskStatus

from conftest import hosts_file_text, run_cli, ssh_host

LOCAL_HOSTS = """
hosts:
  a: {tags: [web]}
  b: {tags: [web]}
  c: {tags: [db]}
  d: {tags: [web, db]}
"""


def max_overlap(tasks) -> int:
    edges = sorted([(t.started_at, 1) for t in tasks] + [(t.ended_at, -1) for t in tasks])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_hosts_are_selected_by_name_list_and_tag():
    inventory = parse_inventory(LOCAL_HOSTS)
    assert select_hosts(inventory, ["b,a", "b"]) == ("b", "a")
    assert select_hosts(inventory, [], tag="db") == ("c", "d")
    assert select_hosts(inventory, ["a"], tag="db") == ("a", "c", "d")
    with pytest.raises(UnknownHostError, match="unknown host 'zz'"):
        select_hosts(inventory, ["a,zz"])
    with pytest.raises(FleetrunError, match=r"no host has tag 'nope' \(tags in use: db, web\)"):
        select_hosts(inventory, [], tag="nope")
    with pytest.raises(FleetrunError, match="empty host name"):
        select_hosts(inventory, ["a,,b"])
    tagged = parse_inventory("hosts:\n  a:\n    tags: [" + ", ".join(f"team{i}" for i in range(40)) + "]\n")
    with pytest.raises(FleetrunError) as error:
        select_hosts(tagged, [], tag="teem7")
    assert str(error.value) == "no host has tag 'teem7' (did you mean 'team7', 'team37' or 'team27'? 40 tags in use)"


def test_a_batch_runs_every_host_within_max_parallel(make_executor):
    executor = make_executor(hosts_yaml=LOCAL_HOSTS)
    seen: list[tuple[str, bytes]] = []
    outcome = run_batch(
        executor,
        BatchRequest(hosts=("a", "b", "c", "d"), command="sleep 0.3; echo hi", max_parallel=2),
        on_output=lambda host, stream, data: seen.append((host, data)),
    )
    assert outcome.succeeded and outcome.not_started == ()
    assert [t.host for t in outcome.tasks] == ["a", "b", "c", "d"]
    assert {t.status for t in outcome.tasks} == {TaskStatus.SUCCEEDED}
    assert max_overlap(outcome.tasks) == 2
    assert sorted(seen) == [(h, b"hi\n") for h in "abcd"]


def test_stop_on_failure_launches_nothing_after_the_first_failure(make_executor):
    executor = make_executor(hosts_yaml=LOCAL_HOSTS)
    outcome = run_batch(
        executor,
        BatchRequest(hosts=("a", "b", "c"), command='test "$X" != fail', max_parallel=1, stop_on_failure=True, env={"X": "fail"}),
    )
    assert [(t.host, t.status, t.exit_code) for t in outcome.tasks] == [("a", TaskStatus.FAILED, 1)]
    assert outcome.not_started == ("b", "c") and not outcome.succeeded
    assert outcome.why_not_started == dict.fromkeys("bc", "an earlier host did not succeed, and the batch stops on failure")


def test_a_host_whose_queue_is_full_is_not_started_and_the_others_run_to_their_end(make_executor, marker):
    executor = make_executor(hosts_yaml="hosts:\n  a: {}\n  busy: {max_concurrent: 1, max_queued: 1}\n  c: {}\n")
    waiting = [executor.submit(TaskRequest(host="busy", command=f"sleep {marker}")) for _ in range(2)]
    outcome = run_batch(executor, BatchRequest(hosts=("a", "busy", "c"), command="sleep 0.3; echo done", max_parallel=1))
    assert [(t.host, t.status, t.stdout_bytes) for t in outcome.tasks] == [("a", TaskStatus.SUCCEEDED, 5), ("c", TaskStatus.SUCCEEDED, 5)]
    assert outcome.not_started == ("busy",) and not outcome.succeeded
    assert outcome.why_not_started == {
        "busy": "host 'busy' already has 1 task waiting for a turn (its max_queued; 1 runs at once): "
        "wait for some to end or cancel some"
    }
    assert sorted(t.host for t in executor.list()) == ["a", "busy", "busy", "c"]  # the refused host recorded nothing
    for handle in waiting:
        executor.cancel(handle.id)


def test_under_stop_on_failure_a_refused_host_stops_the_launches_after_it(make_executor, marker):
    executor = make_executor(hosts_yaml="hosts:\n  busy: {max_concurrent: 1, max_queued: 1}\n  b: {}\n")
    waiting = [executor.submit(TaskRequest(host="busy", command=f"sleep {marker}")) for _ in range(2)]
    outcome = run_batch(executor, BatchRequest(hosts=("busy", "b"), command="true", max_parallel=1, stop_on_failure=True))
    assert outcome.tasks == () and outcome.not_started == ("busy", "b")
    assert outcome.why_not_started["busy"].startswith("host 'busy' already has 1 task waiting")
    assert outcome.why_not_started["b"] == "an earlier host did not succeed, and the batch stops on failure"
    for handle in waiting:
        executor.cancel(handle.id)


def test_cancelling_a_batch_cancels_its_running_tasks(make_executor, marker):
    executor = make_executor(hosts_yaml=LOCAL_HOSTS)

    async def scenario():
        batch = asyncio.ensure_future(run_batch_async(executor, BatchRequest(hosts=("a", "b"), command=f"sleep {marker}")))
        while len([t for t in executor.list() if t.status is TaskStatus.RUNNING]) < 2:
            await asyncio.sleep(0.02)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    asyncio.run(scenario())
    statuses = [t.status for t in executor.list()]
    assert statuses == [TaskStatus.CANCELLED, TaskStatus.CANCELLED]


def test_a_batch_with_an_unknown_host_runs_nothing(make_executor):
    executor = make_executor(hosts_yaml=LOCAL_HOSTS)
    with pytest.raises(UnknownHostError):
        run_batch(executor, BatchRequest(hosts=("a", "ghost"), command="true"))
    assert executor.list() == []


# -- the CLI over real sshd hosts -----------------------------------------------------------


@pytest.fixture(scope="module")
def web_servers(sshd_fleet):
    servers = [sshd_fleet.start(), sshd_fleet.start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def fleet_hosts_file(tmp_path, sshd_fleet, web_servers, shared_sshd) -> Path:
    """web1, web2 (tag web) on their own servers; 'stranger' whose host key is not known."""
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", web_servers)
    hosts = {
        "web1": {**ssh_host(sshd_fleet, web_servers[0], known), "tags": ["web"]},
        "web2": {**ssh_host(sshd_fleet, web_servers[1], known), "tags": ["web"]},
        "stranger": ssh_host(sshd_fleet, shared_sshd, known),
    }
    path = tmp_path / "hosts.yaml"
    path.write_text(hosts_file_text(hosts))
    return path


def test_cli_fan_out_prefixes_output_and_summarises_with_one_failure(fleet_hosts_file, web_servers):
    result = run_cli("--hosts", str(fleet_hosts_file), "run", "web1,stranger,web2", "--", 'echo "on $(echo $SSH_CONNECTION | cut -d" " -f3)"')
    assert result.returncode == 1, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == [f"web1     | on {web_servers[0].address}", f"web2     | on {web_servers[1].address}"]
    table = [line.split() for line in result.stderr.splitlines() if line.startswith(("HOST", "web", "stranger"))]
    assert [row[:3] for row in table] == [
        ["HOST", "STATUS", "EXIT"], ["web1", "succeeded", "0"], ["stranger", "failed", "-"], ["web2", "succeeded", "0"],
    ]
    assert "host key" in result.stderr and "2 of 3 hosts succeeded" in result.stderr


def test_cli_fan_out_by_tag_exits_0_when_all_succeed(fleet_hosts_file):
    result = run_cli("--hosts", str(fleet_hosts_file), "run", "--tag", "web", "--", "exit 0")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 hosts succeeded" in result.stderr


def test_cli_stop_on_failure_reports_hosts_not_started(fleet_hosts_file):
    result = run_cli(
        "--hosts", str(fleet_hosts_file), "run", "stranger,web1,web2", "--max-parallel", "1", "--stop-on-failure", "--", "true"
    )
    assert result.returncode == 1
    rows = {line.split()[0]: line for line in result.stderr.splitlines() if line.startswith(("web", "stranger"))}
    assert "not started" in rows["web1"] and "not started" in rows["web2"]
    assert rows["web2"].split(None, 6)[6] == "an earlier host did not succeed, and the batch stops on failure"
    assert "0 of 3 hosts succeeded" in result.stderr


def test_cli_fan_out_dry_run_connects_to_nothing(fleet_hosts_file, web_servers, sshd_fleet):
    before = [s.accepted_logins() for s in web_servers]
    result = run_cli("--hosts", str(fleet_hosts_file), "run", "--tag", "web", "--dry-run", "--", "reboot")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dry run:") == 2
    assert f"address: {sshd_fleet.user}@{web_servers[1].address}:{web_servers[1].port}" in result.stdout
    assert [s.accepted_logins() for s in web_servers] == before


def test_cli_needs_a_host_or_a_tag():
    result = run_cli("run", "--", "true")
    assert result.returncode == 125
    assert "name a host (or several: web1,web2) or give --tag" in result.stderr


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_cancels_every_task_of_a_cli_fan_out_and_exits_130(tmp_path, marker, stop):
    import json
    import signal
    import subprocess
    import sys

    from conftest import processes_with, wait_until

    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  a:\n  b:\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "--hosts", str(hosts), "run", "a,b", "--", f"sleep {marker}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    wait_until(lambda: len([p for p in processes_with(f"sleep {marker}") if p != proc.pid]) >= 2)
    proc.send_signal(getattr(signal, stop))
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (130, "")
    assert err == "fleetrun: the batch was cancelled; its running tasks were stopped\n"
    assert [p for p in processes_with(f"sleep {marker}")] == []
    tasks = json.loads(run_cli("tasks", "list", "--json", cwd=tmp_path).stdout)
    assert sorted((t["host"], t["status"]) for t in tasks) == [("a", "cancelled"), ("b", "cancelled")]
