"""The local transport: commands started without the shell when it adds nothing, and exits
found whether the pipes close with the command or not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.plugins.transports.local_exec import direct_argv

from conftest import processes_with, run_leaving_a_writer_behind, wait_until


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("sleep 1", ["sleep", "1"]),
        ("  uname   -a\t", ["uname", "-a"]),
        ("/usr/bin/env", ["/usr/bin/env"]),
        ("dd if=/dev/zero of=/dev/null count=1", ["dd", "if=/dev/zero", "of=/dev/null", "count=1"]),
        ("ls -la /tmp,/var:x@y%z+w", ["ls", "-la", "/tmp,/var:x@y%z+w"]),
        # Everything below needs the shell: builtins and keywords, assignments, quoting,
        # expansions, globs, operators, redirections, comments, tildes, several lines.
        ("true", None),
        ("echo hi", None),
        ("cd /tmp", None),
        ("exec sleep 1", None),
        ("[ -e /tmp ]", None),
        ("FOO=1 env", None),
        ("sleep '1'", None),
        ('sleep "1"', None),
        ("sleep $N", None),
        ("ls *.py", None),
        ("ls ~", None),
        ("sleep 1; ls", None),
        ("sleep 1 && ls", None),
        ("sleep 1 | cat", None),
        ("sleep 1 &", None),
        ("ls > out", None),
        ("ls # comment", None),
        ("sleep 1\nls", None),
        ("ls a\\ b", None),
        ("ls `pwd`", None),
        ("ls {a,b}", None),
    ],
)
def test_only_plain_words_skip_the_shell(command, argv):
    assert direct_argv(command, "/bin/sh") == argv


@pytest.mark.parametrize("command", ["cat", 'cat; read answer; echo "read exit $?"'], ids=["direct", "shell"])
def test_a_command_that_reads_its_input_gets_end_of_file_at_once(make_executor, command):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command=command, timeout_s=20))
    assert (task.status, task.exit_code) == (TaskStatus.SUCCEEDED, 0)
    assert executor.read_output(task.id).data == (b"" if command == "cat" else b"read exit 1\n")
    assert task.ended_at - task.started_at < 10


def test_a_host_that_names_its_shell_always_gets_it():
    assert direct_argv("sleep 1", "/bin/bash") is None


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_plain_command_is_the_direct_child_and_leads_its_group(make_executor, marker):
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))
    try:
        (pid,) = wait_until(lambda: processes_with(marker))
        assert _parent_of(pid) == os.getpid()  # no shell in between
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    finally:
        handle.cancel()
    task = handle.wait(10)
    assert task.status is TaskStatus.CANCELLED
    assert processes_with(marker) == []


@pytest.mark.parametrize("inherited_pwd", ["right", "stale", "missing"])
def test_the_direct_path_gives_the_program_the_pwd_the_shell_would(make_executor, tmp_path, monkeypatch, inherited_pwd):
    here = tmp_path / "here"
    here.mkdir()
    link = tmp_path / "link"
    link.symlink_to(here)
    monkeypatch.chdir(here)
    if inherited_pwd == "right":
        monkeypatch.setenv("PWD", str(link))  # a logical path to the same directory is kept
    elif inherited_pwd == "stale":
        monkeypatch.setenv("PWD", str(tmp_path))
    else:
        monkeypatch.delenv("PWD", raising=False)
    executor = make_executor()
    for cwd in (None, str(link)):
        task = executor.run(TaskRequest(host="local", command="printenv PWD", cwd=cwd))
        shell = subprocess.run(["/bin/sh", "-c", "printenv PWD"], cwd=cwd, capture_output=True, check=True)
        assert executor.read_output(task.id).data == shell.stdout, (inherited_pwd, cwd)


def test_a_missing_program_gets_the_shells_own_error_and_status(make_executor):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="fleetrun-no-such-program --flag"))
    assert task.status is TaskStatus.FAILED and task.exit_code == 127
    shell = subprocess.run(["/bin/sh", "-c", "fleetrun-no-such-program --flag"], capture_output=True)
    assert executor.read_output(task.id, "stderr").data == shell.stderr
    assert shell.returncode == 127


def test_a_script_without_an_interpreter_line_is_run_by_the_shell(make_executor, tmp_path):
    script = tmp_path / "plain-script"
    script.write_text("echo ran by the shell\nexit 4\n")
    script.chmod(0o755)
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command=str(script)))
    assert task.exit_code == 4
    assert executor.read_output(task.id).data == b"ran by the shell\n"


def test_an_exit_is_found_while_a_background_process_holds_the_pipes(make_executor, marker):
    executor = make_executor()
    started = time.monotonic()
    try:
        task = executor.run(TaskRequest(host="local", command=f"sleep {marker} & echo started; exit 5"))
        elapsed = time.monotonic() - started
        assert task.exit_code == 5 and task.status is TaskStatus.FAILED
        assert executor.read_output(task.id).data == b"started\n"
        assert 0.9 < elapsed < 5  # the exit, then up to a second for the pipes to drain
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_output_of_a_background_process_is_kept_for_a_second_after_the_exit_and_then_not_read(make_executor, tmp_path, marker):
    go, wrote = tmp_path / f"go-{marker}", tmp_path / "wrote"
    task, output = run_leaving_a_writer_behind(make_executor(), "local", go, wrote)
    assert (task.status, task.exit_code) == (TaskStatus.SUCCEEDED, 0)
    assert output == b"now\nsoon\n"
    assert not wrote.exists()  # its write failed: SIGPIPE ended it


def test_an_exit_is_found_after_the_command_closed_its_output(make_executor):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="echo early; exec >/dev/null 2>&1; sleep 0.3; exit 3"))
    assert task.exit_code == 3
    assert task.duration_s is not None and task.duration_s >= 0.3
    assert executor.read_output(task.id).data == b"early\n"


# -- open files ------------------------------------------------------------------------------

_MANY_AT_ONCE = r"""
import collections, json, os, resource, sys, tempfile
from fleetrun.core.executor import Executor
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.models import TaskRequest
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.store import TaskStore

