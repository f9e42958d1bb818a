"""How the ssh transport finds and checks a host as OpenSSH does: its host keys (known_hosts),
ssh_config (Include, ProxyJump, ProxyCommand, IdentityAgent …) and jump hosts. Against real
OpenSSH servers on 127.0.0.N (tests/sshd.py), with OpenSSH's own tools (ssh -G, ssh-keygen)
as the reference where they read the same files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetrun.core.models import TaskRequest, TaskStatus

from conftest import hosts_file_text, run_cli, ssh_host, wait_until

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (.ci/run installs it)")


# -- host keys ---------------------------------------------------------------------------


def test_an_unknown_host_key_is_refused_naming_host_and_fingerprint(make_executor, sshd_fleet, shared_sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, empty)}))
    task = executor.run(TaskRequest(host="web", command="echo must-not-run"))
    assert (task.status, task.error_category, task.exit_code) == (TaskStatus.FAILED, "host_key", None)
    assert f"[{shared_sshd.address}]:{shared_sshd.port}" in task.error
    assert shared_sshd.host_key_fingerprint in task.error
    assert "host_key_checking: accept-new" in task.error
    assert empty.read_text() == ""


def test_a_changed_host_key_is_refused_even_with_accept_new(make_executor, sshd_fleet, shared_sshd, tmp_path):
    from sshd import fingerprint, generate_key

    impostor = generate_key(tmp_path / "other_host_key")
    other_line = Path(f"{impostor}.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{shared_sshd.address}]:{shared_sshd.port} {other_line[0]} {other_line[1]}\n")
    before = wrong.read_text()
    entry = ssh_host(sshd_fleet, shared_sshd, wrong, host_key_checking="accept-new")
    executor = make_executor(hosts_yaml=hosts_file_text({"web": entry}))
    task = executor.run(TaskRequest(host="web", command="echo must-not-run"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key")
    assert "CHANGED" in task.error
    assert shared_sshd.host_key_fingerprint in task.error
    assert fingerprint(" ".join(other_line)) in task.error
    assert wrong.read_text() == before


def test_accept_new_records_the_key_once_then_strict_checking_accepts_it(make_executor, sshd_fleet, shared_sshd, tmp_path):
    recorded = tmp_path / "new" / "known_hosts"
    entry = ssh_host(sshd_fleet, shared_sshd, recorded, host_key_checking="accept-new")
    first = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert first.status is TaskStatus.SUCCEEDED
    assert recorded.read_text() == shared_sshd.known_hosts_line
    assert recorded.stat().st_mode & 0o777 == 0o600
    strict = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, recorded)}))
    assert strict.run(TaskRequest(host="web", command="true")).status is TaskStatus.SUCCEEDED
    assert recorded.read_text() == shared_sshd.known_hosts_line


def test_strict_host_key_checking_of_ssh_config_decides_unless_the_host_does(make_executor, sshd_fleet, shared_sshd, tmp_path, caplog):
    from sshd import generate_key

    where = f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    impostor = Path(f"{generate_key(tmp_path / 'other_host_key')}.pub").read_text().split()
    stale = tmp_path / "stale_known_hosts"
    stale.write_text(f"[{shared_sshd.address}]:{shared_sshd.port} {impostor[0]} {impostor[1]}\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        # As `vagrant ssh-config` writes it, for a machine whose key changes with each rebuild.
        f"Host vagrant\n{where}  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  IdentitiesOnly yes\n"
        "  PasswordAuthentication no\n  LogLevel FATAL\n"
        f"Host recording\n{where}  UserKnownHostsFile {tmp_path / 'recorded'}\n  StrictHostKeyChecking Accept-New\n"
        f"Host asking\n{where}  UserKnownHostsFile {tmp_path / 'asked'}\n  StrictHostKeyChecking ask\n"
        f"Host stale\n{where}  UserKnownHostsFile {stale}\n  StrictHostKeyChecking off\n"
        f"Host nowhere\n{where}  UserKnownHostsFile none\n  GlobalKnownHostsFile none\n  StrictHostKeyChecking accept-new\n"
    )
    via_config = {"transport": "ssh", "ssh_config_file": str(config), "connect_timeout": 5}
    hosts = {name: via_config for name in ("vagrant", "recording", "asking", "stale", "nowhere")}
    hosts["overruled"] = {**via_config, "hostname": "vagrant", "host_key_checking": "strict"}
    hosts_yaml = hosts_file_text(hosts)
    key = f"ssh-ed25519 {shared_sshd.host_key_fingerprint}"
    named = f"[{shared_sshd.address}]:{shared_sshd.port}"

    # Before: each refused ("unknown: ... add it to /dev/null"), whatever StrictHostKeyChecking said.
    for _ in range(2):  # /dev/null keeps nothing: accepted again by a new connection
        caplog.clear()
        task = make_executor(hosts_yaml=hosts_yaml).run(TaskRequest(host="vagrant", command="echo in"))
        assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)
        assert f"accepted the unknown host key of {named} ({key}); /dev/null is not a file, so it is not recorded" in caplog.text
    assert Path("/dev/null").is_char_device()
    executor = make_executor(hosts_yaml=hosts_yaml)
    assert executor.run(TaskRequest(host="recording", command="true")).status is TaskStatus.SUCCEEDED
    assert (tmp_path / "recorded").read_text() == shared_sshd.known_hosts_line

    to_record = "or set 'host_key_checking: accept-new' for this host to record it on first use"
    for name, advice in [
        ("asking", f"Check it and add it to {tmp_path / 'asked'} (for example with ssh-keyscan), {to_record}"),
        ("overruled", "Check it and add it to a known_hosts file named with the host's known_hosts field (/dev/null is not a file), "
         "or set 'host_key_checking: accept-new' for this host to accept it unrecorded"),
        ("nowhere", "which is not in any known_hosts file. Check it and add it to a known_hosts file named with the host's "
         "known_hosts field (ssh_config's UserKnownHostsFile and GlobalKnownHostsFile are none)"),
    ]:
        refused = executor.run(TaskRequest(host=name, command="echo must-not-run"))
        assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "host_key")
        assert refused.error.endswith(advice), refused.error
    assert not (tmp_path / "asked").exists()

    # ssh, told `no` or `off`, goes on with a changed key; fleetrun refuses it, and says so.
    changed = executor.run(TaskRequest(host="stale", command="echo must-not-run"))
    assert (changed.status, changed.error_category) == (TaskStatus.FAILED, "host_key")
    assert "The connection was refused (ssh_config's StrictHostKeyChecking off does not let a changed key through)." in changed.error
    assert stale.read_text().split()[1:] == impostor[:2]

    env = {"FLEETRUN_HOME": str(tmp_path / "home")}
    (tmp_path / "hosts.yaml").write_text(hosts_yaml)
    for name, checking in [
        ("vagrant", "accept-new (StrictHostKeyChecking no of ssh_config)"), ("asking", "strict (StrictHostKeyChecking ask of ssh_config)"),
        ("overruled", "strict"),
    ]:
        dry = run_cli("--hosts", str(tmp_path / "hosts.yaml"), "run", name, "--dry-run", "--", "true", env=env)
        assert dry.returncode == 0 and dry.stdout.splitlines()[1].endswith(f"; host_key_checking: {checking})"), dry.stdout


def test_known_hosts_lines_paramiko_cannot_read_are_skipped_as_ssh_skips_them(make_executor, sshd_fleet, shared_sshd, tmp_path):
    # Before, one such line (a certificate authority, above all) failed every task of every host.
    from sshd import generate_key

    authority = Path(f"{generate_key(tmp_path / 'ca_key')}.pub").read_text().split()
    server = f"[{shared_sshd.address}]:{shared_sshd.port}"
    noise = [
        f"@cert-authority * {authority[0]} {authority[1]}",
        f"{server} ssh-ed25519 not-base64!",
        f"{server} sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t",
        "@unknown-marker web3.example.test ssh-ed25519 AAAA",
        "web4.example.test ssh-ed25519 not-base64!",  # another host's line: ssh does not read it, nor does fleetrun
    ]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(noise) + "\n" + shared_sshd.known_hosts_line)
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known)}))
    task = executor.run(TaskRequest(host="web", command="true"))
    assert task.status is TaskStatus.SUCCEEDED, task.error

    # A host the file does not list: the refusal says what was skipped and why it does not count.
    known.write_text("\n".join(noise) + "\n")
    executor = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, shared_sshd, known)}))
    task = executor.run(TaskRequest(host="web", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key")
    assert (
        f"which is not in {known} (the server presented no certificate for the @cert-authority lines to vouch for; "
        f"lines it could not read were skipped: {known}:2, {known}:3, {known}:4). Check it"
    ) in task.error


def test_host_certificates_are_checked_as_ssh_checks_them(make_executor, sshd_fleet, tmp_path, caplog):
    from sshd import generate_key

    server = sshd_fleet.start()
    authority = generate_key(tmp_path / "host_ca")
    stranger = generate_key(tmp_path / "other_ca")
    other_key = Path(f"{generate_key(tmp_path / 'other_host_key')}.pub").read_text().split()
    line = lambda marker, names, key: f"{marker} {names} {' '.join(Path(f'{key}.pub').read_text().split()[:2])}\n"  # noqa: E731
    trusted = line("@cert-authority", "*", authority)
    plain = server.known_hosts_line
    named = f"[{server.address}]:{server.port}"
    key = f"ssh-ed25519 {server.host_key_fingerprint}"
    refused = f"the host key of {named} is unknown: the server offered {key}, which is not in {tmp_path / 'known_hosts'} (its certificate is not accepted: "
    cases = [  # how the host key is signed, what known_hosts says, and what comes of it
        (["-n", server.address], trusted, None),
        ([], trusted, None),  # no principals: valid for every host
        (["-n", server.address], line("@cert-authority", server.address, authority), None),  # the name without the port
        (["-n", server.address], line("@cert-authority", named, authority), None),
        (["-n", server.address], line("@cert-authority", "*.example.test", authority), "unknown"),
        (["-n", server.address], trusted + f"{named} {other_key[0]} {other_key[1]}\n", None),  # the certificate wins
        (["-n", "127.0.0.*"], trusted, f"{refused}{server.address} is not one of its principals (127.0.0.*))"),
        (["-n", "10.0.0.1"], trusted, f"{refused}{server.address} is not one of its principals (10.0.0.1))"),
        (["-n", "10.0.0.1"], trusted + plain, None),  # a certificate not accepted: the key itself is checked
        (["-n", server.address, "-V", "20200101:20200102"], trusted, f"{refused}it has expired)"),
        (["-n", server.address, "-V", "+1d:+2d"], trusted, f"{refused}it is not valid yet)"),
        (["-n", server.address], line("@cert-authority", "*", stranger), f"{refused}no @cert-authority line for the host lists the authority that signed it)"),
        (["-n", server.address], trusted + line("@revoked", "*", authority), "unknown"),
        (["-n", server.address], trusted + line("@revoked", "*", Path(str(server.host_key))), "@revoked"),
    ]
    known = tmp_path / "known_hosts"
    hosts_yaml = hosts_file_text({"web": ssh_host(sshd_fleet, server, known)})
    for signing, listed, expected in cases:
        subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-h", "-I", "web", *signing, f"{server.host_key}.pub"], check=True)
        server.stop()
        server.extra_config = f"HostCertificate {server.host_key}-cert.pub"
        server.start()
        known.write_text(listed)
        task = make_executor(hosts_yaml=hosts_yaml).run(TaskRequest(host="web", command="echo in"))
        by_ssh = subprocess.run(
            ["ssh", "-F", "none", "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=none", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-i", str(sshd_fleet.client_key), "-p", str(server.port),
             f"{sshd_fleet.user}@{server.address}", "echo in"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        case = (signing, listed)
        assert (by_ssh.returncode == 0) == (expected is None), (case, by_ssh.stderr)  # ssh itself decides alike
        if expected is None:
            assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None), case
            continue
        assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key"), (case, task.error)
        assert task.error.startswith(expected) if expected.startswith("the host") else expected in task.error, (case, task.error)
        assert known.read_text() == listed
    server.stop()


def test_revoked_host_keys_of_ssh_config_refuse_as_in_ssh(make_executor, sshd_fleet, tmp_path):
    from sshd import generate_key

    server = sshd_fleet.start()
    authority, stranger_authority = generate_key(tmp_path / "host_ca"), generate_key(tmp_path / "other_ca")
    other_key = generate_key(tmp_path / "other_host_key")
    subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-h", "-I", "web", "-z", "7", "-n", server.address, f"{server.host_key}.pub"], check=True)
    server.stop()
    server.extra_config = f"HostCertificate {server.host_key}-cert.pub"
    server.start()
    public = lambda key: " ".join(Path(f"{key}.pub").read_text().split()[:2])  # noqa: E731
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {public(authority)}\n{server.known_hosts_line}")

    def krl(name: str, spec: str, signer: Path | None = authority) -> Path:
        (tmp_path / f"{name}.spec").write_text(spec)
        signing = ["-s", f"{signer}.pub"] if signer else []
        subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(tmp_path / name), *signing, str(tmp_path / f"{name}.spec")], check=True)
        return tmp_path / name

    listed = tmp_path / "listed_keys"
    listed.write_text(f"# revoked\n{public(server.host_key)} old web key\n")
    unrelated = tmp_path / "unrelated_keys"
    unrelated.write_text(f"{public(other_key)}\n")
    garbled = tmp_path / "garbled_keys"  # ssh reads no options here, as authorized_keys has: the file fails closed
    garbled.write_text(f'from="10.0.0.1" {public(other_key)}\n')
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{server.host_key}.pub"], capture_output=True, text=True, check=True).stdout.split()[1]
    cases = {  # RevokedHostKeys, and whether the server's key is refused
        listed: "its key is revoked",
        unrelated: None,
        garbled: "cannot be read (line 1 is not a public key)",
        krl("explicit", f"key: {public(server.host_key)}\n", None): "its key is revoked",
        krl("by_hash", f"hash: {fingerprint}\n", None): "its key is revoked",
        krl("by_serial", "serial: 7\n"): "its certificate (serial 7, key id 'web') is revoked",
        # ssh-keygen writes a serial list, a range or a bitmap, whichever is shorter.
        krl("by_range", "serial: 1-1000000\n"): "its certificate (serial 7, key id 'web') is revoked",
        krl("by_bitmap", "".join(f"serial: {n}\n" for n in range(1, 200, 2))): "its certificate (serial 7, key id 'web') is revoked",
        krl("by_list", "serial: 7\nserial: 100000\n"): "its certificate (serial 7, key id 'web') is revoked",
        krl("not_in_range", "serial: 8-9\n"): None,
        krl("by_key_id", "id: web\n"): "its certificate (serial 7, key id 'web') is revoked",
        krl("other_authority", "id: web\n", stranger_authority): None,
        krl("authority", f"key: {public(authority)}\n", None): "the key of the authority that signed its certificate is revoked",
        tmp_path / "missing": "cannot be read",
    }
    hosts_yaml = hosts_file_text({"web": {"transport": "ssh", "ssh_config_file": str(tmp_path / "ssh_config")}})
    # With the authority's line or only the key's, ssh asks for the certificate first (a listed
    # key's before the bare key), so a certificate revoked by serial is refused either way.
    for listing, certified in ((known.read_text(), True), (server.known_hosts_line, False)):
        known.write_text(listing)
        for revocations, refusal in cases.items():
            (tmp_path / "ssh_config").write_text(
                f"Host web\n  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n"
                f"  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile none\n"
                f"  StrictHostKeyChecking yes\n  RevokedHostKeys {revocations}\n"
            )
            task = make_executor(hosts_yaml=hosts_yaml).run(TaskRequest(host="web", command="true"))
            by_ssh = subprocess.run(
                ["ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes", "web", "true"], capture_output=True, text=True, timeout=30
            )
            case = (revocations.name, certified)
            assert (by_ssh.returncode != 0) == (refusal is not None), (case, by_ssh.stderr)  # ssh decides alike
            if refusal is None:
                assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None), case
            else:  # before: ignored, and each logged in
                assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key"), (case, task.error)
                assert refusal in task.error and str(revocations) in task.error, task.error
    server.stop()


@pytest.mark.parametrize(
    ("host_key_type", "authority_type", "signature", "accepted"),
    [("rsa", "rsa", None, True), ("ecdsa", "rsa", "rsa-sha2-256", True), ("rsa", "ecdsa", None, True), ("ed25519", "rsa", "ssh-rsa", False)],
)
def test_host_certificates_of_each_key_type(make_executor, sshd_fleet, tmp_path, host_key_type, authority_type, signature, accepted):
    from sshd import generate_key

    authority = generate_key(tmp_path / "host_ca", authority_type)
    server = sshd_fleet.start()
    server.stop()
    server.host_key = generate_key(tmp_path / "host_key", host_key_type)
    signing = ["-t", signature] if signature else []  # the algorithm an RSA authority signs with
    subprocess.run(["ssh-keygen", "-q", "-s", str(authority), *signing, "-h", "-I", "web", "-n", server.address, f"{server.host_key}.pub"], check=True)
    server.extra_config = f"HostCertificate {server.host_key}-cert.pub"
    server.start()
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {' '.join(Path(f'{authority}.pub').read_text().split()[:2])}\n")
    task = make_executor(hosts_yaml=hosts_file_text({"web": ssh_host(sshd_fleet, server, known)})).run(TaskRequest(host="web", command="true"))
    server.stop()
    if accepted:
        assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)
    else:  # ssh: "Certificate signed with disallowed algorithm" (SHA-1)
        assert "its certificate is not accepted: its authority signed it with 'ssh-rsa', which ssh does not accept" in task.error


def test_a_host_certificate_names_the_hostkeyalias_where_ssh_config_sets_one(make_executor, sshd_fleet, tmp_path):
    from sshd import generate_key

    authority = generate_key(tmp_path / "host_ca")
    server = sshd_fleet.start()
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {' '.join(Path(f'{authority}.pub').read_text().split()[:2])}\n")
    config = tmp_path / "ssh_config"
    hosts_yaml = hosts_file_text({"web": {"transport": "ssh", "ssh_config_file": str(config)}})
    for principal, alias, accepted in [(server.address, "web-alias", False), ("web-alias", "web-alias", True), (server.address, None, True)]:
        subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-h", "-I", "web", "-n", principal, f"{server.host_key}.pub"], check=True)
        server.stop()
        server.extra_config = f"HostCertificate {server.host_key}-cert.pub"
        server.start()
        config.write_text(
            f"Host web\n  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
            f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile none\n  StrictHostKeyChecking yes\n"
            + (f"  HostKeyAlias {alias}\n" if alias else "")
        )
        task = make_executor(hosts_yaml=hosts_yaml).run(TaskRequest(host="web", command="true"))
        by_ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "web", "true"], capture_output=True, text=True, timeout=30)
        assert ((by_ssh.returncode == 0), task.status is TaskStatus.SUCCEEDED) == (accepted, accepted), (principal, alias, task.error)
        if not accepted:
            assert f"web-alias is not one of its principals ({server.address})" in task.error
    server.stop()


def test_a_host_certificate_is_read_strictly(tmp_path):
    import base64

    import paramiko

    from fleetrun.plugins.transports.ssh_host_certificates import certificate_problem, parse_certificate
    from sshd import generate_key

    authority, host_key = generate_key(tmp_path / "ca"), generate_key(tmp_path / "host_key")
    subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-h", "-I", "web", "-n", "a,b", "-z", "7", f"{host_key}.pub"], check=True)
    blob = base64.b64decode(Path(f"{host_key}-cert.pub").read_text().split()[1])
    certificate = parse_certificate(blob)
    assert (certificate.kind, certificate.serial, certificate.key_id, certificate.principals) == (2, 7, "web", ("a", "b"))
    assert (certificate.signature_algorithm, certificate.critical_options) == ("ssh-ed25519", ())
    trusted = (paramiko.Ed25519Key(data=base64.b64decode(Path(f"{authority}.pub").read_text().split()[1])),)
    presented = paramiko.Ed25519Key(msg=paramiko.Message(blob))
    assert [certificate_problem(presented, trusted, (name,)) for name in ("b", "c")] == [None, "c is not one of its principals (a, b)"]

    signature_at = len(certificate.signed)
    too_long = bytearray(blob)
    too_long[signature_at] = 0x80  # the signature's length, past the end: paramiko's reader takes "the rest"
    for broken, problem in [
        (bytes(too_long), "the certificate cannot be read: it is cut short"),
        (blob[:-1], "the certificate cannot be read: it is cut short"),
        (blob + b"\0", "the certificate cannot be read: it has bytes after its signature"),
        (blob[:signature_at] + blob[signature_at:].replace(b"ssh-ed25519", b"ssh-ed2551\xff"), "the certificate cannot be read: a name in it is not UTF-8"),
    ]:
        with pytest.raises(ValueError) as raised:
            parse_certificate(broken)
        assert str(raised.value) == problem


def test_known_hosts_names_match_as_in_ssh_hashed_by_pattern_or_negated(make_executor, sshd_fleet, shared_sshd, tmp_path):
    kind, blob = shared_sshd.host_public_key.split()[:2]
    server = f"[{shared_sshd.address}]:{shared_sshd.port}"
    network = shared_sshd.address.rsplit(".", 1)[0]
    hashed = tmp_path / "hashed"
    hashed.write_text(f"{server} {kind} {blob}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)  # as HashKnownHosts writes them
    assert hashed.read_text().startswith("|1|")
    files = {
        "hashed": hashed,
        "pattern": f"[{network}.*]:* {kind} {blob}\n",
        "one-of-several": f"web1,{server.upper()},web2 {kind} {blob}\n",
        "negated": f"!{server},[{network}.*]:* {kind} {blob}\n",
        "other-port": f"[{shared_sshd.address}]:1{shared_sshd.port} {kind} {blob}\n",
    }
    hosts = {}
    for name, text in files.items():
        path = text if isinstance(text, Path) else tmp_path / name
        if not isinstance(text, Path):
            path.write_text(text)
        hosts[name] = ssh_host(sshd_fleet, shared_sshd, path)
    executor = make_executor(hosts_yaml=hosts_file_text(hosts))
    outcome = {name: executor.run(TaskRequest(host=name, command="true")).error_category for name in files}
    assert outcome == {"hashed": None, "pattern": None, "one-of-several": None, "negated": "host_key", "other-port": "host_key"}
    for name, category in outcome.items():  # OpenSSH's own reading of the same files
        found = subprocess.run(["ssh-keygen", "-F", server, "-f", str(hosts[name]["known_hosts"])], capture_output=True)
        assert (found.returncode == 0) == (category is None) or name == "negated", name


def test_without_a_known_hosts_field_host_keys_are_looked_up_where_ssh_looks(make_executor, sshd_fleet, shared_sshd, tmp_path, monkeypatch):
    # Before, only ~/.ssh/known_hosts was read: a key that ssh finds in ~/.ssh/known_hosts2, in
    # /etc/ssh/ssh_known_hosts (as config management puts them) or in UserKnownHostsFile was unknown.
    from sshd import generate_key

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    entry = ssh_host(sshd_fleet, shared_sshd, tmp_path / "unused")
    entry.pop("known_hosts")
    (home / ".ssh" / "known_hosts2").write_text(shared_sshd.known_hosts_line)
    by_default = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="true"))
    assert by_default.status is TaskStatus.SUCCEEDED, by_default.error

    config = tmp_path / "ssh_config"
    global_file = tmp_path / "global_known_hosts"
    where = f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    config.write_text(
        f"Host global\n{where}  UserKnownHostsFile ~/first ${{HOME}}/second\n  GlobalKnownHostsFile {global_file}\n"
        f"Host recorded\n{where}  UserKnownHostsFile ~/new/first\n  GlobalKnownHostsFile {global_file}\n  HashKnownHosts yes\n"
    )
    global_file.write_text(shared_sshd.known_hosts_line)
    via_config = {"transport": "ssh", "ssh_config_file": str(config), "host_key_checking": "accept-new"}
    executor = make_executor(hosts_yaml=hosts_file_text({"global": via_config, "recorded": via_config}))
    details = executor.plan(TaskRequest(host="global", command="true")).transport_details
    assert details["known_hosts"] == [str(home / "first"), str(home / "second"), str(global_file)]
    assert executor.run(TaskRequest(host="global", command="true")).status is TaskStatus.SUCCEEDED
    assert not (home / "first").exists()  # found, so not recorded

    # A key none of them lists is recorded, under accept-new, in the first user file: hashed,
    # as HashKnownHosts asks, and found there by OpenSSH's own reading and by the next connection.
    global_file.write_text("")
    assert executor.run(TaskRequest(host="recorded", command="true")).status is TaskStatus.SUCCEEDED
    recorded = (home / "new" / "first").read_text()
    assert recorded.startswith("|1|") and recorded.split()[1:] == shared_sshd.known_hosts_line.split()[1:]
    server = f"[{shared_sshd.address}]:{shared_sshd.port}"
    assert subprocess.run(["ssh-keygen", "-F", server, "-f", str(home / "new" / "first")], capture_output=True).returncode == 0
    again = make_executor(hosts_yaml=hosts_file_text({"recorded": {**via_config, "host_key_checking": "strict"}}))
    assert again.run(TaskRequest(host="recorded", command="true")).status is TaskStatus.SUCCEEDED
    assert (home / "new" / "first").read_text() == recorded

    # A changed key names the file that lists the old one.
    impostor = Path(f"{generate_key(tmp_path / 'other_host_key')}.pub").read_text().split()
    global_file.write_text(f"[{shared_sshd.address}]:{shared_sshd.port} {impostor[0]} {impostor[1]}\n")
    changed = make_executor(hosts_yaml=hosts_file_text({"global": via_config})).run(TaskRequest(host="global", command="true"))
    assert (changed.status, changed.error_category) == (TaskStatus.FAILED, "host_key")
    assert f"but {global_file} lists {impostor[0]} " in changed.error


def test_hostkeyalias_in_ssh_config_names_the_key_to_check_and_to_record(make_executor, sshd_fleet, shared_sshd, tmp_path):
    kind, blob = shared_sshd.host_public_key.split()[:2]
    known = tmp_path / "known_hosts"
    # The key is listed under the alias only; a wrong key under the address must not count, as in ssh.
    known.write_text(f"web-key {kind} {blob}\n[{shared_sshd.address}]:{shared_sshd.port} {kind} AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    config = tmp_path / "ssh_config"
    where = f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    config.write_text(f"Host aliased\n{where}  HostKeyAlias web-key\nHost recorded\n{where}  HostKeyAlias new-alias\n")
    aliased = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known)}
    executor = make_executor(hosts_yaml=hosts_file_text({"aliased": aliased, "recorded": {**aliased, "host_key_checking": "accept-new"}}))
    task = executor.run(TaskRequest(host="aliased", command="true"))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    before = known.read_text()
    assert executor.run(TaskRequest(host="recorded", command="true")).status is TaskStatus.SUCCEEDED
    assert known.read_text() == before + f"new-alias {kind} {blob}\n"

    config.write_text(f"Host aliased\n{where}  HostKeyAlias unlisted\n")
    refused = make_executor(hosts_yaml=hosts_file_text({"aliased": aliased})).run(TaskRequest(host="aliased", command="true"))
    assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "host_key")
    assert refused.error.startswith(f"the host key of [{shared_sshd.address}]:{shared_sshd.port} (HostKeyAlias unlisted) is unknown")


@pytest.mark.parametrize("checking", ["strict", "accept-new"])
def test_a_host_key_marked_revoked_is_refused_even_where_it_is_listed(make_executor, sshd_fleet, shared_sshd, tmp_path, checking):
    kind, blob = shared_sshd.host_public_key.split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(shared_sshd.known_hosts_line + f"@revoked * {kind} {blob}\n")
    before = known.read_text()
    entry = ssh_host(sshd_fleet, shared_sshd, known, host_key_checking=checking)
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="echo must-not-run"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key")
    assert task.error.endswith(
        f"the host key of [{shared_sshd.address}]:{shared_sshd.port} ({kind} {shared_sshd.host_key_fingerprint}) "
        f"is marked @revoked in {known}: it is never accepted"
    ), task.error
    assert known.read_text() == before


# -- reaching hosts: jump host, ssh_config ---------------------------------------------------


@pytest.mark.parametrize("configured_by", ["jump_host field", "ProxyJump in ssh_config"])
@pytest.mark.parametrize("hop_count", [1, 2])
def test_jump_hosts_carry_the_connection_first_hop_first(make_executor, sshd_fleet, tmp_path, configured_by, hop_count):
    # Fabric reads ssh_config's ProxyJump a,b backwards: it connected to b first, then to a through b.
    jumps = [sshd_fleet.start(extra_config="LogLevel DEBUG1") for _ in range(hop_count)]
    target = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [*jumps, target])
    hops = [f"{sshd_fleet.user}@{jump.address}:{jump.port}" for jump in jumps]
    if configured_by == "jump_host field":
        entry = ssh_host(sshd_fleet, target, known, jump_host=",".join(hops))
    else:
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host jumpbox\n  HostName {jumps[0].address}\n  Port {jumps[0].port}\n"
            f"Host inner\n  HostName {target.address}\n  Port {target.port}\n  ProxyJump {','.join(['jumpbox', *hops[1:]])}\n"
            f"Host *\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
        )
        entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known)}
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": entry}))
    assert executor.plan(TaskRequest(host="inner", command="true")).transport_details["jump_hosts"] == hops
    task = executor.run(TaskRequest(host="inner", command="echo $SSH_CONNECTION"))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    assert executor.read_output(task.id).data.split()[2:4] == [target.address.encode(), str(target.port).encode()]
    assert [server.accepted_logins() for server in (*jumps, target)] == [1] * (hop_count + 1)
    for jump, reached in zip(jumps, [*jumps[1:], target]):
        assert f"target {reached.address} port {reached.port}" in jump.log.read_text()
    for server in (*jumps, target):
        server.stop()


def _run_through(executor, jump, target) -> tuple[tuple[object, ...], str | None]:  # type: ignore[no-untyped-def]
    """Run a task on host 'inner', then stop both servers. Returns what the plan showed as
    jump hosts, the task's status, each server's logins, and whether ``jump`` (logging DEBUG1)
    forwarded to ``target``; and the task's error, for the assertion's message."""
    jump_hosts = executor.plan(TaskRequest(host="inner", command="true")).transport_details["jump_hosts"]
    task = executor.run(TaskRequest(host="inner", command="true"))
    forwarded = f"target {target.address} port {target.port}" in jump.log.read_text()
    seen = (jump_hosts, task.status, (jump.accepted_logins(), target.accepted_logins()), forwarded)
    jump.stop()
    target.stop()
    return seen, task.error


def test_a_jump_host_on_an_ipv6_address_is_written_in_brackets(make_executor, sshd_fleet, tmp_path):
    # Before, Fabric read user@[::1]:PORT as the host "[::1]:PORT" on port 22.
    jump = sshd_fleet.start(address="::1", extra_config="LogLevel DEBUG1")
    target = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    hop = f"{sshd_fleet.user}@[::1]:{jump.port}"
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": ssh_host(sshd_fleet, target, known, jump_host=f"ssh://{hop}")}))
    seen, error = _run_through(executor, jump, target)
    assert seen == ([hop], TaskStatus.SUCCEEDED, (1, 1), True), error


def test_connections_that_failed_or_closed_leave_nothing_open_on_the_servers(make_executor, sshd_fleet, tmp_path):
    # Fabric's close() does nothing for a connection whose login failed, and closes no jump
    # host's: each refused login kept a socket and a thread here, and an sshd process there,
    # and a jump host's connection outlived the one it carried.
    from sshd import generate_key

    jump, target = sshd_fleet.start(), sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    hop = f"{sshd_fleet.user}@{jump.address}:{jump.port}"
    stranger = str(generate_key(tmp_path / "stranger_key"))
    hosts = {
        "refused-key": ssh_host(sshd_fleet, target, known, identity_files=[stranger]),
        "unknown-host-key": ssh_host(sshd_fleet, target, tmp_path / "empty_known_hosts"),
        "through-jump": ssh_host(sshd_fleet, target, known, jump_host=hop, idle_timeout=0.2),
    }
    executor = make_executor(hosts_yaml=hosts_file_text(hosts))
    for _ in range(5):
        assert executor.run(TaskRequest(host="refused-key", command="true")).error_category == "auth"
        assert executor.run(TaskRequest(host="unknown-host-key", command="true")).error_category == "host_key"
    wait_until(lambda: target.session_pids() == [], timeout=10)

    assert executor.run(TaskRequest(host="through-jump", command="true")).status is TaskStatus.SUCCEEDED
    assert jump.session_pids() and target.session_pids()
    wait_until(lambda: (jump.session_pids(), target.session_pids()) == ([], []), timeout=10)  # the idle timeout
    jump.stop()
    target.stop()


def test_jump_hosts_of_jump_hosts_come_from_ssh_config_and_none_turns_them_off(make_executor, sshd_fleet, tmp_path):
    first, second = (sshd_fleet.start(extra_config="LogLevel DEBUG1") for _ in range(2))
    target = sshd_fleet.start(extra_config="LogLevel DEBUG1")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [first, second, target])
    config = tmp_path / "ssh_config"
    config.write_text(
        # `first` names itself, as a `Host *` rule would: it is reached directly.
        f"Host first\n  HostName {first.address}\n  Port {first.port}\n  ProxyJump first\n"
        f"Host second\n  HostName {second.address}\n  Port {second.port}\n  ProxyJump first\n"
        f"Host inner\n  HostName {target.address}\n  Port {target.port}\n  ProxyJump second\n"
        f"Host *\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known)}
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": entry, "direct": {**entry, "hostname": "inner", "jump_host": "none"}}))
    hops = [f"{sshd_fleet.user}@{jump.address}:{jump.port}" for jump in (first, second)]
    assert executor.plan(TaskRequest(host="inner", command="true")).transport_details["jump_hosts"] == hops
    task = executor.run(TaskRequest(host="inner", command="true"))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    assert f"target {second.address} port {second.port}" in first.log.read_text()
    assert f"target {target.address} port {target.port}" in second.log.read_text()
    assert [server.accepted_logins() for server in (first, second, target)] == [1, 1, 1]

    assert executor.plan(TaskRequest(host="direct", command="true")).transport_details["jump_hosts"] is None
    task = executor.run(TaskRequest(host="direct", command="true"))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    assert [server.accepted_logins() for server in (first, second, target)] == [1, 1, 2]
    for server in (first, second, target):
        server.stop()


def test_hosts_written_in_files_ssh_config_includes_are_found(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, monkeypatch):
    # paramiko reads no Include: such a host was reached by its alias, on port 22, as the local user.
    home = tmp_path / "home"
    (home / ".ssh" / "config.d").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    where = f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n"
    (home / ".ssh" / "config.d" / "10-web").write_text(f"Host by-glob\n{where}  IdentityFile {sshd_fleet.client_key}\n")
    (home / "by-block.conf").write_text(f"{where}Host unrelated\n  IdentityFile /nonexistent\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        "Include config.d/*\n"  # relative: in ~/.ssh, as for ssh
        f"User {sshd_fleet.user}\n"  # after it, every host's again (not the included file's last block's)
        # The line after the Include is by-block's again, though the included file opened another block.
        "Host by-block\n  Include ~/by-block.conf\n  IdentityFile " + str(sshd_fleet.client_key) + "\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    executor = make_executor(hosts_yaml=hosts_file_text({"by-glob": entry, "by-block": entry}))
    for name in ("by-glob", "by-block"):
        assert executor.plan(TaskRequest(host=name, command="true")).transport_details["address"] == (
            f"{sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}"
        )
        task = executor.run(TaskRequest(host=name, command="whoami"))
        assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error

    (home / ".ssh" / "config.d" / "10-web").write_text("Include config.d/10-web\n")  # includes itself
    task = make_executor(hosts_yaml=hosts_file_text({"by-glob": entry})).run(TaskRequest(host="by-glob", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "config")
    assert task.error == f"cannot read {config}: {home / '.ssh' / 'config.d' / '10-web'}: Include directives nested more than 16 deep"


def _as_ssh_reads_it(config: Path, name: str) -> list[tuple[str, str]]:
    """What OpenSSH's `ssh -G` makes of ``config`` for ``name``: (keyword, value), in the
    order printed (a keyword that takes several values is printed once for each)."""
    printed = subprocess.run(["ssh", "-F", str(config), "-G", name], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split(" ", 1)) for line in printed.splitlines()]  # type: ignore[misc]


def test_ssh_config_with_includes_is_read_as_ssh_reads_it(tmp_path):
    # OpenSSH's own reading (ssh -G) of the same files is the reference.
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-listed").write_text("Host listed\n  HostName 10.0.0.1\n  Port 2201\n")
    (tmp_path / "inner").write_text(
        "Compression yes\n"  # the enclosing block's: host a only
        "Host b a\n  HostName via-a\n"  # a only: b is not under Host a
        f"Host nested\n  Include {tmp_path / 'deeper'}\n"
    )
    (tmp_path / "deeper").write_text(f"Host *\n  Port 2299\n  CertificateFile {tmp_path}/deeper-cert.pub\n")
    config = tmp_path / "config"
    config.write_text(
        f"Include {tmp_path / 'conf.d'}/*\nUser everyone\n"
        f"Host a\n  Include {tmp_path / 'inner'}\n  Port 2000\n  CertificateFile {tmp_path}/a-cert.pub\n"
        "Match originalhost other\n  User someone\n"
        # Every CertificateFile that applies counts, in order (paramiko kept the first).
        f"Host *\n  Port 22\n  CertificateFile {tmp_path}/all-cert.pub\n  IdentityFile {tmp_path}/id\n"
        f"  CertificateFile={tmp_path}/written-with-equals-cert.pub\n"
    )
    lookup = read_ssh_config([ConfigFile(config, tmp_path)])
    keywords = ("hostname", "port", "user", "compression")
    for name in ("listed", "a", "b", "nested", "other"):
        theirs = {k: v for k, v in _as_ssh_reads_it(config, name) if k in keywords}
        ours = lookup.lookup(name)
        assert {k: ours.get(k, {"port": "22", "compression": "no"}.get(k)) for k in keywords} == theirs, name
        certificates = [value for keyword, value in _as_ssh_reads_it(config, name) if keyword == "certificatefile"]
        assert lookup.certificate_files(name) == certificates, name


def test_a_match_final_all_block_as_rhel_writes_it_is_read_as_ssh_reads_it(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path):
    # RHEL and Fedora ship /etc/ssh/ssh_config.d/50-redhat.conf as below: before, paramiko
    # refused `Match final all`, and with it every SSH host of such a machine.
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    (tmp_path / "ssh_config.d").mkdir()
    (tmp_path / "crypto-policy").write_text(
        "Ciphers aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes128-gcm@openssh.com,aes128-ctr\n"
        "MACs hmac-sha2-256-etm@openssh.com,hmac-sha1-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-512-etm@openssh.com\n"
        "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,diffie-hellman-group16-sha512\n"
        "RequiredRSASize 2048\n"
    )
    (tmp_path / "ssh_config.d" / "50-redhat.conf").write_text(
        f"Match final all\n\tInclude {tmp_path / 'crypto-policy'}\n\tGSSAPIAuthentication yes\n\tUser from-final\n\tPort 2222\n"
    )
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Include {tmp_path / 'ssh_config.d'}/*.conf\n"
        f"Host web\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  IdentityFile {sshd_fleet.client_key}\n"
        f"Host web\n  User {sshd_fleet.user}\n  Ciphers aes128-ctr\nMatch !final all\n  Compression yes\n"
    )
    lookup = read_ssh_config([ConfigFile(config, tmp_path)])
    keywords = ("hostname", "port", "user", "ciphers", "macs", "kexalgorithms", "compression", "gssapiauthentication")
    for name in ("web", "other"):
        theirs = {k: v for k, v in _as_ssh_reads_it(config, name) if k in keywords}
        ours = lookup.lookup(name)
        assert {k: ours.get(k) for k in keywords} == theirs, name
    # The final block fills in what nothing else set (User, the crypto policy): this one's own Ciphers win.
    assert (ours["user"], lookup.lookup("web")["ciphers"], lookup.lookup("web")["user"]) == ("from-final", "aes128-ctr", sshd_fleet.user)
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    task = make_executor(hosts_yaml=hosts_file_text({"web": entry})).run(TaskRequest(host="web", command="echo in"))
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)


def test_match_criteria_of_newer_ssh_are_decided_as_ssh_decides_them_for_a_command(tmp_path):
    # Before, paramiko took each of these criteria (OpenSSH 9.4 and later) for a match: the
    # `tagged work` block's User applied to every host, and so did each block below.
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    config = tmp_path / "config"
    config.write_text(
        "Host web\n  Tag work\nMatch tagged work\n  User worker\nMatch tagged home\n  User homer\n"
        "Match localnetwork 127.0.0.0/8,::1/128\n  Port 2201\n"  # this machine's loopback
        "Match localnetwork 198.51.100.0/24\n  HostName via-office\n"  # a documentation network: not here
        "Match !localnetwork 198.51.100.0/24\n  ProxyJump none\n"
        "Match sessiontype exec\n  Compression yes\nMatch sessiontype shell,subsystem\n  ConnectTimeout 9\n"
        "Match command *\n  ServerAliveInterval 7\nMatch command ls\n  ServerAliveCountMax 9\n"
        "Match version OpenSSH_*\n  ForwardAgent yes\n"
    )
    lookup = read_ssh_config([ConfigFile(config, tmp_path)])
    keywords = ("user", "port", "hostname", "proxyjump", "compression", "connecttimeout", "serveraliveinterval",
                "serveralivecountmax", "forwardagent")
    decided = {name: {k: lookup.lookup(name).get(k) for k in keywords} for name in ("web", "other")}
    assert decided == {
        name: {"user": user, "port": "2201", "hostname": name, "proxyjump": "none", "compression": "yes",
               "connecttimeout": None, "serveraliveinterval": "7", "serveralivecountmax": None, "forwardagent": None}
        for name, user in (("web", "worker"), ("other", None))
    }


_LOOKED_UP = ("web", "WEB", "web.example.com", "Db1.Example.COM", "db1", "a.b.c", "10.0.0.1", "other")
_COMPARED = ("hostname", "user", "port", "proxyjump", "connecttimeout", "hostkeyalias", "serveraliveinterval")
_WRITTEN_CONFIGS = [
    # paramiko read every file twice: `Match user bob` matched on the User set below it.
    "Match user bob\n  Port 2200\nHost *\n  User bob\n",
    # Match host ignores case, and sees HostName with %h expanded; Host lines keep case.
    "Host WEB\n  Port 2201\nMatch host web.example.com\n  User matched\nHost *\n  HostName %h.example.com\n"
    "Match host web.example.com,db1.example.com.example.com\n  ConnectTimeout 5\n",
    "Match originalhost WEB,*.EXAMPLE.com\n  HostKeyAlias upper\n",
    # With Match final, a second pass matches Host lines on the name to connect to, lowercased.
    "Host *.example.com\n  ConnectTimeout 7\nMatch final\n  ServerAliveInterval 9\nHost web\n  HostName Web.Example.COM\n",
    # `canonical` holds only in that second pass.
    "Match canonical\n  Port 2202\n",
    "Match canonical\n  Port 2202\nMatch final all\n  User late\n",
    "Match !final\n  ProxyJump none\nHost *\n  ProxyJump bastion\n",
    # Of ProxyJump and ProxyCommand, the first found is kept (ProxyJump none gives way).
    "Host web*\n  ProxyCommand nc %h %p\nHost *\n  ProxyJump bastion\n",
    "Host web*\n  ProxyCommand none\nHost db*\n  ProxyJump none\nHost *\n  ProxyJump bastion\n  ProxyCommand nc %h %p\n",
]


def _random_ssh_configs(count: int) -> list[str]:
    import random

    rng = random.Random(20261125)
    patterns = ["web", "*", "web*", "*.example.com", "!web", "db?", "a.*", "10.0.0.*", "other", "!other", "WEB"]
    values = {
        "HostName": ["h1", "%h.internal", "10.1.1.1", "%h", "Web.Internal", "x.%h"], "User": ["alice", "bob"],
        "Port": ["2200", "22"], "ProxyJump": ["none", "bastion", "u@b:2"], "ConnectTimeout": ["5", "10"],
        "HostKeyAlias": ["alias1", "%h-alias"], "ServerAliveInterval": ["30", "0"], "ProxyCommand": ["nc %h %p", "none"],
    }
    configs = []
    for _ in range(count):
        lines = []
        for block in range(rng.randint(1, 5)):
            if rng.random() < 0.1:
                lines.append(rng.choice(["Match final", "Match final all", "Match canonical", "Match !final", "Match final host web*"]))
            elif rng.random() < 0.6:
                lines.append("Host " + " ".join(rng.sample(patterns, rng.randint(1, 3))))
            else:
                criterion = rng.choice(["host", "originalhost", "user", "localuser"])
                lines.append(f"Match {'!' if rng.random() < 0.2 else ''}{criterion} {','.join(rng.sample(patterns + ['bob'], 2))}")
            lines += [f"  {keyword} {rng.choice(choices)}" for keyword, choices in rng.sample(list(values.items()), rng.randint(1, 3))]
        configs.append("\n".join(lines) + "\n")
    return configs


def test_ssh_config_blocks_apply_as_ssh_decides_them(tmp_path):
    # ssh -G on the same file is the reference, for each name and keyword. Before, fleetrun's
    # reading differed on each written config above and on 57 of the 60 generated ones (199
    # values in all; many for a name written in capitals, which ssh lowercases).
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    differences = []
    for index, text in enumerate(_WRITTEN_CONFIGS + _random_ssh_configs(60)):
        config = tmp_path / f"config{index}"
        config.write_text(text)
        lookup = read_ssh_config([ConfigFile(config, tmp_path)])
        for name in _LOOKED_UP:
            theirs = dict(_as_ssh_reads_it(config, name))
            ours = lookup.lookup(name)
            for keyword in _COMPARED:
                # ssh -G prints its defaults, and prints ProxyJump's tokens unexpanded (they are expanded on connecting).
                expected = theirs.get(keyword, "none" if keyword == "proxyjump" else None)
                default = {"port": "22", "user": theirs["user"] if "user" not in ours else None, "connecttimeout": "none",
                           "serveraliveinterval": "0", "proxyjump": "none"}.get(keyword)
                got = ours.get(keyword, default)
                if keyword == "proxyjump" and "%" in expected:
                    continue
                if got != expected:
                    differences.append((text, name, keyword, got, expected))
            if (ours.get("proxycommand") is not None) != ("proxycommand" in theirs):  # printed with its tokens unexpanded
                differences.append((text, name, "proxycommand", ours.get("proxycommand"), theirs.get("proxycommand")))
    assert not differences, differences[:5]


def test_tokens_of_ssh_config_are_expanded_as_ssh_expands_them(make_executor, sshd_fleet, shared_sshd, tmp_path):
    # Before, paramiko expanded no token in UserKnownHostsFile or IdentityAgent, some in
    # IdentityFile (not %p, %n, %i, %k, %%), one after another, and %l by asking DNS.
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, paths_of, read_ssh_config

    every = "%%-%C-%d-%h-%i-%k-%L-%l-%n-%p-%r-%u"
    config = tmp_path / "config"
    config.write_text(
        "Host aliased\n  HostName real.%h\n  User bob\n  Port 2222\n  HostKeyAlias kept-%%h\n"
        f"Host *\n  UserKnownHostsFile /kh/{every} /kh2/%h%%h\n  IdentityAgent /agent/{every}\n  IdentityFile /id/{every}\n"
    )
    lookup = read_ssh_config([ConfigFile(config, tmp_path)])
    for name in ("aliased", "plain", "Upper.Example"):
        theirs = dict(_as_ssh_reads_it(config, name))
        ours = lookup.lookup(name)
        assert (ours["userknownhostsfile"], ours["identityagent"]) == (theirs["userknownhostsfile"], theirs["identityagent"])
        # ssh -G prints IdentityFile as written (ssh expands it when loading the key): the same tokens, the same values.
        assert ours["identityfile"] == [theirs["identityagent"].replace("/agent/", "/id/")]
        assert "%" in theirs["identityagent"] and theirs["identityagent"].startswith("/agent/%-")

    # A known_hosts file per host, as ~/.ssh/known_hosts.d/%k is written: fleetrun found none.
    (tmp_path / "known_hosts.d").mkdir()
    (tmp_path / "known_hosts.d" / "web").write_text(shared_sshd.known_hosts_line)
    (tmp_path / "per_host").write_text(
        f"Host web\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {tmp_path}/known_hosts.d/%k\n"
    )
    task = make_executor(hosts_yaml=hosts_file_text({"web": {"transport": "ssh", "ssh_config_file": str(tmp_path / "per_host")}})).run(
        TaskRequest(host="web", command="echo in")
    )
    ssh = subprocess.run(["ssh", "-F", str(tmp_path / "per_host"), "-o", "BatchMode=yes", "web", "echo in"], capture_output=True, text=True, timeout=30)
    assert (task.status, task.error, ssh.stdout) == (TaskStatus.SUCCEEDED, None, "in\n")

    # A path with a space, quoted: one file (before, two: "…/with" and "space/known_hosts").
    (tmp_path / "with space").mkdir()
    (tmp_path / "with space" / "known_hosts").write_text(shared_sshd.known_hosts_line)
    for written in (f'"{tmp_path}/with space/known_hosts"', f"/nowhere '{tmp_path}/with space/known_hosts'"):
        (tmp_path / "quoted").write_text((tmp_path / "per_host").read_text().replace(f"{tmp_path}/known_hosts.d/%k", written))
        lookup = read_ssh_config([ConfigFile(tmp_path / "quoted", tmp_path)])
        assert [f"{tmp_path}/with space/known_hosts"] == [
            path for path in paths_of(lookup.lookup("web")["userknownhostsfile"]) if path != "/nowhere"
        ]
        assert f"{tmp_path}/with space/known_hosts" in dict(_as_ssh_reads_it(tmp_path / "quoted", "web"))["userknownhostsfile"]
        task = make_executor(hosts_yaml=hosts_file_text({"web": {"transport": "ssh", "ssh_config_file": str(tmp_path / "quoted")}})).run(
            TaskRequest(host="web", command="echo in")
        )
        assert (task.status, task.error) == (TaskStatus.SUCCEEDED, None)


def test_match_exec_runs_by_the_user_s_shell_as_in_ssh_without_secrets(tmp_path, monkeypatch):
    from fleetrun.core.secrets import read_secret
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    monkeypatch.setenv("SHELL", "/bin/sh")
    monkeypatch.setenv("EXEC_SECRET", "kept-from-match-exec")
    assert read_secret(env="EXEC_SECRET", file=None, what="password") == "kept-from-match-exec"
    config = tmp_path / "config"
    config.write_text(
        f'Match exec "test -e {tmp_path}/flag"\n  Port 2200\n'
        'Match exec "[ %h = web.example ] && [ %n = web.example ]"\n  User matched\n'
        f'Match exec "env > {tmp_path}/exec_env"\n  ConnectTimeout 7\n'
    )
    for flag in (False, True):
        if flag:
            (tmp_path / "flag").touch()
        lookup = read_ssh_config([ConfigFile(config, tmp_path)])
        for name in ("web.example", "other"):
            theirs = dict(_as_ssh_reads_it(config, name))
            ours = lookup.lookup(name)
            assert (ours.get("port", "22"), ours.get("user", theirs["user"]), ours.get("connecttimeout")) == (
                theirs["port"], theirs["user"], theirs["connecttimeout"]
            ), (flag, name)
            assert (ours.get("port"), ours.get("user")) == ("2200" if flag else None, "matched" if name == "web.example" else None)
    # Before: run by bash, with every variable of fleetrun's.
    exec_env = (tmp_path / "exec_env").read_text()
    assert "SHELL=/bin/sh\n" in exec_env and "EXEC_SECRET" not in exec_env
    # And by invoke, which read fleetrun's own stdin: the MCP server's protocol stream lost bytes.
    looked_up = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config; "
         f"read_ssh_config([ConfigFile(Path({str(config)!r}), Path('/'))]).lookup('web.example'); print(sys.stdin.read())"],
        input='{"jsonrpc": "2.0"}\n', capture_output=True, text=True, check=True,
    )
    assert looked_up.stdout == '{"jsonrpc": "2.0"}\n\n'


def test_an_identity_file_of_ssh_config_may_name_an_environment_variable_as_in_ssh(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path, monkeypatch):
    # ssh expands ${NAME} in IdentityFile; paramiko took it as written and found no such file.
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_*
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("FLEETRUN_TEST_KEYS", str(sshd_fleet.client_key.parent))
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host web\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile ${{FLEETRUN_TEST_KEYS}}/{sshd_fleet.client_key.name}\n"
    )
    executor = make_executor(hosts_yaml=hosts_file_text({"web": {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}}))
    task = executor.run(TaskRequest(host="web", command="whoami"))
    assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error


def test_an_ssh_config_another_user_may_write_is_refused_as_ssh_refuses_it(make_executor, tmp_path, monkeypatch):
    # Such a file could make fleetrun run any command as its user (a ProxyCommand, Match exec).
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    user_config = home / ".ssh" / "config"
    user_config.write_text("Host web\n  HostName 127.0.0.1\n")
    user_config.chmod(0o664)
    included = tmp_path / "included"
    included.write_text("Host web\n  Port 2222\n")
    included.chmod(0o666)
    given = tmp_path / "given_config"  # named with ssh_config_file, as `ssh -F`: not checked itself
    given.write_text(f"Include {included}\n")
    given.chmod(0o666)
    executor = make_executor(hosts_yaml=hosts_file_text({
        "web": {"transport": "ssh"}, "given": {"transport": "ssh", "hostname": "web", "ssh_config_file": str(given)},
    }))
    expected = {
        "web": f"cannot read ~/.ssh/config or /etc/ssh/ssh_config: {user_config} may be written by another user (mode 664, "
               f"owner uid {os.getuid()}): ssh refuses to read it, and so does fleetrun; make it the user's own and chmod go-w it",
        "given": f"cannot read {given}: {included} may be written by another user (mode 666, owner uid {os.getuid()}): "
                 "ssh refuses to read it, and so does fleetrun; make it the user's own and chmod go-w it",
    }
    for name, error in expected.items():
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.status, task.error_category, task.error) == (TaskStatus.FAILED, "config", error)
    refused = subprocess.run(["ssh", "-F", str(given), "-G", "web"], capture_output=True, text=True)
    assert refused.returncode != 0 and f"Bad owner or permissions on {included}" in refused.stderr
    included.chmod(0o644)
    assert executor.plan(TaskRequest(host="given", command="true")).transport_details["address"].endswith("@web:2222")


def test_an_ssh_config_reading_is_kept_until_a_file_it_read_changes(tmp_path):
    from fleetrun.plugins.transports.ssh_config_files import ConfigFile, read_ssh_config

    def settled(path: Path, text: str, age_s: int) -> None:  # written a while ago, as a config usually was
        path.write_text(text)
        then = time.time_ns() - age_s * 1_000_000_000
        os.utime(path, ns=(then, then))

    (tmp_path / "conf.d").mkdir()
    main = tmp_path / "config"
    settled(main, "Include conf.d/*\n", 60)
    settled(tmp_path / "conf.d" / "a", "Host a\n  Port 2001\n", 60)
    files = [ConfigFile(main, tmp_path)]
    built = []

    def read():  # -> the port of each host, and whether it was read again (a new lookup, not the one kept)
        lookup = read_ssh_config(files)
        again = not built or lookup is not built[-1]
        built.append(lookup)
        return [lookup.lookup(name).get("port") for name in ("a", "b")], again

    assert read() == (["2001", None], True)
    assert read() == (["2001", None], False)
    settled(tmp_path / "conf.d" / "b", "Host b\n  Port 2002\n", 30)  # a new file the Include's pattern matches
    assert read() == (["2001", "2002"], True)
    settled(tmp_path / "conf.d" / "a", "Host a\n  Port 2003\n", 20)  # same size, another time
    assert read() == (["2003", "2002"], True)
    assert read()[1] is False
    (tmp_path / "conf.d" / "a").write_text("Host a\n  Port 2004\n")  # just now: could change again unseen
    assert read() == (["2004", "2002"], True)
    assert read()[1] is True


def test_a_proxycommand_in_ssh_config_carries_the_connection(make_executor, sshd_fleet, tmp_path):
    # OpenSSH's own client as the proxy: `ssh -W` through the jump server.
    jump = sshd_fleet.start(extra_config="LogLevel DEBUG1")
    target = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host inner\n  HostName {target.address}\n  Port {target.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n"
        f"  ProxyCommand ssh -F none -i {sshd_fleet.client_key} -o UserKnownHostsFile={known} -o BatchMode=yes "
        f"-p {jump.port} -W %h:%p {sshd_fleet.user}@{jump.address}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known)}
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": entry, "ruled": {**entry, "hostname": "inner", "blocked_networks": ["192.0.2.0/24"]}}))
    # Network rules cannot be checked on a connection a command makes: such a host is refused.
    refused = executor.run(TaskRequest(host="ruled", command="true"))
    assert (refused.status, refused.error_category) == (TaskStatus.FAILED, "network")
    assert refused.error == (
        f"{sshd_fleet.user}@{target.address}:{target.port} is reached through a ProxyCommand of ssh_config, which connects where "
        "fleetrun cannot check: the host's network rules (allowed_networks, blocked_networks) refuse it"
    )
    seen, error = _run_through(executor, jump, target)
    assert seen == (None, TaskStatus.SUCCEEDED, (1, 1), True), error  # the ruled host never logged in anywhere
    # The dry run says a ProxyCommand carries the connection (before, nothing did), naming its program only.
    details = executor.plan(TaskRequest(host="inner", command="true")).transport_details
    assert (details["proxy_command"], details["jump_hosts"]) == ("ssh … (ssh_config's ProxyCommand)", None)


def test_a_proxycommand_is_run_by_the_user_s_shell_as_ssh_runs_it(make_executor, sshd_fleet, tmp_path, monkeypatch, capfd):
    # Before, paramiko split the command into words itself: "$JUMP_PORT" and "$(printf ...)"
    # reached ssh -W as written, and the proxy failed.
    jump = sshd_fleet.start()
    target = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [jump, target])
    monkeypatch.setenv("JUMP_PORT", str(jump.port))
    monkeypatch.setenv("SHELL", "/bin/sh")
    monkeypatch.setenv("INNER_PASSWORD", "not-for-the-proxy")  # the host's password_env: no command here gets it
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host inner\n  HostName {target.address}\n  Port {target.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {known}\n"
        f"  ProxyCommand {tmp_path}/proxy ssh -F none -i {sshd_fleet.client_key} -o UserKnownHostsFile={known} "
        f'-o BatchMode=yes -p $JUMP_PORT -W "$(printf %%s %h)":%p {sshd_fleet.user}@{jump.address}\n'
    )
    (tmp_path / "proxy").write_text(f'#!/bin/sh\nenv > {tmp_path}/proxy_env\necho "the proxy says hello" >&2\nexec "$@"\n')
    (tmp_path / "proxy").chmod(0o755)
    entry = {"transport": "ssh", "ssh_config_file": str(config), "password_env": "INNER_PASSWORD"}
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": entry}))
    task = executor.run(TaskRequest(host="inner", command="echo in"))
    proxy_env = (tmp_path / "proxy_env").read_text()
    assert f"JUMP_PORT={jump.port}\n" in proxy_env and "INNER_PASSWORD" not in proxy_env
    assert "the proxy says hello\n" in capfd.readouterr().err  # on fleetrun's stderr, as on ssh's (paramiko kept it in a pipe)
    ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "inner", "echo in"], capture_output=True, text=True, timeout=30)
    assert (task.status, task.error, ssh.stdout) == (TaskStatus.SUCCEEDED, None, "in\n")
    assert (jump.accepted_logins(), target.accepted_logins()) == (2, 2)


def test_an_ssh_config_fabric_cannot_read_fails_its_hosts_tasks_naming_the_problem(tmp_path):
    # Before: ValueError and ConfigParseError tracebacks from `fleetrun hosts`, a dry run and every task.
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host words\n  HostName 127.0.0.1\n  Port ssh\nHost high\n  HostName 127.0.0.1\n  Port 99999\n"
        "Host canonical\n  CanonicalizeHostname yes\n"
        # Values ssh refuses ("unsupported option", "invalid time value"); before, ignored.
        "Host asks\n  StrictHostKeyChecking maybe\nHost waits\n  ConnectTimeout 1.5\n"
        "Host pings\n  ServerAliveInterval 5x\nHost counts\n  ServerAliveCountMax -1\nHost ciphers\n  Ciphers aes*\n"
        # Fabric took only a lowercase yes or no; fleetrun forwards no agent whatever it says.
        "Host fine\n  HostName 127.0.0.1\n  Port 2222\n  ForwardAgent Yes\n"
    )
    unreadable = {"unparsable": "Host *\n  User\n", "escape": "Host *\n  Match host a\\\n"}
    for name, text in unreadable.items():
        (tmp_path / name).write_text(text)
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(hosts_file_text({
        **{
            name: {"transport": "ssh", "ssh_config_file": str(config)}
            for name in ("words", "high", "canonical", "asks", "waits", "pings", "counts", "ciphers", "fine")
        },
        **{name: {"transport": "ssh", "ssh_config_file": str(tmp_path / name)} for name in unreadable},
    }))
    problems = {
        "words": "ssh_config gives words the port 'ssh': a port is a number from 1 to 65535",
        "high": "ssh_config gives high the port '99999': a port is a number from 1 to 65535",
        "canonical": "ssh_config cannot be read for canonical: KeyError: 'canonicaldomains'",
        "asks": "ssh_config gives asks StrictHostKeyChecking 'maybe': expected one of yes, ask, accept-new, no, off",
        "waits": "ssh_config gives waits ConnectTimeout '1.5': expected a time in seconds, or with units as 1m30s",
        "pings": "ssh_config gives pings ServerAliveInterval '5x': expected a time in seconds, or with units as 1m30s",
        "counts": "ssh_config gives counts ServerAliveCountMax '-1': expected a whole number",
        "ciphers": "ssh_config gives ciphers Ciphers 'aes*': expected names of algorithms (ssh -Q Ciphers lists them; "
                   "patterns only after '-'): 'aes*' is not one",
        "unparsable": f"cannot read {tmp_path / 'unparsable'}: Unparsable line User",
        "escape": f"cannot read {tmp_path / 'escape'}: ValueError: No escaped character",
    }
    env = {"FLEETRUN_HOME": str(tmp_path / "home")}
    listed = run_cli("--hosts", str(hosts), "hosts", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    details = {h["name"]: h["details"] for h in json.loads(listed.stdout)["hosts"]}
    assert {name: details[name] for name in problems} == {name: {"error": problem} for name, problem in problems.items()}
    assert details["fine"]["address"].endswith("@127.0.0.1:2222")
    for name, problem in problems.items():
        ran = run_cli("--hosts", str(hosts), "run", name, "--", "true", env=env)
        assert ran.returncode == 125 and "Traceback" not in ran.stderr, ran.stderr
        assert re.fullmatch(f"fleetrun: task [0-9a-f]{{12}} failed: {re.escape(problem)}", ran.stderr.splitlines()[-1]), ran.stderr
        dry = run_cli("--hosts", str(hosts), "run", name, "--dry-run", "--", "true", env=env)
        assert (dry.returncode, f"transport:   ssh (error: {problem})") == (0, dry.stdout.splitlines()[1]), dry.stderr


@pytest.mark.parametrize(
    ("written", "error"),
    [
        ("Host inner\n  HostName 127.0.0.1\n  ProxyJump bastion:22x\n",
         "ssh_config's ProxyJump for inner: jump host 'bastion:22x': the port must be a number from 1 to 65535"),
        ("Host inner\n  ProxyJump a\nHost a\n  ProxyJump b\nHost b\n  ProxyJump a\n",
         "ssh_config's ProxyJump goes round in a loop: inner -> a -> b -> a"),
    ],
)
def test_a_proxyjump_in_ssh_config_that_cannot_be_followed_fails_the_task_naming_it(make_executor, tmp_path, written, error):
    config = tmp_path / "ssh_config"
    config.write_text(written)
    executor = make_executor(hosts_yaml=hosts_file_text({"inner": {"transport": "ssh", "ssh_config_file": str(config)}}))
    task = executor.run(TaskRequest(host="inner", command="true"))
    assert (task.status, task.error_category, task.error) == (TaskStatus.FAILED, "config", error)


def test_a_jump_host_with_an_unknown_key_is_refused_by_name(make_executor, sshd_fleet, tmp_path):
    jump = sshd_fleet.start()
    target = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [target])  # the jump host's key is missing
    entry = ssh_host(sshd_fleet, target, known, jump_host=f"{sshd_fleet.user}@{jump.address}:{jump.port}")
    task = make_executor(hosts_yaml=hosts_file_text({"inner": entry})).run(TaskRequest(host="inner", command="true"))
    assert (task.status, task.error_category) == (TaskStatus.FAILED, "host_key")
    assert f"[{jump.address}]:{jump.port}" in task.error and jump.host_key_fingerprint in task.error
    assert target.accepted_logins() == 0
    jump.stop()
    target.stop()


def test_hosts_are_resolved_through_an_ssh_config_file(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host web-alias\n  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n"
        f"  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
    )
    entry = {"transport": "ssh", "ssh_config_file": str(config), "known_hosts": str(known_hosts)}
    executor = make_executor(hosts_yaml=hosts_file_text({"web-alias": entry}))
    details = executor.plan(TaskRequest(host="web-alias", command="true")).transport_details
    assert details["address"] == f"{sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}"
    task = executor.run(TaskRequest(host="web-alias", command="whoami"))
    assert task.status is TaskStatus.SUCCEEDED, task.error
    assert executor.read_output(task.id).data == f"{sshd_fleet.user}\n".encode()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_a_server_on_an_ipv6_address(make_executor, sshd_fleet, tmp_path):
    server = sshd_fleet.start(address="::1")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    executor = make_executor(hosts_yaml=hosts_file_text({
        "v6": ssh_host(sshd_fleet, server, known),
        "v6-unknown-key": ssh_host(sshd_fleet, server, tmp_path / "empty_known_hosts"),
    }))
    where = f"{sshd_fleet.user}@[::1]:{server.port}"  # as ssh writes it; before: user@::1:PORT
    assert executor.plan(TaskRequest(host="v6", command="true")).transport_details["address"] == where
    task = executor.run(TaskRequest(host="v6", command="whoami"))
    assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{sshd_fleet.user}\n".encode()), task.error
    refused = executor.run(TaskRequest(host="v6-unknown-key", command="true"))
    assert refused.error_category == "host_key" and f"the host key of [::1]:{server.port} is unknown" in refused.error


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_address_family_of_ssh_config_chooses_the_addresses_tried_as_in_ssh(make_executor, sshd_fleet, tmp_path):
    v6 = sshd_fleet.start(address="::1")
    v4 = sshd_fleet.start()
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [v6, v4])
    common = f"  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {known}\n  ConnectTimeout 5\n"
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host six\n  HostName ::1\n  Port {v6.port}\n  AddressFamily INET6\n{common}"
        f"Host any\n  HostName ::1\n  Port {v6.port}\n  AddressFamily any\n{common}"
        f"Host six-as-four\n  HostName ::1\n  Port {v6.port}\n  AddressFamily inet\n{common}"
        f"Host four-as-six\n  HostName {v4.address}\n  Port {v4.port}\n  AddressFamily inet6\n{common}"
    )
    misspelt = tmp_path / "misspelt_ssh_config"
    misspelt.write_text(f"Host misspelt\n  HostName {v4.address}\n  Port {v4.port}\n  AddressFamily ipv4\n{common}")
    files = {"six": config, "any": config, "six-as-four": config, "four-as-six": config, "misspelt": misspelt}
    executor = make_executor(hosts_yaml=hosts_file_text({name: {"transport": "ssh", "ssh_config_file": str(file)} for name, file in files.items()}))
    outcomes = {}
    for name, file in files.items():
        task = executor.run(TaskRequest(host=name, command="echo in"))
        by_ssh = subprocess.run(["ssh", "-F", str(file), "-o", "BatchMode=yes", name, "echo in"], capture_output=True, text=True, timeout=30)
        ssh_said = "in" if by_ssh.stdout == "in\n" else "unsupported" if 'unsupported option "ipv4"' in by_ssh.stderr else (
            "family" if "Address family for hostname not supported" in by_ssh.stderr else by_ssh.stderr
        )
        outcomes[name] = (task.status, task.error_category, task.error, ssh_said)
    where = f"{sshd_fleet.user}@{{}}:{{}}"
    # Before: AddressFamily was not read, so both mismatches connected, and ipv4 was accepted.
    assert outcomes == {
        "six": (TaskStatus.SUCCEEDED, None, None, "in"),
        "any": (TaskStatus.SUCCEEDED, None, None, "in"),
        "six-as-four": (
            TaskStatus.FAILED, "unreachable", f"cannot resolve {where.format('[::1]', v6.port)}: Address family for hostname not "
            "supported (ssh_config's AddressFamily is inet)", "family",
        ),
        "four-as-six": (
            TaskStatus.FAILED, "unreachable", f"cannot resolve {where.format(v4.address, v4.port)}: Address family for hostname "
            "not supported (ssh_config's AddressFamily is inet6)", "family",
        ),
        "misspelt": (
            TaskStatus.FAILED, "config", f"ssh_config gives {v4.address} AddressFamily 'ipv4': expected one of any, inet, inet6", "unsupported",
        ),
    }
    assert executor.plan(TaskRequest(host="six", command="true")).transport_details["address_family"] == "inet6"
    assert executor.plan(TaskRequest(host="any", command="true")).transport_details["address_family"] is None


# -- algorithms --------------------------------------------------------------------------

_ALGORITHM_LISTS = [
    None, "aes256-ctr,aes128-ctr", "+aes128-cbc", "^aes256-ctr", "-*gcm*", "-aes1?8-ctr,*cbc", "aes128-ctr,aes128-ctr",
    "chacha20-poly1305@openssh.com", "aes128-ctr,blowfish-cbc", "AES128-CTR", "aes*", "aes128-ctr, aes256-ctr", "-*",
    "hmac-sha2-512", "+hmac-md5", "-hmac-sha1*", "umac-64@openssh.com", "curve25519-sha256", "+diffie-hellman-group14-sha1",
    "^diffie-hellman-group16-sha512", "-ecdh-*", "ssh-ed25519", "+ssh-rsa", "-*-cert-v01@openssh.com", "^rsa-sha2-256",
    "sk-ssh-ed25519@openssh.com", "mlkem1024x448-sha512@example.org,curve25519-sha256", "+sntrup4591761x25519-sha512@tinyssh.org",
    "-*ctr,!aes128-ctr", "-hmac-sha?-*,!hmac-sha2-512", "-ecdh-*,!*nistp256", "-*,!ssh-ed25519",
]


def test_algorithm_lists_of_ssh_config_are_read_as_ssh_reads_them(tmp_path):
    from fleetrun.core.transport import TransportError
    from fleetrun.plugins.transports.ssh_algorithms import KINDS, offered

    def by_ssh(keyword: str, written: str | None) -> list[str] | None:
        options = [] if written is None else ["-o", f"{keyword}={written}"]
        printed = subprocess.run(["ssh", "-F", "none", *options, "-G", "example"], capture_output=True, text=True)
        if printed.returncode != 0:
            return None
        return next(line.split(" ", 1)[1].split(",") for line in printed.stdout.splitlines() if line.startswith(f"{keyword.lower()} "))

    compared = 0
    for kind in KINDS:
        this_ssh_knows = set(subprocess.run(["ssh", "-Q", kind.keyword], capture_output=True, text=True, check=True).stdout.split())
        for written in _ALGORITHM_LISTS:
            listed = by_ssh(kind.keyword, written)
            names = (written or "").lstrip("+^").split(",")
            if listed is None and written[0] != "-" and all(re.fullmatch(r"[a-z0-9][a-z0-9.@_+-]*", name) for name in names):
                # Names this ssh does not know (a newer ssh's, or none at all): left out, where ssh refuses the file.
                known = ",".join(name for name in names if name in this_ssh_knows)
                prefix = written[0] if written[0] in "+^" else ""
                listed = by_ssh(kind.keyword, prefix + known) if known else by_ssh(kind.keyword, None) if prefix else []
            speakable = kind.speakable()
            try:
                ours: tuple[str, ...] | str = offered(kind, written, "example")
            except TransportError as exc:
                assert exc.category == "config" and exc.message.startswith(f"ssh_config gives example {kind.keyword} {written!r}: expected ")
                ours = "refused"
            if listed is None:  # ssh refuses the file
                assert ours == "refused", (kind.keyword, written, ours)
                continue
            expected = [name for name in listed if name in speakable]
            if not expected:  # nothing fleetrun can speak: refused, naming what it can
                assert ours == "refused", (kind.keyword, written, ours)
                continue
            assert isinstance(ours, tuple), (kind.keyword, written, ours)
            # Names newer than this ssh (mlkem768x25519-sha256) are in fleetrun's defaults.
            known_here = [name for name in ours if name in this_ssh_knows]
            if written is None or written[0] in "+-^":
                # Over ssh's defaults: the same names; AES-GCM goes first among the defaults.
                assert sorted(known_here) == sorted(expected), (kind.keyword, written, ours, listed)
                if written and written[0] == "^":
                    head = [name for name in written[1:].split(",") if name in speakable]
                    assert list(ours[: len(head)]) == head, (kind.keyword, written, ours)
            else:
                assert known_here == expected, (kind.keyword, written, ours, listed)
            compared += 1
    assert compared >= 30
    # Before: paramiko's defaults, CBC, 3DES and MD5 included, which ssh no longer offers.
    assert offered(KINDS[0], None, "example") == (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr",
    )
    assert offered(KINDS[1], None, "example") == (
        "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512", "hmac-sha1",
    )
    # A name of a newer ssh, as a system-wide crypto policy may write it, fails no host.
    assert offered(KINDS[2], "mlkem1024x448-sha512@example.org,curve25519-sha256", "example") == ("curve25519-sha256",)


def test_algorithms_offered_are_ssh_s_and_ssh_config_s(make_executor, sshd_fleet, shared_sshd, tmp_path):
    legacy = sshd_fleet.start(extra_config="Ciphers aes128-cbc\nMACs hmac-md5")
    narrow = sshd_fleet.start(extra_config="MACs hmac-sha2-256\nLogLevel DEBUG1")
    # RFC 8731's name alone, which paramiko knows only as curve25519-sha256@libssh.org.
    rfc_kex = sshd_fleet.start(extra_config="KexAlgorithms curve25519-sha256\nLogLevel DEBUG1")
    servers = {"legacy": legacy, "narrow": narrow, "shared": shared_sshd, "rfc_kex": rfc_kex}
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", list(servers.values()))
    config = tmp_path / "ssh_config"
    blocks = {
        "legacy": ("legacy", ""),
        "legacy-allowed": ("legacy", "  Ciphers +aes128-cbc\n  MACs +hmac-md5\n"),
        # (A cipher without a MAC of its own: ssh needs no MAC in common with AES-GCM, paramiko does.)
        "hardened": ("narrow", "  Ciphers aes256-ctr\n  MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-512\n"),
        "chosen": ("narrow", "  Ciphers aes256-ctr\n  MACs hmac-sha2-256\n  KexAlgorithms diffie-hellman-group16-sha512\n"
                              "  HostKeyAlgorithms ssh-ed25519\n"),
        "no-common-host-key": ("shared", "  HostKeyAlgorithms rsa-sha2-512\n"),
        "rfc-kex": ("rfc_kex", ""),
    }
    config.write_text("".join(
        f"Host {name}\n  HostName {servers[server].address}\n  Port {servers[server].port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {known}\n{lines}"
        for name, (server, lines) in blocks.items()
    ))
    executor = make_executor(hosts_yaml=hosts_file_text({name: {"transport": "ssh", "ssh_config_file": str(config)} for name in blocks}))
    outcomes = {}
    for name in blocks:
        task = executor.run(TaskRequest(host=name, command="echo in"))
        ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", name, "echo in"], capture_output=True, text=True, timeout=30)
        outcomes[name] = (task.status, task.error_category, ssh.stdout == "in\n")
        if task.status is TaskStatus.FAILED:
            outcomes[name] += (task.error.split(" failed: ", 1)[1],)
    def refused(what: str, offered: str, keyword: str) -> tuple[object, ...]:
        return (
            TaskStatus.FAILED, "unreachable", False,
            f"Incompatible ssh {what}. fleetrun offered: {offered} (ssh's defaults, or ssh_config's {keyword}); for a "
            f"server that speaks only others, add one in ssh_config for this host ({keyword} +NAME), as ssh needs too",
        )

    gcm_first = "aes128-gcm@openssh.com, aes256-gcm@openssh.com, aes128-ctr, aes192-ctr, aes256-ctr"
    # Before: the legacy server was reached (paramiko offers CBC), the hardened list was not kept
    # to, and the server speaking RFC 8731's name alone was not reached.
    assert outcomes == {
        "legacy": refused("server (no acceptable ciphers)", gcm_first, "Ciphers"),
        "legacy-allowed": (TaskStatus.SUCCEEDED, None, True),
        "hardened": refused("server (no acceptable macs)", "hmac-sha2-512-etm@openssh.com, hmac-sha2-512", "MACs"),
        "chosen": (TaskStatus.SUCCEEDED, None, True),
        "no-common-host-key": refused("peer (no acceptable host key)", "rsa-sha2-512", "HostKeyAlgorithms"),
        "rfc-kex": (TaskStatus.SUCCEEDED, None, True),
    }
    assert len(re.findall(r"kex: algorithm: curve25519-sha256(?!@)", rfc_kex.log.read_text(errors="replace"))) == 2
    # What the server saw for the chosen host: fleetrun's sessions, then ssh's, each with the chosen algorithms.
    log = narrow.log.read_text(errors="replace")
    assert log.count("kex: algorithm: diffie-hellman-group16-sha512") == 2, log[-3000:]
    assert log.count("kex: host key algorithm: ssh-ed25519") >= 2
    assert log.count("kex: client->server cipher: aes256-ctr MAC: hmac-sha2-256 compression: none") == 2


def test_connection_attempts_and_compression_of_ssh_config_apply_as_in_ssh(make_executor, sshd_fleet, tmp_path):
    import threading

    server = sshd_fleet.start(extra_config="LogLevel DEBUG1")
    known = sshd_fleet.known_hosts(tmp_path / "known_hosts", [server])
    where = (
        f"  HostName {server.address}\n  Port {server.port}\n  User {sshd_fleet.user}\n  IdentityFile {sshd_fleet.client_key}\n"
        f"  UserKnownHostsFile {known}\n"
    )
    config = tmp_path / "ssh_config"
    config.write_text(f"Host patient\n{where}  ConnectionAttempts 3\nHost hasty\n{where}Host compressed\n{where}  Compression YES\n")
    # ssh refuses a whole file for either of these lines: each has its own.
    (tmp_path / "counted").write_text(f"Host counted\n{where}  ConnectionAttempts 0\n")
    (tmp_path / "squeezed").write_text(f"Host squeezed\n{where}  Compression delayed\n")
    files = {"patient": config, "hasty": config, "compressed": config, "counted": tmp_path / "counted", "squeezed": tmp_path / "squeezed"}
    executor = make_executor(hosts_yaml=hosts_file_text({name: {"transport": "ssh", "ssh_config_file": str(file)} for name, file in files.items()}))

    def while_the_server_restarts(run):  # type: ignore[no-untyped-def]
        # The server is down when the first attempt is made, and up again 0.3 s later.
        server.stop()
        restart = threading.Timer(0.3, server.start)
        restart.start()
        try:
            return run()
        finally:
            restart.join()

    outcomes = {}
    for name in ("patient", "hasty"):
        task = while_the_server_restarts(lambda: executor.run(TaskRequest(host=name, command="echo in")))
        ssh = while_the_server_restarts(lambda: subprocess.run(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", name, "echo in"], capture_output=True, text=True, timeout=30
        ))
        outcomes[name] = (task.status, task.error, ssh.stdout == "in\n")
    # Before: ConnectionAttempts was not read, so the patient host failed at its first attempt.
    assert outcomes == {
        "patient": (TaskStatus.SUCCEEDED, None, True),
        "hasty": (TaskStatus.FAILED, f"cannot connect to {sshd_fleet.user}@{server.address}:{server.port}: Connection refused", False),
    }
    from sshd import free_port

    closed = tmp_path / "closed"
    closed.write_text(f"Host closed\n  HostName 127.0.0.1\n  Port {free_port('127.0.0.1')}\n  ConnectionAttempts 2\n")
    down = make_executor(hosts_yaml=hosts_file_text({"closed": {"transport": "ssh", "ssh_config_file": str(closed)}}))
    task = down.run(TaskRequest(host="closed", command="true"))
    assert task.error.endswith(": Connection refused (2 attempts: ConnectionAttempts of ssh_config)"), task.error
    assert task.ended_at - task.started_at >= 1  # a second between attempts, as in ssh
    before = server.log.read_text(errors="replace").count("compression: zlib@openssh.com")
    task = executor.run(TaskRequest(host="compressed", command="echo in"))
    assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, b"in\n"), task.error
    # Both directions compressed (before: none), once the login succeeded, as zlib@openssh.com is.
    assert server.log.read_text(errors="replace").count("compression: zlib@openssh.com") == before + 2
    for name, problem, ssh_says in (
        ("counted", "ConnectionAttempts '0': expected a whole number from 1", "Invalid number of ConnectionAttempts"),
        ("squeezed", "Compression 'delayed': expected yes or no", 'unsupported option "delayed"'),
    ):
        task = executor.run(TaskRequest(host=name, command="true"))
        assert (task.error_category, task.error) == ("config", f"ssh_config gives {server.address} {problem}")
        refused = subprocess.run(["ssh", "-F", str(files[name]), "-o", "BatchMode=yes", name, "true"], capture_output=True, text=True)
        assert (refused.returncode, refused.stdout, ssh_says in refused.stderr) == (255, "", True), refused.stderr


def test_bind_address_of_ssh_config_is_where_connections_come_from(make_executor, sshd_fleet, shared_sshd, known_hosts, tmp_path):
    where = (
        f"  HostName {shared_sshd.address}\n  Port {shared_sshd.port}\n  User {sshd_fleet.user}\n"
        f"  IdentityFile {sshd_fleet.client_key}\n  UserKnownHostsFile {known_hosts}\n"
    )
    config = tmp_path / "ssh_config"
    config.write_text(f"Host bound\n{where}  BindAddress 127.0.0.77\nHost mismatched\n{where}  BindAddress ::1\n")
    entry = {"transport": "ssh", "ssh_config_file": str(config)}
    executor = make_executor(hosts_yaml=hosts_file_text({"bound": entry, "mismatched": entry}))
    seen_before = shared_sshd.log.read_text(errors="replace").count("Connection from 127.0.0.77 ")
    task = executor.run(TaskRequest(host="bound", command="echo in"))
    ssh = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "bound", "echo in"], capture_output=True, text=True, timeout=30)
    assert (task.status, task.error, ssh.stdout) == (TaskStatus.SUCCEEDED, None, "in\n")
    # Before: BindAddress was not read, and the server saw fleetrun come from 127.0.0.1.
    assert shared_sshd.log.read_text(errors="replace").count("Connection from 127.0.0.77 ") == seen_before + 2
    refused = executor.run(TaskRequest(host="mismatched", command="true"))
    assert (refused.error_category, refused.error) == (
        "unreachable", f"cannot connect to {sshd_fleet.user}@{shared_sshd.address}:{shared_sshd.port}: BindAddress ::1 of "
        "ssh_config: Address family for hostname not supported",
    )
    assert subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "mismatched", "true"], capture_output=True).returncode == 255
