"""The embedded store: durable records, reads from other processes, orphans, retention."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleetrun.core import store as store_module
from fleetrun.core.errors import FleetrunError, UnknownTaskError
from fleetrun.core.executor import Executor
from fleetrun.core.models import Task, TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.processes import owner_token
from fleetrun.core import start_log
from fleetrun.core.start_log import StartLog, read_starts
from fleetrun.core.store import Retention, TaskStore, _values

from conftest import assert_none_left, processes_running, processes_with, run_cli, wait_until

OWNER_SCRIPT = textwrap.dedent(
    """
    import sys
    from fleetrun.core import executor, journal
    from fleetrun.core.executor import Executor
    from fleetrun.core.models import TaskRequest
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.store import TaskStore

    if sys.argv[3] != "-":
        journal.BATCH_SECONDS = float(sys.argv[3])  # records reach SQLite this late
    if sys.argv[4] != "-":
        executor._RUNNING_WRITE_DELAY = float(sys.argv[4])  # a task is recorded as running this late
    executor = Executor(store=TaskStore(sys.argv[1]), plugins=PluginManager(autoload=False))
    handle = executor.submit(TaskRequest(host="local", command=sys.argv[2]))
    print(handle.id, flush=True)
    task = handle.wait()
    print(task.status.value, flush=True)
    executor.close()
    """
)


def start_owner(
    home: Path, command: str, *, apply_after_s: float | None = None, running_after_s: float | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Another process that owns a task; returns it and the task id."""
    extra = ["-" if value is None else str(value) for value in (apply_after_s, running_after_s)]
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(home), command, *extra], stdout=subprocess.PIPE, text=True
    )
    task_id = proc.stdout.readline().strip()
    assert len(task_id) == 12, task_id
    return proc, task_id


def test_records_and_output_outlive_the_executor(make_executor, store):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="echo kept"))
    executor.close()
    reopened = TaskStore(store.home)
    assert reopened.get(task.id) == task
    assert reopened.read_output(task.id, "stdout").data == b"kept\n"
    reopened.close()


def test_the_largest_limits_a_hosts_file_may_set_are_kept_in_the_store(make_executor, store):
    # A max_output_bytes past SQLite's 64-bit integers dropped the task's record from the store.
    from fleetrun.core.inventory import COMMON_HOST_FIELDS

    largest = int(COMMON_HOST_FIELDS["max_output_bytes"].maximum)
    executor = make_executor(hosts_yaml=f"hosts:\n  big:\n    max_output_bytes: {largest}\n    max_seconds: 1.0e+300\n")
    task = executor.run(TaskRequest(host="big", command="echo kept"))
    executor.close()
    reopened = TaskStore(store.home)
    assert reopened.get(task.id) == task
    assert (task.status, task.max_output_bytes, task.max_seconds) == (TaskStatus.SUCCEEDED, largest, 1e300)
    reopened.close()


def test_another_process_reads_records_and_output_while_the_task_runs(tmp_path, store):
    flag = tmp_path / "go"
    owner, task_id = start_owner(store.home, f"echo first; while [ ! -e {flag} ]; do sleep 0.02; done; echo second")
    try:
        wait_until(lambda: store.read_output(task_id, "stdout").data == b"first\n")
        assert store.get(task_id).status in (TaskStatus.QUEUED, TaskStatus.RUNNING)
        wait_until(lambda: store.get(task_id).status is TaskStatus.RUNNING)
        shown = run_cli("tasks", "show", task_id, "--json", env={"FLEETRUN_HOME": str(store.home)})
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["status"] == "running"
        out = run_cli("tasks", "output", task_id, env={"FLEETRUN_HOME": str(store.home)})
        assert out.stdout == "first\n"
        flag.touch()
        assert owner.stdout.readline().strip() == "succeeded"
    finally:
        owner.kill()
        owner.wait()
    assert store.read_output(task_id, "stdout").data == b"first\nsecond\n"
    assert store.get(task_id).status is TaskStatus.SUCCEEDED


