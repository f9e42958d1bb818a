"""The JSON-lines notifier: one object per event, stable fields, usable as an audit log."""

from __future__ import annotations

import json
import stat

from fleetrun.core.models import TaskRequest
from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier

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
    assert set(created) == COMMON | {"created_at", "max_seconds", "max_output_bytes", "policy"}
    assert set(progress) == COMMON | {"elapsed_s", "stdout_bytes", "stderr_bytes", "stdout_lines", "stderr_lines",
                                      "latest_line", "latest_stream", "percent", "heartbeat"}
    assert set(completed) == COMMON | ENDING
    assert set(cancel) == COMMON | ENDING | {"reason"}
    assert created["v"] == 1 and created["status"] == "queued" and created["command"] == ok.command
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
