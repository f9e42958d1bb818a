"""Executor behaviour: processes, limits, output, progress, asyncio use."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest

from fleetrun.core.errors import FleetrunError, HostBusyError, PolicyDenied, UnknownHostError, UnknownTaskError
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.processes import KILL_GRACE_SECONDS
from fleetrun.core.secrets import register_secret

from conftest import assert_none_left, processes_running, processes_with, stop_one_that_cleans_up, wait_until


def max_overlap(tasks) -> int:
    """How many of these tasks were running at the same moment, at most."""
    edges = sorted([(t.started_at, 1) for t in tasks] + [(t.ended_at, -1) for t in tasks], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


# -- nothing left running ----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_timeout_and_cancel_kill_the_whole_process_group(make_executor, marker, ending):
    executor = make_executor()
    command = f"sleep {marker} & sleep {marker} & (sleep {marker}; echo never) & wait"
    timeout = 0.5 if ending == "timeout" else None
    handle = executor.submit(TaskRequest(host="local", command=command, timeout_s=timeout))
    wait_until(lambda: len(processes_with(f"sleep {marker}")) >= 3)
    if ending == "cancel":
        handle.cancel()
    task = handle.wait(15)
    assert task.status is (TaskStatus.TIMED_OUT if ending == "timeout" else TaskStatus.CANCELLED)
    assert_none_left(marker)


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(make_executor, marker):
    executor = make_executor()
    command = f"trap '' TERM; sh -c \"trap '' TERM; sleep {marker}\" & wait; wait"
    handle = executor.submit(TaskRequest(host="local", command=command))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    started = time.monotonic()
    handle.cancel()
    task = handle.wait(15)
    assert task.status is TaskStatus.CANCELLED
    assert_none_left(marker)
    # Before: KILL came with the TERM (the cancel also cancelled the wait for the exit).
    assert KILL_GRACE_SECONDS <= time.monotonic() - started < KILL_GRACE_SECONDS + 3


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_a_stopped_command_has_the_grace_period_to_end_itself(make_executor, ending):
    # Its TERM trap takes 0.3 s, well inside the grace period: it ends as it chooses.
    executor = make_executor()
    task = stop_one_that_cleans_up(executor, "local", ending)
    assert task.status is (TaskStatus.TIMED_OUT if ending == "timeout" else TaskStatus.CANCELLED)
    # Before: b"ready\n": KILL came with the TERM, and the trap never finished.
    assert executor.read_output(task.id).data == b"ready\ncleaning\ncleaned\n"


def test_closing_the_executor_cancels_what_still_runs(make_executor, recorder, marker):
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
    wait_until(lambda: processes_with(marker))
    executor.close()
    task = handle.wait(1)
    assert task.status is TaskStatus.CANCELLED
    assert task.cancel_reason == "the executor was closed"
    assert_none_left(marker)
    assert executor.store.get(task.id).status is TaskStatus.CANCELLED


def test_a_second_close_returns_only_once_the_first_has_ended_the_tasks(make_executor, marker):
    # `fleetrun serve` closes from a signal thread while the main thread may close too: the
    # one that comes second must not go on (and let the process exit) with commands running.
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command=f"trap 'sleep 0.5; exit 1' TERM; sleep {marker} & wait"))
    wait_until(lambda: processes_running("sleep", marker))
    first = threading.Thread(target=executor.close, args=("closed by the first",))
    first.start()
    wait_until(lambda: executor._closed)
    executor.close("closed by the second")
    assert handle.done()
    task = handle.wait(0)
    assert (task.status, task.cancel_reason) == (TaskStatus.CANCELLED, "closed by the first")
    assert_none_left(marker)
    first.join(10)


# -- concurrency -------------------------------------------------------------------------


def test_per_host_limit_queues_the_rest(make_executor):
    executor = make_executor(hosts_yaml="hosts:\n  box:\n    max_concurrent: 2\n")
    handles = [executor.submit(TaskRequest(host="box", command="sleep 0.3")) for _ in range(6)]
    tasks = [h.wait(20) for h in handles]
    assert all(t.status is TaskStatus.SUCCEEDED for t in tasks)
    assert max_overlap(tasks) == 2


def test_a_host_refuses_tasks_beyond_its_queue_and_takes_them_again_once_there_is_room(make_executor, store, recorder, marker):
    executor = make_executor(hosts_yaml="hosts:\n  box: {max_concurrent: 1, max_queued: 2}\n  other: {max_concurrent: 1}\n")
    held = [executor.submit(TaskRequest(host="box", command=f"sleep {marker}")) for _ in range(3)]  # 1 runs, 2 wait
    wait_until(lambda: executor.get(held[0].id).status is TaskStatus.RUNNING)
    created = len(recorder.events)
    with pytest.raises(HostBusyError) as refused:
        executor.submit(TaskRequest(host="box", command="true"))
    assert str(refused.value) == (
        "host 'box' already has 2 tasks waiting for a turn (its max_queued; 1 runs at once): "
        "wait for some to end or cancel some"
    )
    assert len(recorder.events) == created, "a refused task fires no hook"
    assert sorted(t.id for t in store.list()) == sorted(h.id for h in held), "and is not recorded"
    assert executor.run(TaskRequest(host="other", command="true")).status is TaskStatus.SUCCEEDED  # another host's queue

    assert executor.cancel(held[2].id)
    assert held[2].wait(10).status is TaskStatus.CANCELLED
    again = executor.submit(TaskRequest(host="box", command="true"))
    for handle in held[:2]:
        executor.cancel(handle.id)
    assert again.wait(20).status is TaskStatus.SUCCEEDED
    assert [executor.get(h.id).status for h in held] == [TaskStatus.CANCELLED] * 3
    assert_none_left(marker)


def test_global_limit_spans_hosts(make_executor):
    executor = make_executor(
        hosts_yaml="hosts:\n  a:\n    max_concurrent: 5\n  b:\n    max_concurrent: 5\n", max_concurrent=3
    )
    handles = [executor.submit(TaskRequest(host=h, command="sleep 0.3")) for h in "abababab"]
    tasks = [h.wait(20) for h in handles]
    assert max_overlap(tasks) == 3
    assert max_overlap([t for t in tasks if t.host == "a"]) <= 3


# -- output ------------------------------------------------------------------------------


def test_stdout_and_stderr_are_kept_apart(make_executor):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="echo out1; echo err1 >&2; echo out2"))
    assert executor.read_output(task.id, "stdout").data == b"out1\nout2\n"
    assert executor.read_output(task.id, "stderr").data == b"err1\n"


def test_truncation_keeps_the_head_counts_everything_and_flags_it(make_executor):
    executor = make_executor()
    task = executor.run(
        TaskRequest(host="local", command="head -c 50000 /dev/zero | tr '\\0' x; echo tail >&2", max_output_bytes=1000)
    )
    assert task.status is TaskStatus.SUCCEEDED
    assert task.stdout_bytes == 50000 and task.stdout_truncated is True
    assert task.stderr_bytes == 5 and task.stderr_truncated is False
    piece = executor.read_output(task.id, "stdout", max_bytes=1 << 20)
    assert piece.data == b"x" * 1000
    assert piece.size == 1000 and piece.complete and piece.truncated


def test_request_can_lower_but_not_raise_host_limits(make_executor):
    executor = make_executor(hosts_yaml="hosts:\n  box:\n    max_seconds: 10\n    max_output_bytes: 100\n")
    lowered = executor.plan(TaskRequest(host="box", command="true", timeout_s=2, max_output_bytes=10))
    raised = executor.plan(TaskRequest(host="box", command="true", timeout_s=60, max_output_bytes=10**9))
    assert (lowered.limits.max_seconds, lowered.limits.max_output_bytes) == (2, 10)
    assert (raised.limits.max_seconds, raised.limits.max_output_bytes) == (10, 100)


def test_output_is_readable_by_cursor_while_the_task_runs(make_executor, tmp_path):
    executor = make_executor()
    flag = tmp_path / "go"
    handle = executor.submit(
        TaskRequest(host="local", command=f"echo first; while [ ! -e {flag} ]; do sleep 0.02; done; echo second")
    )
    wait_until(lambda: executor.read_output(handle.id, "stdout").data)
    piece = executor.read_output(handle.id, "stdout")
    assert piece.data == b"first\n"
    assert piece.next_offset == 6 and piece.complete is False
    assert executor.get(handle.id).status is TaskStatus.RUNNING
    tail = executor.tail_output(handle.id, "stdout", lines=1)
    assert tail.data == b"first\n" and tail.offset == 0
    flag.touch()
    handle.wait(10)
    rest = executor.read_output(handle.id, "stdout", offset=piece.next_offset)
    assert rest.data == b"second\n" and rest.offset == 6 and rest.complete is True
    assert executor.tail_output(handle.id, "stdout", lines=1).data == b"second\n"


def test_an_output_listener_sees_every_byte_and_its_failure_harms_nothing(make_executor, caplog):
    seen = []

    def listener(stream, data):
        seen.append((stream, data))
        raise ValueError("a listener bug")

    executor = make_executor()
    with caplog.at_level("ERROR", logger="fleetrun.executor"):
        task = executor.run(TaskRequest(host="local", command="echo out; echo err >&2"), on_output=listener)
    assert task.status is TaskStatus.SUCCEEDED
    assert b"".join(d for s, d in seen if s == "stdout") == b"out\n"
    assert b"".join(d for s, d in seen if s == "stderr") == b"err\n"
    assert executor.read_output(task.id).data == b"out\n"
    assert f"output listener of task {task.id} failed" in caplog.text


def test_large_output_is_byte_exact(make_executor, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(8 << 20))
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command=f"cat {source}"))
    assert task.stdout_bytes == 8 << 20 and not task.stdout_truncated
    path = executor.store.output_dir(task.id) / "stdout"
    assert path.read_bytes() == source.read_bytes()


def test_env_and_cwd_come_from_host_and_request(make_executor, tmp_path):
    executor = make_executor(
        hosts_yaml=f"hosts:\n  box:\n    cwd: {tmp_path}\n    env:\n      COLOR: blue\n      SIZE: '1'\n"
    )
    task = executor.run(TaskRequest(host="box", command='echo "$COLOR $SIZE $(pwd)"', env={"SIZE": "2"}))
    assert executor.read_output(task.id).data == f"blue 2 {tmp_path}\n".encode()
    other = tmp_path / "sub"
    other.mkdir()
    task = executor.run(TaskRequest(host="box", command="pwd", cwd=str(other)))
    assert executor.read_output(task.id).data == f"{other}\n".encode()


# -- progress ----------------------------------------------------------------------------


def test_progress_counts_lines_and_bytes_and_is_rate_limited(make_executor, recorder):
    executor = make_executor(heartbeat_s=30)
    script = "i=0; while [ $i -lt 60 ]; do echo line $i; i=$((i+1)); sleep 0.01; done; echo done >&2"
    task = executor.run(TaskRequest(host="local", command=script))
    events = [e for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    progress = [e.progress for e in events]
    assert len(progress) >= 3
    # At most one event per 0.1 s; only the flush of the last output, right before
    # the final hook, may come sooner.
    gaps = [b.time - a.time for a, b in zip(events, events[1:-1])]
    assert min(gaps) >= 0.095, gaps
    counts = [p.stdout_lines for p in progress]
    assert counts == sorted(counts)
    last = progress[-1]
    assert last.stdout_lines == 60 and last.stderr_lines == 1
    assert last.stdout_bytes == task.stdout_bytes
    assert last.latest_line == "done" and last.latest_stream == "stderr"
    assert all(p.percent is None for p in progress)
    assert not any(p.heartbeat for p in progress)


def test_percent_comes_only_from_progress_markers(make_executor, recorder):
    executor = make_executor(heartbeat_s=30)
    task = executor.run(
        TaskRequest(host="local", command="echo 'disk 93% full'; sleep 0.15; echo 'progress: 40%'; sleep 0.15; echo 'Progress 75.5%'")
    )
    percents = [e.progress.percent for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert percents[0] is None  # "93%" alone is not a progress marker
    assert 40.0 in percents and percents[-1] == 75.5


def test_a_progress_marker_is_one_line(make_executor, recorder):
    # "progress:" then "50%" on the next line is not a marker; blank lines around one are fine.
    executor = make_executor(heartbeat_s=30)
    task = executor.run(TaskRequest(host="local", command="printf 'progress:\\n50%%\\n\\n\\n'; sleep 0.15; printf '\\n\\n  progress: 20%%\\n\\n'"))
    percents = [e.progress.percent for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert percents[0] is None and percents[-1] == 20.0, percents


def test_progress_redrawn_in_place_with_carriage_returns_is_read(make_executor, recorder):
    # pv, curl, wget, rsync: a progress bar rewrites its line after a \r (and may end with one).
    executor = make_executor(heartbeat_s=30)
    command = "printf 'progress: 10%%\\rprogress: 20%%\\rprogress: 30%%'; sleep 0.3; printf '\\rprogress: 90%%\\r'"
    task = executor.run(TaskRequest(host="local", command=command))
    events = [e.progress for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert [(p.percent, p.latest_line) for p in events] == [(30.0, "progress: 30%"), (90.0, "progress: 90%")]


def test_a_character_cut_between_two_writes_reaches_the_latest_line_whole(make_executor, recorder):
    executor = make_executor(heartbeat_s=30)
    command = "printf 'price: \\342\\202'; sleep 0.3; printf '\\254 5\\n'"  # the euro sign, in two writes
    task = executor.run(TaskRequest(host="local", command=command))
    lines = [e.progress.latest_line for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert lines == ["price:", "price: € 5"]


def test_the_latest_line_never_shows_a_secret_nor_its_beginning(make_executor, recorder):
    secret = "S3CR3T-" + secrets.token_hex(6).upper()
    register_secret(secret)
    executor = make_executor(heartbeat_s=30)
    command = f"printf 'password={secret[:9]}'; sleep 0.3; printf '{secret[9:]} ok\\n'"  # written in two pieces
    task = executor.run(TaskRequest(host="local", command=command))
    lines = [e.progress.latest_line for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert lines == ["password=", "password=*** ok"]


def test_coloured_progress_is_read_and_the_latest_line_has_no_escape_sequences(make_executor, recorder):
    executor = make_executor(heartbeat_s=30)
    command = "printf '\\033]0;title\\007\\033[1;32mprogress: 60%%\\033[0m \\033]8;;http://x\\033\\\\link\\033]8;;\\033\\\\\\n'"
    task = executor.run(TaskRequest(host="local", command=command))
    events = [e.progress for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert [(p.percent, p.latest_line) for p in events] == [(60.0, "progress: 60% link")]
    assert b"\x1b[1;32m" in executor.read_output(task.id).data  # the output itself keeps them


def test_custom_progress_pattern_with_current_and_total(make_executor, recorder):
    executor = make_executor(heartbeat_s=30)
    task = executor.run(
        TaskRequest(host="local", command="echo 'step 3/12'", progress_pattern=r"step (?P<current>\d+)/(?P<total>\d+)")
    )
    percents = [e.progress.percent for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert percents == [25.0]


def test_bad_progress_pattern_is_a_clear_error(make_executor, recorder):
    # A FleetrunError, like every other bad request: front ends show it as one line.
    executor = make_executor()
    with pytest.raises(FleetrunError, match="needs a named group 'percent'"):
        executor.submit(TaskRequest(host="local", command="true", progress_pattern=r"(\d+)%"))
    with pytest.raises(FleetrunError, match=r"invalid progress pattern '\(': missing \)"):
        executor.submit(TaskRequest(host="local", command="true", progress_pattern="("))
    assert executor.list() == [] and list(recorder) == []


def test_heartbeats_while_silent_carry_elapsed_time(make_executor, recorder):
    executor = make_executor(heartbeat_s=0.2)
    task = executor.run(TaskRequest(host="local", command="sleep 1"))
    beats = [e.progress for e in recorder if e.event == "task.progress" and e.task.id == task.id]
    assert 3 <= len(beats) <= 6
    assert all(b.heartbeat and b.stdout_bytes == 0 and b.percent is None for b in beats)
    elapsed = [b.elapsed_s for b in beats]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0.15


# -- API ---------------------------------------------------------------------------------


def test_asyncio_callers_are_not_blocked(make_executor):
    executor = make_executor()

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        tasks = await asyncio.gather(*(executor.run_async(TaskRequest(host="local", command="sleep 0.3")) for _ in range(3)))
        tick_task.cancel()
        return tasks, ticks

    tasks, ticks = asyncio.run(main())
    assert [t.status for t in tasks] == [TaskStatus.SUCCEEDED] * 3
    assert ticks >= 15  # the loop kept running while the tasks did


def test_a_long_command_is_submitted_from_asyncio_like_a_short_one(make_executor):
    # Longer than 4 KiB: the policy reads it on a worker thread, not on the caller's loop.
    from fleetrun.core.policy import parse_policy

    executor = make_executor(policy=parse_policy("rules:\n  - allow: echo *\n", source="p.yaml"))
    words = " ".join(f"w{i}" for i in range(1500))

    async def main():
        task = await executor.run_async(TaskRequest(host="local", command=f"echo {words}"))
        with pytest.raises(PolicyDenied, match="'rm -rf /tmp/nothing' matches no rule"):
            await executor.submit_async(TaskRequest(host="local", command=f"echo {words}; rm -rf /tmp/nothing"))
        return task

    task = asyncio.run(main())
    assert len(task.command) > 4096 and task.status is TaskStatus.SUCCEEDED
    assert executor.read_output(task.id).data == words.encode() + b"\n"


def test_async_reads_give_what_the_blocking_ones_give(make_executor, marker):
    executor = make_executor()

    async def main():
        ended = await executor.run_async(TaskRequest(host="local", command="echo done"))
        running = await executor.submit_async(TaskRequest(host="local", command=f"sleep {marker}"))
        live = await executor.get_async(running.id)
        stored = await executor.get_async(ended.id)
        listed = await executor.list_async(status=[TaskStatus.SUCCEEDED])
        with pytest.raises(UnknownTaskError):
            await executor.get_async("0123456789ab")
        executor.cancel(running.id)
        await running.wait_async()
        return ended, live, stored, listed

    ended, live, stored, listed = asyncio.run(main())
    assert live.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and live.command == f"sleep {marker}"
    assert stored == ended == executor.get(ended.id)
    assert listed == [ended]


def test_unknown_host_and_bad_requests_are_refused_before_anything_runs(make_executor, recorder, store):
    executor = make_executor()
    with pytest.raises(UnknownHostError, match="unknown host 'nope' \\(known hosts: local"):
        executor.submit(TaskRequest(host="nope", command="true"))
    with pytest.raises(FleetrunError, match="the command is empty"):
        executor.submit(TaskRequest(host="local", command="   "))
    with pytest.raises(FleetrunError, match="NUL"):
        executor.submit(TaskRequest(host="local", command="echo \x00"))
    with pytest.raises(FleetrunError, match="timeout_s must be greater than 0"):
        executor.submit(TaskRequest(host="local", command="true", timeout_s=0))
    assert len(recorder) == 0
    assert store.list() == []


def test_closed_executor_refuses_new_tasks(make_executor):
    executor = make_executor()
    executor.close()
    with pytest.raises(FleetrunError, match="closed"):
        executor.submit(TaskRequest(host="local", command="true"))


# Runs in a Python process of its own: it forks, and a forked pytest would go on testing.
_FORKS = r"""
import multiprocessing, os, sys, json
from fleetrun import Executor, TaskRequest
from fleetrun.core.errors import FleetrunError
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.plugin_manager import PluginManager