def _process_token(home: Path, task_id: str) -> str | None:
    db = sqlite3.connect(home / "tasks.sqlite3")
    try:
        row = db.execute("SELECT process_token FROM tasks WHERE id = ?", (task_id,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def test_a_command_running_10_ms_has_its_process_on_record(make_executor, store):
    # What lets another process stop it should this one die; only a command that ends
    # sooner is spared the store write.
    executor = make_executor()
    quick = executor.run(TaskRequest(host="local", command="true"))
    brief = executor.run(TaskRequest(host="local", command="sleep 0.04"))
    store.flush()
    assert _process_token(store.home, quick.id) is None
    token = _process_token(store.home, brief.id)
    assert token is not None
    boot, pid, started = token.split(":")
    assert int(pid) != os.getpid() and int(started) > 0  # the command's process, with its start time


def test_a_task_whose_owner_was_killed_becomes_interrupted_and_its_command_is_stopped(store, marker):
    # The shell leads the command's group; the background sleep is what it started.
    owner, task_id = start_owner(store.home, f"sleep {marker} & sleep {marker}; wait")
    try:
        wait_until(lambda: len(processes_running("sleep", marker)) == 2)
        group = os.getpgid(processes_running("sleep", marker)[0])
        wait_until(lambda: _process_token(store.home, task_id))  # recorded with the running state
        assert store.sweep_orphans() == []  # the owner is alive: nothing to do
        assert len(processes_running("sleep", marker)) == 2
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert len(processes_running("sleep", marker)) == 2  # nothing stops them but the next fleetrun
        listed = run_cli("tasks", "list", "--json", env={"FLEETRUN_HOME": str(store.home)})
        assert listed.returncode == 0, listed.stderr
        record = next(t for t in json.loads(listed.stdout) if t["id"] == task_id)
        assert record["status"] == "interrupted"
        assert record["error"] == (
            f"the fleetrun process that owned this task (pid {owner.pid}) is gone; "
            f"its command, still running, was stopped (process group {group})"
        )
        assert_none_left(marker)
        assert store.get(task_id).status is TaskStatus.INTERRUPTED
        assert store.sweep_orphans() == []  # once is enough
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _kill_and_sweep(store: TaskStore, owner: subprocess.Popen[str], task_id: str, marker: str, group: int) -> None:
    """Kill the owner outright; the next sweep must mark its task interrupted and stop its command's group."""
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert store.sweep_orphans() == [task_id]
    assert_none_left(marker)
    task = store.get(task_id)
    assert task.status is TaskStatus.INTERRUPTED
    assert task.error.endswith(f"its command, still running, was stopped (process group {group})")


def test_a_command_whose_owner_was_killed_before_applying_its_journal_is_stopped_too(store, marker):
    # Record, running state and process token are only in the dead owner's journal: the
    # replay must bring in the token with the row it belongs to, before the sweep judges.
    owner, task_id = start_owner(store.home, f"sleep {marker}", apply_after_s=30.0)
    try:
        wait_until(lambda: processes_running("sleep", marker))
        group = os.getpgid(processes_running("sleep", marker)[0])

        def journaled() -> str:
            return "".join(path.read_text() for path in (store.home / "journal").glob("*.journal"))

        wait_until(lambda: f'["process","{task_id}"' in journaled())
        assert _process_token(store.home, task_id) is None
        _kill_and_sweep(store, owner, task_id, marker, group)
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_command_whose_owner_was_killed_before_recording_it_as_running_is_stopped_too(store, marker):
    # Killed within the moment before its task is recorded as running (10 ms; stretched
    # here to an hour so that the kill surely lands in it), the owner left no record of
    # the command's process but its start log.
    owner, task_id = start_owner(store.home, f"sleep {marker} & sleep {marker}; wait", running_after_s=3600.0)
    try:
        wait_until(lambda: len(processes_running("sleep", marker)) == 2)
        group = os.getpgid(processes_running("sleep", marker)[0])
        time.sleep(0.1)  # the journal's writer applies the record, as queued
        assert store.get(task_id).status is TaskStatus.QUEUED and _process_token(store.home, task_id) is None
        starts = list((store.home / "journal").glob("*.starts"))
        assert len(starts) == 1
        _kill_and_sweep(store, owner, task_id, marker, group)
        assert not starts[0].exists()  # replayed once, with the journal
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_start_log_is_removed_when_its_owner_closes_and_skips_slots_it_cannot_trust(tmp_path, store, make_executor):
    executor = make_executor()
    assert executor.run(TaskRequest(host="local", command="sleep 0.001")).status is TaskStatus.SUCCEEDED
    assert len(list((store.home / "journal").glob("*.starts"))) == 1
    executor.close()
    store.close()
    assert list((store.home / "journal").glob("*.starts")) == []
    log = StartLog(tmp_path / "x.starts")
    log.note("0123456789ab", 4242, 99)
    log.note("ba9876543210", 4343, 100)
    raw = bytearray((tmp_path / "x.starts").read_bytes())
    log.close()
    assert read_starts(tmp_path / "x.starts") == {}  # gone with its owner's close
    slot = raw.index(b"ba9876543210")
    raw[slot + 12] ^= 0xFF  # a pid cut short when its writer was killed: the checksum tells
    (tmp_path / "torn.starts").write_bytes(bytes(raw))
    assert read_starts(tmp_path / "torn.starts") == {"0123456789ab": (4242, 99)}
    other_boot = bytearray(raw)
    other_boot[32:80] = b"another-boot".ljust(48, b"\0")
    (tmp_path / "other.starts").write_bytes(bytes(other_boot))
    assert read_starts(tmp_path / "other.starts") == {}  # its pids name nothing on this boot
    # One whose journal is gone (its replayer died in between) goes at the next sweep.
    orphan = store.home / "journal" / "12345-abcd.starts"
    orphan.write_bytes(bytes(raw))
    reopened = TaskStore(store.home)
    reopened.sweep_orphans()
    reopened.close()
    assert not orphan.exists()


def test_without_a_start_log_tasks_still_run_and_are_recorded(make_executor, store, monkeypatch, caplog):
    # A file system that cannot map files (which this machine's can) loses only the start log.
    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(start_log.mmap, "mmap", refuse)
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="sleep 0.001"))
    assert task.status is TaskStatus.SUCCEEDED and store.get(task.id) == task
    assert list((store.home / "journal").glob("*.starts")) == []  # none half made
    assert "no start log in" in caplog.text and "No such device" in caplog.text


