"""The `fleetrun` command, run as a real process: exit codes, output, errors, help."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_none_left, processes_running, processes_with, run_cli, wait_until


def test_run_streams_output_and_exits_with_the_command_status():
    ok = run_cli("run", "local", "--", "echo", "hello;", "echo", "oops", ">&2")
    assert ok.returncode == 0
    assert ok.stdout == "hello\n" and ok.stderr == "oops\n"
    failed = run_cli("run", "local", "--", "exit 7")
    assert failed.returncode == 7 and failed.stderr == ""


def test_input_piped_into_run_is_not_passed_on_and_it_says_so(tmp_path):
    # Commands run with stdin at end of file (as with ssh -n); the user is told, once.
    note = "fleetrun: note: fleetrun does not pass its input on: the command's stdin is at end of file (as with ssh -n)\n"
    piped = run_cli("run", "local", "--", "cat; echo done", input="data for cat\n")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, "done\n", note)
    data = tmp_path / "data"
    data.write_text("x")
    with data.open() as redirected:
        from_file = run_cli("run", "local", "--", "cat; echo done", stdin=redirected)
    assert (from_file.stdout, from_file.stderr) == ("done\n", note)
    for quiet in ("", None):  # an empty pipe, /dev/null
        result = run_cli("run", "local", "--", "true", input=quiet) if quiet is not None else run_cli("run", "local", "--", "true")
        assert (result.returncode, result.stderr) == (0, "")
    assert "what is piped\ninto fleetrun is not passed on" in run_cli("run", "--help").stdout


def test_options_after_the_double_dash_belong_to_the_command():
    result = run_cli("run", "local", "--", "ls", "-d", "--", "/")
    assert result.returncode == 0 and result.stdout == "/\n"


def test_timeout_exits_124_and_says_so(marker):
    result = run_cli("run", "local", "--timeout", "0.3", "--", f"sleep {marker}")
    assert result.returncode == 124
    assert "timed out after 0.3 s" in result.stderr
    assert_none_left(marker)


def test_sigint_cancels_the_task_and_exits_130(marker, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "run", "local", "--", f"sleep {marker}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: processes_with(f"sleep {marker}") and [p for p in processes_with(marker) if p != proc.pid])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "was cancelled: interrupted by the user" in err
    assert processes_with(f"sleep {marker}") == []
    listed = json.loads(run_cli("tasks", "list", "--json").stdout)
    assert listed[0]["status"] == "cancelled"


def test_a_ctrl_c_while_fleetrun_exits_ends_it_without_a_traceback():
    # Exiting, Python joins the worker threads that a run leaves (here, one that says when
    # the exit has begun, then sleeps); a Ctrl-C then raised KeyboardInterrupt there, which
    # Python printed as a traceback ("Exception ignored in: <module 'threading'>").
    script = (
        "import sys, threading, time\n"
        "def joined_at_exit():\n"
        "    while threading.main_thread().is_alive():\n"
        "        time.sleep(0.01)\n"
        "    print('exiting', flush=True)\n"
        "    time.sleep(5)\n"
        "threading.Thread(target=joined_at_exit).start()\n"
        "sys.argv = ['fleetrun', 'hosts']\n"
        "from fleetrun.cli import entry\n"
        "entry()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while (line := proc.stdout.readline()) not in ("exiting\n", ""):
        pass
    assert line == "exiting\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, err) == (-signal.SIGINT, "")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=lambda sig: sig.name)
def test_sigterm_and_sighup_also_cancel_cleanly(marker, stop):
    # SIGHUP is the terminal closing: the command, in a session of its own, would not get it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "run", "local", "--", f"sleep {marker}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: processes_running("sleep", marker))
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err.endswith(f"was cancelled: stopped by {stop.name}\n")
    assert_none_left(marker)
    listed = json.loads(run_cli("tasks", "list", "--json").stdout)
    assert (listed[0]["status"], listed[0]["cancel_reason"]) == ("cancelled", f"stopped by {stop.name}")


@pytest.mark.parametrize(
    "case, options, hosts, printing",
    [
        ("output", [], "local", "stdout"),
        ("json events", ["--json"], "local", "stdout"),
        ("fan-out", ["--max-parallel", "2"], "one,two", "stdout"),
        ("stderr", [], "local", "stderr"),
    ],
)
def test_a_reader_going_away_stops_the_run_like_sigpipe(tmp_path, marker, case, options, hosts, printing):
    """`fleetrun run ... | head -1`: fleetrun exits 141 and stops the command, as a pipeline would."""
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text("hosts:\n  one: {transport: local}\n  two: {transport: local}\n  local: {transport: local}\n")
    command = f"while :; do echo {marker}; sleep 0.01; done" + (" >&2" if printing == "stderr" else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "--hosts", str(inventory), "run", *options, hosts, "--", command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    read_by_head, other = (proc.stdout, proc.stderr) if printing == "stdout" else (proc.stderr, proc.stdout)
    assert read_by_head.readline()
    read_by_head.close()
    assert proc.wait(timeout=20) == 141
    assert b"Traceback" not in other.read()
    assert_none_left(marker)
    tasks = json.loads(run_cli("tasks", "list", "--json").stdout)
    assert len(tasks) == len(hosts.split(",")) and all(t["status"] == "cancelled" for t in tasks)
    expected = "the batch was cancelled" if case == "fan-out" else f"the reader of fleetrun's {printing} went away (broken pipe)"
    assert {t["cancel_reason"] for t in tasks} == {expected}


def test_fleetrun_errors_exit_125_with_one_line_and_no_traceback(tmp_path):
    unknown = run_cli("run", "web9", "--", "true")
    assert unknown.returncode == 125
    assert unknown.stderr == (
        "fleetrun: error: unknown host 'web9' (known hosts: local; inventory: <embedded default inventory>)\n"
    )
    bad = tmp_path / "hosts.yaml"
    bad.write_text("hosts:\n  web1:\n    max_seconds: forever\n")
    broken = run_cli("--hosts", str(bad), "run", "web1", "--", "true")
    assert broken.returncode == 125
    assert broken.stderr == (
        f"fleetrun: error: {bad}:3: host 'web1', field 'max_seconds': expected a number, got 'forever'\n"
    )
    no_command = run_cli("run", "local")
    assert no_command.returncode == 125 and "no command given" in no_command.stderr
    spawn = run_cli("run", "local", "--cwd", str(tmp_path / "nowhere"), "--", "true")
    assert spawn.returncode == 125
    assert spawn.stderr.endswith(f"cannot use the working directory {tmp_path / 'nowhere'}: No such file or directory\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    not_a_directory = run_cli("run", "local", "--cwd", str(a_file), "--", "ls")
    assert not_a_directory.stderr.endswith(f"cannot use the working directory {a_file}: Not a directory\n")
    bad_shell = tmp_path / "shell.yaml"
    bad_shell.write_text("hosts:\n  odd:\n    shell: /no/such/shell\n")
    no_shell = run_cli("--hosts", str(bad_shell), "run", "odd", "--", "true")
    assert no_shell.returncode == 125
    assert no_shell.stderr.endswith("cannot start the command: No such file or directory: /no/such/shell\n")
    for result in (unknown, broken, no_command, spawn):
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "anchors, value, line, problem",
    [
        # libyaml's composer recursed once per level and the process died of SIGSEGV.
        ("", "[" * 50_000 + "]" * 50_000, 3, "lists and mappings nested more than 100 levels deep"),
        # Nine anchors naming the one before ten times: 10**10 values, hours of reading.
        (
            "x-0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"x-{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)),
            "*a9",
            6,
            "through its aliases, the value that starts here stands for more than 1,000,000 values",
        ),
        # A chain of merge keys ran out of Python's stack (RecursionError, with its traceback).
        (
            "x-m0: &m0 {a: b}\n" + "".join(f"x-m{i}: &m{i} {{<<: *m{i - 1}}}\n" for i in range(1, 3000)),
            "*m2999",
            1,
            "through its aliases, the file stands for more than 1,000,000 values",
        ),
    ],
    ids=["nested", "aliases", "merge-chain"],
)
@pytest.mark.parametrize("kind", ["hosts", "policy"])
def test_a_file_too_deep_or_too_aliased_to_read_is_one_error_line(tmp_path, kind, anchors, value, line, problem):
    path = tmp_path / f"{kind}.yaml"
    if kind == "hosts":
        path.write_text(f"{anchors}hosts:\n  local:\n    tags: {value}\n")
        result = run_cli("--hosts", str(path), "run", "local", "--", "true", timeout=30)
        assert result.returncode == 125
    else:
        path.write_text(f"{anchors}rules:\n  - allow: x\n    hosts: {value}\n")
        result = run_cli("--policy", str(path), "policy", "check", "local", "--", "true", timeout=30)
        assert result.returncode == 1
    assert result.stderr.startswith(f"fleetrun: error: {path}:{line}: {problem}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arguments, closed, code",
    [
        ("run local --timeout 0.2 -- 'sleep 5'", "2>&-", 124),
        ("run nowhere -- true", "2>&-", 125),
        ("run local --bogus -- true", "2>&-", 125),
        ("run local -- 'echo out; echo err >&2; exit 4'", "2>&-", 4),
        ("run local -- 'echo out; exit 3'", ">&-", 3),
        ("run local -- 'echo out; exit 3'", ">&- 2>&-", 3),
        ("tasks show ffffffffffff", "2>&-", 1),
    ],
)
def test_exit_statuses_hold_with_stdout_or_stderr_closed(arguments, closed, code):
    # A cron job or a daemon may start fleetrun that way: the status is all it has left.
    result = subprocess.run(["sh", "-c", f"{sys.executable} -m fleetrun {arguments} {closed}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    if "2>&-" not in closed:
        assert result.stderr == ""


def test_usage_errors_of_run_exit_125_and_of_other_commands_2():
    # 2 is a common exit status of commands themselves (grep, diff, ls): `run` must not use it.
    bad_value = run_cli("run", "local", "--timeout", "soon", "--", "true")
    assert bad_value.returncode == 125
    assert bad_value.stderr.endswith("fleetrun run: error: argument --timeout: expected a number of seconds, got 'soon'\n")
    for text, problem in (("0", "must be greater than 0, got 0"), ("nan", "must be greater than 0, got nan"),
                          ("inf", "must be a finite number of seconds, got inf")):
        refused = run_cli("run", "local", "--timeout", text, "--", "true")
        assert refused.returncode == 125 and refused.stderr.endswith(f"argument --timeout: {problem}\n"), refused.stderr
    bad_pattern = run_cli("run", "local", "--progress-pattern", "(", "--", "true")
    assert bad_pattern.returncode == 125 and "Traceback" not in bad_pattern.stderr
    assert bad_pattern.stderr.endswith(
        "fleetrun run: error: argument --progress-pattern: invalid progress pattern '(': missing ), unterminated subpattern at position 0\n"
    )
    unknown_option = run_cli("run", "local", "--bogus", "--", "true")
    assert unknown_option.returncode == 125
    assert unknown_option.stderr.endswith("fleetrun run: error: unrecognized arguments: --bogus\n")
    command_status = run_cli("run", "local", "--", "ls", "--bogus")
    assert command_status.returncode == 2 and "fleetrun" not in command_status.stderr
    assert run_cli("frobnicate").returncode == 2
    other = run_cli("hosts", "--bogus")
    assert other.returncode == 2 and other.stderr.endswith("fleetrun hosts: error: unrecognized arguments: --bogus\n")
    # An option of another command is reported with the usage of the command it was given to.
    nested = run_cli("tasks", "list", "--tag", "web")
    assert nested.returncode == 2
    assert nested.stderr.startswith("usage: fleetrun tasks list [-h] [--status STATUS]"), nested.stderr
    assert nested.stderr.endswith("fleetrun tasks list: error: unrecognized arguments: --tag web\n")
    extra = run_cli("tasks", "retention", "90")
    assert extra.returncode == 2 and extra.stderr.startswith("usage: fleetrun tasks retention [-h]")
    assert extra.stderr.endswith("fleetrun tasks retention: error: unrecognized arguments: 90\n")


def test_dry_run_shows_the_plan_and_runs_nothing(tmp_path):
    flag = tmp_path / "ran"
    result = run_cli("run", "local", "--timeout", "5", "--dry-run", "--", f"touch {flag}")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    assert lines["host"].strip() == "local"
    assert lines["transport"].strip() == "local (shell: /bin/sh)"
    assert lines["command"].strip() == f"touch {flag}"
    assert lines["limits"].strip() == "max_seconds=5 max_output_bytes=104857600 max_concurrent=8 max_queued=1000"
    assert "none configured" in lines["policy"]
    assert lines["dry run"].strip() == "nothing was run"
    time.sleep(0.2)
    assert not flag.exists()
    as_json = json.loads(run_cli("run", "local", "--dry-run", "--json", "--", f"touch {flag}").stdout)
    assert as_json["ran"] is False and as_json["limits"]["max_seconds"] == 3600
    assert not flag.exists()
    assert json.loads(run_cli("tasks", "list", "--json").stdout) == []


def test_a_dry_run_on_ssh_hosts_shows_how_each_is_reached_in_words(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    example = str(REPO / "hosts.example.yaml")
    result = run_cli("--hosts", example, "run", "web1,db1", "--dry-run", "--", "uptime", env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("transport:")] == [
        f"transport:   ssh (address: deploy@web1.example.com:22; known_hosts: {home}/.ssh/known_hosts; host_key_checking: strict; "
        "identity_files: ~/.ssh/id_ed25519; secrets_from: passphrase from $WEB1_KEY_PASSPHRASE; "
        "allowed_networks: 10.0.0.0/8, 192.168.0.0/16, 2001:db8::/32; blocked_networks: 169.254.169.254/32)",
        f"transport:   ssh (address: deploy@10.0.0.12:22; jump_hosts: deploy@bastion.example.com:22; known_hosts: {home}/.ssh/known_hosts; "
        "host_key_checking: strict; secrets_from: password from ~/.config/fleetrun/db1.password)",
    ]


def test_json_mode_prints_lifecycle_events_only():
    result = run_cli("run", "local", "--json", "--", "echo hi")
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["task.created", "task.progress", "task.completed"]
    assert events[-1]["exit_code"] == 0 and events[1]["latest_line"] == "hi"


def test_json_log_flag_and_env_write_an_audit_file(tmp_path):
    by_flag = tmp_path / "flag.jsonl"
    run_cli("--json-log", str(by_flag), "run", "local", "--", "true")
    assert [json.loads(l)["event"] for l in by_flag.read_text().splitlines()] == ["task.created", "task.completed"]
    by_env = tmp_path / "env.jsonl"
    run_cli("run", "local", "--", "exit 3", env={"FLEETRUN_JSON_LOG": str(by_env)})
    assert json.loads(by_env.read_text().splitlines()[-1])["exit_code"] == 3


def test_tasks_list_show_and_output():
    first = run_cli("run", "local", "--", "printf 'a\\nb\\nc\\n'; echo err >&2")
    assert first.returncode == 0
    tasks = json.loads(run_cli("tasks", "list", "--json").stdout)
    task_id = tasks[0]["id"]
    table = run_cli("tasks", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "EXIT", "HOST", "ORIGIN", "CREATED", "DURATION", "COMMAND"]
    assert table[1].split()[:5] == [task_id, "succeeded", "0", "local", "cli"]
    bare = run_cli("tasks")  # no action: the list, with its defaults and its options
    assert bare.returncode == 0 and bare.stdout.splitlines() == table
    assert json.loads(run_cli("tasks", "--json", "--limit", "1").stdout) == tasks[:1]
    assert run_cli("tasks", "--status", "failed", "--json").stdout.strip() == "[]"
    assert json.loads(run_cli("tasks", "--origin", "cli", "--json").stdout) == tasks
    assert run_cli("tasks", "list", "--origin", "mcp").stdout.startswith("no tasks")
    assert json.loads(run_cli("tasks", "--limit", "5", "list", "--limit", "1", "--json").stdout) == tasks[:1]
    assert run_cli("tasks", "show", "--help").stdout.startswith("usage: fleetrun tasks show [-h] [--json] ID\n")
    unknown = run_cli("tasks", "lst")
    assert unknown.returncode == 2 and "invalid choice: 'lst'" in unknown.stderr
    shown = json.loads(run_cli("tasks", "show", task_id, "--json").stdout)
    assert shown["stdout_bytes"] == 6 and shown["stderr_bytes"] == 4 and shown["status"] == "succeeded"
    text = run_cli("tasks", "show", task_id).stdout
    assert re.search(rf"^id: +{task_id}$", text, re.M) and re.search(r"^status: +succeeded$", text, re.M)
    assert re.search(r"^duration_s: +\d+\.\d{3}$", text, re.M)  # milliseconds, not 17 digits
    assert run_cli("tasks", "output", task_id).stdout == "a\nb\nc\n"
    assert run_cli("tasks", "output", task_id, "--stream", "stderr").stdout == "err\n"
    assert run_cli("tasks", "output", task_id, "--offset", "2").stdout == "b\nc\n"
    assert run_cli("tasks", "output", task_id, "--tail", "2").stdout == "b\nc\n"
    assert run_cli("tasks", "list", "--status", "failed", "--json").stdout.strip() == "[]"
    missing = run_cli("tasks", "show", "ffffffffffff")
    assert missing.returncode == 1 and "no task 'ffffffffffff'" in missing.stderr
    invalid = run_cli("tasks", "output", "../../etc/passwd")
    assert invalid.returncode == 1 and "invalid task id" in invalid.stderr


def test_tasks_output_prints_a_whole_large_stream_and_says_where_a_capped_read_stopped():
    size = (17 << 20) + 5  # more than the 16 MiB a read once stopped at, without a word
    ran = run_cli("run", "local", "--", f"head -c {size} /dev/zero | tr '\\0' x; echo; echo tail")
    assert ran.returncode == 0
    total = size + len("\ntail\n")
    task_id = json.loads(run_cli("tasks", "list", "--json").stdout)[0]["id"]
    whole = run_cli("tasks", "output", task_id)
    assert whole.returncode == 0 and whole.stderr == ""
    assert len(whole.stdout) == total and whole.stdout.endswith("x\ntail\n")
    head = run_cli("tasks", "output", task_id, "--max-bytes", "1000")
    assert head.returncode == 0 and head.stdout == "x" * 1000
    assert head.stderr == f"fleetrun: stopped after --max-bytes 1000: {total - 1000} more bytes are kept (continue with --offset 1000)\n"
    rest = run_cli("tasks", "output", task_id, "--offset", "1000")
    assert rest.returncode == 0 and head.stdout + rest.stdout == whole.stdout
    assert run_cli("tasks", "output", task_id, "--offset", str(total)).stdout == ""
    past = run_cli("tasks", "output", task_id, "--offset", str(total + 1))
    assert past.returncode == 1 and past.stdout == ""
    assert past.stderr == f"fleetrun: error: offset {total + 1} is past the end of the stdout of task {task_id} ({total} bytes kept)\n"
    both = run_cli("tasks", "output", task_id, "--tail", "1", "--offset", "3")
    assert both.returncode == 2 and "argument --offset: not allowed with argument --tail" in both.stderr
    assert run_cli("tasks", "output", task_id, "--tail", "1").stdout == "tail\n"


def test_tasks_output_follow_streams_until_the_task_ends(tmp_path):
    flag = tmp_path / "go"
    runner = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "run", "local", "--", f"echo one; while [ ! -e {flag} ]; do sleep 0.02; done; echo two"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    task_id = wait_until(lambda: (json.loads(run_cli("tasks", "list", "--json").stdout) or [{}])[0].get("id"))
    follower = subprocess.Popen([sys.executable, "-m", "fleetrun", "tasks", "output", task_id, "--follow"], stdout=subprocess.PIPE)
    assert follower.stdout.readline() == b"one\n"
    capped = run_cli("tasks", "output", task_id, "--follow", "--max-bytes", "2")  # stops there, while the task runs on
    assert capped.returncode == 0 and capped.stdout == "on"
    assert capped.stderr == "fleetrun: stopped after --max-bytes 2: 2 more bytes are kept (continue with --offset 2)\n"
    flag.touch()
    assert follower.stdout.readline() == b"two\n"
    assert follower.wait(10) == 0
    runner.communicate(timeout=10)


def test_text_from_commands_cannot_drive_the_terminal_through_fleetruns_own_output(marker):
    # A bell, a backspace, a right-to-left override and a lone escape in a command's last
    # line (whole escape sequences are not kept in it: they style text, they are not text).
    printed = "printf 'ok\\n\\007bell\\010\\342\\200\\256x\\033'"
    assert run_cli("run", "local", "--", printed).returncode == 0
    task_id = json.loads(run_cli("tasks", "list", "--json").stdout)[0]["id"]
    shown = run_cli("tasks", "show", task_id).stdout
    assert not any(char in shown for char in "\x07\x08\u202e\x1b")
    assert "latest_line=\\x07bell\\x08\\u202ex\\x1b" in shown
    # The output itself is the command's data: printed as it is, as cat would.
    assert run_cli("tasks", "output", task_id).stdout == "ok\n\x07bell\x08\u202ex\x1b"
    # A command of several lines is one line of the list, and exact (escaped) in `show`.
    assert run_cli("run", "local", "--", "echo a\n\techo b").returncode == 0
    assert run_cli("tasks", "list").stdout.splitlines()[1].endswith("  echo a echo b")
    assert "command:          echo a\\x0a\\x09echo b\n" in run_cli("tasks", "show", json.loads(run_cli("tasks", "--json").stdout)[0]["id"]).stdout
    # A cancel reason comes from whoever cancels: shown escaped too.
    running = subprocess.Popen([sys.executable, "-m", "fleetrun", "run", "local", "--", f"sleep {marker}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: processes_running("sleep", marker))
        # Listed once the owner's writer has put it in SQLite (within about 50 ms).
        other = wait_until(lambda: json.loads(run_cli("tasks", "list", "--json", "--status", "running").stdout))[0]["id"]
        assert run_cli("tasks", "cancel", other, "--reason", "bye\x1b[2J").returncode == 0
        assert running.wait(20) == 130
    finally:
        if running.poll() is None:
            running.kill()
    assert "cancel_reason:    bye\\x1b[2J" in run_cli("tasks", "show", other).stdout
    assert running.stderr.read().endswith(f"fleetrun: task {other} was cancelled: bye\\x1b[2J\n")


def test_hosts_and_plugins_commands(tmp_path):
    hosts = run_cli("hosts")
    assert hosts.returncode == 0
    assert hosts.stdout.splitlines()[1].split()[:2] == ["local", "local"]
    assert "inventory: <embedded default inventory>" in hosts.stdout
    example = Path(__file__).resolve().parent.parent / "hosts.example.yaml"
    listed = json.loads(run_cli("--hosts", str(example), "hosts", "--json").stdout)
    assert [h["name"] for h in listed["hosts"]] == ["builder", "db1", "local", "web1"]
    # Where each host is reached, as the transport resolves it, without connecting.
    db1 = listed["hosts"][1]["details"]
    assert (db1["address"], db1["jump_hosts"]) == ("deploy@10.0.0.12:22", ["deploy@bastion.example.com:22"])
    assert listed["hosts"][2]["details"] == {"shell": "/bin/sh"}
    table = run_cli("--hosts", str(example), "hosts").stdout.splitlines()
    assert table[0].split()[:4] == ["HOST", "TRANSPORT", "ADDRESS", "TAGS"]
    assert table[4].split()[:4] == ["web1", "ssh", "deploy@web1.example.com:22", "web,prod"]
    assert table[3].split()[:3] == ["local", "local", "-"]
    plugins = json.loads(run_cli("plugins", "--json").stdout)
    assert {"name": "fleetrun.transports.local", "source": "built-in", "hooks": ["fleetrun_register_transports"], "error": None, "blocked": False} in plugins["plugins"]
    assert plugins["transports"] == {
        "local": "fleetrun.plugins.transports.local.LocalTransport",
        "ssh": "fleetrun.plugins.transports.ssh.SSHTransport",
    }


def test_global_options_also_go_after_the_command_name(tmp_path):
    example = Path(__file__).resolve().parent.parent / "hosts.example.yaml"
    before = run_cli("--hosts", str(example), "hosts", "--json")
    after = run_cli("hosts", "--json", "--hosts", str(example))
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout
    # Given before the command, an option is not undone by the command's own (unset) default.
    assert json.loads(before.stdout)["source"] == str(example)
    log = tmp_path / "audit.jsonl"
    ran = run_cli("run", "web1", "--hosts", str(example), "--json-log", str(log), "--dry-run", "--", "uptime")
    assert ran.returncode == 0, ran.stderr
    assert "web1" in ran.stdout and "ssh" in ran.stdout
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - deny: 'rm *'\n")
    denied = run_cli("policy", "check", "local", "--policy", str(policy), "--", "rm", "-rf", "/")
    assert denied.returncode == 126
    assert f"{policy}" in denied.stdout + denied.stderr
    help_text = run_cli("serve", "--help").stdout
    assert "global options (also accepted before the command)" in help_text and "--policy PATH" in help_text


@pytest.mark.parametrize(
    "args",
    [[], ["run"], ["hosts"], ["plugins"], ["tasks"], ["tasks", "list"], ["tasks", "show"], ["tasks", "output"], ["tasks", "cancel"],
     ["policy"], ["policy", "check"], ["policy", "show"], ["serve"]],
)
def test_every_command_has_help(args):
    result = run_cli(*args, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: fleetrun")
    assert len(result.stdout.splitlines()) > 4


NO_SUCH_USER = "fleetrun-no-such-user"
_NO_HOME = f"starts with the home directory of user '{NO_SUCH_USER}', who does not exist on this machine"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {"FLEETRUN_HOME": f"~{NO_SUCH_USER}/store"}, f"$FLEETRUN_HOME: '~{NO_SUCH_USER}/store' {_NO_HOME}"),
        (["--hosts", f"~{NO_SUCH_USER}/hosts.yaml"], {}, f"--hosts: '~{NO_SUCH_USER}/hosts.yaml' {_NO_HOME}"),
        ([], {"FLEETRUN_HOSTS": f"~{NO_SUCH_USER}/hosts.yaml"}, f"$FLEETRUN_HOSTS: '~{NO_SUCH_USER}/hosts.yaml' {_NO_HOME}"),
        (["--policy", f"~{NO_SUCH_USER}/policy.yaml"], {}, f"--policy: '~{NO_SUCH_USER}/policy.yaml' {_NO_HOME}"),
        ([], {"FLEETRUN_POLICY": f"~{NO_SUCH_USER}/p.yaml"}, f"$FLEETRUN_POLICY: '~{NO_SUCH_USER}/p.yaml' {_NO_HOME}"),
        (["--json-log", f"~{NO_SUCH_USER}/log"], {}, f"cannot open the JSON log: '~{NO_SUCH_USER}/log' {_NO_HOME}"),
        ([], {"FLEETRUN_JSON_LOG": f"~{NO_SUCH_USER}/log"}, f"cannot open the JSON log: '~{NO_SUCH_USER}/log' {_NO_HOME}"),
    ],
)
def test_a_path_in_the_home_of_a_user_this_machine_lacks_is_one_clear_error(args, env, expected, tmp_path):
    # pathlib raises a bare RuntimeError ("Could not determine home directory"): a traceback.
    result = run_cli(*args, "run", "local", "--", "echo ran", env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (125, "")
    assert result.stderr == f"fleetrun: error: {expected}\n"


def test_a_token_file_or_a_json_log_the_server_cannot_use_is_one_clear_error(tmp_path):
    token = run_cli("serve", "--http", "127.0.0.1:8999", "--token-file", f"~{NO_SUCH_USER}/token", cwd=tmp_path, timeout=20)
    assert (token.returncode, token.stdout) == (1, "")
    assert token.stderr == f"fleetrun: error: the MCP bearer token: '~{NO_SUCH_USER}/token' {_NO_HOME}\n"
    # The server's JSON log was opened without the check `run` makes: a traceback.
    log = run_cli("serve", "--json-log", str(tmp_path / "missing" / "log"), cwd=tmp_path, timeout=20)
    assert (log.returncode, log.stdout) == (1, "")
    assert log.stderr == f"fleetrun: error: cannot open the JSON log {tmp_path / 'missing' / 'log'}: No such file or directory\n"


def test_help_says_why_the_store_cannot_be_found_instead_of_failing(tmp_path):
    result = run_cli("--help", env={"FLEETRUN_HOME": f"~{NO_SUCH_USER}/store", "COLUMNS": "500"}, cwd=tmp_path)
    assert result.returncode == 0
    assert f"The task store lives in (none: $FLEETRUN_HOME: '~{NO_SUCH_USER}/store' {_NO_HOME})" in result.stdout


def test_a_json_log_path_from_the_environment_starts_at_the_home_directory_like_the_other_paths(tmp_path):
    # An MCP client's configuration sets variables without a shell to expand ~: the hosts
    # and policy paths took ~ there, the JSON log made a directory named '~'.
    result = run_cli("run", "local", "--", "true", env={"HOME": str(tmp_path), "FLEETRUN_JSON_LOG": "~/audit.jsonl"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()] == [
        "task.created", "task.completed"
    ]
    assert not (tmp_path / "~").exists()


def _run_on_a_terminal(*args: str, columns: int = 100) -> tuple[int, str, str]:
    """``fleetrun ARGS`` with stderr on a terminal of ``columns`` columns: exit status, stdout, and what the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "fleetrun", *args], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    out = process.stdout.read().decode()
    return process.wait(30), out, shown.decode(errors="replace")


