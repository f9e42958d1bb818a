"""The ssh transport against real OpenSSH servers on 127.0.0.N (see tests/sshd.py)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from fleetrun.core.errors import InventoryError
from fleetrun.core.inventory import parse_inventory
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.policy import parse_policy
from fleetrun.core.processes import KILL_GRACE_SECONDS
from fleetrun.core.shell import reads_like_sh
from fleetrun.plugins.transports.ssh_channel import login_shell, remote_command, stop_script

from conftest import (
    assert_none_left, hosts_file_text, processes_running, processes_with, run_cli, run_leaving_a_writer_behind, ssh_host, stat_fields,
    stop_one_that_cleans_up, wait_until,
)

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (.ci/run installs it)")


@pytest.fixture
def ssh_executor(make_executor, sshd_fleet, shared_sshd, known_hosts):
    """An executor with host 'web' on the shared server."""
    return make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known_hosts)}))


# -- running commands --------------------------------------------------------------------


def test_exit_status_stdout_and_stderr_are_kept_apart(ssh_executor, recorder):
    task = ssh_executor.run(TaskRequest(host="web", command="echo out; echo err >&2; echo more; exit 3"))
    assert (task.status, task.exit_code, task.transport) == (TaskStatus.FAILED, 3, "ssh")
    assert ssh_executor.read_output(task.id, "stdout").data == b"out\nmore\n"
    assert ssh_executor.read_output(task.id, "stderr").data == b"err\n"
    assert (task.stdout_bytes, task.stderr_bytes) == (9, 4)
    names = recorder.names(task.id)
    assert names[0] == "task.created" and names[-1] == "task.completed"
    assert set(names[1:-1]) <= {"task.progress"}
    ok = ssh_executor.run(TaskRequest(host="web", command="true"))
    assert (ok.status, ok.exit_code) == (TaskStatus.SUCCEEDED, 0)


def test_large_output_arrives_byte_exact(ssh_executor, sshd_fleet):
    payload = os.urandom(24 << 20)
    source = sshd_fleet.directory / "payload.bin"
    source.write_bytes(payload)
    source.chmod(0o644)
    task = ssh_executor.run(TaskRequest(host="web", command=f"cat {source}; head -c 70000 {source} >&2"))
    assert task.status is TaskStatus.SUCCEEDED
    spooled = ssh_executor.read_output(task.id, "stdout", max_bytes=len(payload) + 1)
    assert spooled.data == payload and spooled.complete and not spooled.truncated
    assert ssh_executor.read_output(task.id, "stderr", max_bytes=1 << 20).data == payload[:70000]


def test_max_output_bytes_keeps_the_head_and_flags_truncation(ssh_executor):
    task = ssh_executor.run(TaskRequest(host="web", command="seq 1 200000", max_output_bytes=1000))
    assert task.status is TaskStatus.SUCCEEDED
    assert task.stdout_truncated and task.stdout_bytes == len("".join(f"{i}\n" for i in range(1, 200001)))
    kept = ssh_executor.read_output(task.id, "stdout", max_bytes=1 << 20)
    assert kept.data == "".join(f"{i}\n" for i in range(1, 400)).encode()[:1000]


def test_a_command_that_reads_its_input_gets_end_of_file_at_once(ssh_executor):
    # Before: the channel's stdin stayed open, so `apt-get install` without -y (or any
    # prompt) waited for an answer until the task's timeout.
    task = ssh_executor.run(
        TaskRequest(host="web", command='cat; read answer; echo "read exit $?, answer [$answer]"', timeout_s=20)
    )
    assert (task.status, task.exit_code) == (TaskStatus.SUCCEEDED, 0)
    assert ssh_executor.read_output(task.id).data == b"read exit 1, answer []\n"
    assert task.ended_at - task.started_at < 10


def test_env_and_cwd_reach_the_remote_shell(ssh_executor):
    task = ssh_executor.run(
        TaskRequest(host="web", command='pwd; printf "%s\\n" "$GREETING"', env={"GREETING": "it's a $test `x`"}, cwd="/tmp")
    )
    assert task.status is TaskStatus.SUCCEEDED
    assert ssh_executor.read_output(task.id).data == b"/tmp\nit's a $test `x`\n"
    missing = ssh_executor.run(TaskRequest(host="web", command="true", cwd="/no/such/dir"))
    assert (missing.status, missing.exit_code) == (TaskStatus.FAILED, 1)
    assert b"/no/such/dir" in ssh_executor.read_output(missing.id, "stderr").data


def test_any_environment_value_arrives_exactly_and_the_command_still_reads_end_of_file(ssh_executor):
    values = {
        "LINES_VALUE": "first\nsecond\n\n",
        "PRINTF_VALUE": "100% \\101 %s \\n",
        "UNICODE_VALUE": "température ✓",
        "EMPTY_VALUE": "",
        "QUOTES_VALUE": "'\"`$(id)`\"'",
    }
    shown = "; ".join(f'printf "%s|" "${name}"' for name in values)
    task = ssh_executor.run(TaskRequest(host="web", command=f"{shown}; cat; echo end", env=values))
    assert task.status is TaskStatus.SUCCEEDED
    assert ssh_executor.read_output(task.id).data == ("".join(f"{v}|" for v in values.values()) + "end\n").encode()


def test_environment_values_are_not_on_the_remote_command_line(ssh_executor, marker):
    # The exec request becomes the remote shell's argument, which `ps` shows to every
    # user of the host: values travel on the channel's stdin instead.
    token = f"token-{marker.replace('.', '')}"
    handle = ssh_executor.submit(TaskRequest(host="web", command=f"sleep {marker}", env={"API_TOKEN": token}))
    wait_until(lambda: processes_running("sleep", marker))
    assert processes_with(token) == []
    (sleeper,) = processes_running("sleep", marker)
    assert f"API_TOKEN={token}".encode() in Path(f"/proc/{sleeper}/environ").read_bytes().split(b"\0")
    handle.cancel()
    assert handle.wait().status is TaskStatus.CANCELLED
    assert_none_left(marker)


def test_a_command_killed_by_a_signal_exits_128_plus_n(ssh_executor):
    task = ssh_executor.run(TaskRequest(host="web", command="kill -KILL $$"))
    assert (task.status, task.exit_code) == (TaskStatus.FAILED, 137)


def test_progress_markers_are_seen_remotely(ssh_executor, recorder):
    task = ssh_executor.run(TaskRequest(host="web", command="echo 'progress: 40%'; sleep 0.3; echo 'progress: 90%'; sleep 0.3"))
    percents = [e.progress.percent for e in recorder.events if e.task.id == task.id and e.event == "task.progress"]
    assert 40.0 in percents and 90.0 in percents


# -- login shells ----------------------------------------------------------------------------

#: Login shells to try: zsh reads commands itself (it is of the sh family); the others do not.
_LOGIN_SHELLS = ["csh", "fish", "tcsh", "zsh"]


READ_LOGS = parse_policy("rules:\n  - allow: cat /var/log/*\n", source="logs.yaml")


def _why_no_user_with(shell: str) -> str:
    if os.geteuid() != 0:
        return f"making a user whose login shell is {shell} needs root (CI runs as root)"
    return f"{shell} is not installed (.ci/run installs fish, tcsh, csh and zsh)"


@pytest.fixture
def shell_host(make_executor, sshd_fleet, shared_sshd, known_hosts):
    """An executor with host 'box' on the shared server, logging in as a user whose login
    shell is the one named."""
    from sshd import user_with_login_shell

    def make(shell: str):  # type: ignore[no-untyped-def]
        user = user_with_login_shell(shell)
        if user is None:
            pytest.skip(_why_no_user_with(shell))
        sshd_fleet.authorize(user, sshd_fleet.client_key)
        return make_executor(hosts_yaml=hosts_file_text({"box": ssh_host(sshd_fleet, shared_sshd, known_hosts, user=user)}))

    return make


@pytest.mark.parametrize("shell", _LOGIN_SHELLS)
def test_a_command_is_posix_shell_whatever_the_login_shell(shell_host, shell):
    # fish, csh and tcsh cannot read the POSIX preamble: before, fish reported success for
    # a command that never ran, and csh ran it without its environment or its watchdog.
    executor = shell_host(shell)
    command = 'greeting=hello; if [ -n "$greeting" ]; then echo "$greeting from $(basename "$SHELL")"; fi\necho \'two words\'\nexit 3'
    task = executor.run(TaskRequest(host="box", command=command))
    assert (task.status, task.exit_code) == (TaskStatus.FAILED, 3)
    assert executor.read_output(task.id).data == f"hello from {shell}\ntwo words\n".encode()
    assert executor.read_output(task.id, "stderr").data == b""

    # The command means what the policy read: fish would make `..` of this, sh does not.
    escaped = executor.run(TaskRequest(host="box", command="printf '%s\\n' /var/log/\\x2e\\x2e/etc"))
    assert executor.read_output(escaped.id).data == b"/var/log/x2ex2e/etc\n"
    assert READ_LOGS.decide(executor.inventory.get("box"), "cat /var/log/\\x2e\\x2e/etc").reason == (
        "'cat /var/log/x2ex2e/etc' is allowed"
    )

    value = "it's a $test `x` \\n %s!\nsecond line"
    placed = executor.run(TaskRequest(host="box", command="pwd; printenv GREETING", env={"GREETING": value}, cwd="/tmp"))
    assert placed.status is TaskStatus.SUCCEEDED
    assert executor.read_output(placed.id).data == f"/tmp\n{value}\n".encode()
    missing = executor.run(TaskRequest(host="box", command="pwd", cwd="/no/such/dir"))
    assert (missing.status, missing.exit_code) == (TaskStatus.FAILED, 1)


@pytest.mark.parametrize("shell", _LOGIN_SHELLS)
def test_cancel_stops_the_remote_command_whatever_the_login_shell(shell_host, shell, marker):
    executor = shell_host(shell)
    handle = executor.submit(TaskRequest(host="box", command=f"sleep {marker}"))
    wait_until(lambda: processes_running("sleep", marker))
    handle.cancel("test cancel")
    assert handle.wait(20).status is TaskStatus.CANCELLED
    assert_none_left(marker)


@pytest.mark.parametrize("environment", [{}, {"LARGE": "x" * (4 << 20)}], ids=["small input", "input beyond the window"])
def test_a_login_shell_that_runs_nothing_fails_the_task_instead_of_faking_an_exit_status(shell_host, environment):
    # The variables go over the channel's input. One larger than the server's window is
    # still being sent when nologin has exited: that is the same failure, not a lost connection.
    executor = shell_host("nologin")
    task = executor.run(TaskRequest(host="box", command="echo never", env=environment))
    assert (task.status, task.exit_code, task.error_category) == (TaskStatus.FAILED, None, "spawn")
    assert task.error is not None and task.error.endswith(
        "did not run the command: the user's login shell (unknown) did not start it, as a shell that runs "
        "nothing (nologin), a restricted one (rbash) or the server's ForceCommand would not (exit status 1; its output may say why)"
    )
    assert executor.read_output(task.id).data == b"This account is currently not available.\n"


def test_a_server_that_forces_its_own_command_fails_the_task_instead_of_faking_an_exit_status(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start(extra_config="ForceCommand /bin/echo only this")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known)}))
    task = executor.run(TaskRequest(host="web", command="true"))
    assert (task.status, task.exit_code, task.error_category) == (TaskStatus.FAILED, None, "spawn")
    assert "or the server's ForceCommand would not (exit status 0;" in (task.error or "")
    assert executor.read_output(task.id).data == b"only this\n"
    server.stop()


def test_to_a_shell_that_is_not_posix_the_exec_request_carries_nothing_of_the_task():
    # What sshd runs is visible in `ps`, and the one line must read alike in every shell.
    request, given = remote_command("uptime 'it''s' \\ !x", {"API_TOKEN": "t0ken"}, "/srv/app", posix_login_shell=False)
    assert request.startswith("exec /bin/sh -c '") and request.count("'") == 2
    assert not {"\\", "!", "\n"} & set(request)
    assert not any(text in request for text in ("uptime", "t0ken", "/srv/app"))
    assert b"t0ken" in given and b"/srv/app" not in given  # the cwd is escaped like the rest


def test_the_login_shell_is_found_after_what_start_up_files_print():
    assert login_shell(b"Welcome!\nfleetrun-shell not this one\nfleetrun-shell /usr/bin/fish\n") == "/usr/bin/fish"
    assert login_shell(b"nu: variable not found: SHELL\n") is None
    assert login_shell(b"fleetrun-shell \n") is None
    assert [reads_like_sh(s) for s in ("/bin/bash", "/usr/bin/zsh", "/bin/sh", "/usr/bin/fish", "/bin/tcsh", None)] == [
        True, True, True, False, False, False,
    ]


# -- connection failures -------------------------------------------------------------------


def test_a_key_the_server_does_not_accept_is_an_auth_failure(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path):
    from sshd import generate_key

    stranger = generate_key(tmp_path / "stranger_key")
    entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=[str(stranger)])
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "auth")
    assert f"{sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}" in task.error
    private = stranger.read_text()
    assert not any(line in task.error for line in private.splitlines()[1:-1])


@pytest.fixture
def ssh_agent(tmp_path, monkeypatch):
    """A real ssh-agent of the test's own, as $SSH_AUTH_SOCK, in a home without keys; call it
    with a key file to add the key."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.ssh/id_*: only the agent and the hosts file offer keys
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(socket_path.exists)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))

        def add(key: Path) -> None:
            subprocess.run(["ssh-add", str(key)], check=True, capture_output=True)

        yield add
    finally:
        agent.terminate()
        agent.wait()


