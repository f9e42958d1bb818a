"""Secrets, network rules, per-tag limits and input limits at every boundary."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from fleetrun.core.config_files import ConfigFiles
from fleetrun.core.errors import FleetrunError, InventoryError, UnknownTaskError
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.secrets import redact

from conftest import hosts_file_text, run_cli, ssh_host

TRANSPORTS = PluginManager(autoload=False).transports


# -- secrets ----------------------------------------------------------------------------------


def test_a_secret_in_play_is_written_nowhere(tmp_path, sshd_fleet, shared_sshd):
    passphrase = "pp-" + secrets.token_hex(12)
    wrong = "wrong-" + secrets.token_hex(12)
    key = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(key)], check=True)
    sshd_fleet.authorize(sshd_fleet.user, key)
    wrong_file = tmp_path / "wrong-passphrase"
    wrong_file.write_text(wrong + "\n")
    wrong_file.chmod(0o600)
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [shared_sshd])
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({
        "vault": ssh_host(sshd_fleet, shared_sshd, known, identity_files=[str(key)], passphrase_env="TEST_KEY_PASSPHRASE"),
        "badpass": ssh_host(sshd_fleet, shared_sshd, known, identity_files=[str(key)], passphrase_file=str(wrong_file)),
    }))
    audit = tmp_path / "audit.jsonl"
    env = {"TEST_KEY_PASSPHRASE": passphrase}
    common = ["-vv", "--hosts", str(hosts), "--json-log", str(audit)]
    runs = [
        run_cli(*common, "run", "vault", "--", f"echo start; true '{passphrase}'", env=env),
        run_cli(*common, "run", "badpass", "--", "true", env=env),
        run_cli(*common, "run", "vault,badpass", "--", f"test -n '{wrong}'", env=env),
        run_cli(*common, "run", "vault", "--dry-run", "--", f"echo {passphrase}", env=env),
        run_cli(*common, "run", "vault", "--json", "--", f"echo {passphrase} >/dev/null", env=env),
    ]
    first, bad = runs[0], runs[1]
    assert first.returncode == 0, first.stderr  # the passphrase unlocked the key
    assert first.stdout == "start\n"
    assert bad.returncode == 125 and "auth" not in bad.stdout
    listing = run_cli("tasks", "list", "--json", env=env)
    records = json.loads(listing.stdout)
    assert any("***" in r["command"] for r in records), "the command's copy of the secret was redacted"
    shows = [run_cli("tasks", "show", r["id"], "--json", env=env) for r in records]
    failed = [r for r in records if r["host"] == "badpass"]
    assert failed and all(r["error_category"] == "auth" for r in failed), [(r["error_category"], r["error"]) for r in failed]

    written = [run.stdout + run.stderr for run in [*runs, listing, *shows]]
    written.append(audit.read_text())
    store_files = [p for p in Path(os.environ["FLEETRUN_HOME"]).rglob("*") if p.is_file()]
    assert any(p.name.startswith("tasks.sqlite3") for p in store_files)
    for path in store_files:
        written.append(path.read_bytes().decode("latin-1"))
    assert any("paramiko" in text for text in written), "debug logs were part of what was searched"
    for text in written:
        assert passphrase not in text
        assert wrong not in text


def _secret_in(tmp_path: Path, monkeypatch, name: str) -> tuple[str, str, Path]:
    """A new variable and a new mode-600 file, each holding a secret of its own."""
    variable = f"FLEETRUN_TEST_{name.upper()}_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(variable, f"{name}-pw-" + secrets.token_hex(10))
    path = tmp_path / f"{name}.passphrase"
    path.write_text(f"{name}-pp-" + secrets.token_hex(10) + "\n")
    path.chmod(0o600)
    return variable, os.environ[variable], path


def _unused_ssh_host(variable: str, passphrase_file: Path) -> dict[str, object]:
    # Never connected to: the secrets it names are what matters.
    return {"transport": "ssh", "hostname": "127.0.0.1", "port": 9, "password_env": variable,
            "passphrase_file": str(passphrase_file)}


def _printed_on_local(executor, command: str) -> str:
    task = executor.run(TaskRequest(host="local", command=command))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    return executor.read_output(task.id).data.decode()


def test_a_command_on_one_host_never_sees_the_secrets_of_another(make_executor, tmp_path, monkeypatch):
    # An MCP client starts `fleetrun serve` with the variables a hosts file names as secrets;
    # before, a command on `local` inherited them (`echo $VAR` is read-only) and another
    # host's secrets were known for redaction only once a task had run there.
    variable, password, passphrase_file = _secret_in(tmp_path, monkeypatch, "web1")
    passphrase = passphrase_file.read_text().strip()
    executor = make_executor(hosts_yaml=hosts_file_text({"local": {}, "web1": _unused_ssh_host(variable, passphrase_file)}))
    assert (redact(password), redact(passphrase)) == ("***", "***")  # before any task on web1
    assert _printed_on_local(executor, f'printf "[%s]" "${variable}"') == "[]"
    assert _printed_on_local(executor, f"printenv {variable}; echo exit=$?") == "exit=1\n"
    # Only those variables are withheld; the rest of the environment is inherited as before.
    assert _printed_on_local(executor, 'printf "%s" "$HOME"') == os.environ["HOME"]
    # A host's own env: is configuration, written in the hosts file, and is given as written.
    executor.reconfigure(inventory=parse_inventory(hosts_file_text({
        "local": {"env": {variable: "set-by-the-hosts-file"}}, "web1": _unused_ssh_host(variable, passphrase_file),
    }), source="hosts.yaml", transports=TRANSPORTS), policy=None)
    assert _printed_on_local(executor, f'printf "%s" "${variable}"') == "set-by-the-hosts-file"

    # A host added later, by reconfigure() or by an edit of the hosts file, is read at once too.
    added, added_password, added_file = _secret_in(tmp_path, monkeypatch, "web2")
    executor.reconfigure(inventory=parse_inventory(hosts_file_text({"local": {}, "web2": _unused_ssh_host(added, added_file)}),
                                                   source="hosts.yaml", transports=TRANSPORTS), policy=None)
    assert (redact(added_password), redact(added_file.read_text().strip())) == ("***", "***")
    assert _printed_on_local(executor, f'printf "[%s]" "${added}"') == "[]"

    edited, edited_password, edited_file = _secret_in(tmp_path, monkeypatch, "web3")
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({"local": {}}))
    followed = make_executor(config_files=ConfigFiles(hosts=hosts, transports=TRANSPORTS))
    assert _printed_on_local(followed, f'printf "[%s]" "${edited}"') == f"[{edited_password}]"  # not a secret yet
    hosts.write_text(hosts_file_text({"local": {}, "web3": _unused_ssh_host(edited, edited_file)}))
    past = time.time() - 60
    os.utime(hosts, (past, past))
    assert _printed_on_local(followed, f'printf "[%s]" "${edited}"') == "[]"
    assert redact(edited_file.read_text().strip()) == "***"


def test_the_cli_hides_every_hosts_secret_whatever_host_it_is_asked_about(tmp_path, monkeypatch):
    variable, password, passphrase_file = _secret_in(tmp_path, monkeypatch, "web1")
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({"local": {}, "web1": _unused_ssh_host(variable, passphrase_file)}))
    command = f"echo {password}"
    shown = [
        run_cli("--hosts", str(hosts), "policy", "check", "--builtin", "local", "--", command),
        run_cli("--hosts", str(hosts), "run", "--dry-run", "local", "--", command),
        run_cli("--hosts", str(hosts), "run", "--dry-run", "--json", "local", "--", command),
    ]
    assert [run.returncode for run in shown] == [0, 0, 0]
    assert "'echo ***' is allowed" in shown[0].stdout
    assert all(password not in run.stdout + run.stderr for run in shown)


@pytest.mark.skipif(os.geteuid() != 0, reason="sets a password on the tests' own login user, which needs root")
@pytest.mark.parametrize(
    ("server_auth", "accepted"),
    [
        ("PasswordAuthentication yes", "Accepted password for "),
        # As many PAM servers take passwords: keyboard-interactive only.
        ("UsePAM yes\nKbdInteractiveAuthentication yes\nPasswordAuthentication no", "Accepted keyboard-interactive/pam for "),
    ],
)
def test_a_login_password_logs_in_and_is_written_nowhere(tmp_path, sshd_fleet, server_auth, accepted):
    from sshd import TEST_USER

    password = "pw-" + secrets.token_hex(12)
    wrong = "wrong-" + secrets.token_hex(12)
    subprocess.run(["chpasswd"], input=f"{TEST_USER}:{password}\n", text=True, check=True)
    try:
        server = sshd_fleet.start(extra_config=f"{server_auth}\nPubkeyAuthentication no")
        known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
        wrong_file = tmp_path / "wrong-password"
        wrong_file.write_text(wrong + "\n")
        wrong_file.chmod(0o600)
        right = ssh_host(sshd_fleet, server, known, password_env="TEST_LOGIN_PASSWORD")
        bad = ssh_host(sshd_fleet, server, known, password_file=str(wrong_file))
        for entry in (right, bad):
            entry.pop("identity_files")  # the server takes passwords only
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text(hosts_file_text({"pw": right, "badpw": bad}))
        audit = tmp_path / "audit.jsonl"
        env = {"TEST_LOGIN_PASSWORD": password, "HOME": str(tmp_path), "SSH_AUTH_SOCK": ""}
        common = ["-vv", "--hosts", str(hosts), "--json-log", str(audit)]
        good = run_cli(*common, "run", "pw", "--", "whoami", env=env)
        refused = run_cli(*common, "run", "badpw", "--", "whoami", env=env)
        listing = run_cli("tasks", "list", "--json", env=env)
    finally:
        subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)
    assert (good.returncode, good.stdout) == (0, f"{TEST_USER}\n"), good.stderr
    assert accepted + TEST_USER in server.log.read_text()
    assert refused.returncode == 125 and "authentication to " in refused.stderr
    records = {r["host"]: r for r in json.loads(listing.stdout)}
    assert (records["pw"]["status"], records["badpw"]["error_category"]) == ("succeeded", "auth")
    written = [good.stdout + good.stderr, refused.stdout + refused.stderr, listing.stdout, audit.read_text()]
    written += [p.read_bytes().decode("latin-1") for p in Path(os.environ["FLEETRUN_HOME"]).rglob("*") if p.is_file()]
    assert any("paramiko" in text for text in written), "debug logs were part of what was searched"
    for text in written:
        assert password not in text and wrong not in text


def test_secrets_in_the_hosts_file_are_refused_with_where_they_go():
    with pytest.raises(InventoryError) as error:
        parse_inventory("hosts:\n  web:\n    transport: ssh\n    password: hunter22\n", source="h.yaml", transports=TRANSPORTS)
    assert str(error.value).startswith("h.yaml:4: host 'web', field 'password': secrets do not belong in the hosts file")
    assert "hunter22" not in str(error.value)


def test_an_unreadable_or_shared_secret_file_fails_the_task_clearly(make_executor, tmp_path, sshd_fleet, shared_sshd):
    loose = tmp_path / "loose"
    loose.write_text("a-secret-value\n")
    loose.chmod(0o644)
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [shared_sshd])
    executor = make_executor(hosts_yaml=hosts_file_text({
        "loose": ssh_host(sshd_fleet, shared_sshd, known, password_file=str(loose)),
        "unset": ssh_host(sshd_fleet, shared_sshd, known, password_env="FLEETRUN_TEST_UNSET_VARIABLE"),
    }))
    loose_task = executor.run(TaskRequest(host="loose", command="true"))
    assert (loose_task.status, loose_task.error_category) == (TaskStatus.FAILED, "auth")
    assert "readable by others (mode 644); chmod 600 it" in loose_task.error
    unset = executor.run(TaskRequest(host="unset", command="true"))
    assert unset.error == "the password: environment variable FLEETRUN_TEST_UNSET_VARIABLE is not set"


# -- network rules ----------------------------------------------------------------------------


def test_network_rules_are_checked_on_the_resolved_addresses(make_executor, tmp_path, sshd_fleet, shared_sshd):
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [shared_sshd])
    before = shared_sshd.log.read_text().count("Connection from")
    executor = make_executor(hosts_yaml=hosts_file_text({
        "blocked-name": ssh_host(sshd_fleet, shared_sshd, known, hostname="localhost", blocked_networks=["127.0.0.0/8", "::1/128"]),
        "outside": ssh_host(sshd_fleet, shared_sshd, known, allowed_networks=["10.0.0.0/8"]),
        "inside": ssh_host(sshd_fleet, shared_sshd, known, allowed_networks=["127.0.0.0/8"], blocked_networks=["127.0.0.1/32"]),
    }))
    blocked = executor.run(TaskRequest(host="blocked-name", command="true"))
    assert (blocked.status, blocked.error_category) == (TaskStatus.FAILED, "network")
    assert "localhost resolves to 127.0.0.1 (in blocked_networks 127.0.0.0/8)" in blocked.error
    outside = executor.run(TaskRequest(host="outside", command="true"))
    assert outside.error_category == "network"
    assert f"{shared_sshd.address} (not in allowed_networks)" in outside.error
    assert shared_sshd.log.read_text().count("Connection from") == before  # refused before connecting
    inside = executor.run(TaskRequest(host="inside", command="true"))
    assert inside.status is TaskStatus.SUCCEEDED, inside.error


def test_through_a_jump_host_network_rules_apply_to_the_address_fleetrun_connects_to(make_executor, tmp_path, sshd_fleet):
    jump = sshd_fleet.start(address="127.0.0.3")
    target = sshd_fleet.start(address="127.0.0.4")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    hop = f"{sshd_fleet.user}@{jump.address}:{jump.port}"
    executor = make_executor(hosts_yaml=hosts_file_text({
        # The target's own address is the jump host's to reach: only the jump host's is checked here.
        "jump-allowed": ssh_host(sshd_fleet, target, known, jump_host=hop, allowed_networks=["127.0.0.3/32"]),
        "jump-blocked": ssh_host(sshd_fleet, target, known, jump_host=hop, blocked_networks=["127.0.0.3/32"]),
    }))
    assert executor.run(TaskRequest(host="jump-allowed", command="true")).status is TaskStatus.SUCCEEDED
    blocked = executor.run(TaskRequest(host="jump-blocked", command="true"))
    assert (blocked.status, blocked.error_category) == (TaskStatus.FAILED, "network")
    assert blocked.error == "127.0.0.3 resolves to 127.0.0.3 (in blocked_networks 127.0.0.3/32): the host's network rules refuse it"
    assert (jump.accepted_logins(), target.accepted_logins()) == (1, 1)
    jump.stop()
    target.stop()


def test_a_bad_network_is_a_hosts_file_error():
    with pytest.raises(InventoryError) as error:
        parse_inventory(
            "hosts:\n  web:\n    transport: ssh\n    blocked_networks: [10.0.0.0/8, 300.1.0.0/16]\n", source="h.yaml", transports=TRANSPORTS
        )
    assert str(error.value) == (
        "h.yaml:4: host 'web', field 'blocked_networks': '300.1.0.0/16' is not a network in CIDR notation "
        "(e.g. 10.0.0.0/8 or 2001:db8::/32)"
    )


# -- limits by host and tag ---------------------------------------------------------------------


def test_limits_come_from_defaults_then_tags_then_the_host_and_a_request_only_lowers_them(make_executor):
    hosts = """