def executor():
    manager = PluginManager(autoload=False)
    return Executor(plugins=manager, inventory=parse_inventory("hosts:\n  local:\n", transports=manager.transports))

parent = executor()
first = parent.run(TaskRequest(host="local", command="echo parent"))
slow = parent.submit(TaskRequest(host="local", command="sleep 1; echo slow"))

def use_parents(_):
    try:
        parent.run(TaskRequest(host="local", command="echo child"))
        return "ran"
    except FleetrunError as exc:
        try:
            slow.wait(5)  # the parent's task, which the child's copy of its handle would wait for forever
            waited = "waited"
        except FleetrunError as again:
            waited = str(again)
        # The store itself is the child's to read, through a connection of its own.
        return [str(exc), waited, parent.store.get(first.id).status.value]

def use_own(n):
    with executor() as own:
        task = own.run(TaskRequest(host="local", command=f"echo own {n}"))
        return [task.status.value, own.read_output(task.id).data.decode(), own.get(first.id).status.value]

with multiprocessing.get_context("fork").Pool(2) as pool:
    refused = pool.map(use_parents, range(2))
    owned = pool.map(use_own, range(3))

pid = os.fork()
if pid == 0:
    parent.close()  # a with-block or a cleanup in the child: it must not touch the parent's tasks
    sys.exit(0)  # and exit runs the atexit handlers, which must not wait for the parent's engine