def _encrypted_copy(key: Path, path: Path) -> Path:
    """The same private key in a file of its own, encrypted with a passphrase."""
    path.write_bytes(key.read_bytes())
    path.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "a passphrase", "-f", str(path)], check=True, capture_output=True)
    return path


def test_keys_in_ssh_agent_log_in_and_identity_files_limit_them_to_their_own(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, ssh_agent):
    from sshd import generate_key

    ssh_agent(sshd_fleet.client_key)
    encrypted = _encrypted_copy(sshd_fleet.client_key, tmp_path / "encrypted_key")
    public_only = tmp_path / "public_only.pub"
    public_only.write_text(Path(f"{sshd_fleet.client_key}.pub").read_text())
    stranger = generate_key(tmp_path / "stranger_key")
    hosts = {
        # No identity_files: the agent's keys are offered.
        "by-agent": ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=None),
        # An encrypted file and no passphrase: its key, unlocked in the agent, is used.
        "encrypted": ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=[str(encrypted)]),
        # Only the public half on disk, the private half in the agent (as ssh's IdentityFile allows).
        "public-only": ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=[str(public_only)]),
        # identity_files names another key: the agent's key is not offered, though the
        # server would take it (OpenSSH's IdentitiesOnly). Before, it logged in with it.
        "other-key": ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=[str(stranger)]),
    }
    hosts["by-agent"].pop("identity_files")
    executor = make_executor(hosts_yaml=hosts_file_text(hosts))
    for name in ("by-agent", "encrypted", "public-only"):
        task = executor.run(TaskRequest(host=name, command="whoami"))
        assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error
    refused = executor.run(TaskRequest(host="other-key", command="whoami"))
    assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "auth")
    assert f"tried: {stranger}" in refused.error

    # IdentitiesOnly in ssh_config limits the agent the same way.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host pinned\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {stranger}\n  IdentitiesOnly yes\n"
        f"Host unpinned\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {stranger}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    executor = make_executor(hosts_yaml=hosts_file_text({"pinned": entry, "unpinned": entry}))
    assert executor.run(TaskRequest(host="pinned", command="true")).error_category == "auth"
    assert executor.run(TaskRequest(host="unpinned", command="true")).status is TaskStatus.SUCCEEDED


def test_each_certificate_file_is_offered_until_one_is_accepted_as_in_ssh(make_executor, sshd_fleet, tmp_path, user_authority, monkeypatch):
    # Two environments' authorities, say: the server trusts the second one only.
    from sshd import generate_key

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    staging_key, production_key = generate_key(tmp_path / "id_staging"), generate_key(tmp_path / "id_production")
    staging_authority = generate_key(tmp_path / "staging_ca")
    subprocess.run(["ssh-keygen", "-q", "-s", str(staging_authority), "-I", "staging", "-n", sshd_fleet.user, f"{staging_key}.pub"], check=True)
    staging = Path(f"{staging_key}-cert.pub").rename(tmp_path / "staging-cert.pub")  # not beside the key, where paramiko looks
    production = user_authority.sign(production_key, "production").rename(tmp_path / "production-cert.pub")
    server = user_authority.server
    config = tmp_path / "ssh_config"
    certificates = f"  CertificateFile {staging}\n  CertificateFile {production}\n"
    config.write_text(
        f"Host *\n  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {user_authority.known_hosts}\n  IdentityFile {staging_key}\n"
        f"Host both\n  IdentityFile {production_key}\n{certificates}Host staging-only\n  CertificateFile {staging}\n"
    )
    via_config = {"transport": "ssh", "ssh_config_file": str(config)}
    executor = make_executor(hosts_yaml=hosts_file_text({"both": via_config, "staging-only": via_config}))
    # Before: only the first certificate was offered, and refused.
    task = executor.run(TaskRequest(host="both", command="true"))
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)
    assert 'Accepted certificate ID "production"' in server.log.read_text()
    by_ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "both", "true"], capture_output=True, text=True, timeout=30)
    assert by_ssh.returncode == 0, by_ssh.stderr
    refused = executor.run(TaskRequest(host="staging-only", command="true"))
    assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "auth")
    assert f"(tried: {staging} (certificate), {staging_key}): " in refused.error, refused.error