defaults: {max_seconds: 100, max_output_bytes: 5000}
tags:
  slow: {max_seconds: 7000}
  strict: {max_seconds: 0.5, max_output_bytes: 1000}
hosts:
  both: {tags: [slow, strict]}
  slow-only: {tags: [slow]}
  own: {tags: [strict], max_seconds: 9, max_concurrent: 2}
  plain:
"""
    inventory = parse_inventory(hosts)
    limits = {name: (h.limits.max_seconds, h.limits.max_output_bytes, h.limits.max_concurrent) for name, h in inventory.hosts.items()}
    assert limits == {"both": (0.5, 1000, 8), "slow-only": (7000, 5000, 8), "own": (9, 1000, 2), "plain": (100, 5000, 8)}
    executor = make_executor(hosts_yaml=hosts)
    timed = executor.run(TaskRequest(host="both", command="sleep 5", timeout_s=60))
    assert (timed.status, timed.max_seconds) == (TaskStatus.TIMED_OUT, 0.5)
    lowered = executor.run(TaskRequest(host="slow-only", command="head -c 4000 /dev/zero", max_output_bytes=10))
    assert (lowered.max_output_bytes, lowered.stdout_truncated) == (10, True)


# -- input limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, command, env, message",
    [
        ("a" * 300, "true", {}, "invalid host name 'aaaa"),
        ("web\x1b[2J", "true", {}, "invalid host name"),
        ("../../etc", "true", {}, "invalid host name '../../etc'"),
        ("local\n", "true", {}, "invalid host name 'local\\n'"),
        (None, "true", {}, "invalid host name None"),
        ("local", "echo \x1b[31mred", {}, "control character U+001B at position 5"),
        ("local", "echo a\x00b", {}, "control character U+0000"),
        ("local", "ls \u202eevil", {}, "control character U+202E"),
        ("local", "echo done\r", {}, "control character U+000D"),
        ("local", "x" * (128 * 1024 + 1), {}, "the limit is 131072"),
        ("local", "   ", {}, "the command is empty"),
        ("local", "true", {"BAD NAME": "x"}, "invalid environment variable name 'BAD NAME'"),
        ("local", "true", {"OK": "a\x00b"}, "contains a NUL character"),
        # Bytes that are not UTF-8 (Python keeps them as lone surrogates) could be neither
        # recorded nor sent: before, such a task's records blocked the store for good.
        ("local", "echo caf\udce9", {}, "the command is not UTF-8: it has the byte 0xE9 at position 8"),
        ("local", "echo \ud800", {}, "the command has U+D800 at position 5, which is not a character"),
        ("local", "true", {"OK": "\udcff"}, "the value of environment variable 'OK' is not UTF-8: it has the byte 0xFF"),
    ],
)
def test_bad_requests_get_a_clear_error_and_run_nothing(make_executor, host, command, env, message):
    executor = make_executor()
    with pytest.raises(FleetrunError) as error:
        executor.submit(TaskRequest(host=host, command=command, env=env))
    assert message in str(error.value)
    assert len(str(error.value)) < 400
    assert executor.list() == []


@pytest.mark.parametrize(
    "options, message",
    [
        # Before: TypeErrors from inside the executor, or a task failed "in the local transport".
        ({"timeout_s": "5"}, "timeout_s must be a number of seconds, got '5'"),
        ({"timeout_s": True}, "timeout_s must be a number of seconds, got True"),
        ({"timeout_s": float("nan")}, "timeout_s must be greater than 0, got nan"),
        ({"max_output_bytes": 1.5}, "max_output_bytes must be a whole number of bytes, got 1.5"),
        ({"max_output_bytes": -1}, "max_output_bytes must be greater than 0, got -1"),
        ({"env": {"DB_PASSWORD": b"hunter2"}}, "env['DB_PASSWORD'] must be a string, got a bytes"),  # never its value
        ({"env": {5: "x"}}, "env must map variable names to strings, got the name 5"),
        ({"env": ["A=1"]}, "env must map variable names to strings, got a list"),
        ({"cwd": 7}, "cwd must be a string, got 7"),
        ({"cwd": "/tmp\x00x"}, "the working directory contains a NUL character"),
        ({"progress_pattern": b"(\\d+)%"}, "progress_pattern must be a string, got b'"),
        ({"origin": "ci\njob"}, "origin must be a short name (letters, digits, '.', '_', '-'; at most 32), got 'ci\\njob'"),
        ({"origin": 5}, "origin must be a short name"),
    ],
)
def test_a_request_with_an_option_of_the_wrong_type_is_refused_clearly(make_executor, options, message):
    executor = make_executor()
    with pytest.raises(FleetrunError) as error:
        executor.submit(TaskRequest(host="local", command="true", **options))
    assert str(error.value).startswith(message)
    assert "hunter2" not in str(error.value)
    assert executor.list() == []


def test_a_working_directory_that_is_not_utf8_is_refused(make_executor):
    executor = make_executor()
    with pytest.raises(FleetrunError, match="the working directory is not UTF-8: it has the byte 0xE9 at position 8"):
        executor.submit(TaskRequest(host="local", command="true", cwd="/tmp/caf\udce9"))
    assert executor.list() == []


@pytest.mark.parametrize("task_id", ["../../etc/passwd", "x" * 5000, "ABCDEF123456", "", "12345", "abcdef012345\n"])
def test_bad_task_ids_are_refused_without_echoing_them_whole(make_executor, task_id):
    executor = make_executor()
    with pytest.raises(UnknownTaskError) as error:
        executor.get(task_id)
    assert "invalid task id" in str(error.value) and len(str(error.value)) < 200
    with pytest.raises(UnknownTaskError):
        executor.read_output(task_id)


def test_the_cli_reports_bad_input_on_one_line():
    for args, code in [
        (["run", "bad host!", "--", "true"], 125),
        (["run", "local", "--", "echo \x1b[2J"], 125),
        (["run", "local", "--", "echo caf\udce9"], 125),  # the byte 0xE9 on the command line
        (["tasks", "show", "../../x"], 1),
        (["tasks", "output", "x" * 3000], 1),
    ]:
        result = run_cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("fleetrun: error: ")
        assert "Traceback" not in result.stderr
