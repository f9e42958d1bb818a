"""Throwaway OpenSSH servers on loopback for tests and benchmarks.

Each server is a real ``/usr/sbin/sshd`` with its own config, host key, port and
127.0.0.N address, so several of them stand for distinct hosts. Logins are key-only,
as an unprivileged test user when running as root, else as the current user.
Nothing here touches the system's sshd, its keys or any home directory's ``.ssh``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TEST_USER = "fleetrun-test"


def login_user() -> str:
    """The account tests log in as: a dedicated unprivileged user when we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        # '*' (not '!'): a locked account is refused when PAM is off.
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-p", "*", TEST_USER], check=True)
    return TEST_USER


def user_with_login_shell(shell: str) -> str | None:
    """An account whose login shell is ``shell`` (a name: fish, tcsh, nologin...), made when
    we are root and the shell is installed; None otherwise."""
    path = shutil.which(shell) or shutil.which(shell, path="/usr/sbin:/sbin")
    if os.geteuid() != 0 or path is None:
        return None
    user = f"fleetrun-{shell}"
    try:
        if pwd.getpwnam(user).pw_shell == path:
            return user
        subprocess.run(["usermod", "-s", path, user], check=True)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", path, "-p", "*", user], check=True)
    return user


def generate_key(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "fleetrun-test", "-f", str(path)], check=True)
    path.chmod(0o600)
    return path


def fingerprint(public_key_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (``type base64 [comment]``)."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


@dataclass
class Sshd:
    """One running sshd."""

    address: str
    port: int
    directory: Path
    host_key: Path
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "sshd.log"

    @property
    def host_public_key(self) -> str:
        return Path(f"{self.host_key}.pub").read_text().strip()

    @property
    def known_hosts_line(self) -> str:
        kind, blob = self.host_public_key.split()[:2]
        return f"[{self.address}]:{self.port} {kind} {blob}\n"

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint(self.host_public_key)

    def start(self) -> None:
        config = self.directory / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    # sshd keeps the first value it reads for a keyword: the test's own go first.
                    self.extra_config,
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.directory.parent / 'authorized_keys'}/%u",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "MaxStartups 100:30:200",
                    "MaxSessions 100",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._wait_for_banner()

    def _wait_for_banner(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as probe:
                    if probe.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {self.address}:{self.port} did not answer")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the listener and every session it started (as a crashed server would)."""
        if self.process is None:
            return
        for pid in self.session_pids():
            _kill(pid, signal.SIGKILL)
        _kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def accepted_logins(self) -> int:
        """How many connections authenticated so far (from the server's log)."""
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def session_pids(self) -> list[int]:
        """Pids of the per-connection sshd processes this server forked."""
        if self.process is None:
            return []
        return _descendants(self.process.pid, only_named="sshd")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _descendants(root: int, only_named: str | None = None) -> list[int]:
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        names[int(entry)] = name
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if only_named is None or names.get(child, "").startswith(only_named):
                found.append(child)
            todo.append(child)
    return found


class SshdFleet:
    """Starts sshds on 127.0.0.2, 127.0.0.3, … sharing one client key and user.

    The directory must be readable by the login user (sshd reads authorized_keys as that
    user), so it is a fresh 0755 temp dir unless one is given.
    """

    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or Path(tempfile.mkdtemp(prefix="fleetrun-sshd-"))
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.user = login_user()
        self.client_key = generate_key(directory / "client_key")
        self.authorized = directory / "authorized_keys"
        self.authorized.mkdir(exist_ok=True)
        self.authorized.chmod(0o755)
        self.authorize(self.user, self.client_key)
        self.servers: list[Sshd] = []

    def authorize(self, user: str, key: Path) -> None:
        path = self.authorized / user
        with path.open("a") as out:
            out.write(Path(f"{key}.pub").read_text())
        path.chmod(0o644)

    def start(self, extra_config: str = "", address: str | None = None) -> Sshd:
        index = len(self.servers) + 2
        # 127.0.0.2 upwards: one loopback address per server, so each is a distinct host.
        address = address or f"127.0.0.{index}"
        directory = self.directory / f"sshd-{index}"
        directory.mkdir()
        directory.chmod(0o755)
        server = Sshd(
            address=address,
            port=free_port(address),
            directory=directory,
            host_key=generate_key(directory / "host_key"),
            extra_config=extra_config,
        )
        server.start()
        self.servers.append(server)
        return server

    def known_hosts(self, path: Path, servers: list[Sshd] | None = None) -> Path:
        path.write_text("".join(s.known_hosts_line for s in (servers or self.servers)))
        return path

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