@pytest.mark.parametrize("key_type", ["ed25519", "rsa"])
def test_a_certificate_held_by_ssh_agent_logs_in(make_executor, sshd_fleet, tmp_path, ssh_agent, user_authority, key_type):
    # As `step ssh login` and `tsh login` leave it: the key and its certificate in the agent only.
    from sshd import generate_key

    key = generate_key(tmp_path / "id_user", key_type)
    certificate = user_authority.sign(key, "agent-held")
    ssh_agent(key)  # adds KEY-cert.pub beside it too
    key.unlink()
    certificate.unlink()
    server, known = user_authority.server, user_authority.known_hosts
    agent_only = ssh_host(sshd_fleet, server, known)
    del agent_only["identity_files"]
    executor = make_executor(hosts_yaml=hosts_file_text({
        "web": agent_only,
        "only-its-key": ssh_host(sshd_fleet, server, known, identity_files=[f"{key}.pub"]),
    }))
    # Before, for RSA: paramiko named the certificate's algorithm and sent the bare key ("key type mismatch").
    task = executor.run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)
    assert 'Accepted certificate ID "agent-held"' in server.log.read_text()
    # Under IdentitiesOnly the key's file does not bring its certificate from the agent, as with
    # `ssh -o IdentitiesOnly=yes -i KEY.pub`: its certificate is not that key.
    refused = executor.run(TaskRequest(host="only-its-key", command="true"))
    assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "auth")


@pytest.mark.parametrize("key_type", ["ed25519", "rsa"])
def test_a_certificate_file_goes_with_the_key_ssh_agent_holds(make_executor, sshd_fleet, tmp_path, ssh_agent, user_authority, key_type):
    # A key kept in an agent (1Password's, say) and its certificate in a file, as Vault's signer leaves it.
    from sshd import generate_key

    key = generate_key(tmp_path / "id_user", key_type)
    certificate = user_authority.sign(key, "filed").rename(tmp_path / "signed-cert.pub")
    ssh_agent(key)  # the bare key only
    key.unlink()
    server = user_authority.server
    entry = ssh_host(sshd_fleet, server, user_authority.known_hosts, identity_files=[f"{key}.pub"], certificate_files=[str(certificate)])
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)
    assert 'Accepted certificate ID "filed"' in server.log.read_text()


def test_the_agent_named_by_identityagent_in_ssh_config_is_used(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, ssh_agent, monkeypatch):
    # As 1Password's or Secretive's agent is set up; before, only $SSH_AUTH_SOCK's agent was asked.
    ssh_agent(sshd_fleet.client_key)
    agent_socket = os.environ["SSH_AUTH_SOCK"]
    monkeypatch.delenv("SSH_AUTH_SOCK")
    monkeypatch.setenv("AGENT_DIR", str(Path(agent_socket).parent))
    monkeypatch.setenv("MY_AGENT", agent_socket)
    config = tmp_path / "ssh_config"
    where = f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
    config.write_text(
        f"Host by-path\n{where}  IdentityAgent {agent_socket}\n"
        f"Host by-variable\n{where}  IdentityAgent ${{AGENT_DIR}}/{Path(agent_socket).name}\n"
        f"Host by-older-form\n{where}  IdentityAgent $MY_AGENT\n"
        f"Host turned-off\n{where}  IdentityAgent none\n"
        f"Host nobody-there\n{where}  IdentityAgent {tmp_path / 'no-agent.sock'}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    executor = make_executor(hosts_yaml=hosts_file_text({name: entry for name in ("by-path", "by-variable", "by-older-form", "turned-off", "nobody-there")}))
    for name in ("by-path", "by-variable", "by-older-form"):
        task = executor.run(TaskRequest(host=name, command="whoami"))
        assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error
    for name, agent in (("turned-off", "no ssh-agent (IdentityAgent none)"), ("nobody-there", f"no ssh-agent answering at {tmp_path / 'no-agent.sock'}")):
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.status, task.error_category) == (TaskStatus.FAILED, "auth")
        assert task.error.endswith(
            f"there was no key or password to offer (no identity_files, none in ~/.ssh/config or ~/.ssh/id_*, {agent}; "
            "no password_env or password_file)"
        ), task.error
    monkeypatch.setenv("SSH_AUTH_SOCK", agent_socket)  # IdentityAgent none wins over it, as in ssh
    assert executor.run(TaskRequest(host="turned-off", command="true")).error_category == "auth"


@pytest.fixture
def user_authority(sshd_fleet, tmp_path):
    """A user-certificate authority of the test's own, and a server that lets in only the
    keys it signs (``AuthorizedKeysFile none``), listed in tmp_path/known_hosts."""
    from sshd import generate_key

    authority = generate_key(tmp_path / "user_ca")
    Path(f"{authority}.pub").chmod(0o644)
    server = sshd_fleet.start(extra_config=f"TrustedUserCAKeys {authority}.pub\nAuthorizedKeysFile none")

    def sign(key: Path, key_id: str) -> Path:
        """Sign the key's public half for the login user: KEY-cert.pub, as ssh-keygen writes it."""
        subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-I", key_id, "-n", sshd_fleet.user, f"{key}.pub"], check=True)
        return Path(f"{key}-cert.pub")

    yield SimpleNamespace(server=server, known_hosts=sshd_fleet.known_hosts(tmp_path / "known_hosts", [server]), sign=sign)
    server.stop()


def test_a_user_certificate_beside_the_identity_file_logs_in_where_only_its_authority_is_trusted(make_executor, sshd_fleet, tmp_path, user_authority):
    from sshd import generate_key

    user_key = generate_key(tmp_path / "user_key")
    user_authority.sign(user_key, "fleetrun-test-cert")  # KEY-cert.pub, where ssh finds it
    server = user_authority.server
    entry = ssh_host(sshd_fleet, server, user_authority.known_hosts, identity_files=[str(user_key)])
    executor = make_executor(hosts_yaml=hosts_file_text({"certified": entry}))
    task = executor.run(TaskRequest(host="certified", command="whoami"))
    assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error
    assert "ID fleetrun-test-cert" in server.log.read_text()