def test_on_a_file_system_without_fallocate_the_start_log_is_allocated_by_writing_it(tmp_path, monkeypatch):
    # Its space is taken before it is mapped, so that a full disk fails here instead of
    # killing the process (SIGBUS) at a note (tests/test_full_disk.py). Where fallocate is
    # not supported (which this machine's file systems do), zeros are written instead.
    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(start_log.os, "posix_fallocate", unsupported)
    log = StartLog(tmp_path / "x.starts")
    try:
        path = tmp_path / "x.starts"
        assert path.stat().st_blocks * 512 >= path.stat().st_size  # written, not sparse
        log.note("0123456789ab", 4242, 99)
        assert read_starts(path) == {"0123456789ab": (4242, 99)}
    finally:
        log.close()


def test_cancel_from_another_process_reaches_the_owner(store, marker):
    owner, task_id = start_owner(store.home, f"sleep {marker}")
    try:
        wait_until(lambda: processes_with(marker))
        result = run_cli("tasks", "cancel", task_id, env={"FLEETRUN_HOME": str(store.home)})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"task {task_id} cancelled"
        assert owner.stdout.readline().strip() == "cancelled"
        assert store.get(task_id).cancel_reason == "cancelled with `fleetrun tasks cancel`"
        assert_none_left(marker)
        again = run_cli("tasks", "cancel", task_id, env={"FLEETRUN_HOME": str(store.home)})
        assert again.returncode == 1
        assert "already ended (cancelled)" in again.stderr
    finally:
        owner.kill()
        owner.wait()


def test_a_cancel_asked_before_the_owner_applied_the_record_still_reaches_it(store, marker):
    owner, task_id = start_owner(store.home, f"sleep {marker}", apply_after_s=3.0)
    try:
        wait_until(lambda: processes_with(marker))
        db = sqlite3.connect(store.home / "tasks.sqlite3")
        try:
            assert db.execute("SELECT count(*) FROM tasks WHERE id = ?", (task_id,)).fetchone() == (0,)
        finally:
            db.close()
        # Read from the owner's journal, where the record's last entry is its process's.
        wait_until(lambda: store.get(task_id).status is TaskStatus.RUNNING)
        assert _process_token(store.home, task_id) is None  # not applied yet, still
        result = run_cli("tasks", "cancel", task_id, env={"FLEETRUN_HOME": str(store.home)})
        assert result.returncode == 0, result.stderr
        assert owner.stdout.readline().strip() == "cancelled"
        task = store.get(task_id)
        assert task.status is TaskStatus.CANCELLED
        assert task.cancel_reason == "cancelled with `fleetrun tasks cancel`"
        assert_none_left(marker)
    finally:
        owner.kill()
        owner.wait()


SLOW_WRITER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from fleetrun.core import journal
    from fleetrun.core.executor import Executor
    from fleetrun.core.models import TaskRequest
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.store import TaskStore

    journal.BATCH_SECONDS = 3600  # the writer waits: what this process writes stays in its journal
    executor = Executor(store=TaskStore(sys.argv[1]), plugins=PluginManager(autoload=False), retention=None)
    previous = ""
    for command in sys.argv[2:] or ["echo ended before the crash"]:
        task = executor.run(TaskRequest(host="local", command=command.format(previous=previous)))
        print(task.id, task.status.value, flush=True)
        previous = task.id
    if os.environ.get("TEST_FORK_A_CHILD") and os.fork() == 0:
        time.sleep(600)  # a worker forked meanwhile, that outlives its parent
        os._exit(0)
    time.sleep(600)
    """
)


def test_while_another_process_locks_the_database_records_wait_in_the_journal_and_arrive_after(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    home = tmp_path / "locked"
    store = TaskStore(home)
    executor = Executor(store=store, plugins=PluginManager(autoload=False))
    locker = sqlite3.connect(home / "tasks.sqlite3", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the busy timeout
        with caplog.at_level("WARNING", logger="fleetrun.store"):
            task = executor.run(TaskRequest(host="local", command="echo kept"))
            failed = executor.run(TaskRequest(host="local", command="exit 3"))
            wait_until(lambda: "cannot write task records to the store (database is locked)" in caplog.text)
        assert task.status is TaskStatus.SUCCEEDED
        assert store.get(task.id) == task  # from the journal meanwhile
        # A store that keeps refusing writes is not waited for: before, each of these waited
        # until the lock went (for ever, had it stayed).
        assert call_with_deadline(store.flush) is False
        listed = call_with_deadline(store.list)
        assert [(t.id, t.status) for t in listed] == [(failed.id, TaskStatus.FAILED), (task.id, TaskStatus.SUCCEEDED)]
        assert [t.id for t in store.list(status=[TaskStatus.FAILED])] == [failed.id]
        assert [t.id for t in store.list(limit=1)] == [failed.id]
        assert store.list(host="elsewhere") == []
        assert locker.execute("SELECT count(*) FROM tasks").fetchone() == (0,)  # so they came from the journal
        call_with_deadline(executor.close)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # The writer still tries: once the lock goes, the records arrive.
    with caplog.at_level("WARNING", logger="fleetrun.store"):
        wait_until(lambda: "task records reach the store again" in caplog.text)
    assert store.flush(timeout=10)
    other_process = TaskStore(home)
    try:
        assert [t.id for t in other_process.list()] == [failed.id, task.id]
        assert other_process.get(task.id).status is TaskStatus.SUCCEEDED
    finally:
        other_process.close()
        executor.close()
        store.close()


def call_with_deadline(function, seconds: float = 30.0):  # type: ignore[no-untyped-def]
    """``function()``'s result; fails the test, instead of hanging it, if that takes longer."""
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{function} still waits after {seconds} s"
    return result[0]