soft, hard, tasks = (int(a) for a in sys.argv[1:])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
plugins = PluginManager(autoload=False)
inventory = parse_inventory(f"hosts:\n  local: {{max_concurrent: {tasks}}}\n", source="h", transports=plugins.transports)
with Executor(store=TaskStore(tempfile.mkdtemp()), inventory=inventory, plugins=plugins, max_concurrent=tasks) as executor:
    executor.run(TaskRequest(host="local", command="true"))
    before = len(os.listdir("/proc/self/fd"))
    handles = [executor.submit(TaskRequest(host="local", command="sleep 1")) for _ in range(tasks)]
    ended = [h.wait(60) for h in handles]
    after_all = len(os.listdir("/proc/self/fd"))
    next_task = executor.run(TaskRequest(host="local", command="echo next"))
print(json.dumps({
    "endings": collections.Counter(f"{t.status.value}|{t.error_category}|{t.error}" for t in ended),
    "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "leaked": after_all - before,
    "next": [next_task.status.value, next_task.exit_code],
}))
"""


def _many_at_once(soft: int, hard: int, tasks: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _MANY_AT_ONCE, str(soft), str(hard), str(tasks)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_executor_raises_the_soft_open_file_limit_as_far_as_its_tasks_need():
    # 300 descriptors hold about 90 running commands: before, 59 of these 200 failed to start.
    outcome = _many_at_once(soft=300, hard=4096, tasks=200)
    assert outcome["endings"] == {"succeeded|None|None": 200}
    assert outcome["limit"] == 256 + 5 * 200
    assert outcome["next"] == ["succeeded", 0]


def test_tasks_beyond_the_hard_open_file_limit_fail_saying_so_and_leak_nothing():
    outcome = _many_at_once(soft=200, hard=200, tasks=150)
    message = ("cannot start the command: too many open files in this process (its limit: 200): "
               "run fewer tasks at once (max_concurrent), or raise the limit (ulimit -n)")
    failed = outcome["endings"].get(f"failed|spawn|{message}", 0)
    assert failed > 0 and outcome["endings"]["succeeded|None|None"] > 0
    assert failed + outcome["endings"]["succeeded|None|None"] == 150, outcome["endings"]
    assert outcome["limit"] == 200
    assert outcome["leaked"] == 0
    assert outcome["next"] == ["succeeded", 0]