def test_a_certificate_file_logs_in_with_the_identity_file_whose_key_it_certifies(make_executor, sshd_fleet, tmp_path, monkeypatch, user_authority):
    from sshd import generate_key

    plain = generate_key(tmp_path / "id_plain")
    locked = tmp_path / "id_locked"  # encrypted: its passphrase comes from passphrase_env
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "pass-phrase", "-f", str(locked)], check=True)
    signed = tmp_path / "vault"
    signed.mkdir()
    for key, name in ((plain, "plain-cert.pub"), (locked, "locked-cert.pub")):
        user_authority.sign(key, name).rename(signed / name)  # as Vault or a CA's tooling leave it, not beside the key
    server, known = user_authority.server, user_authority.known_hosts
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host *\n  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n  UserKnownHostsFile {known}\n"
        "  IdentitiesOnly yes\nHost missing\n  CertificateFile ${CERTS}/no-such-cert.pub\n"
        f"Host *\n  IdentityFile {plain}\n  CertificateFile ${{CERTS}}/plain-cert.pub\n"
    )
    monkeypatch.setenv("CERTS", str(signed))
    monkeypatch.setenv("LOCKED_PASSPHRASE", "pass-phrase")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    via_config = {"transport": "ssh", "ssh_config_file": str(config)}
    own = {**via_config, "identity_files": [str(plain), str(locked)], "passphrase_env": "LOCKED_PASSPHRASE"}
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({
        "web": via_config,
        "missing": via_config,
        "locked": {**own, "certificate_files": [str(signed / "locked-cert.pub")]},
        "gone": {**own, "certificate_files": [str(signed / "gone-cert.pub")]},
        "stranger": {**via_config, "identity_files": [str(plain)], "certificate_files": [str(signed / "locked-cert.pub")]},
        "not-one": {**own, "certificate_files": [f"{plain}.pub"]},
        "public-only": ssh_host(sshd_fleet, server, known, identity_files=[f"{plain}.pub"], certificate_files=[str(signed / "plain-cert.pub")]),
        "no-passphrase": {**via_config, "identity_files": [str(locked)], "certificate_files": [str(signed / "locked-cert.pub")]},
        "wrong-passphrase": {**own, "certificate_files": [str(signed / "locked-cert.pub")], "passphrase_env": "WRONG_PASSPHRASE"},
    }))
    monkeypatch.setenv("WRONG_PASSPHRASE", "not-the-pass-phrase")
    executor = make_executor(hosts_yaml=hosts.read_text())
    dry = run_cli("--hosts", str(hosts), "run", "locked", "--dry-run", "--", "true", env={"FLEETRUN_HOME": str(tmp_path / "home")})
    assert f"; certificate_files: {signed / 'locked-cert.pub'}; " in dry.stdout, dry.stdout
    # Before: "authentication ... failed": paramiko sends only KEY-cert.pub.
    for name, certificate in (("web", "plain-cert.pub"), ("locked", "locked-cert.pub")):
        task = executor.run(TaskRequest(host=name, command="whoami"))
        assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error
        assert f"ID {certificate}" in server.log.read_text()
    # A CertificateFile of ssh_config that does not exist is skipped and the next one used, as in ssh
    # (paramiko kept only the first that applies).
    missing = executor.run(TaskRequest(host="missing", command="true"))
    assert (missing.status, missing.error) == (TaskStatus.SUCCEEDED, None)
    for name in ("web", "missing"):
        by_ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", name, "true"], capture_output=True, text=True, timeout=30)
        assert by_ssh.returncode == 0, by_ssh.stderr

    where = f"{sshd_fleet.user}@{server.address}:{server.port}"
    for name, problem in [
        ("gone", f"certificate file {signed / 'gone-cert.pub'} does not exist"),
        ("stranger", f"certificate file {signed / 'locked-cert.pub'} certifies a key that none of the identity files holds ({plain})"),
        ("not-one", f"certificate file {plain}.pub is not an OpenSSH certificate (not a certificate type fleetrun can check: 'ssh-ed25519')"),
        ("public-only", f"certificate file {signed / 'plain-cert.pub'} certifies the key of {plain}.pub, which is a public key, "
         "and ssh-agent does not hold its private key"),
        # Before: "TypeError: Key is password-protected...", and paramiko's "no BEGIN/END delimiters" for a wrong one.
        ("no-passphrase", f"certificate file {signed / 'locked-cert.pub'} certifies the key of {locked}, which is encrypted, "
         "and no passphrase was given"),
        ("wrong-passphrase", f"certificate file {signed / 'locked-cert.pub'} certifies the key of {locked}, which the passphrase "
         "given does not decrypt"),
    ]:
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.status, task.error_category, task.error) == (TaskStatus.FAILED, "auth", f"cannot log in to {where}: {problem}")


def test_an_identityfile_of_ssh_config_takes_the_place_of_the_default_keys_as_in_ssh(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, ssh_agent):
    from sshd import generate_key

    default_key = tmp_path / "home" / ".ssh" / "id_ed25519"  # authorized on the server
    default_key.parent.mkdir()
    default_key.write_bytes(sshd_fleet.client_key.read_bytes())
    default_key.chmod(0o600)
    stranger = generate_key(tmp_path / "stranger_key")
    ssh_agent(generate_key(tmp_path / "agent_key"))  # not authorized either
    config = tmp_path / "ssh_config"
    config.write_text(f"Host named\n  HostName {shared_sshd.address}\n  IdentityFile {stranger}\nHost *\n  User {sshd_fleet.user}\n")
    via_config = {"transport": "ssh", "hostname": shared_sshd.address, "port": shared_sshd.port, "known_hosts": str(known_hosts)}
    executor = make_executor(hosts_yaml=hosts_file_text({
        "named": {**via_config, "hostname": "named", "ssh_config_file": str(config)},
        "unnamed": {**via_config, "ssh_config_file": str(config)},
    }))
    assert executor.run(TaskRequest(host="unnamed", command="true")).status is TaskStatus.SUCCEEDED  # ~/.ssh/id_ed25519
    # Before: logged in with ~/.ssh/id_ed25519 too, which ssh does not offer where an IdentityFile is written.
    task = executor.run(TaskRequest(host="named", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "auth")
    assert task.error == (
        f"authentication to {sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port} failed "
        f"(tried: {stranger}, 1 key of ssh-agent): Authentication failed."
    )


def test_nothing_to_offer_is_an_auth_failure_that_says_so(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    entry = ssh_host(sshd_fleet, shared_sshd, known_hosts)
    entry.pop("identity_files")
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "auth")
    # Before: "unreachable: SSH negotiation ... failed: No authentication methods available".
    assert task.error.endswith(
        "failed: there was no key or password to offer (no identity_files, none in ~/.ssh/id_*, "
        "no ssh-agent (SSH_AUTH_SOCK is not set); no password_env or password_file)"
    ), task.error


def test_a_server_that_ends_the_login_is_named_with_its_reason_as_ssh_names_it(make_executor, sshd_fleet, tmp_path):
    from sshd import generate_key

    server = sshd_fleet.start("MaxAuthTries 1")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    stranger = generate_key(tmp_path / "stranger_key")
    keys = [str(stranger), str(sshd_fleet.client_key)]
    task = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known, identity_files=keys)})).run(
        TaskRequest(host="web", command="true")
    )
    where = f"{sshd_fleet.user}@{server.address}:{server.port}"
    # Before: "timeout": "connecting ... timed out after 5 s: the SSH handshake did not finish",
    # in a fraction of a second (paramiko's "No existing session", from the second key).
    assert (task.status, task.error_category, task.error) == (
        TaskStatus.FAILED, "auth",
        f'authentication to {where} failed (tried: {", ".join(keys)}): the server ended the connection: "Too many authentication failures"',
    )
    ssh = subprocess.run(
        ["ssh", "-F", "none", "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-i", keys[0], "-i", keys[1],
         "-p", str(server.port), f"{sshd_fleet.user}@{server.address}", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert ssh.returncode == 255
    assert f"Received disconnect from {server.address} port {server.port}:2: Too many authentication failures" in ssh.stderr


class Relay:
    """A relay to ``server`` on a port of its own. ``delay``: each connection waits that
    long before it is relayed (a slow network). ``cut_at_login``: the first connection is
    closed where the login starts, at the client's first bytes after its key exchange
    (after its NEWKEYS packet); later ones are relayed whole."""

    def __init__(self, server, *, delay: float = 0.0, cut_at_login: bool = False) -> None:
        self.server = server
        self.delay = delay
        self.listener = socket.create_server((server.address, 0))
        self.port = self.listener.getsockname()[1]
        self.cut_at_login = cut_at_login
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def known_hosts(self, path: Path) -> Path:
        """A known_hosts file listing the server's key for the relay's address."""
        path.write_text(self.server.known_hosts_line.replace(f":{self.server.port} ", f":{self.port} "))
        return path

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                self.connections += 1
                first = self.connections == 1
                threading.Thread(target=self._start, args=(client, self.cut_at_login and first), daemon=True).start()

    def _start(self, client: socket.socket, cut_at_login: bool) -> None:
        time.sleep(self.delay)
        upstream = socket.create_connection((self.server.address, self.server.port))
        threading.Thread(target=self._relay, args=(upstream, client), daemon=True).start()
        self._relay(client, upstream, cut_at_login)

    @staticmethod
    def _end_of_newkeys(stream: bytes) -> int | None:
        """Where the client's NEWKEYS packet ends in what it sent (unencrypted until then)."""
        at = stream.find(b"\n") + 1  # after the version line
        while at and len(stream) >= at + 6:
            end = at + 4 + int.from_bytes(stream[at:at + 4], "big")
            if stream[at + 5] == 21:  # SSH_MSG_NEWKEYS
                return end if len(stream) >= end else None
            at = end
        return None

    def _relay(self, source: socket.socket, target: socket.socket, cut_at_login: bool = False) -> None:
        sent = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not cut_at_login:
                    target.sendall(data)
                    continue
                newkeys_end = self._end_of_newkeys(sent + data)
                if newkeys_end is None:
                    target.sendall(data)
                    sent += data
                elif newkeys_end > len(sent):  # NEWKEYS ends in this piece: send up to its end
                    target.sendall(data[: newkeys_end - len(sent)])
                    if newkeys_end < len(sent) + len(data):
                        break  # the login's first packet came with it
                    sent += data
                else:
                    break  # the login's first packet
        for each in (source, target):
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()

    def close(self) -> None:
        self.listener.close()


def test_a_connection_closed_during_the_login_is_a_disconnection_and_the_next_task_reconnects(make_executor, sshd_fleet, shared_sshd, tmp_path):
    relay = Relay(shared_sshd, cut_at_login=True)
    known = relay.known_hosts(tmp_path / "known_hosts")
    try:
        entry = ssh_host(sshd_fleet, shared_sshd, known, port=relay.port)
        executor = make_executor(hosts_yaml=hosts_file_text({"web": entry}))
        task = executor.run(TaskRequest(host="web", command="true"))
        again = executor.run(TaskRequest(host="web", command="echo again"))
    finally:
        relay.close()
    where = f"{sshd_fleet.user}@{shared_sshd.address}:{relay.port}"
    # Before: "auth": "authentication ... failed (...): Authentication failed: transport shut down or saw EOF".
    assert (task.status, task.error_category, task.error) == (
        TaskStatus.FAILED, "disconnected",
        f"the connection to {where} was closed during the login, without a reason (tried: {sshd_fleet.client_key})",
    )
    assert relay.connections == 2  # the one cut, and the next task's
    assert again.status is TaskStatus.SUCCEEDED and executor.read_output(again.id).data == b"again\n"


def test_a_connection_still_being_opened_when_the_executor_closes_is_closed_when_it_opens(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start()
    relay = Relay(server, delay=0.5)
    try:
        entry = ssh_host(sshd_fleet, server, relay.known_hosts(tmp_path / "known_hosts"), port=relay.port)
        executor = make_executor(hosts_yaml=hosts_file_text({"web": entry}))
        handle = executor.submit(TaskRequest(host="web", command="true"))
        wait_until(lambda: relay.connections == 1)
        executor.close()  # at once: a connect is not waited for
        assert handle.wait(0).status is TaskStatus.CANCELLED
        wait_until(lambda: server.accepted_logins() == 1)  # the connect went on, and logged in
        # Before: it stayed open, held by nobody, for as long as the process lived (a
        # reconfigured `fleetrun serve`, say): its sshd session too.
        wait_until(lambda: not server.session_pids(), timeout=5)
    finally:
        relay.close()
        server.stop()


def test_an_identity_file_that_cannot_be_used_is_refused_saying_why(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    shared = tmp_path / "shared_key"
    shared.write_bytes(sshd_fleet.client_key.read_bytes())
    shared.chmod(0o644)
    cases = {
        # Before: "unreachable: cannot connect to ...: No such file or directory".
        "~/no_such_key": "identity file ~/no_such_key does not exist",
        "$HOME/no_such_key": "identity file $HOME/no_such_key does not exist (environment variables are not expanded in it; write ~ for the home directory)",
        str(tmp_path): f"identity file {tmp_path} is not a file",
        # Before: offered and taken, where ssh refuses a private key that others may read.
        str(shared): f"identity file {shared} is readable by others (mode 644); chmod 600 it, as ssh requires",
    }
    hosts = {f"h{i}": ssh_host(sshd_fleet, shared_sshd, known_hosts, identity_files=[path]) for i, path in enumerate(cases)}
    executor = make_executor(hosts_yaml=hosts_file_text(hosts))
    where = f"{sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}"
    for name, expected in zip(hosts, cases.values()):
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.status, task.error_category, task.error) == (TaskStatus.FAILED, "auth", f"cannot log in to {where}: {expected}")

    # An IdentityFile of ssh_config that does not exist is skipped, as ssh skips it.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host web\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile ~/gone_key\n  IdentityFile ~fleetrun-no-such-user/key\n  IdentityFile {sshd_fleet.client_key}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert task.status is TaskStatus.SUCCEEDED, task.error


def test_a_path_in_the_home_of_a_user_this_machine_lacks_fails_the_task_of_a_host_built_in_python(make_executor):
    # The hosts file refuses such a path when read; a Host made in Python is not read
    # through it, and pathlib's bare RuntimeError failed the task as an internal error.
    from fleetrun import Host, Inventory

    user = "fleetrun-no-such-user"
    fields = {"identity_files": [f"~{user}/key"], "known_hosts": f"~{user}/known_hosts", "ssh_config_file": f"~{user}/cfg"}
    hosts = {name: Host(name, transport="ssh", options={"hostname": "127.0.0.1", "port": 1, name: value}) for name, value in fields.items()}
    executor = make_executor(inventory=Inventory(hosts=hosts))
    for name, value in fields.items():
        path = value[0] if isinstance(value, list) else value
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.status, task.error_category, task.error) == (
            TaskStatus.FAILED, "config", f"{path!r} starts with the home directory of user {user!r}, who does not exist on this machine"
        )


def test_nothing_listening_is_unreachable(make_executor, sshd_fleet, shared_sshd, known_hosts):
    from sshd import free_port

    entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, port=free_port(shared_sshd.address))
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "unreachable")
    assert "refused" in task.error.lower()