@pytest.mark.parametrize("forked_child", [False, True], ids=["alone", "with-a-forked-child"])
def test_writes_not_yet_in_sqlite_are_found_in_the_journal_and_survive_the_owner(store, forked_child):
    # With a forked child alive, the child's copy of the journal's file kept the owner's
    # lock on it after the owner's death: the journal was taken for a live process's and
    # was not applied (nor its start log read) until the child ended too.
    owner = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER_SCRIPT, str(store.home)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TEST_FORK_A_CHILD": "1" if forked_child else ""},
    )
    children: list[int] = []
    try:
        task_id, status = owner.stdout.readline().split()
        assert status == "succeeded"
        with sqlite3.connect(store.home / "tasks.sqlite3") as db:
            assert db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchall() == []
        # The owner lives: its record is read from its journal.
        seen = store.get(task_id)
        assert (seen.status, seen.exit_code, seen.stdout_bytes) == (TaskStatus.SUCCEEDED, 0, 23)
        assert store.read_output(task_id, "stdout").data == b"ended before the crash\n"
        if forked_child:
            children = wait_until(lambda: [int(p) for p in Path(f"/proc/{owner.pid}/task/{owner.pid}/children").read_text().split()])
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # Dead before its writer caught up: the next process applies the journal, so the task
        # keeps its real ending instead of becoming `interrupted`.
        listed = run_cli("tasks", "list", "--json", env={"FLEETRUN_HOME": str(store.home)})
        assert listed.returncode == 0, listed.stderr
        (record,) = [t for t in json.loads(listed.stdout) if t["id"] == task_id]
        assert (record["status"], record["exit_code"]) == ("succeeded", 0)
        assert list((store.home / "journal").glob("*.journal")) == []
        assert all(Path(f"/proc/{pid}").exists() for pid in children)  # the child still lives
    finally:
        owner.kill()
        owner.wait()
        for pid in children:
            os.kill(pid, signal.SIGKILL)


def test_a_journal_entry_that_only_mentions_a_task_is_not_taken_for_it(store):
    # The second command names the first task's id, so its journal lines contain that id too.
    owner = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER_SCRIPT, str(store.home), "echo first", "echo {previous}"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        first_id, _ = owner.stdout.readline().split()
        second_id, _ = owner.stdout.readline().split()
        first, second = store.get(first_id), store.get(second_id)
        assert (first.id, first.command, first.stdout_bytes) == (first_id, "echo first", 6)
        assert (second.id, second.command, second.stdout_bytes) == (second_id, f"echo {first_id}", 13)
    finally:
        owner.kill()
        owner.wait()