_, status = os.waitpid(pid, 0)

print(json.dumps({
    "refused": refused, "owned": owned, "child_exit": os.waitstatus_to_exitcode(status),
    "slow": [parent.get(slow.id).status.value, slow.wait(10).status.value, parent.read_output(slow.id).data.decode()],
    "after": parent.run(TaskRequest(host="local", command="true")).status.value,
    "parent_pid": os.getpid(),
    "tasks": len(parent.list(limit=100)),
}))
parent.close()
"""


def test_a_forked_child_neither_uses_nor_stops_the_parents_executor_and_can_make_its_own(tmp_path):
    # Before: in a child forked from a process with an executor (multiprocessing's default
    # on Linux), the executor's calls waited forever for an engine thread that stayed in
    # the parent, and so did the child's exit (its atexit handler closed that executor).
    done = subprocess.run(
        [sys.executable, "-c", _FORKS], capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLEETRUN_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    pid = result["parent_pid"]
    for message, waited, first_status in result["refused"]:
        assert first_status == "succeeded" and waited == message
        assert message.startswith(f"this executor belongs to process {pid}, and process "), message
        assert message.endswith(
            "is a fork of it: its tasks, engine thread and connections stayed there. Make an Executor in this "
            "process (with multiprocessing: in the worker, or use the 'spawn' or 'forkserver' start method)"
        )
    # A child's own executor works, on the same store, and sees the parent's tasks.
    assert result["owned"] == [["succeeded", f"own {n}\n", "succeeded"] for n in range(3)]
    assert result["child_exit"] == 0
    # The parent's task that ran across the forks ended as it would have, and the parent goes on.
    assert result["slow"][1:] == ["succeeded", "slow\n"] and result["after"] == "succeeded"
    assert result["tasks"] == 1 + 1 + 3 + 1
    assert list((tmp_path / "home" / "journal").glob("*.jsonl")) == []  # every journal applied and removed