def test_a_server_that_never_greets_times_out(make_executor, sshd_fleet, shared_sshd, known_hosts):
    silent = socket.socket()
    silent.bind((shared_sshd.address, 0))
    silent.listen(8)
    try:
        entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, port=silent.getsockname()[1], connect_timeout=0.5)
        started = time.monotonic()
        task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    finally:
        silent.close()
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "timeout")
    assert "0.5 s" in task.error
    assert time.monotonic() - started < 5


def test_a_server_that_greets_then_says_no_more_times_out(make_executor, sshd_fleet, shared_sshd, known_hosts):
    import threading

    listener = socket.socket()
    listener.bind((shared_sshd.address, 0))
    listener.listen(8)
    held = []

    def greet_only() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted, _ = listener.accept()
                accepted.sendall(b"SSH-2.0-GreetsOnly\r\n")
                held.append(accepted)

    threading.Thread(target=greet_only, daemon=True).start()
    try:
        entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, port=listener.getsockname()[1], connect_timeout=0.5)
        task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    finally:
        listener.close()
        for each in held:
            each.close()
    where = f"{sshd_fleet.user}@{shared_sshd.address}:{entry['port']}"
    # Before: after 15 s, "unreachable" (EOFError): Fabric's int() made 0.5 s no handshake
    # limit at all. With 1 s: "unreachable", "SSH negotiation ... failed: No existing session".
    assert (task.status, task.error_category, task.error) == (
        TaskStatus.FAILED, "timeout", f"connecting to {where} timed out after 0.5 s: the SSH handshake did not finish"
    )


def test_connect_timeout_and_keepalives_come_from_ssh_config_when_the_host_sets_none(
    make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, marker
):
    silent = socket.socket()
    silent.bind((shared_sshd.address, 0))
    silent.listen(8)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host silent\n  HostName {shared_sshd.address}\n  Port {silent.getsockname()[1]}\n  ConnectTimeout 1\n"
        "Host *\n  ServerAliveInterval 1\n  ServerAliveCountMax 1\n"
    )
    server = sshd_fleet.start()

    def through_config(server, known: Path, **fields: object) -> dict[str, object]:
        """ssh_host's entry, ssh_config read; a field given as None is left out."""
        entry = ssh_host(sshd_fleet, server, known, use_ssh_config=True, ssh_config_file=str(config), **fields)
        return {field: value for field, value in entry.items() if value is not None}

    executor = make_executor(hosts_yaml=hosts_file_text({
        "silent": through_config(shared_sshd, known_hosts, hostname="silent", port=None, connect_timeout=None),
        "impatient": through_config(shared_sshd, known_hosts, hostname="silent", port=None, connect_timeout=0.5),
        "web": through_config(server, sshd_fleet.known_hosts(tmp_path / "known_hosts", [server]), connect_timeout=None),
    }))
    try:
        for name, seconds in (("silent", "1"), ("impatient", "0.5")):
            started = time.monotonic()
            task = executor.run(TaskRequest(host=name, command="true"))
            assert (task.status, task.error_category) == (TaskStatus.FAILED, "timeout")
            assert f"timed out after {seconds} s" in task.error, task.error
            assert time.monotonic() - started < 3
    finally:
        silent.close()

    # Keepalives every second, one unanswered drops the connection (the default: 3 of 15 s).
    with _when_the_server_stops_answering(executor, server, marker) as (task, seconds):
        assert (task.status, task.error_category, seconds < 4) == (TaskStatus.FAILED, "disconnected", True)
    server.stop()


