"""The MCP server, through the SDK's real client: in memory (both protocol modes), over stdio
against a `fleetrun serve` process, and over authenticated streamable HTTP."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import anyio
import pytest

import mcp
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from fleetrun.core.config_files import ConfigFiles
from fleetrun.core.executor import Executor
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.models import TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.policy import parse_policy, read_only_policy
from fleetrun.core.secrets import register_secret
from fleetrun.core.store import Retention
from fleetrun.mcp_server import create_server

from conftest import assert_none_left, hosts_file_text, processes_running, processes_with, run_cli, ssh_host, stat_fields, wait_until

MODES = ["legacy", "auto"]  # 2025-11-25 and 2026-07-28
POLICY = """
rules:
  - allow: [uname *, "echo *", "sleep *", "printf *", "true", "seq *", "cat *", "exit *"]
  - deny: echo forbidden*
"""
HOSTS = "hosts:\n  local: {tags: [dev]}\n  other: {tags: [dev]}\n"


@pytest.fixture
def server_for(store, tmp_path):
    made = []

    def build(policy_text: str | None = POLICY, hosts: str = HOSTS):
        manager = PluginManager(autoload=False)
        inventory = parse_inventory(hosts, source="hosts.yaml", transports=manager.transports)
        policy = parse_policy(policy_text, source="policy.yaml") if policy_text else read_only_policy()
        executor = Executor(inventory=inventory, store=store, plugins=manager, policy=policy)
        made.append(executor)
        return create_server(executor), executor

    yield build
    for executor in made:
        executor.close()


def run(scenario):
    anyio.run(scenario)


# -- tools -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tools_are_typed_and_run_commands_under_the_policy(server_for, mode):
    server, executor = server_for()

    async def scenario():
        async with mcp.Client(server, mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == {
                "list_hosts", "describe_host", "plan_command", "run_command", "start_task", "run_on_hosts",
                "get_task", "get_task_output", "cancel_task", "list_tasks",
            }
            assert all(t.output_schema is not None for t in tools.values())
            assert tools["run_command"].input_schema["required"] == ["host", "command"]
            # The assistant learns each parameter from its description and bounds.
            undescribed = [
                (name, parameter) for name, tool in tools.items()
                for parameter, schema in tool.input_schema["properties"].items() if not schema.get("description")
            ]
            assert undescribed == []
            assert tools["get_task_output"].input_schema["properties"]["offset"]["minimum"] == 0

            hosts = (await client.call_tool("list_hosts", {"tag": "dev"})).structured_content
            assert [h["name"] for h in hosts["hosts"]] == ["local", "other"]

            done = (await client.call_tool("run_command", {"host": "local", "command": "echo out; echo err >&2; exit 3"})).structured_content
            assert done["finished"] is True
            assert (done["task"]["status"], done["task"]["exit_code"]) == ("failed", 3)
            assert (done["stdout_tail"], done["stderr_tail"]) == ("out\n", "err\n")
            assert done["task"]["policy"] == "allowed by rule 1 of policy.yaml, line 3: allow: echo *"

            denied = await client.call_tool("run_command", {"host": "local", "command": "echo ok; rm -rf /tmp/nothing"})
            assert denied.is_error
            assert "'rm -rf /tmp/nothing' matches no rule [the default of policy.yaml: deny]" in denied.content[0].text
            by_rule = await client.call_tool("run_command", {"host": "local", "command": "echo forbidden"})
            assert "rule 2 of policy.yaml, line 4: deny: echo forbidden*" in by_rule.content[0].text
            assert [t.command for t in executor.list()] == ["echo out; echo err >&2; exit 3"]

            plan = (await client.call_tool("plan_command", {"host": "local", "command": "rm -rf /"})).structured_content
            assert plan["ran"] is False and plan["policy"]["allowed"] is False and plan["policy"]["rule"] is None
            assert len(executor.list()) == 1

            unknown = await client.call_tool("get_task", {"task_id": "../../etc"})
            assert unknown.is_error and "invalid task id" in unknown.content[0].text
            bad_host = await client.call_tool("run_command", {"host": "nowhere", "command": "true"})
            assert bad_host.is_error and "unknown host 'nowhere'" in bad_host.content[0].text
            for tool, arguments, wrong in [
                ("get_task_output", {"task_id": "0123456789ab", "offset": -5}, "offset"),
                ("get_task_output", {"task_id": "0123456789ab", "tail_lines": -1}, "tail_lines"),
                ("list_tasks", {"limit": 0}, "limit"),
                ("run_command", {"host": "local", "command": "true", "timeout_s": 0}, "timeout_s"),
                ("run_command", {"host": "local", "command": "true", "wait_s": -1}, "wait_s"),
            ]:
                refused = await client.call_tool(tool, arguments)
                text = refused.content[0].text
                assert refused.is_error and text.startswith(f"invalid arguments for {tool}: {wrong}: Input should be greater than"), text
            typed = await client.call_tool("run_command", {"host": 5})
            assert typed.content[0].text == "invalid arguments for run_command: host: Input should be a valid string; command: Field required"
            # A misspelt argument is refused, not dropped: the assistant would think it had set a time limit.
            assert tools["run_command"].input_schema["additionalProperties"] is False
            misspelt = await client.call_tool("run_command", {"host": "local", "command": "true", "timeout_seconds": 5})
            assert misspelt.is_error
            assert misspelt.content[0].text == (
                "run_command takes no argument 'timeout_seconds' (its arguments: host, command, timeout_s, wait_s)"
            )
            no_arguments = await client.call_tool("list_tasks", {"status": "failed", "hostname": "x"})
            assert no_arguments.content[0].text.startswith("list_tasks takes no argument 'hostname' (its arguments: status, host, limit")
            assert len(executor.list()) == 1

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_a_long_command_becomes_a_task_to_follow_read_and_cancel(server_for, mode, marker):
    server, executor = server_for()

    async def scenario():
        async with mcp.Client(server, mode=mode) as client:
            started = (await client.call_tool(
                "run_command", {"host": "local", "command": f"seq 1 3; sleep {marker}", "wait_s": 0.3}
            )).structured_content
            assert started["finished"] is False and "get_task" in started["hint"]
            task_id = started["task"]["task_id"]
            info = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
            assert info["status"] == "running" and info["ended"] is False
            first = (await client.call_tool("get_task_output", {"task_id": task_id, "max_bytes": 2})).structured_content
            assert (first["data"], first["next_offset"], first["ended"]) == ("1\n", 2, False)
            rest = (await client.call_tool("get_task_output", {"task_id": task_id, "offset": 2})).structured_content
            assert rest["data"] == "2\n3\n"
            beyond = await client.call_tool("get_task_output", {"task_id": task_id, "offset": 7})
            assert beyond.is_error
            assert beyond.content[0].text == f"Error executing tool get_task_output: offset 7 is past the end of the stdout of task {task_id} (6 bytes so far)"
            listed = (await client.call_tool("list_tasks", {"status": "running"})).structured_content
            assert [t["task_id"] for t in listed["tasks"]] == [task_id]
            cancelled = (await client.call_tool("cancel_task", {"task_id": task_id})).structured_content
            assert cancelled == {"task_id": task_id, "cancelled": True, "status": "cancelled"}
            again = (await client.call_tool("cancel_task", {"task_id": task_id})).structured_content
            assert again["cancelled"] is False
            ended = (await client.call_tool("get_task_output", {"task_id": task_id, "offset": 6})).structured_content
            assert (ended["data"], ended["ended"]) == ("", True)
            beyond = await client.call_tool("get_task_output", {"task_id": task_id, "offset": 7, "stream": "stderr"})
            assert beyond.content[0].text == f"Error executing tool get_task_output: offset 7 is past the end of the stderr of task {task_id} (0 bytes kept)"

    run(scenario)
    assert_none_left(marker)


def test_output_read_in_pieces_arrives_as_whole_characters(server_for):
    # Each piece is decoded on its own: a character cut between two pieces (or by a tail's
    # byte limit) must not arrive as two replacement characters.
    server, executor = server_for()
    text = "état: ok € 😀 — fin\n" * 3

    async def scenario():
        async with mcp.Client(server) as client:
            run = (await client.call_tool("run_command", {"host": "local", "command": f"printf '%s' '{text}'"})).structured_content
            task_id = run["task"]["task_id"]
            assert run["stdout_tail"] == text
            for max_bytes in (5, 7):
                offset, pieces = 0, []
                while True:
                    piece = (await client.call_tool(
                        "get_task_output", {"task_id": task_id, "offset": offset, "max_bytes": max_bytes}
                    )).structured_content
                    assert piece["offset"] == offset and piece["next_offset"] > offset
                    pieces.append(piece["data"])
                    offset = piece["next_offset"]
                    if piece["ended"]:
                        break
                assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
            tail = (await client.call_tool("get_task_output", {"task_id": task_id, "tail_lines": 1, "max_bytes": 16})).structured_content
            size = len(text.encode())
            assert (tail["data"], tail["offset"], tail["next_offset"]) == (" 😀 — fin\n", size - 14, size)

    run(scenario)


def test_a_secret_in_the_output_stays_hidden_however_the_output_is_read(server_for):
    # Redacting each piece on its own would show a secret cut between two pieces, or read
    # a byte at a time, in full. The text around the secret has none of its characters.
    server, executor = server_for()
    secret = "S3CR3T-" + secrets.token_hex(8).upper()
    register_secret(secret)
    half = len(secret) // 2
    # The pause leaves ample time to read what comes before it while the task runs.
    command = f"printf 'user=admin password={secret[:half]}'; sleep 1.5; printf '{secret[half:]} host=db\\n'"

    def leaked(text: str) -> set[str]:
        return set(secret) & set(text)

    async def read_all(client, task_id, max_bytes, pieces):
        offset = 0
        while True:
            piece = (await client.call_tool(
                "get_task_output", {"task_id": task_id, "offset": offset, "max_bytes": max_bytes}
            )).structured_content
            pieces.append(piece["data"])
            offset = piece["next_offset"]
            if piece["ended"] or not piece["data"]:
                return offset

    async def scenario():
        async with mcp.Client(server) as client:
            started = (await client.call_tool("run_command", {"host": "local", "command": command, "wait_s": 0.2})).structured_content
            task_id = started["task"]["task_id"]
            assert started["finished"] is False
            # While the task runs, the first half is the end of what was written: held back.
            running = []
            held_at = await read_all(client, task_id, 4, running)
            assert "".join(running) == "user=admin password=" and held_at == len("user=admin password=")
            await executor.wait_async(task_id)
            for max_bytes in (1, 3, 7, 64):
                pieces = []
                await read_all(client, task_id, max_bytes, pieces)
                text = "".join(pieces)
                assert text.startswith("user=admin password=***") and text.endswith("*** host=db\n"), text
                assert not leaked(text)
            for max_bytes in (12, 20):
                tail = (await client.call_tool(
                    "get_task_output", {"task_id": task_id, "tail_lines": 1, "max_bytes": max_bytes}
                )).structured_content
                assert tail["data"].startswith("***") and not leaked(tail["data"])
            latest = (await client.call_tool("get_task", {"task_id": task_id})).structured_content["progress"]["latest_line"]
            assert latest == "user=admin password=*** host=db"

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_an_assistant_that_starts_tasks_in_a_loop_is_stopped_at_the_hosts_queue(server_for, mode, marker):
    server, executor = server_for(hosts="hosts:\n  local: {max_concurrent: 1, max_queued: 1}\n  other: {}\n")

    async def scenario():
        async with mcp.Client(server, mode=mode) as client:
            started = [(await client.call_tool("start_task", {"host": "local", "command": f"sleep {marker}"})).structured_content
                       for _ in range(2)]
            refused = await client.call_tool("start_task", {"host": "local", "command": "true"})
            assert refused.is_error
            assert refused.content[0].text == (
                "Error executing tool start_task: host 'local' already has 1 task waiting for a turn (its max_queued; "
                "1 runs at once): wait for some to end or cancel some"
            )
            listed = (await client.call_tool("list_tasks", {})).structured_content["tasks"]
            assert sorted(t["task_id"] for t in listed) == sorted(t["task_id"] for t in started)
            limits = (await client.call_tool("describe_host", {"host": "local"})).structured_content["limits"]
            assert (limits["max_concurrent"], limits["max_queued"]) == (1, 1)
            # In a batch, the full host is left out with the reason; the other host's command runs.
            batch = (await client.call_tool("run_on_hosts", {"command": "echo hi", "hosts": ["local", "other"]})).structured_content
            assert [(t["host"], t["status"]) for t in batch["tasks"]] == [("other", "succeeded")]
            assert batch["succeeded"] is False and batch["not_started"] == ["local"]
            assert batch["why_not_started"]["local"].startswith("host 'local' already has 1 task waiting for a turn")
            for task in started:
                await client.call_tool("cancel_task", {"task_id": task["task_id"]})

    run(scenario)
    assert_none_left(marker)


@pytest.mark.parametrize("mode", MODES)
def test_cancel_is_served_while_run_command_waits(server_for, mode, marker):
    server, executor = server_for()

    async def scenario():
        async with mcp.Client(server, mode=mode) as client:
            result = {}

            async def long_call():
                result["run"] = await client.call_tool("run_command", {"host": "local", "command": f"sleep {marker}", "wait_s": 50})

            async with anyio.create_task_group() as group:
                group.start_soon(long_call)
                with anyio.fail_after(10):
                    while not processes_with(f"sleep {marker}"):
                        await anyio.sleep(0.02)
                started = time.monotonic()
                listed = (await client.call_tool("list_tasks", {"status": "running"})).structured_content
                cancelled = await client.call_tool("cancel_task", {"task_id": listed["tasks"][0]["task_id"]})
                assert cancelled.structured_content["status"] == "cancelled"
            assert time.monotonic() - started < 5
            run_result = result["run"].structured_content
            assert run_result["finished"] is True and run_result["task"]["status"] == "cancelled"

    run(scenario)
    assert_none_left(marker)


def test_while_another_process_locks_the_store_the_server_keeps_answering(server_for, store, marker):
    # Listing waits for this process's records to reach SQLite, which another process's
    # long write holds back. Before, it waited on the event loop, and every session waited with it.
    server, executor = server_for()
    locker = sqlite3.connect(store.home / "tasks.sqlite3", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    locked = True

    async def scenario():
        nonlocal locked
        async with mcp.Client(server) as client:
            started = (await client.call_tool("start_task", {"host": "local", "command": f"sleep {marker}"})).structured_content
            listing = {}

            async def list_tasks():
                listing.update((await client.call_tool("list_tasks", {})).structured_content)

            async with anyio.create_task_group() as group:
                group.start_soon(list_tasks)
                await anyio.sleep(0.3)
                assert listing == {}  # still waiting for the store
                with anyio.fail_after(5):
                    got = (await client.call_tool("get_task", {"task_id": started["task_id"]})).structured_content
                assert got["status"] == "running"
                locker.execute("ROLLBACK")
                locked = False
            assert [t["task_id"] for t in listing["tasks"]] == [started["task_id"]]
            cancelled = await client.call_tool("cancel_task", {"task_id": started["task_id"]})
            assert cancelled.structured_content["status"] == "cancelled"

    try:
        run(scenario)
    finally:
        if locked:
            locker.execute("ROLLBACK")
        locker.close()
    assert_none_left(marker)


def test_progress_reaches_the_open_call(server_for):
    server, _ = server_for()

    async def scenario():
        seen = []

        async def on_progress(progress, total, message):
            seen.append((progress, total, message))

        async with mcp.Client(server, mode="legacy") as client:
            result = await client.call_tool(
                "run_command",
                {"host": "local", "command": "printf 'progress: 25%%\\n'; sleep 0.3; printf 'progress: 75%%\\n'; sleep 0.3"},
                progress_callback=on_progress,
            )
        assert result.structured_content["finished"] is True
        assert (25.0, 100.0) in [(p, t) for p, t, _ in seen] and (75.0, 100.0) in [(p, t) for p, t, _ in seen]
        assert any("progress: 75%" in (m or "") for _, _, m in seen)

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_reports_progress_as_each_task_ends(server_for, mode):
    server, _ = server_for()

    async def scenario():
        seen = []

        async def on_progress(progress, total, message):
            seen.append((progress, total, message))

        async with mcp.Client(server, mode=mode) as client:
            result = await client.call_tool(
                "run_on_hosts", {"command": "exit 3", "tag": "dev", "max_parallel": 1}, progress_callback=on_progress,
            )
        assert result.structured_content["succeeded"] is False
        assert seen == [(1, 2, "local: failed (exit 3); 1 of 2 ended"), (2, 2, "other: failed (exit 3); 2 of 2 ended")]

    run(scenario)


def test_a_cancelled_call_stops_its_batch_and_leaves_a_started_task_running(server_for, marker):
    # run_on_hosts holds the batch (its max_parallel, its stop_on_failure): a call the client
    # gives up on stops its tasks. run_command's task is the assistant's to follow or cancel,
    # as after wait_s; list_tasks finds it.
    server, executor = server_for()

    async def call_then_give_up(client, tool, arguments, processes):
        async with anyio.create_task_group() as call:
            call.start_soon(client.call_tool, tool, arguments)
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: len(processes_running("sleep", marker)) == processes))
            call.cancel_scope.cancel()

    async def scenario():
        with anyio.fail_after(30):
            async with mcp.Client(server, mode="legacy") as client:
                await call_then_give_up(client, "run_on_hosts", {"command": f"sleep {marker}", "tag": "dev"}, 2)
                await anyio.to_thread.run_sync(assert_none_left, marker, 5.0)
                await call_then_give_up(client, "run_command", {"host": "local", "command": f"sleep {marker}", "wait_s": 60}, 1)
                await anyio.sleep(0.5)
                assert len(processes_running("sleep", marker)) == 1
                listed = (await client.call_tool("list_tasks", {})).structured_content["tasks"]
                assert (listed[0]["host"], listed[0]["status"]) == ("local", "running")
                assert sorted((t["host"], t["status"], t["cancel_reason"]) for t in listed[1:]) == [
                    ("local", "cancelled", "the batch was cancelled"), ("other", "cancelled", "the batch was cancelled"),
                ]
                await client.call_tool("cancel_task", {"task_id": listed[0]["task_id"]})

    run(scenario)
    assert_none_left(marker)


def test_notifications_arrive_after_the_starting_call_returned_2025_11_25(server_for):
    server, _ = server_for()

    async def scenario():
        logs, updates = [], []

        async def on_log(params):
            logs.append(params.data)

        async def on_message(message):
            if isinstance(message, mcp.types.ResourceUpdatedNotification):
                updates.append(str(message.params.uri))

        async with mcp.Client(server, mode="legacy", logging_callback=on_log, message_handler=on_message) as client:
            task = (await client.call_tool("start_task", {"host": "local", "command": "sleep 0.4; echo done"})).structured_content
            returned_at = time.monotonic()
            assert task["status"] in ("queued", "running")
            with anyio.fail_after(10):
                while not any(d.get("event") == "task.completed" for d in logs):
                    await anyio.sleep(0.02)
            assert time.monotonic() - returned_at >= 0.3  # it came after the call had returned
            completed = [d for d in logs if d.get("event") == "task.completed"][0]
            assert (completed["task_id"], completed["status"], completed["exit_code"]) == (task["task_id"], "succeeded", 0)
            assert [d["event"] for d in logs] == ["task.created", "task.completed"]
            with anyio.fail_after(5):
                while task["resource"] not in updates:
                    await anyio.sleep(0.02)
            body = await client.read_resource(task["resource"])
            assert '"status": "succeeded"' in body.contents[0].text and "done" in body.contents[0].text

    run(scenario)


def test_a_client_that_went_away_leaves_the_others_their_notifications(server_for):
    server, executor = server_for()

    async def scenario():
        logs = []

        async def on_log(params):
            logs.append(params.data)

        async with mcp.Client(server, mode="legacy") as leaving:
            gone = (await leaving.call_tool("start_task", {"host": "local", "command": "sleep 0.3; echo a"})).structured_content
        # Its task ends after it has disconnected: the session still here gets its own
        # notifications, and only those, and the server goes on serving.
        async with mcp.Client(server, mode="legacy", logging_callback=on_log) as staying:
            task = (await staying.call_tool("start_task", {"host": "local", "command": "sleep 0.6; echo b"})).structured_content
            with anyio.fail_after(10):
                while not any(d.get("event") == "task.completed" for d in logs):
                    await anyio.sleep(0.02)
            assert [(d["event"], d["task_id"]) for d in logs] == [("task.created", task["task_id"]), ("task.completed", task["task_id"])]
            assert executor.get(gone["task_id"]).status is TaskStatus.SUCCEEDED
            again = (await staying.call_tool("run_command", {"host": "local", "command": "echo still serving"})).structured_content
            assert again["task"]["status"] == "succeeded"

    run(scenario)


def test_task_resources_update_for_listeners_2026_07_28(server_for):
    server, _ = server_for()

    async def scenario():
        async with mcp.Client(server, mode="auto") as client:
            assert client.protocol_version == "2026-07-28"
            task = (await client.call_tool("start_task", {"host": "local", "command": "sleep 0.5"})).structured_content
            async with client.listen(resource_subscriptions=[task["resource"]]) as subscription:
                with anyio.fail_after(10):
                    async for event in subscription:
                        assert str(event.uri) == task["resource"]
                        break
            final = (await client.call_tool("get_task", {"task_id": task["task_id"]})).structured_content
            assert final["status"] == "succeeded"

    run(scenario)


def test_fan_out_resources_and_the_guide(server_for):
    server, _ = server_for()

    async def scenario():
        async with mcp.Client(server, mode="legacy") as client:
            batch = (await client.call_tool("run_on_hosts", {"command": "echo hi", "tag": "dev", "max_parallel": 2})).structured_content
            assert batch["succeeded"] is True and [t["host"] for t in batch["tasks"]] == ["local", "other"]
            denied = await client.call_tool("run_on_hosts", {"command": "rm -rf /", "hosts": ["local", "other"]})
            assert denied.is_error and "matches no rule" in denied.content[0].text
            hosts = await client.read_resource("fleetrun://hosts")
            assert '"name": "local"' in hosts.contents[0].text
            prompts = await client.list_prompts()
            assert [p.name for p in prompts.prompts] == ["fleetrun_guide"]
            guide = await client.get_prompt("fleetrun_guide")
            assert "plan_command" in guide.messages[0].content.text and "policy denies" in guide.messages[0].content.text

    run(scenario)


def test_without_a_policy_file_the_server_is_read_only_and_says_how_to_change_it(server_for):
    server, _ = server_for(policy_text=None)

    async def scenario():
        async with mcp.Client(server, mode="legacy") as client:
            ok = await client.call_tool("run_command", {"host": "local", "command": "uname -s"})
            assert ok.structured_content["stdout_tail"] == "Linux\n"
            denied = await client.call_tool("run_command", {"host": "local", "command": "touch /tmp/x"})
            assert denied.is_error and "built-in read-only policy; to allow more, write a policy file" in denied.content[0].text

    run(scenario)


def test_a_policy_written_where_the_read_only_server_says_applies_to_its_next_call(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "FLEETRUN_POLICY"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "fleetrun", "serve"], env=env)

    async def scenario():
        async with mcp.Client(params, mode="legacy") as client:
            denied = await client.call_tool("run_command", {"host": "local", "command": "sleep 0"})
            where = tmp_path / "config" / "fleetrun" / "policy.yaml"  # $XDG_CONFIG_HOME/fleetrun (conftest)
            assert denied.is_error and f"write a policy file (policy.example.yaml shows every field) at {where}, " \
                "which a running `fleetrun serve` takes up at its next request" in denied.content[0].text
            where.parent.mkdir(parents=True)
            where.write_text("rules:\n  - allow: sleep *\n")
            past = time.time() - 60
            os.utime(where, (past, past))
            answer = await client.call_tool("run_command", {"host": "local", "command": "sleep 0"})
            assert not answer.is_error, answer.content[0].text
            allowed = answer.structured_content
            assert (allowed["task"]["status"], allowed["task"]["policy"]) == ("succeeded", f"allowed by rule 1 of {where}, line 2: allow: sleep *")

    run(scenario)


def test_the_read_only_server_shows_the_assistant_no_secret_from_its_environment(tmp_path):
    # The MCP client starts the server with the variables the hosts file names as secrets.
    # Any other variable of its environment can hold a token too (GITHUB_TOKEN).
    password, token = "pw-" + secrets.token_hex(12), "tok-" + secrets.token_hex(12)
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({"local": {}, "web1": {"transport": "ssh", "hostname": "127.0.0.1", "port": 9,
                                                            "password_env": "WEB1_PASSWORD"}}))
    env = {name: value for name, value in os.environ.items() if name != "FLEETRUN_POLICY"}
    env.update(FLEETRUN_HOSTS=str(hosts), WEB1_PASSWORD=password, FLEETRUN_TEST_TOKEN=token)
    params = StdioServerParameters(command=sys.executable, args=["-m", "fleetrun", "serve"], env=env)
    answers = []

    async def scenario():
        async with mcp.Client(params, mode="legacy") as client:
            for command, variable in [('echo "[$WEB1_PASSWORD]"', "WEB1_PASSWORD"), ("id $FLEETRUN_TEST_TOKEN", "FLEETRUN_TEST_TOKEN")]:
                refused = await client.call_tool("run_command", {"host": "local", "command": command})
                assert refused.is_error
                assert f"the command expands ${variable}, a variable that can hold a secret" in refused.content[0].text
                answers.append(refused)
            environments = await client.call_tool("run_command", {"host": "local", "command": "ps eww"})
            assert environments.is_error
            assert "ps eww (it shows processes' environments, where secrets are kept)" in environments.content[0].text
            home = await client.call_tool("run_command", {"host": "local", "command": 'echo "$HOME"'})
            assert home.structured_content["stdout_tail"] == os.environ["HOME"] + "\n"
            answers.extend([environments, home])

    run(scenario)
    assert not any(secret in answer.model_dump_json() for answer in answers for secret in (password, token))


def test_the_assistant_sees_only_the_tasks_started_through_the_mcp_server(server_for, store, marker):
    # Before, list_tasks and get_task_output handed the assistant the output of whatever the
    # user had run with `fleetrun run` (no policy there), and cancel_task stopped it.
    server, executor = server_for(policy_text=None)  # the read-only policy: `cat` is not allowed
    private = "user-only-" + secrets.token_hex(6)
    env = {"FLEETRUN_HOME": str(store.home)}
    assert run_cli("run", "local", "--", f"echo {private}", env=env).returncode == 0
    running = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "run", "local", "--", f"sleep {marker}"], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(executor.list(status=[TaskStatus.RUNNING])) == 1)  # in SQLite, out of its journal
        users = {task.command: task.id for task in executor.list()}
        assert set(users) == {f"echo {private}", f"sleep {marker}"}
        answers = []

        async def scenario():
            async with mcp.Client(server, mode="legacy") as client:
                own = (await client.call_tool("run_command", {"host": "local", "command": "echo mine"})).structured_content
                listed = (await client.call_tool("list_tasks", {})).structured_content
                assert [t["task_id"] for t in listed["tasks"]] == [own["task"]["task_id"]]
                for task_id in users.values():
                    hidden = f"no task '{task_id}' was started through the MCP server (the assistant sees only those)"
                    for tool, arguments in [("get_task", {}), ("get_task_output", {}), ("get_task_output", {"tail_lines": 5}),
                                            ("cancel_task", {})]:
                        answer = await client.call_tool(tool, {"task_id": task_id, **arguments})
                        answers.append(answer)
                        assert answer.is_error and answer.content[0].text == f"Error executing tool {tool}: {hidden}"
                    with pytest.raises(MCPError, match=re.escape(hidden)):
                        await client.read_resource(f"fleetrun://tasks/{task_id}")
                    with pytest.warns(Warning), pytest.raises(MCPError, match=re.escape(hidden)):
                        await client.subscribe_resource(f"fleetrun://tasks/{task_id}")

        run(scenario)
        assert not any(private in answer.model_dump_json() for answer in answers)
        assert store.get(users[f"sleep {marker}"]).status is TaskStatus.RUNNING  # not the assistant's to cancel
        assert {task.origin for task in executor.list()} == {"cli", "mcp"}
    finally:
        running.terminate()
        running.wait(10)
    assert_none_left(marker)


def test_an_ssh_host_through_the_server(server_for, sshd_fleet, shared_sshd, tmp_path):
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [shared_sshd])
    hosts = hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known)})
    server, _ = server_for(hosts=hosts)

    async def scenario():
        async with mcp.Client(server, mode="legacy") as client:
            described = (await client.call_tool("describe_host", {"host": "web"})).structured_content
            assert described["details"]["address"] == f"{sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}"
            result = (await client.call_tool("run_command", {"host": "web", "command": "echo $SSH_CONNECTION"})).structured_content
            assert result["task"]["transport"] == "ssh" and result["task"]["status"] == "succeeded"
            assert result["stdout_tail"].split()[2] == shared_sshd.address

    run(scenario)


def test_edits_of_the_policy_and_the_hosts_file_reach_the_next_call(tmp_path, store):
    # The assistant is refused, the person edits the policy, the assistant asks again: no restart.
    manager = PluginManager(autoload=False)
    hosts, policy = tmp_path / "hosts.yaml", tmp_path / "policy.yaml"
    hosts.write_text(HOSTS)
    policy.write_text(POLICY)
    past = time.time() - 60
    for path in (hosts, policy):
        os.utime(path, (past, past))
    files = ConfigFiles(hosts=hosts, policy=policy, transports=manager.transports, fallback_policy=read_only_policy)
    executor = Executor(config_files=files, store=store, plugins=manager)

    def edit(path, text: str) -> None:
        path.write_text(text)
        edit.age += 1
        os.utime(path, (past - edit.age, past - edit.age))  # saved a while ago: no longer being written

    edit.age = 0

    async def scenario():
        async with mcp.Client(create_server(executor), mode="legacy") as client:
            denied = await client.call_tool("run_command", {"host": "local", "command": "id -u"})
            assert denied.is_error and "'id -u' matches no rule" in denied.content[0].text

            edit(policy, POLICY + "  - allow: id *\n")
            allowed = (await client.call_tool("run_command", {"host": "local", "command": "id -u"})).structured_content
            assert (allowed["task"]["status"], allowed["stdout_tail"]) == ("succeeded", f"{os.getuid()}\n")
            assert allowed["task"]["policy"] == f"allowed by rule 3 of {policy}, line 5: allow: id *"

            edit(hosts, HOSTS + "  third: {description: added}\n")
            listed = (await client.call_tool("list_hosts", {})).structured_content
            assert [h["name"] for h in listed["hosts"]] == ["local", "other", "third"]

            edit(policy, "rules:\n  - allow: id *\n  - deny echo *\n")
            for tool, arguments in [
                ("run_command", {"host": "local", "command": "id -u"}),
                ("plan_command", {"host": "local", "command": "id -u"}),
                ("list_hosts", {}),
                ("run_on_hosts", {"command": "id -u", "tag": "dev"}),
            ]:
                broken = await client.call_tool(tool, arguments)
                assert broken.is_error, tool
                assert f": {policy}:3: rule 2: a rule must be a mapping" in broken.content[0].text
                assert "nothing new runs until it is fixed, and no restart is needed" in broken.content[0].text
            # What has started can still be followed.
            task = (await client.call_tool("get_task", {"task_id": allowed["task"]["task_id"]})).structured_content
            assert task["status"] == "succeeded"
            edit(policy, POLICY)
            assert (await client.call_tool("run_command", {"host": "third", "command": "echo back"})).structured_content["stdout_tail"] == "back\n"

    try:
        run(scenario)
    finally:
        executor.close()


def test_a_denial_reads_as_the_readme_shows_it(server_for):
    from pathlib import Path

    from fleetrun.core import paths

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = readme.split("What the assistant sees when a command is denied", 1)[1].split("```\n", 2)[1]
    expected = " ".join(shown.split("\n")).strip().replace("/home/me/.config/fleetrun", str(paths.config_dir()))
    server, _ = server_for(policy_text=None, hosts="hosts:\n  web1: {}\n")

    async def scenario():
        async with mcp.Client(server) as client:
            denied = await client.call_tool("run_command", {"host": "web1", "command": "rm -rf /var/www"})
            assert denied.is_error and denied.content[0].text == expected

    run(scenario)


# -- real processes: stdio and HTTP ------------------------------------------------------------


def _server_env(tmp_path) -> dict[str, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return {**os.environ, "FLEETRUN_POLICY": str(policy)}


def test_the_server_names_a_rule_that_lets_any_command_through_on_stderr(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - allow: [uptime *, awk *]\n")
    result = subprocess.run(
        [sys.executable, "-m", "fleetrun", "serve"], env={**os.environ, "FLEETRUN_POLICY": str(policy)},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "")  # stdout carries protocol messages only
    assert (
        f"fleetrun: WARNING: fleetrun.config: rule 1 of {policy}, line 2: allow: awk *: awk runs commands through system() "
        "and pipes in its program, so this rule lets any command through"
    ) in result.stderr


def test_started_by_hand_on_a_terminal_it_says_what_it_is_and_ctrl_d_stops_it(tmp_path):
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "serve"], env=_server_env(tmp_path),
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    os.close(terminal)
    try:
        first = process.stderr.readline().decode()
        assert first.startswith("fleetrun: serving MCP on stdin and stdout, for an MCP client that starts this command")
        os.write(controller, b"\x04")  # Ctrl-D: end of input
        assert process.wait(20) == 0
        assert process.stdout.read() == b""  # stdout is the protocol's alone
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)


def test_stdio_against_a_fleetrun_serve_process(tmp_path):
    params = StdioServerParameters(command=sys.executable, args=["-m", "fleetrun", "serve"], env=_server_env(tmp_path))

    async def scenario():
        async with mcp.Client(params, mode="legacy") as client:
            assert client.server_info.name == "fleetrun"
            result = (await client.call_tool("run_command", {"host": "local", "command": "echo over stdio"})).structured_content
            assert result["stdout_tail"] == "over stdio\n"
            denied = await client.call_tool("run_command", {"host": "local", "command": "reboot"})
            assert denied.is_error and "matches no rule" in denied.content[0].text
            # `fleetrun serve` follows its policy file: an edit reaches the next call.
            policy = tmp_path / "policy.yaml"
            policy.write_text(POLICY + "  - allow: id *\n")
            past = time.time() - 60
            os.utime(policy, (past, past))
            allowed = (await client.call_tool("run_command", {"host": "local", "command": "id -u"})).structured_content
            assert allowed["stdout_tail"] == f"{os.getuid()}\n"
            first.append(result["task"]["task_id"])
        # The next server (the client restarted it) shows the assistant what the last one ran.
        async with mcp.Client(params, mode="legacy") as client:
            listed = (await client.call_tool("list_tasks", {})).structured_content["tasks"]
            assert [t["task_id"] for t in listed][-1] == first[0]
            output = (await client.call_tool("get_task_output", {"task_id": first[0]})).structured_content
            assert (output["data"], output["ended"]) == ("over stdio\n", True)

    first: list[str] = []
    run(scenario)


def test_an_ssh_config_match_exec_leaves_the_stdio_stream_to_the_protocol(tmp_path):
    # A `Match exec` command runs while the client's requests arrive: it gets none of them
    # (paramiko ran it through invoke, which reads its process's stdin while the command
    # runs; the server's own reader won that race in every run here, tests/test_ssh_reaching's
    # lookup in a bare process lost all of its input to it).
    config = tmp_path / "ssh_config"
    config.write_text('Match exec "sleep 0.5"\n  User via-exec\n')
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({
        "web": {"transport": "ssh", "hostname": "127.0.0.1", "ssh_config_file": str(config)}, "local": {"transport": "local"},
    }))
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "fleetrun", "serve"], env={**_server_env(tmp_path), "FLEETRUN_HOSTS": str(hosts)}
    )

    async def scenario():
        answers: list[object] = []

        async def describe(client) -> None:
            answers.append((await client.call_tool("describe_host", {"host": "web"})).structured_content["details"]["address"])

        async def echo(client, number: int) -> None:
            await anyio.sleep(0.05 * number)  # sent while a describe's Match exec runs
            answers.append((await client.call_tool("run_command", {"host": "local", "command": f"echo {number}"})).structured_content["stdout_tail"])

        with anyio.fail_after(60):
            async with mcp.Client(params, mode="legacy") as client:
                async with anyio.create_task_group() as group:
                    group.start_soon(describe, client)
                    for number in range(1, 11):
                        group.start_soon(echo, client, number)
        assert sorted(map(str, answers)) == sorted([f"{number}\n" for number in range(1, 11)] + ["via-exec@127.0.0.1:22"])

    run(scenario)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_signal_stops_the_stdio_server_and_the_commands_its_tasks_run(tmp_path, marker, stop):
    # Over stdio the server waits for the client in a thread: it must still stop at once,
    # and not leave its tasks' commands running.
    params = StdioServerParameters(command=sys.executable, args=["-m", "fleetrun", "serve"], env=_server_env(tmp_path))
    ended = {}

    async def scenario():
        with anyio.fail_after(30):
            async with mcp.Client(params, mode="legacy") as client:
                started = (await client.call_tool("start_task", {"host": "local", "command": f"sleep {marker}"})).structured_content
                ended["task"] = started["task_id"]
                command = wait_until(lambda: processes_running("sleep", marker))[0]
                server = int(stat_fields(command)[1])  # the command's parent
                os.kill(server, stop)
                while (stat_fields(server) or ["Z"])[0] != "Z":  # exited (the client reaps it)
                    await anyio.sleep(0.02)
                assert_none_left(marker)

    run(scenario)
    listed = run_cli("tasks", "show", ended["task"], "--json")
    task = json.loads(listed.stdout)
    assert (task["status"], task["cancel_reason"]) == ("cancelled", f"the MCP server stopped ({stop.name})")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(address: str, port: int, process: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((address, port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
            time.sleep(0.05)


def _http_status(url: str, headers: dict[str, str], body: bytes = b"{}") -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_http_requires_the_bearer_token_and_sigterm_stops_the_commands_of_its_tasks(tmp_path, marker):
    port = _free_port()
    token = "tok-" + os.urandom(12).hex()
    env = {**_server_env(tmp_path), "FLEETRUN_MCP_TOKEN": token}
    # A policy that lets the assistant expand any variable (raw shell) still does not reach the token.
    (tmp_path / "policy.yaml").write_text(POLICY + "  - allow_raw_shell: true\n")
    log = (tmp_path / "serve.log").open("w")
    out = (tmp_path / "serve.out").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "serve", "--http", f"127.0.0.1:{port}"], env=env, stdout=out, stderr=log
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        _wait_for_port("127.0.0.1", port, process, tmp_path / "serve.log")
        assert _http_status(url, {}) == 401
        assert _http_status(url, {"Authorization": "Bearer wrong-token"}) == 401

        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async def scenario():
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            async with mcp.Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                result = (await client.call_tool("run_command", {"host": "local", "command": "echo over http"})).structured_content
                assert result["stdout_tail"] == "over http\n"
                # The token the server was given is not passed on to the commands it runs.
                token_seen = (await client.call_tool("run_command", {"host": "local", "command": 'echo "[$FLEETRUN_MCP_TOKEN]"'}))
                assert token_seen.structured_content["stdout_tail"] == "[]\n"
                await client.call_tool("start_task", {"host": "local", "command": f"sleep {marker}"})

        run(scenario)
        wait_until(lambda: processes_running("sleep", marker))
        # uvicorn shuts down, then raises the signal again: the server must still end its tasks first.
        process.terminate()
        assert process.wait(20) == 0
        assert_none_left(marker)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
        out.close()
    logged = (tmp_path / "serve.log").read_text()
    assert token not in logged
    # Every log line goes to stderr, uvicorn's access log included: stdout stays empty.
    assert '"POST /mcp HTTP/1.1" 401' in logged
    assert (tmp_path / "serve.out").read_text() == ""


def test_http_refuses_requests_naming_another_host_or_from_another_origin_on_any_address(tmp_path):
    # Before, only 127.0.0.1, localhost and ::1 were checked: served on 127.0.0.2 without a token,
    # a web page that pointed a name of its own at that address could run commands (DNS rebinding).
    port = _free_port()
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetrun", "serve", "--http", f"127.0.0.2:{port}", "--insecure-no-auth",
             "--allow-host", "mcp.example.test"],
            env=_server_env(tmp_path), stdout=subprocess.DEVNULL, stderr=log,
        )
    url = f"http://127.0.0.2:{port}/mcp"
    initialize = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
    }).encode()
    try:
        _wait_for_port("127.0.0.2", port, process, tmp_path / "serve.log")
        codes = {
            (host, origin): _http_status(url, {"Host": host, **({"Origin": origin} if origin else {})}, initialize)
            for host in (f"127.0.0.2:{port}", f"localhost:{port}", "mcp.example.test", f"attacker.test:{port}")
            for origin in (None, "https://mcp.example.test", f"http://attacker.test:{port}")
        }
    finally:
        process.terminate()
        process.wait(20)
    assert codes == {
        (host, origin): 421 if host.startswith("attacker") else 403 if origin and "attacker" in origin else 200
        for host, origin in codes
    }
    assert (
        f"requests must name the server as 127.0.0.2:{port}, 127.0.0.1:{port}, localhost:{port}, [::1]:{port}, "
        f"mcp.example.test, mcp.example.test:{port} (--allow-host NAME adds a name)"
    ) in (tmp_path / "serve.log").read_text()


def test_http_on_an_ipv6_address_takes_the_token(tmp_path):
    # Before, the token's settings wrote the address without brackets (http://::1:PORT): a traceback at start.
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    token = "tok-" + os.urandom(12).hex()
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetrun", "serve", "--http", f"[::1]:{port}"],
            env={**_server_env(tmp_path), "FLEETRUN_MCP_TOKEN": token}, stdout=subprocess.DEVNULL, stderr=log,
        )
    url = f"http://[::1]:{port}/mcp"
    try:
        _wait_for_port("::1", port, process, tmp_path / "serve.log")
        assert _http_status(url, {}) == 401

        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async def scenario():
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            async with mcp.Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                result = (await client.call_tool("run_command", {"host": "local", "command": "echo over ipv6"})).structured_content
                assert (result["task"]["status"], result["stdout_tail"]) == ("succeeded", "over ipv6\n")

        run(scenario)
    finally:
        process.terminate()
        assert process.wait(20) == 0
    assert f"serving MCP over streamable HTTP at http://[::1]:{port}/mcp" in (tmp_path / "serve.log").read_text()


def test_http_on_a_port_already_taken_says_so_before_announcing_anything(tmp_path):
    # Before: "serving MCP over streamable HTTP at ..." first, then uvicorn's error, and exit status 3.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fleetrun", "serve", "--http", f"127.0.0.1:{port}"],
            env={**_server_env(tmp_path), "FLEETRUN_MCP_TOKEN": "tok-" + os.urandom(12).hex()},
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"fleetrun: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("option", [["--token-file", "token"], ["--insecure-no-auth"], ["--allow-host", "mcp.example.test"]])
def test_http_options_without_http_are_an_error_not_a_stdio_server(tmp_path, option):
    result = subprocess.run(
        [sys.executable, "-m", "fleetrun", "serve", *option], env=_server_env(tmp_path), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"fleetrun: error: {option[0]} applies to HTTP only: add --http [HOST:]PORT, or leave it out to serve stdio\n"


def test_http_refuses_to_start_without_a_token_or_with_a_guessable_one(tmp_path):
    env = {k: v for k, v in _server_env(tmp_path).items() if k != "FLEETRUN_MCP_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "fleetrun", "serve", "--http", str(_free_port())], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "refusing to serve HTTP without a bearer token: set FLEETRUN_MCP_TOKEN or pass --token-file PATH" in result.stderr
    guessable = subprocess.run(
        [sys.executable, "-m", "fleetrun", "serve", "--http", str(_free_port())],
        env={**env, "FLEETRUN_MCP_TOKEN": "hunter2-abc"}, capture_output=True, text=True, timeout=30,
    )
    assert guessable.returncode == 1
    assert guessable.stderr == (
        "fleetrun: error: the MCP bearer token ($FLEETRUN_MCP_TOKEN) is 11 characters long; use at least 16\n"
    )


# -- MCP Tasks (SEP-1686, 2025-11-25) ----------------------------------------------------------


def _task_status_listener(received: list):
    from mcp.client.extension import ClientExtension, NotificationBinding

    async def on_status(params):
        received.append(params)

    class TaskStatusListener(ClientExtension):
        identifier = "io.fleetrun/test-task-status"

        def notifications(self):
            return [NotificationBinding(method="notifications/tasks/status", params_type=mcp.types.TaskStatusNotificationParams, handler=on_status)]

    return TaskStatusListener()


async def _create_task(client, arguments: dict, name: str = "run_command", ttl: int = 60000) -> dict:
    # The SDK client has no public call for a task-augmented tools/call (its result is a
    # CreateTaskResult, not a CallToolResult): send it through the client's own dispatcher.
    return await client.session._dispatcher.send_raw_request(  # noqa: SLF001
        "tools/call", {"name": name, "arguments": arguments, "task": {"ttl": ttl}}, {}
    )


def _task_request(cls, params_cls, task_id):
    return cls(params=params_cls(task_id=task_id))


def test_mcp_tasks_end_to_end(server_for):
    server, executor = server_for()
    types = mcp.types

    async def scenario():
        statuses: list = []
        async with mcp.Client(server, mode="legacy", extensions=[_task_status_listener(statuses)]) as client:
            tasks_capability = client.server_capabilities.tasks
            assert tasks_capability.list is not None and tasks_capability.cancel is not None
            assert tasks_capability.requests.tools.call is not None
            support = {t.name: t.execution.task_support for t in (await client.list_tools()).tools}
            assert support["run_command"] == "optional" and support["list_hosts"] == "forbidden"

            created = types.CreateTaskResult.model_validate(
                await _create_task(client, {"host": "local", "command": "sleep 0.4; echo from a task"})
            )
            task_id = created.task.task_id
            assert (created.task.status, created.task.ttl) == ("working", 60000)
            got = await client.session.send_request(_task_request(types.GetTaskRequest, types.GetTaskRequestParams, task_id), types.GetTaskResult)
            assert got.status == "working"
            same = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
            assert same["status"] in ("queued", "running")  # the MCP task is the executor task
            result = await client.session.send_request(
                _task_request(types.GetTaskPayloadRequest, types.GetTaskPayloadRequestParams, task_id), types.CallToolResult
            )
            assert result.structured_content["task"]["status"] == "succeeded"
            assert result.structured_content["stdout_tail"] == "from a task\n"
            assert result.meta["io.modelcontextprotocol/related-task"] == {"taskId": task_id}
            listed = await client.session.send_request(types.ListTasksRequest(), types.ListTasksResult)
            assert [(t.task_id, t.status) for t in listed.tasks] == [(task_id, "completed")]
            with anyio.fail_after(5):
                while not statuses:
                    await anyio.sleep(0.02)
            assert (statuses[0].task_id, statuses[0].status) == (task_id, "completed")
            assert executor.get(task_id).command == "sleep 0.4; echo from a task"

    run(scenario)


def test_mcp_tasks_are_forgotten_after_their_ttl_or_when_the_store_prunes_them(server_for, marker):
    server, executor = server_for()
    types = mcp.types

    async def get(client, task_id):
        return await client.session.send_request(_task_request(types.GetTaskRequest, types.GetTaskRequestParams, task_id), types.GetTaskResult)

    async def listed(client):
        return [t.task_id for t in (await client.session.send_request(types.ListTasksRequest(), types.ListTasksResult)).tasks]

    async def scenario():
        async with mcp.Client(server, mode="legacy") as client:
            asked_too_much = types.CreateTaskResult.model_validate(await _create_task(client, {"host": "local", "command": "true"}, ttl=10**12))
            assert asked_too_much.task.ttl == 24 * 3600 * 1000  # the server grants at most a day
            short = types.CreateTaskResult.model_validate(await _create_task(client, {"host": "local", "command": "true"}, ttl=1000)).task
            running = types.CreateTaskResult.model_validate(await _create_task(client, {"host": "local", "command": f"sleep {marker}"}, ttl=1000)).task
            executor.get(short.task_id)  # known to the executor
            await anyio.sleep(1.2)
            # Past its ttl: the ended task is forgotten; the running one stays, still cancellable.
            with pytest.raises(mcp.MCPError, match="unknown task"):
                await get(client, short.task_id)
            assert (await get(client, running.task_id)).status == "working"
            assert await listed(client) == [running.task_id, asked_too_much.task.task_id]
            cancelled = await client.session.send_request(
                _task_request(types.CancelTaskRequest, types.CancelTaskRequestParams, running.task_id), types.CancelTaskResult
            )
            assert cancelled.status == "cancelled"
            # The store's retention removes every ended record: the MCP tasks go with them.
            executor.store.prune(Retention(max_tasks=0))
            assert await listed(client) == []
            with pytest.raises(mcp.MCPError, match="unknown task"):
                await get(client, asked_too_much.task.task_id)

    run(scenario)
    assert_none_left(marker)


def test_mcp_tasks_cancel_denial_and_unknown_ids(server_for, marker):
    server, executor = server_for()
    types = mcp.types

    async def scenario():
        statuses: list = []
        async with mcp.Client(server, mode="legacy", extensions=[_task_status_listener(statuses)]) as client:
            created = types.CreateTaskResult.model_validate(await _create_task(client, {"host": "local", "command": f"sleep {marker}"}))
            with anyio.fail_after(10):
                while not processes_with(f"sleep {marker}"):
                    await anyio.sleep(0.02)
            cancelled = await client.session.send_request(
                _task_request(types.CancelTaskRequest, types.CancelTaskRequestParams, created.task.task_id), types.CancelTaskResult
            )
            assert cancelled.status == "cancelled"
            with anyio.fail_after(5):
                while not statuses:
                    await anyio.sleep(0.02)
            assert statuses[0].status == "cancelled"

            with pytest.raises(mcp.MCPError, match=r"policy: .*rule 2 of policy\.yaml, line 4: deny: echo forbidden"):
                await _create_task(client, {"host": "local", "command": "echo forbidden"})
            with pytest.raises(mcp.MCPError, match="unknown host 'nowhere'"):
                await _create_task(client, {"host": "nowhere", "command": "true"})
            with pytest.raises(mcp.MCPError, match="does not support task-augmented calls"):
                await _create_task(client, {"tag": "dev"}, name="list_hosts")
            # The same argument checks as a plain call: nothing is coerced into a command.
            for arguments, problem in [
                ({"host": "local", "command": ["echo", "x"]}, "invalid arguments for run_command: command: a string is required (got list)"),
                ({"host": 5, "command": "true"}, "invalid arguments for run_command: host: a string is required (got int)"),
                ({"host": "local"}, "invalid arguments for run_command: command: a string is required (missing)"),
                ({"host": "local", "command": "true", "timeout_seconds": 1},
                 "run_command takes no argument 'timeout_seconds' (its arguments: host, command, timeout_s, wait_s)"),
            ]:
                with pytest.raises(mcp.MCPError) as refused:
                    await _create_task(client, arguments)
                assert refused.value.error.message == problem
            assert [task.command for task in executor.list()] == [f"sleep {marker}"]
            with pytest.raises(mcp.MCPError, match="unknown task"):
                await client.session.send_request(_task_request(types.GetTaskRequest, types.GetTaskRequestParams, "0123456789ab"), types.GetTaskResult)

    run(scenario)
    assert_none_left(marker)


def test_resources_subscribe_for_2025_11_25_clients(server_for):
    server, executor = server_for()

    async def scenario():
        updates: list[str] = []

        async def on_message(message):
            if isinstance(message, mcp.types.ResourceUpdatedNotification):
                updates.append(str(message.params.uri))

        async with mcp.Client(server, mode="legacy") as starter, mcp.Client(server, mode="legacy", message_handler=on_message) as watcher:
            assert watcher.server_capabilities.resources.subscribe is True
            task = (await starter.call_tool("start_task", {"host": "local", "command": "sleep 0.3"})).structured_content
            with pytest.warns(Warning):
                await watcher.subscribe_resource(task["resource"])
            notifier = executor.plugins.get("fleetrun.notifiers.mcp")
            assert notifier.subscribed(task["resource"]) == 1
            with anyio.fail_after(10):
                while task["resource"] not in updates:
                    await anyio.sleep(0.02)
            # The task's last update was sent: nothing is kept for it any more.
            assert notifier.subscribed(task["resource"]) == 0
            assert updates.count(task["resource"]) == 1
            # What can no longer change is acknowledged and not kept: a session that leaves
            # without unsubscribing leaves nothing behind.
            with pytest.warns(Warning):
                await watcher.subscribe_resource(task["resource"])
                await watcher.subscribe_resource("fleetrun://hosts")
            assert (notifier.subscribed(task["resource"]), notifier.subscribed("fleetrun://hosts")) == (0, 0)
            for uri, reason in (
                ("fleetrun://tasks/0123456789ab", "no task '0123456789ab'"),
                ("fleetrun://tasks/nope", "invalid task id 'nope'"),
                ("fleetrun://elsewhere", "no such resource"),
            ):
                with pytest.warns(Warning), pytest.raises(MCPError) as refused:
                    await watcher.subscribe_resource(uri)
                assert f"cannot subscribe to {uri!r}" in str(refused.value) and reason in str(refused.value)

    run(scenario)


def test_stdio_stdout_carries_protocol_messages_only(tmp_path):
    import json as _json

    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_command", "arguments": {"host": "local", "command": "echo hello >&2; echo out"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "run_command", "arguments": {"host": "local", "command": "reboot"}}},
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "-vv", "serve"], env=_server_env(tmp_path),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    answers, notifications = [], []
    try:
        for message in messages:
            process.stdin.write(_json.dumps(message) + "\n")
            process.stdin.flush()
            while "id" in message:
                received = _json.loads(process.stdout.readline())  # every stdout line parses as JSON-RPC
                if received.get("id") == message["id"]:
                    answers.append(received)
                    break
                notifications.append(received)
    finally:
        rest, errors = process.communicate(timeout=20)  # closes stdin: the server ends
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert all(m["jsonrpc"] == "2.0" for m in answers + notifications)
    assert {m["method"] for m in notifications} <= {"notifications/message", "notifications/resources/updated", "notifications/progress"}
    assert answers[1]["result"]["structuredContent"]["stdout_tail"] == "out\n"
    assert answers[2]["result"]["isError"] is True
    for line in rest.splitlines():  # anything else on stdout must be protocol too
        assert _json.loads(line)["jsonrpc"] == "2.0"
    assert "fleetrun" in errors  # the -vv logs went to stderr
