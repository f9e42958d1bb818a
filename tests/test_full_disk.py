"""A full disk (a real, small tmpfs): fleetrun must neither hang, nor crash, nor lose what
it can keep. (A database locked by another process: tests/test_store.py.)"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import run_cli
from fleetrun.core import journal as journal_module
from fleetrun.core.journal import Journal
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system; remove the file returned to free them."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 16, PAGE, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_a_run_whose_output_fills_the_disk_ends_with_the_command_and_its_record_arrives_later(small_disk):
    home = {"FLEETRUN_HOME": str(small_disk / "home")}
    size = 3 * 1024 * 1024  # three times the disk
    result = run_cli("run", "local", "--", f"head -c {size} /dev/zero | tr '\\0' a; echo done >&2", env=home, timeout=120)
    # Before: the run hung for ever after the command, waiting for the store to take its record.
    assert result.returncode == 0
    assert len(result.stdout) == size and set(result.stdout) == {"a"}  # streamed whole, though not kept
    assert "keeping no more stdout" in result.stderr and "No space left on device" in result.stderr
    assert "task records not yet in the store are kept in" in result.stderr
    assert result.stderr.count("done\n") == 1

    # With the disk full, reading still works: the record waits in the dead run's journal.
    assert run_cli("tasks", "list", env=home).returncode == 0
    for spool in (small_disk / "home" / "output").glob("*/stdout"):
        spool.unlink()  # the user frees space
    listed = json.loads(run_cli("tasks", "list", "--json", env=home).stdout)
    assert [(t["status"], t["stdout_bytes"], t["stdout_truncated"]) for t in listed] == [("succeeded", size, True)]
    assert list((small_disk / "home" / "journal").glob("*.journal")) == []  # applied, then removed
    shown = run_cli("tasks", "output", listed[0]["id"], env=home)
    assert shown.stdout == ""
    assert f"was cut short: 0 of its {size} bytes were kept (the disk took no more" in shown.stderr


def test_on_a_full_disk_a_run_is_refused_clearly_and_the_tasks_can_still_be_read(small_disk, tmp_path):
    home = {"FLEETRUN_HOME": str(small_disk / "home")}
    assert run_cli("run", "local", "--", "echo", "before", env=home).returncode == 0
    # Another process has the store open (an MCP server, say), so its WAL files stay.
    other = sqlite3.connect(small_disk / "home" / "tasks.sqlite3")
    try:
        other.execute("SELECT count(*) FROM tasks").fetchone()
        filler = fill(small_disk)
        ran = tmp_path / "ran"
        refused = run_cli("run", "local", "--", "touch", str(ran), env=home)
        # Before: killed by SIGBUS, writing to the memory-mapped start log the disk could not back.
        assert refused.returncode == 125, refused.stderr
        assert "fleetrun: error: cannot record the task in the store: cannot write to the journal " in refused.stderr
        assert refused.stderr.rstrip().endswith("No space left on device")
        assert "no start log in" in refused.stderr  # its warning, instead of the crash
        assert not ran.exists()
        assert list((small_disk / "home" / "journal").iterdir()) == []  # nothing left behind either
        # Before: "cannot open the task store ...: database or disk is full", as opening it wrote to it.
        listed = run_cli("tasks", "list", "--json", env=home)
        assert listed.returncode == 0, listed.stderr
        assert [t["command"] for t in json.loads(listed.stdout)] == ["echo before"]
    finally:
        other.close()
    # With no process left to hold them, SQLite needs room for its WAL files to open the store at all.
    filler.unlink()
    fill(small_disk)
    closed = run_cli("tasks", "list", env=home)
    assert closed.returncode == 1  # fleetrun's own error, outside `run`
    assert closed.stderr.startswith("fleetrun: error: cannot open the task store ")
    assert closed.stderr.endswith(" (its file system has no space left)\n")


def _journal_lines(path: Path) -> list[list[object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_a_journal_the_disk_refuses_keeps_whole_lines_and_what_it_refused_reaches_the_store(small_disk, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal_module, "BATCH_SECONDS", 3600)  # entries stay in the journal until flushed
    database = tmp_path / "applied.sqlite3"  # on a disk with room: only the journal's disk is full
    sqlite3.connect(database).execute("CREATE TABLE entries (key TEXT, value TEXT)").connection.commit()

    def apply(db: sqlite3.Connection, entries) -> None:  # type: ignore[no-untyped-def]
        db.executemany("INSERT INTO entries VALUES (?, ?)", [(key, value) for _, key, value in entries])

    journal = Journal(small_disk / "journal", lambda: sqlite3.connect(database, isolation_level=None), apply)
    try:
        # A first line that leaves 10 bytes in the file's page: the next line is taken only in part.
        frame = len(json.dumps(["put", "first", ""], separators=(",", ":"))) + 1
        journal.append(["put", "first", "x" * (PAGE - 10 - frame)], "first")
        assert journal.path.stat().st_size == PAGE - 10
        filler = fill(small_disk)
        with caplog.at_level("WARNING", logger="fleetrun.store"):
            journal.append(["put", "refused", "y" * 200], "refused", required=False)
        assert "task records are kept in memory until the store takes them" in caplog.text
        # Before: the 10 bytes that fitted stayed, and the next line was glued to them.
        assert journal.path.stat().st_size == PAGE - 10
        with pytest.raises(OSError, match="cannot write to the journal .*: No space left on device"):
            journal.append(["put", "required", "z"], "required")
        assert journal.pending("refused") == "refused" and journal.pending("required") is None

        filler.unlink()
        with caplog.at_level("WARNING", logger="fleetrun.store"):
            journal.append(["put", "after", "w"], "after")
        assert "takes writes again" in caplog.text
        assert [key for _, key, _ in _journal_lines(journal.path)] == ["first", "after"]
        assert journal.flush(timeout=10)
        with sqlite3.connect(database) as db:
            assert [key for (key,) in db.execute("SELECT key FROM entries ORDER BY rowid")] == ["first", "refused", "after"]
    finally:
        journal.close()
    assert not journal.path.exists()


def test_a_json_log_the_disk_refuses_says_so_once_and_resumes_on_a_line_of_its_own(small_disk, make_executor, caplog):
    path = small_disk / "audit.jsonl"
    notifier = JsonLogNotifier(path, progress=False)
    # A first line that leaves 10 bytes in the file's page: the next line fits only in part.
    pad = {"pad": "x" * (PAGE - 10 - len(json.dumps({"pad": ""}, separators=(",", ":"))) - 1)}
    notifier._write(pad)
    assert path.stat().st_size == PAGE - 10
    executor = make_executor(plugins=[notifier])
    filler = fill(small_disk)
    with caplog.at_level("WARNING", logger="fleetrun.jsonlog"):
        lost = executor.run(TaskRequest(host="local", command="echo lost"))
    # Before: a traceback for each event; the task went on, as it still must.
    assert lost.status is TaskStatus.SUCCEEDED
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write the JSON log {path} (No space left on device): its events are lost until it can be written again"
    ]
    caplog.clear()
    filler.unlink()
    with caplog.at_level("WARNING", logger="fleetrun.jsonlog"):
        kept = executor.run(TaskRequest(host="local", command="echo kept"))
    assert [r.getMessage() for r in caplog.records] == [
        f"the JSON log {path} is written again; 2 events before this one could not be written (No space left on device)"
    ]
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and len(lines[1]) == 10  # the part of a line that fitted, ended
    events = [json.loads(line) for line in (lines[0], *lines[2:-1])]
    assert [(e.get("event"), e.get("task_id")) for e in events[1:]] == [
        ("task.created", kept.id), ("task.completed", kept.id)
    ]
    notifier.close()