def test_ssh_config_times_are_read_as_ssh_reads_them():
    from fleetrun.plugins.transports.ssh_options import hop_options

    def options(**written: str):
        unset = dict(connect_timeout=None, keepalive_interval=None, keepalive_count_max=None, host_key_checking=None)
        return hop_options(written, "web", **unset)

    assert options() == options(stricthostkeychecking="ask").__class__(10.0, 15.0, 3, "strict")
    assert (options(connecttimeout="1m30s").connect_timeout, options(connecttimeout="2H").connect_timeout) == (90, 7200)
    assert options(connecttimeout="0").connect_timeout == 10  # ssh: no timeout of its own; fleetrun keeps its default
    assert options(connecttimeout="2147483647").connect_timeout == 86400  # the most the hosts file allows
    assert (options(serveraliveinterval="0").keepalive_interval, options(serveraliveinterval="1m30").keepalive_interval) == (0, 90)
    assert options(serveralivecountmax="0").keepalive_count_max == 1  # ssh drops at the first unanswered one
    given = hop_options(
        {"connecttimeout": "5", "serveraliveinterval": "7", "serveralivecountmax": "9", "stricthostkeychecking": "no"}, "web",
        connect_timeout=1.0, keepalive_interval=2.0, keepalive_count_max=3, host_key_checking="strict",
    )
    assert given == given.__class__(1.0, 2.0, 3, "strict")  # the host's own fields win


def test_ctrl_c_while_connecting_to_a_server_that_never_greets_exits_without_waiting_out_the_connect(
    sshd_fleet, shared_sshd, known_hosts, tmp_path
):
    # The cancelled task ended at once, but the process then waited at exit for the
    # connecting thread, until connect_timeout (here a minute) had passed.
    silent = socket.socket()
    silent.bind((shared_sshd.address, 0))
    silent.listen(8)
    silent.settimeout(30)
    try:
        hosts = tmp_path / "hosts.yaml"
        entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, port=silent.getsockname()[1], connect_timeout=60)
        hosts.write_text(hosts_file_text({"silent": entry}))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetrun", "--hosts", str(hosts), "run", "silent", "--", "true"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        accepted, _ = silent.accept()  # the connect is under way, waiting for the server's greeting
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        accepted.close()
    finally:
        silent.close()
    assert proc.returncode == 130
    assert re.fullmatch(r"fleetrun: task [0-9a-f]{12} was cancelled: interrupted by the user\n", err), err


# -- stopping remote commands ----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
def test_cancel_and_timeout_stop_the_remote_process_group(ssh_executor, marker, ending):
    command = f"sleep {marker} & sleep {marker} & (sleep {marker}; echo never) & wait"
    handle = ssh_executor.submit(
        TaskRequest(host="web", command=command, timeout_s=1.0 if ending == "timeout" else None)
    )
    wait_until(lambda: len(processes_with(f"sleep {marker}")) >= 3)
    stopped_at = time.monotonic()
    if ending == "cancel":
        handle.cancel("test cancel")
    task = handle.wait(20)
    assert task.status is (TaskStatus.CANCELLED if ending == "cancel" else TaskStatus.TIMED_OUT)
    if ending == "cancel":
        # Nothing ignored TERM: the task ends without waiting out the grace period (for the
        # zombies the TERM leaves in the group, say, until the server's init reaps them).
        assert time.monotonic() - stopped_at < KILL_GRACE_SECONDS
    assert_none_left(marker)
    assert time.monotonic() - stopped_at < 5
    assert b"never" not in ssh_executor.read_output(task.id).data


def test_a_remote_child_ignoring_sigterm_is_killed(ssh_executor, marker):
    command = f"trap '' TERM; sh -c \"trap '' TERM; sleep {marker}\" & wait; wait"
    handle = ssh_executor.submit(TaskRequest(host="web", command=command))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    handle.cancel()
    assert handle.wait(20).status is TaskStatus.CANCELLED
    assert_none_left(marker)


# The stop script, run here by sh as the server's shell runs it. The group it stops is made
# by a helper outside it that never reaps its children, as a slow init does not: what the
# group holds when the script looks is known, whatever this machine's init does.
_GROUP_MAKER = """
import os, signal, sys, time
leader = os.fork()
if leader == 0:
    os.setpgid(0, 0)
    if sys.argv[1] == "with-a-survivor":
        if os.fork() == 0:
            os._exit(0)  # a zombie in the group: its parent, the leader, never reaps it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    os._exit(0)
try:
    os.setpgid(leader, leader)  # in both processes: the group exists before the pid is printed
except OSError:
    pass  # the leader did it and is already a zombie
print(leader, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("group", ["zombies-only", "with-a-survivor"])
def test_the_remote_stop_script_waits_for_live_processes_and_not_for_zombies(group):
    maker = subprocess.Popen([sys.executable, "-c", _GROUP_MAKER, group], stdout=subprocess.PIPE, text=True)
    try:
        leader = int(maker.stdout.readline())
        if group == "zombies-only":
            wait_until(lambda: stat_fields(leader)[0] == "Z")
        else:
            wait_until(lambda: len(_group_members(leader)) == 2)
        os.kill(-leader, 0)  # the group exists for kill -0, zombies and all
        started = time.monotonic()
        subprocess.run(["sh", "-c", stop_script(leader)], check=True, timeout=10)
        took = time.monotonic() - started
        wait_until(lambda: not _live_members(leader), timeout=1)  # a KILL takes a moment to land
        if group == "zombies-only":
            assert took < KILL_GRACE_SECONDS / 2  # not a round of the grace period spent on the dead
        else:
            assert took >= KILL_GRACE_SECONDS  # the survivor ignored TERM: KILL after the grace period
    finally:
        maker.kill()
        maker.wait()


def _group_members(pgid: int) -> dict[int, str]:
    """The processes of a group, zombies included, with their states."""
    members = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[2]) == pgid:
            members[int(entry)] = fields[0]
    return members


def _live_members(pgid: int) -> list[int]:
    return [pid for pid, state in _group_members(pgid).items() if state != "Z"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a root login needs the tests to run as root (CI does)")
@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_a_stopped_remote_command_has_the_grace_period_to_end_itself(ssh_executor, ending):
    # As on the local transport: its TERM trap takes 0.3 s, and what it prints is kept.
    task = stop_one_that_cleans_up(ssh_executor, "web", ending)
    assert task.status is (TaskStatus.TIMED_OUT if ending == "timeout" else TaskStatus.CANCELLED)
    assert ssh_executor.read_output(task.id).data == b"ready\ncleaning\ncleaned\n"


def test_cancel_stops_the_remote_command_of_a_root_login(make_executor, sshd_fleet, shared_sshd, known_hosts, marker):
    sshd_fleet.authorize("root", sshd_fleet.client_key)
    entry = ssh_host(sshd_fleet, shared_sshd, known_hosts, user="root")
    executor = make_executor(hosts_yaml=hosts_file_text({"root-web": entry}))
    check = executor.run(TaskRequest(host="root-web", command="id -u"))
    assert executor.read_output(check.id).data == b"0\n"
    handle = executor.submit(TaskRequest(host="root-web", command=f"sleep {marker} & sleep {marker}; wait"))
    wait_until(lambda: len(processes_with(f"sleep {marker}")) >= 2)
    handle.cancel()
    assert handle.wait(20).status is TaskStatus.CANCELLED
    assert_none_left(marker)


@pytest.mark.parametrize("shell", ["sh", "fish"])
def test_a_remote_command_stops_when_its_owner_is_killed(sshd_fleet, shared_sshd, known_hosts, tmp_path, marker, shell):
    # The connection closes with the owner; the remote command must not outlive it.
    from sshd import user_with_login_shell

    user = sshd_fleet.user if shell == "sh" else user_with_login_shell(shell)
    if user is None:
        pytest.skip(_why_no_user_with(shell))
    sshd_fleet.authorize(user, sshd_fleet.client_key)
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known_hosts, user=user)}))
    owner = subprocess.Popen(
        [sys.executable, "-m", "fleetrun", "--hosts", str(hosts), "run", "web", "--",
         f"sleep {marker} & trap '' TERM; sleep {marker}; wait"],
        env={**os.environ, "FLEETRUN_HOME": str(tmp_path / "home")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: len(processes_running("sleep", marker)) == 2)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # TERM at once, KILL after the grace period for what ignores TERM.
        assert_none_left(marker, within=10)
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


# Runs as a process of its own: it forks (a forked pytest would go on testing), and is killed.
_OWNER_WITH_A_FORKED_CHILD = r"""
import os, sys, time
from fleetrun import Executor, TaskRequest
from fleetrun.core.inventory import load_inventory
from fleetrun.core.plugin_manager import PluginManager

hosts, report = sys.argv[1:]
marker = os.environ["TEST_MARKER"]  # not in argv: the forked child's command line must not name it

def executor():
    manager = PluginManager(autoload=False)
    return Executor(plugins=manager, inventory=load_inventory(hosts, manager.transports))

