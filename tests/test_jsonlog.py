"""The JSON-lines notifier: one object per event, stable fields, usable as an audit log."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fleetrun.core.models import TaskRequest
from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier

from conftest import run_cli

COMMON = {"v", "event", "time", "task_id", "host", "transport", "command", "status"}
ENDING = {"exit_code", "duration_s", "started_at", "ended_at", "stdout_bytes", "stderr_bytes",
          "stdout_truncated", "stderr_truncated", "error", "error_category"}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_events_are_json_lines_with_documented_fields(make_executor, tmp_path):
    log_path = tmp_path / "audit.jsonl"
    notifier = JsonLogNotifier(log_path)
    executor = make_executor(plugins=[notifier], heartbeat_s=30)
    ok = executor.run(TaskRequest(host="local", command="echo progress: 50%; exit 4"))
    handle = executor.submit(TaskRequest(host="local", command="sleep 30"))
    handle.cancel("audit test")
    cancelled = handle.wait(10)
    notifier.close()
    lines = read_lines(log_path)
    assert [(l["task_id"], l["event"]) for l in lines] == [
        (ok.id, "task.created"), (ok.id, "task.progress"), (ok.id, "task.completed"),
        (cancelled.id, "task.created"), (cancelled.id, "task.cancelled"),
    ]
    created, progress, completed, _, cancel = lines
    assert set(created) == COMMON | {"created_at", "max_seconds", "max_output_bytes", "policy", "origin"}
    assert set(progress) == COMMON | {"elapsed_s", "stdout_bytes", "stderr_bytes", "stdout_lines", "stderr_lines",
                                      "latest_line", "latest_stream", "percent", "heartbeat"}
    assert set(completed) == COMMON | ENDING
    assert set(cancel) == COMMON | ENDING | {"reason"}
    assert created["v"] == 1 and created["status"] == "queued" and created["command"] == ok.command
    assert created["origin"] is None  # a Python caller that names none
    assert progress["percent"] == 50.0 and progress["latest_line"] == "progress: 50%"
    assert completed["status"] == "failed" and completed["exit_code"] == 4
    assert cancel["status"] == "cancelled" and cancel["reason"] == "audit test"
    assert created["time"].endswith("Z")
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_the_log_appends_and_keeps_earlier_runs(make_executor, tmp_path):
    log_path = tmp_path / "audit.jsonl"
    log_path.write_text('{"earlier": true}\n')
    notifier = JsonLogNotifier(log_path, progress=False)
    make_executor(plugins=[notifier]).run(TaskRequest(host="local", command="echo hi"))
    notifier.close()
    lines = read_lines(log_path)
    assert lines[0] == {"earlier": True}
    assert [l["event"] for l in lines[1:]] == ["task.created", "task.completed"]


def test_processes_sharing_one_log_never_mix_their_lines(tmp_path):
    # An audit log for every fleetrun run on a machine: lines far above any buffer size,
    # written by processes at once, must each stay whole.
    import subprocess
    import sys

    log_path = tmp_path / "shared.jsonl"
    script = (
        "import sys; from pathlib import Path; from fleetrun import Executor, TaskRequest;"
        "from fleetrun.core.plugin_manager import PluginManager; from fleetrun.core.store import TaskStore;"
        "from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier;"
        "log = JsonLogNotifier(sys.argv[1]);"
        "ex = Executor(store=TaskStore(Path(sys.argv[2])), plugins=PluginManager(plugins=[log], autoload=False));"
        "[ex.submit(TaskRequest(host='local', command='true ' + sys.argv[3] * 40000)) for _ in range(40)];"
        "ex.close(); log.close()"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(log_path), str(tmp_path / f"home{n}"), letter])
        for n, letter in enumerate("ab")
    ]
    assert [w.wait(120) for w in writers] == [0, 0]
    lines = read_lines(log_path)  # every line parses
    assert len(lines) == 2 * 40 * 2  # created and completed (or cancelled) per task
    assert {l["command"][5] for l in lines} == {"a", "b"}
    assert all(set(l["command"][5:]) == {l["command"][5]} and len(l["command"]) == 40005 for l in lines)


def test_a_log_moved_or_deleted_away_is_followed_by_a_new_file_at_its_path(make_executor, tmp_path, caplog):
    # Before, a long-running server wrote on into the rotated file, or into a deleted one: lines lost.
    log_path = tmp_path / "audit.jsonl"
    notifier = JsonLogNotifier(log_path, progress=False)
    executor = make_executor(plugins=[notifier])
    first = executor.run(TaskRequest(host="local", command="echo one"))
    log_path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: move, then a new file
    second = executor.run(TaskRequest(host="local", command="echo two"))
    assert [(l["task_id"], l["event"]) for l in read_lines(log_path)] == [(second.id, "task.created"), (second.id, "task.completed")]
    log_path.unlink()
    third = executor.run(TaskRequest(host="local", command="echo three"))
    (tmp_path / "gone").mkdir()
    log_path.rename(tmp_path / "gone" / "audit.jsonl")
    (tmp_path / "gone").rename(tmp_path / "gone-too")
    log_path.mkdir()  # the path can no longer be a file: the lines go on into the old one
    fourth = executor.run(TaskRequest(host="local", command="echo four"))
    fifth = executor.run(TaskRequest(host="local", command="echo five"))
    notifier.close()
    assert [(l["task_id"], l["event"]) for l in read_lines(tmp_path / "audit.jsonl.1")] == [
        (first.id, "task.created"), (first.id, "task.completed"),
    ]
    assert [(l["task_id"], l["event"]) for l in read_lines(tmp_path / "gone-too" / "audit.jsonl")] == [
        (task.id, event) for task in (third, fourth, fifth) for event in ("task.created", "task.completed")
    ]
    warnings = [r.getMessage() for r in caplog.records if r.name == "fleetrun.jsonlog"]
    assert warnings == [f"the JSON log {log_path} was moved and cannot be opened again (Is a directory): writing on to the old file"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_json_log_that_cannot_be_written_is_one_warning_and_the_run_goes_on():
    result = run_cli("--json-log", "/dev/full", "run", "local", "--", "echo ran")
    # Before: three tracebacks, one per event.
    assert (result.returncode, result.stdout) == (0, "ran\n")
    assert result.stderr == (
        "fleetrun: WARNING: fleetrun.jsonlog: cannot write the JSON log /dev/full (No space left on device): "
        "its events are lost until it can be written again\n"
    )