def test_a_live_progress_line_on_a_terminal_only(tmp_path):
    command = "echo progress: 40%; sleep 0.6; echo done"
    code, out, shown = _run_on_a_terminal("run", "local", "--", command)
    assert (code, out) == (0, "progress: 40%\ndone\n")
    lines = [part for part in shown.split("\r\x1b[K") if part.startswith("[fleetrun]")]
    assert lines, shown
    assert re.fullmatch(r"\[fleetrun\] local · \d+\.\ds · 40% · out 14 B/1 lines", lines[0]), lines[0]
    assert shown.endswith("\r\x1b[K")  # cleared at the end: the terminal keeps the output alone
    # Never wider than the terminal: a wrapped line could not be cleared.
    narrow = _run_on_a_terminal("run", "local", "--", command, columns=20)[2]
    assert all(len(part) <= 19 for part in narrow.split("\r\x1b[K") if part.startswith("[fleetrun]"))
    # A terminal that says it has 0 columns (its size never set) is taken as 80 wide; it showed "[".
    unsized = _run_on_a_terminal("run", "local", "--", command, columns=0)[2]
    first = [part for part in unsized.split("\r\x1b[K") if part.startswith("[")][0]
    assert re.fullmatch(r"\[fleetrun\] local · \d+\.\ds · 40% · out 14 B/1 lines", first), first
    # -q, or stderr not a terminal: nothing but the command's own output.
    assert "[fleetrun]" not in _run_on_a_terminal("run", "local", "-q", "--", command)[2]
    piped = run_cli("run", "local", "--", command)
    assert (piped.stdout, piped.stderr) == ("progress: 40%\ndone\n", "")


def test_run_help_documents_the_exit_codes():
    text = run_cli("run", "--help").stdout
    for code in ("124", "125", "130"):
        assert code in text