def test_a_journal_cut_short_by_a_crash_loses_only_its_last_line(store):
    journal_dir = store.home / "journal"
    journal_dir.mkdir()
    task = _ended_task("00000000abcd", time.time())
    good = json.dumps(["insert", *_values(task), "dead-owner-token"])
    (journal_dir / "123-dead.journal").write_text(good + "\n" + good[: len(good) // 2])
    assert store.get(task.id).status is TaskStatus.SUCCEEDED
    assert store.sweep_orphans() == []
    assert not (journal_dir / "123-dead.journal").exists()
    with sqlite3.connect(store.home / "tasks.sqlite3") as db:
        assert db.execute("SELECT status FROM tasks WHERE id = ?", (task.id,)).fetchall() == [("succeeded",)]


def test_a_damaged_journal_gives_one_warning_and_its_readable_entries_still_arrive(store, caplog):
    journal_dir = store.home / "journal"
    journal_dir.mkdir()
    first, second = _ended_task("0000000000d1", time.time()), _ended_task("0000000000d2", time.time())
    damage = b"\x00\xff garbage\n" * 40
    (journal_dir / "123-dead.journal").write_bytes(
        damage + json.dumps(["insert", *_values(first), "dead"]).encode() + b"\n" + damage
        + json.dumps(["insert", *_values(second), "dead"]).encode() + b"\n"
    )
    with caplog.at_level("WARNING", logger="fleetrun.store"):
        assert store.sweep_orphans() == []
    warnings = [record.getMessage() for record in caplog.records if "journal" in record.getMessage()]
    assert warnings == [f"{journal_dir / '123-dead.journal'}: skipping 80 journal lines that cannot be read (lines 1, 2, 3, 4, 5, …)"]
    assert sorted(t.id for t in store.list()) == [first.id, second.id]
    assert not (journal_dir / "123-dead.journal").exists()


def test_a_journal_entry_the_store_can_never_take_is_dropped_and_the_others_still_arrive(store, caplog):
    # Before: the entry failed its whole batch, every time, and every later fleetrun that
    # replayed the journal (any `fleetrun tasks`) died of it with a traceback.
    journal_dir = store.home / "journal"
    journal_dir.mkdir()
    before, after = _ended_task("0000000000c1", time.time()), _ended_task("0000000000c3", time.time())
    bad = replace(_ended_task("0000000000c2", time.time()), command="echo caf\udce9")  # SQLite takes no lone surrogate
    lines = [["insert", *_values(task), "dead-owner-token"] for task in (before, bad, after)]
    (journal_dir / "123-dead.journal").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level("ERROR", logger="fleetrun.store"):
        assert store.sweep_orphans() == []
    assert "dropped records of task 0000000000c2 that the store cannot take (UnicodeEncodeError" in caplog.text
    assert not (journal_dir / "123-dead.journal").exists()
    assert sorted(t.id for t in store.list()) == [before.id, after.id]


def test_a_cancel_reason_that_is_not_text_is_recorded_escaped(make_executor, store, marker):
    # An MCP client's JSON can hold "\ud800"; a reason passed on from a path can hold a byte that is not UTF-8.
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    executor.cancel(handle.id, "stopped by \ud800 in caf\udce9")
    task = handle.wait(10)
    assert (task.status, task.cancel_reason) == (TaskStatus.CANCELLED, "stopped by \\ud800 in caf\\xe9")
    store.flush()
    other = TaskStore(store.home)
    try:
        assert other.get(task.id).cancel_reason == "stopped by \\ud800 in caf\\xe9"
        # Asked from another process, through the store, it is escaped the same way.
        second = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
        wait_until(lambda: processes_with(f"sleep {marker}"))
        store.flush()
        other.request_cancel(second.id, "from \udcff")
        assert second.wait(10).cancel_reason == "from \\xff"
    finally:
        other.close()


def test_a_replayed_journal_leaves_each_task_in_its_latest_state(store):
    now = time.time()
    created = Task(id="0000000000a1", host="local", transport="local", command="true",
                   status=TaskStatus.QUEUED, created_at=now)
    running = replace(created, status=TaskStatus.RUNNING, started_at=now)
    ended = replace(running, status=TaskStatus.SUCCEEDED, ended_at=now, exit_code=0)
    already_in = _ended_task("0000000000b2", now)
    store.insert(already_in, owner_token())
    store.flush()
    lines = [
        ["insert", *_values(created), "dead-owner-token"],
        ["update", *_values(running)],
        ["update", *_values(ended)],
        # An insert replayed over a record that got further never takes it back.
        ["insert", *_values(replace(already_in, status=TaskStatus.QUEUED, ended_at=None)), "dead-owner-token"],
    ]
    journal_dir = store.home / "journal"
    (journal_dir / "123-dead.journal").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert store.sweep_orphans() == []
    with sqlite3.connect(store.home / "tasks.sqlite3") as db:
        rows = db.execute("SELECT id, status, exit_code, owner_token FROM tasks ORDER BY id").fetchall()
    assert rows == [
        ("0000000000a1", "succeeded", 0, "dead-owner-token"),
        ("0000000000b2", "succeeded", 0, owner_token()),
    ]


def test_a_journal_left_by_another_version_is_read_with_its_own_columns(store):
    # A journal is positional. One written before Task gained its newest column (origin)
    # has one value fewer in each entry; one written by a newer version has more.
    journal_dir = store.home / "journal"
    journal_dir.mkdir()
    older, newer = _ended_task("0000000000e1", time.time()), _ended_task("0000000000e2", time.time())
    older_values = _values(older)[:-1]  # as the version before origin wrote them
    lines = [
        ["insert", *older_values, "dead-owner-token"],
        ["update", *older_values[:3], "echo updated", *older_values[4:]],
        ["insert", *_values(replace(newer, origin="cli")), "a-column-of-later", "dead-owner-token"],
    ]
    (journal_dir / "123-dead.journal").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # Read from the journal before it is replayed, then from SQLite after.
    assert (store.get(older.id).command, store.get(older.id).origin) == ("echo updated", None)
    assert store.get(newer.id).origin == "cli"
    assert store.sweep_orphans() == []
    assert not (journal_dir / "123-dead.journal").exists()
    with sqlite3.connect(store.home / "tasks.sqlite3") as db:
        rows = db.execute("SELECT id, command, origin, owner_token FROM tasks ORDER BY id").fetchall()
    assert rows == [("0000000000e1", "echo updated", None, "dead-owner-token"), ("0000000000e2", "true", "cli", "dead-owner-token")]


def _ended_task(task_id: str, created_at: float) -> Task:
    return Task(
        id=task_id, host="local", transport="local", command="true", status=TaskStatus.SUCCEEDED,
        created_at=created_at, started_at=created_at, ended_at=created_at, exit_code=0,
    )


def test_retention_by_age_and_by_count(store):
    now = time.time()
    old = [_ended_task(f"{i:012x}", now - 40 * 86400 + i) for i in range(3)]
    recent = [_ended_task(f"{0xa00 + i:012x}", now - 100 + i) for i in range(5)]
    live = Task(id="0000000000ff", host="local", transport="local", command="sleep 1",
                status=TaskStatus.RUNNING, created_at=now - 50 * 86400)
    for task in [*old, *recent]:
        store.insert(task, owner_token())
        (store.output_dir(task.id)).mkdir()
    store.insert(live, owner_token())
    assert store.prune(Retention(max_age_days=30, max_tasks=3)) == 5
    kept = {t.id for t in store.list(limit=100)}
    assert kept == {t.id for t in recent[-3:]} | {live.id}  # never a task still running
    assert not store.output_dir(old[0].id).exists()


def test_a_prune_removes_output_directories_no_task_owns(store):
    # Left by a prune that died between deleting the rows and the files.
    now = time.time()
    kept_task = _ended_task("00000000000a", now)
    store.insert(kept_task, owner_token())
    owned = store.output_dir(kept_task.id)
    leftover, recent = store.output_dir("00000000000b"), store.output_dir("00000000000c")
    not_a_task = store.output_root / "notes"
    for directory in (owned, leftover, recent, not_a_task):
        directory.mkdir()
        (directory / "stdout").write_bytes(b"output\n")
    day_and_more = now - 86400 - 60
    for directory in (owned, leftover, not_a_task):
        os.utime(directory, (day_and_more, day_and_more))
    store.prune(Retention())
    assert not leftover.exists()
    # A directory changed within the day may be a new task whose row is still in another
    # process's journal.
    assert {p.name for p in store.output_root.iterdir()} == {owned.name, recent.name, "notes", ".orphans-scanned"}
    assert store.read_output(kept_task.id, "stdout").data == b"output\n"
    # Every fleetrun command prunes as it starts; the scan runs at most once an hour.
    leftover.mkdir()
    os.utime(leftover, (day_and_more, day_and_more))
    store.prune(Retention())
    assert leftover.exists()


def test_a_pruned_task_stays_gone_while_its_owner_runs(make_executor, store, tmp_path):
    # Before: the owner's journal kept applied entries until it reached 64 KiB, and a
    # lookup that found no row took the pruned task from there.
    executor = make_executor()
    ended = executor.run(TaskRequest(host="local", command="echo kept for a while"))
    assert store.prune(Retention(max_tasks=0)) == 1
    with pytest.raises(UnknownTaskError, match=f"no task '{ended.id}'"):
        store.get(ended.id)
    other_process = TaskStore(store.home)
    try:
        with pytest.raises(UnknownTaskError):
            other_process.get(ended.id)
    finally:
        other_process.close()
    assert run_cli("tasks", "show", ended.id, env={"FLEETRUN_HOME": str(store.home)}).returncode == 1


def test_a_long_running_executor_applies_the_retention_by_count_as_tasks_end(make_executor, store):
    # A prune after every tenth of max_tasks endings: here after each one.
    executor = make_executor(retention=Retention(max_tasks=5))
    ran = [executor.run(TaskRequest(host="local", command=f"echo {i}")) for i in range(12)]
    newest = {task.id for task in ran[-5:]}
    # A prune deletes the rows, then the output directories.
    wait_until(lambda: {task.id for task in store.list(limit=100)} == newest)
    wait_until(lambda: not any(store.output_dir(task.id).exists() for task in ran[:-5]))
    assert executor.read_output(ran[-1].id).data == b"11\n"


def test_a_long_running_executor_applies_the_retention_by_age_on_a_timer(make_executor, store, marker):
    # Ended tasks older than a moment go at the next timed prune, with no task ending to
    # trigger it; a task still running stays, however old.
    executor = make_executor(retention=Retention(max_age_days=0.3 / 86400, every_s=0.2))
    ended = executor.run(TaskRequest(host="local", command="echo old"))
    running = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
    wait_until(lambda: [task.id for task in store.list(limit=100)] == [running.id])
    wait_until(lambda: not store.output_dir(ended.id).exists())
    assert executor.get(running.id).status is TaskStatus.RUNNING
    running.cancel()
    assert running.wait().status is TaskStatus.CANCELLED
    assert_none_left(marker)


def test_the_retention_belongs_to_the_store_and_every_executor_applies_it(make_executor, store):
    # Before, each process pruned by its own built-in 30 days and 10,000 tasks: none could keep more.
    now = time.time()
    for i in range(6):
        store.insert(_ended_task(f"{0xd00 + i:012x}", now - 40 * 86400 + i), owner_token())
    store.flush()
    assert store.retention() == Retention()
    assert store.set_retention(max_age_days=90) == Retention(max_age_days=90, max_tasks=10_000)
    # 10 tasks at most: the executor prunes after every tenth of that many endings, each one here.
    assert store.set_retention(max_tasks=10) == Retention(max_age_days=90, max_tasks=10)
    executor = make_executor()  # prunes by the store's retention as it starts: 40 days is within 90
    assert len(store.list(limit=100)) == 6
    # Changed by another process while the executor runs: applied at the executor's next prune.
    other_process = TaskStore(store.home)
    try:
        assert other_process.retention() == Retention(max_age_days=90, max_tasks=10)
        other_process.set_retention(max_tasks=2)
    finally:
        other_process.close()
    ran = [executor.run(TaskRequest(host="local", command=f"echo {i}")) for i in range(3)]
    wait_until(lambda: {t.id for t in store.list(limit=100)} == {t.id for t in ran[-2:]})
    with pytest.raises(FleetrunError, match="the days to keep tasks must be a number above 0, got 0"):
        store.set_retention(max_age_days=0)
    with pytest.raises(FleetrunError, match="the number of tasks to keep must be at least 1, got 0"):
        store.set_retention(max_tasks=0)
    with pytest.raises(FleetrunError, match=f"the number of tasks to keep must be at most 1000000000000, got {10**23}"):
        store.set_retention(max_tasks=10**23)
    assert store.retention() == Retention(max_age_days=90, max_tasks=2)


def test_counts_past_sqlites_integers_neither_fail_nor_lose_tasks(make_executor, store, tmp_path):
    # A retention of 10**23 tasks was stored, then its prune raised OverflowError, and so did
    # every fleetrun command after it; `tasks list --limit 10**23` did the same.
    for i in range(3):
        store.insert(_ended_task(f"{0xf00 + i:012x}", time.time() - i), owner_token())
    store.flush()
    with sqlite3.connect(store.home / "tasks.sqlite3") as db:  # what the version before this one stored
        db.execute("INSERT INTO settings (name, value) VALUES ('max_tasks', ?)", (str(10**23),))
    assert store.retention().max_tasks == 10**12
    assert make_executor().run(TaskRequest(host="local", command="true")).status is TaskStatus.SUCCEEDED
    assert len(store.list(limit=10**23)) == 4
    env = {"FLEETRUN_HOME": str(store.home)}
    listed = run_cli("tasks", "list", "--limit", str(10**23), "--json", env=env)
    assert (listed.returncode, len(json.loads(listed.stdout))) == (0, 4), listed.stderr
    refused = run_cli("tasks", "retention", "--max-tasks", str(10**23), env=env)
    assert (refused.returncode, refused.stderr) == (1, f"fleetrun: error: the number of tasks to keep must be at most 1000000000000, got {10**23}\n")


def test_the_cli_shows_and_changes_the_retention_and_applies_a_change_at_once(store):
    now = time.time()
    for i in range(5):
        store.insert(_ended_task(f"{0xe00 + i:012x}", now - 10 * 86400 + i), owner_token())
    store.flush()
    env = {"FLEETRUN_HOME": str(store.home)}
    shown = run_cli("tasks", "retention", env=env)
    assert (shown.returncode, shown.stdout) == (0, f"ended tasks are kept 30 days, at most 10000 of them (store: {store.home})\n")
    changed = run_cli("tasks", "retention", "--days", "7.5", "--max-tasks", "3", env=env)
    assert (changed.returncode, changed.stdout) == (
        0, f"ended tasks are now kept 7.5 days, at most 3 of them (store: {store.home}); 5 removed now\n"
    )
    assert store.list(limit=100) == []
    assert run_cli("tasks", "retention", env=env).stdout.startswith("ended tasks are kept 7.5 days, at most 3 of them")
    for bad, message in (("--days=0", "argument --days: must be greater than 0, got 0"),
                         ("--days=a week", "argument --days: expected a number of days, got 'a week'"),
                         ("--max-tasks=-1", "argument --max-tasks: must be greater than 0, got -1")):
        refused = run_cli("tasks", "retention", bad, env=env)
        assert refused.returncode == 2 and refused.stderr.endswith(f"fleetrun tasks retention: error: {message}\n")


def test_bad_task_ids_are_clear_errors(store):
    with pytest.raises(UnknownTaskError, match="invalid task id '../etc'"):
        store.get("../etc")
    with pytest.raises(UnknownTaskError, match="no task 'abcdefabcdef'"):
        store.get("abcdefabcdef")


def test_a_store_written_by_an_older_version_gains_the_new_columns_and_keeps_its_records(tmp_path):
    home = tmp_path / "old"
    home.mkdir()
    db = sqlite3.connect(home / "tasks.sqlite3")
    # The version-1 table: no policy, no process token.
    db.executescript(
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY, host TEXT NOT NULL, transport TEXT NOT NULL, command TEXT NOT NULL,
            status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
            exit_code INTEGER, error TEXT, error_category TEXT, cancel_reason TEXT,
            stdout_bytes INTEGER NOT NULL DEFAULT 0, stderr_bytes INTEGER NOT NULL DEFAULT 0,
            stdout_truncated INTEGER NOT NULL DEFAULT 0, stderr_truncated INTEGER NOT NULL DEFAULT 0,
            max_seconds REAL, max_output_bytes INTEGER, owner_pid INTEGER, owner_token TEXT, progress TEXT
        );
        INSERT INTO tasks (id, host, transport, command, status, created_at, exit_code, owner_pid, owner_token)
        VALUES ('0000000000c1', 'local', 'local', 'true', 'succeeded', 1.0, 0, 1, 'x'),
               ('0000000000c2', 'local', 'local', 'sleep 9', 'running', 2.0, NULL, 4242, 'gone-boot:4242:1');
        PRAGMA user_version=1;
        """
    )
    db.close()
    store = TaskStore(home)
    try:
        assert store.get("0000000000c1").status is TaskStatus.SUCCEEDED
        assert store.get("0000000000c1").policy is None
        assert store.sweep_orphans() == ["0000000000c2"]  # no process token: nothing to stop
        assert store.get("0000000000c2").error == "the fleetrun process that owned this task (pid 4242) is gone"
    finally:
        store.close()
    db = sqlite3.connect(home / "tasks.sqlite3")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
        assert {"policy", "process_token", "origin"} <= columns
        assert db.execute("PRAGMA user_version").fetchone() == (6,)
        assert db.execute("SELECT count(*) FROM settings").fetchone() == (0,)
    finally:
        db.close()


def test_a_store_location_that_is_a_file_is_named_as_not_a_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept\n")
    for home in (blocker, blocker / "below"):
        result = run_cli("run", "local", "--", "true", env={"FLEETRUN_HOME": str(home)})
        assert result.returncode == 125
        assert result.stderr == (
            f"fleetrun: error: cannot create the task store at {home}: {blocker} is not a directory "
            "(set $FLEETRUN_HOME to a directory fleetrun may create)\n"
        )
    assert blocker.read_text() == "kept\n"


def test_a_damaged_database_is_reported_with_the_way_out_and_left_as_it_was(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    damaged = os.urandom(8192)
    (home / "tasks.sqlite3").write_bytes(damaged)
    result = run_cli("tasks", "list", env={"FLEETRUN_HOME": str(home)})
    assert result.returncode == 1
    assert result.stderr == (
        f"fleetrun: error: cannot open the task store {home / 'tasks.sqlite3'}: file is not a database; "
        "to start a new, empty store, move it (with any tasks.sqlite3-wal and -shm files beside it) out of the way\n"
    )
    assert (home / "tasks.sqlite3").read_bytes() == damaged
    (home / "tasks.sqlite3").rename(home / "tasks.sqlite3.damaged")
    assert run_cli("run", "local", "--", "true", env={"FLEETRUN_HOME": str(home)}).returncode == 0
    assert (home / "tasks.sqlite3.damaged").read_bytes() == damaged


def test_a_relative_fleetrun_home_is_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    from fleetrun.core import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEETRUN_HOME", "state")
    assert paths.data_dir() == tmp_path / "state"
    result = run_cli("run", "local", "--json", "--", "true", env={"FLEETRUN_HOME": "state"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = run_cli("tasks", "list", "--json", env={"FLEETRUN_HOME": str(tmp_path / "state")})
    assert [task["status"] for task in json.loads(listed.stdout)] == ["succeeded"]


def test_relative_xdg_directories_are_ignored_as_the_specification_says(tmp_path, monkeypatch):
    from fleetrun.core import paths

    monkeypatch.delenv("FLEETRUN_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")
    assert paths.data_dir() == tmp_path / ".local" / "share" / "fleetrun"
    assert paths.config_dir() == tmp_path / ".config" / "fleetrun"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert paths.data_dir() == tmp_path / "data" / "fleetrun"


def test_the_cli_takes_a_unique_start_of_a_task_id_and_names_the_candidates_of_an_ambiguous_one(store):
    now = time.time()
    for task_id in ("abcd12000001", "abcd12000002", "abcd99000003"):
        store.insert(_ended_task(task_id, now), owner_token())
    store.flush()
    env = {"FLEETRUN_HOME": str(store.home)}
    shown = run_cli("tasks", "show", "abcd99", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == "abcd99000003"
    ambiguous = run_cli("tasks", "show", "abcd12", env=env)
    assert ambiguous.returncode == 1
    assert ambiguous.stderr == "fleetrun: error: 'abcd12' starts more than one task id (abcd12000001, abcd12000002): give more of it\n"
    unknown = run_cli("tasks", "output", "ffff", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr == f"fleetrun: error: no task id starts with 'ffff' in the store at {store.home}\n"
    assert run_cli("tasks", "cancel", "abcd1200000", env=env).stderr == "fleetrun: error: 'abcd1200000' starts more than one task id (abcd12000001, abcd12000002): give more of it\n"
    assert run_cli("tasks", "cancel", "abcd120000021", env=env).stderr.startswith("fleetrun: error: invalid task id 'abcd120000021'")
    assert run_cli("tasks", "show", "abc", env=env).stderr == (
        "fleetrun: error: invalid task id 'abc': a task id is 12 lowercase hex characters, or a unique start of one (4 or more of them)\n"
    )
    assert store.complete_id(" ABCD99\n") == "abcd99000003"
    assert store.complete_id("abcd12000002") == "abcd12000002"