parent = executor()
parent.submit(TaskRequest(host="web", command=f"sleep {marker}"))
time.sleep(0.5)
if os.fork() == 0:
    # A worker forked meanwhile: its own executor reaches the host too.
    with executor() as own:
        task = own.run(TaskRequest(host="web", command="echo from the child"))
        with open(report, "w") as out:
            out.write(f"{task.status.value} {own.read_output(task.id).data.decode()}")
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_a_forked_child_neither_keeps_the_parents_connections_nor_shares_its_threads(sshd_fleet, known_hosts, shared_sshd, tmp_path, marker):
    # Before: the child's copy of the parent's connection kept it open, so the server saw no
    # end when the parent was killed, and the command ran on; and an executor the child
    # made waited forever for the SSH thread pool's threads, which stayed in the parent.
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known_hosts)}))
    report = tmp_path / "report"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_WITH_A_FORKED_CHILD, str(hosts), str(report)],
        env={**os.environ, "FLEETRUN_HOME": str(tmp_path / "home"), "TEST_MARKER": marker}, stderr=subprocess.PIPE,
    )
    children: list[int] = []
    try:
        wait_until(lambda: report.exists() and report.read_text())
        assert report.read_text() == "succeeded from the child\n"
        assert len(processes_running("sleep", marker)) == 1
        children = [int(pid) for pid in Path(f"/proc/{owner.pid}/task/{owner.pid}/children").read_text().split()]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert all(Path(f"/proc/{pid}").exists() for pid in children)  # the forked child lives on
        assert_none_left(marker, within=10)
    finally:
        owner.kill()
        for pid in processes_with(marker) + children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_finished_command_leaves_its_background_processes_alone(ssh_executor, marker):
    # Only a command still running when the connection goes is stopped: what a command
    # started to outlive it (nohup, a daemon) stays, as with ssh.
    task = ssh_executor.run(TaskRequest(host="web", command=f"nohup sleep {marker} >/dev/null 2>&1 &"))
    assert task.status is TaskStatus.SUCCEEDED
    ssh_executor.close()  # closes the connection too
    try:
        # Nothing of the task is left but what it put in the background (the remote shell's
        # command line names the marker too).
        wait_until(lambda: len(processes_with(marker)) == 1)
        time.sleep(0.5)
        assert len(processes_with(marker)) == 1 and len(processes_running("sleep", marker)) == 1
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_output_of_a_background_process_is_kept_for_a_second_after_the_exit_and_then_not_read(ssh_executor, marker):
    # The server's user writes where the test can look: /tmp, under names of the test's own.
    go, wrote = Path(f"/tmp/fleetrun-go-{marker}"), Path(f"/tmp/fleetrun-wrote-{marker}")
    try:
        task, output = run_leaving_a_writer_behind(ssh_executor, "web", go, wrote)
        assert (task.status, task.exit_code) == (TaskStatus.SUCCEEDED, 0)
        assert output == b"now\nsoon\n"
        assert not wrote.exists()  # its write failed: SIGPIPE ended it
    finally:
        go.unlink(missing_ok=True)
        wrote.unlink(missing_ok=True)


# -- connections: failure, reuse, pool -------------------------------------------------------


def test_a_server_dying_mid_command_fails_the_task_and_the_next_task_reconnects(make_executor, sshd_fleet, tmp_path, marker):
    server = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known)}))
    assert executor.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    handle = executor.submit(TaskRequest(host="web", command=f"echo started; sleep {marker}"))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    died_at = time.monotonic()
    server.stop()
    task = handle.wait(20)
    assert (task.status, task.error_category, task.exit_code) == (TaskStatus.FAILED, "disconnected", None)
    assert "lost" in task.error
    assert time.monotonic() - died_at < 3
    assert executor.read_output(task.id).data == b"started\n"
    server.start()
    again = executor.run(TaskRequest(host="web", command="echo back"))
    assert again.status is TaskStatus.SUCCEEDED
    assert executor.read_output(again.id).data == b"back\n"


_HALF_BROKEN_RELAY = """
import os, socket, sys
server = socket.create_connection((sys.argv[1], int(sys.argv[2])))
writer = os.fork()
if writer == 0:  # what the client sends, to the server: until this process is killed
    while data := os.read(0, 65536):
        server.sendall(data)
    os._exit(0)
os.close(0)  # only the writer reads what the client sends
with open(sys.argv[3], "a") as pids:
    pids.write(f"{writer}\\n")
while data := server.recv(65536):  # what the server sends, to the client
    os.write(1, data)
"""


def _relay_that_can_break_one_way(tmp_path: Path) -> SimpleNamespace:
    """``_HALF_BROKEN_RELAY`` as an ssh_config ProxyCommand (``command``, ``path``), and
    ``break_sending()``, which kills the writing half of the last one started: a link that
    fails one way, what the server sends still arriving and what fleetrun sends not (a
    jump host's connection dying under it fails so, for a moment)."""
    path, writers = tmp_path / "relay.py", tmp_path / "writers"
    path.write_text(_HALF_BROKEN_RELAY)

    def break_sending() -> None:
        writer = int(writers.read_text().split()[-1])
        os.kill(writer, signal.SIGKILL)
        wait_until(lambda: (stat_fields(writer) or ["Z"])[0] == "Z")  # gone: its end of the pipe is closed

    return SimpleNamespace(command=f"{sys.executable} {path} %h %p {writers}", path=path, break_sending=break_sending)


def _through_a_relay_that_can_break_one_way(make_executor, sshd_fleet, tmp_path, **fields: object):  # type: ignore[no-untyped-def]
    """An executor whose host 'web' is reached through :func:`_relay_that_can_break_one_way`;
    returns it, the server, and the relay's ``break_sending``."""
    server = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    relay = _relay_that_can_break_one_way(tmp_path)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host web\n  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n  ProxyCommand {relay.command}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known), **fields}
    return make_executor(hosts_yaml=hosts_file_text({"web": entry})), server, relay.break_sending


def test_a_channel_whose_close_cannot_be_sent_ends_its_task_as_the_command_ended(make_executor, sshd_fleet, tmp_path, marker):
    # The command exits leaving a process in the background that holds its output: fleetrun,
    # not the server, then closes the channel, and that close is the first thing it sends.
    executor, server, break_sending = _through_a_relay_that_can_break_one_way(make_executor, sshd_fleet, tmp_path)
    go = Path(f"/tmp/fleetrun-go-{marker}")  # where the server's user sees it
    handle = executor.submit(TaskRequest(host="web", command=f"until [ -e {go} ]; do sleep 0.05; done; sleep {marker} & echo started"))
    try:
        wait_until(lambda: processes_with(str(go)))
        break_sending()
        go.touch()
        task = handle.wait(20)
    finally:
        go.unlink(missing_ok=True)
        for pid in processes_running("sleep", marker):
            os.kill(pid, signal.SIGKILL)
    # Before: failed, "internal": paramiko's close of the channel raised ProxyCommandFailure,
    # in place of the task's own ending.
    assert (task.status, task.exit_code, task.error) == (TaskStatus.SUCCEEDED, 0, None)
    assert executor.read_output(task.id).data == b"started\n"
    again = executor.run(TaskRequest(host="web", command="echo again"))
    assert (again.status, again.error, executor.read_output(again.id).data) == (TaskStatus.SUCCEEDED, None, b"again\n")
    assert server.accepted_logins() == 2


def test_a_pooled_connection_that_can_no_longer_send_is_replaced_by_the_next_task(make_executor, sshd_fleet, tmp_path):
    executor, server, break_sending = _through_a_relay_that_can_break_one_way(make_executor, sshd_fleet, tmp_path)
    assert executor.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    break_sending()
    task = executor.run(TaskRequest(host="web", command="echo again"))
    # Before: failed, "disconnected": "... refused a new channel: ... Broken pipe", and so
    # every task on the host until keepalives (if any) gave the connection up.
    assert (task.status, task.error, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, None, b"again\n")
    assert server.accepted_logins() == 2


def test_a_connection_through_a_jump_host_that_can_no_longer_send_closes_without_a_traceback(make_executor, sshd_fleet, tmp_path, monkeypatch, caplog):
    jump, target = sshd_fleet.start(), sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    relay = _relay_that_can_break_one_way(tmp_path)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jumpbox\n  HostName {jump.address}\n  Port {jump.port}\n  ProxyCommand {relay.command}\n"
        f"Host inner\n  HostName {target.address}\n  Port {target.port}\n  ProxyJump jumpbox\n"
        f"Host *\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    )
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known)}}))
    assert executor.run(TaskRequest(host="inner", command="true")).status is TaskStatus.SUCCEEDED
    relay.break_sending()
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    with caplog.at_level(logging.ERROR):
        executor.close()  # the connection to the target closes its channel on the jump host's first
    # Before: that close raised ProxyCommandFailure, logged as an error with a traceback, and
    # the jump host's connection was left open (its ProxyCommand ran on). When paramiko's own
    # thread makes that close (the target's connection ended by itself), Python prints the
    # exception on stderr as a traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    wait_until(lambda: not processes_with(str(relay.path)))
    assert raised == []


def test_a_connection_that_can_no_longer_send_its_keepalives_is_dropped(make_executor, sshd_fleet, tmp_path, marker, caplog):
    executor, server, break_sending = _through_a_relay_that_can_break_one_way(
        make_executor, sshd_fleet, tmp_path, keepalive_interval=0.2, keepalive_count_max=2
    )
    handle = executor.submit(TaskRequest(host="web", command=f"echo started; sleep {marker}"))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    break_sending()
    broken_at = time.monotonic()
    task = handle.wait(20)
    # Before: the keepalive's failure ended its watch without a word: the task ran on (until
    # its max_seconds), and so did the command on the server.
    assert (task.status, task.error_category, task.exit_code) == (TaskStatus.FAILED, "disconnected", None)
    assert time.monotonic() - broken_at < 3
    assert executor.read_output(task.id).data == b"started\n"
    assert_none_left(marker, within=5)  # the session ended with the connection: its watchdog stopped the command
    where = f"host 'web' ({sshd_fleet.user}@{server.address}:{server.port})"
    assert task.error == f"the connection to {where} was lost while the command ran"
    assert f"{where}: a keepalive could not be sent (the ProxyCommand failed: Broken pipe); dropping the connection" in caplog.messages


def test_a_server_that_stops_answering_is_dropped_by_keepalives(make_executor, sshd_fleet, tmp_path, marker, caplog):
    server = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    entry = ssh_host(sshd_fleet, server, known, keepalive_interval=0.2, keepalive_count_max=2)
    executor = make_executor(hosts_yaml=hosts_file_text({"web": entry}))
    with _when_the_server_stops_answering(executor, server, marker) as (task, seconds):
        assert (task.status, task.error_category, seconds < 3) == (TaskStatus.FAILED, "disconnected", True)
        # Closed at once, the executor still waits for the dropped connection's close and its
        # last keepalive: a task its loop had left would be reported by asyncio when collected.
        executor.close()
        gc.collect()
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    server.stop()


@contextlib.contextmanager
def _when_the_server_stops_answering(executor, server, marker: str) -> Iterator[tuple[object, float]]:  # type: ignore[no-untyped-def]
    """A task that runs ``sleep MARKER`` on the host ``web`` until ``server``'s sessions are
    stopped (SIGSTOP), as a server that no longer answers: the task as it ended, and the
    seconds it took to end. The sessions go on when the block ends."""
    handle = executor.submit(TaskRequest(host="web", command=f"sleep {marker}"))
    wait_until(lambda: processes_with(f"sleep {marker}"))
    pids = server.session_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        task = handle.wait(20)
        yield task, time.monotonic() - stopped_at
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_one_connection_serves_sequential_and_concurrent_tasks(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known)}))
    for _ in range(10):
        assert executor.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    handles = [executor.submit(TaskRequest(host="web", command="sleep 0.5")) for _ in range(6)]
    tasks = [h.wait(20) for h in handles]
    assert {t.status for t in tasks} == {TaskStatus.SUCCEEDED}
    assert max(t.started_at for t in tasks) < min(t.ended_at for t in tasks)  # they overlapped
    assert server.accepted_logins() == 1
    server.stop()


def test_a_server_allowing_fewer_sessions_gets_more_connections(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start(extra_config="MaxSessions 2")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    entry = ssh_host(sshd_fleet, server, known, max_concurrent=5)
    executor = make_executor(hosts_yaml=hosts_file_text({"web": entry}))
    handles = [executor.submit(TaskRequest(host="web", command="sleep 0.5; echo done")) for _ in range(5)]
    tasks = [h.wait(20) for h in handles]
    assert [t.status for t in tasks] == [TaskStatus.SUCCEEDED] * 5, [t.error for t in tasks]
    assert all(executor.read_output(t.id).data == b"done\n" for t in tasks)
    assert server.accepted_logins() >= 3
    server.stop()


def test_a_server_that_allows_no_session_fails_the_task_saying_so(make_executor, sshd_fleet, tmp_path):
    # The login succeeds; the question which login shell the user has, and then the
    # command, are refused.
    server = sshd_fleet.start(extra_config="MaxSessions 0")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known)}))
    task = executor.run(TaskRequest(host="web", command="echo hi"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "disconnected")
    assert task.error is not None and "refused a new channel" in task.error
    server.stop()


def test_an_idle_connection_is_closed_and_reopened_on_demand(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known, idle_timeout=0.3)}))
    assert executor.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    assert server.session_pids()
    wait_until(lambda: not server.session_pids(), timeout=5)
    assert executor.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    assert server.accepted_logins() == 2
    server.stop()


def test_ssh_fields_are_checked_when_the_hosts_file_loads():
    transports = PluginManager(autoload=False).transports
    with pytest.raises(InventoryError) as bad_choice:
        parse_inventory("hosts:\n  web:\n    transport: ssh\n    host_key_checking: maybe\n", source="h.yaml", transports=transports)
    assert str(bad_choice.value) == "h.yaml:4: host 'web', field 'host_key_checking': expected one of strict, accept-new, got 'maybe'"
    with pytest.raises(InventoryError) as bad_port:
        parse_inventory("hosts:\n  web:\n    transport: ssh\n    port: 0\n", source="h.yaml", transports=transports)
    assert str(bad_port.value) == "h.yaml:4: host 'web', field 'port': must be at least 1, got 0"
    with pytest.raises(InventoryError) as high_port:
        parse_inventory("hosts:\n  web:\n    transport: ssh\n    port: 99999\n", source="h.yaml", transports=transports)
    assert str(high_port.value) == "h.yaml:4: host 'web', field 'port': must be at most 65535, got 99999"
    with pytest.raises(InventoryError) as long_wait:  # paramiko failed every task: "timestamp too large"
        parse_inventory("hosts:\n  web:\n    transport: ssh\n    connect_timeout: 1e10\n", source="h.yaml", transports=transports)
    assert str(long_wait.value) == "h.yaml:4: host 'web', field 'connect_timeout': must be at most 86400, got 10000000000"
    for address, problem in (("[::1]", "write an IPv6 address without brackets (::1)"), ("web1:2222", "the port goes in 'port'")):
        with pytest.raises(InventoryError) as bad_address:
            parse_inventory(f"hosts:\n  web:\n    transport: ssh\n    hostname: '{address}'\n", source="h.yaml", transports=transports)
        assert str(bad_address.value).startswith(f"h.yaml:4: host 'web', field 'hostname': '{address}': {problem}")
    for address in ("web 1", "deploy@web1", "-oProxyCommand=x", ""):
        with pytest.raises(InventoryError, match="h.yaml:4: host 'web', field 'hostname': "):
            parse_inventory(f"hosts:\n  web:\n    transport: ssh\n    hostname: '{address}'\n", source="h.yaml", transports=transports)
    for hops, problem in (
        ("bastion:22x", "jump host 'bastion:22x': the port must be a number from 1 to 65535"),
        ("[::1:2222", "jump host '[::1:2222': an IPv6 address goes in brackets, then :PORT if any ([::1]:2222)"),
        ("a,,b", "jump host '' is not [user@]host[:port]"),
        ("deploy@bastion one", "jump host 'deploy@bastion one' is not [user@]host[:port]"),
    ):
        with pytest.raises(InventoryError) as bad_jump:
            parse_inventory(f"hosts:\n  web:\n    transport: ssh\n    jump_host: '{hops}'\n", source="h.yaml", transports=transports)
        assert str(bad_jump.value) == f"h.yaml:4: host 'web', field 'jump_host': {problem}"
    with pytest.raises(InventoryError) as local_field:
        parse_inventory("hosts:\n  box:\n    hostname: x\n", source="h.yaml", transports=transports)
    assert "field 'hostname': unknown field for transport 'local'" in str(local_field.value)


def test_environment_names_cannot_smuggle_shell_code(ssh_executor):
    from fleetrun.core.errors import FleetrunError

    with pytest.raises(FleetrunError, match="invalid environment variable name"):
        ssh_executor.submit(TaskRequest(host="web", command="true", env={"A=1; touch /tmp/pwned; B": "x"}))
