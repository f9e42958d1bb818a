"""Host keys for the ``ssh`` transport: the known_hosts files, read as ssh reads them, and
what happens to a key they do not list.

paramiko's own reader gives up on the whole file at the first line it cannot read, and
a line with a marker (``@cert-authority``, ``@revoked``) is such a line: every host of
a user whose known_hosts trusts an SSH certificate authority failed. Here each line
stands alone. A line that cannot be read is skipped, as ssh skips it; a
``@cert-authority`` line is skipped too (fleetrun does not check host certificates);
and a key marked ``@revoked`` is refused for every host, even one that lists it, even
under ``accept-new``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys, InvalidHostKey

from fleetrun.core.transport import TransportError

log = logging.getLogger("fleetrun.ssh")


def fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint OpenSSH shows for a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class HostKeyRefused(paramiko.SSHException):
    """A host key that known_hosts does not list (under strict checking), or marks revoked."""


@dataclass(frozen=True)
class KnownHosts:
    """What the known_hosts files said besides the keys they list for hosts."""

    files: tuple[Path, ...]  # a new key is recorded in the first
    revoked: frozenset[tuple[str, str]] = frozenset()  # (key type, base64)
    authorities: int = 0  # @cert-authority lines, skipped
    skipped_lines: tuple[str, ...] = ()  # FILE:LINE that could not be read, or hold a key paramiko cannot use
    listed_in: Mapping[tuple[str, str], Path] = field(default_factory=dict)  # the file each listed key came from

    def looked_in(self) -> str:
        """The files that were read, in words (the first one if none exists)."""
        read = [str(path) for path in self.files if path.is_file()] or [str(self.files[0])] if self.files else ["no file"]
        return " or ".join(read)


def check_host_keys(
    client: paramiko.SSHClient, files: list[Path], *, accept_new: bool, alias: tuple[str, str] | None = None
) -> None:
    """Load ``files`` into ``client`` and set what happens to a key they do not list.

    ``alias``: the name paramiko will look the key up by (``host``, or ``[host]:port``) and
    ssh_config's ``HostKeyAlias`` for it. Then, as in ssh, only the keys listed for the
    alias count, and a new key is recorded under the alias."""
    if alias is None:
        known = _load(client.get_host_keys(), files)
    else:
        listed = HostKeys()
        known = _load(listed, files)
        looked_up_as, alias_name = alias
        for key_type, key in (listed.lookup(alias_name) or {}).items():
            client.get_host_keys().add(looked_up_as, key_type, key)
    # paramiko would rewrite the whole file on every new key; the policy appends instead,
    # and only when the host opted in.
    client._host_keys_filename = None  # noqa: SLF001
    client.set_missing_host_key_policy(_KnownHostsPolicy(known, accept_new=accept_new, alias=alias[1] if alias else None))


def known_hosts_of(client: paramiko.SSHClient) -> KnownHosts | None:
    """What :func:`check_host_keys` read for ``client``."""
    policy = getattr(client, "_policy", None)
    return policy.known if isinstance(policy, _KnownHostsPolicy) else None


def _load(host_keys: HostKeys, files: list[Path]) -> KnownHosts:
    listed: list[tuple[Path, HostKeyEntry]] = []
    revoked: set[tuple[str, str]] = set()
    authorities = 0
    skipped: list[str] = []
    for path in files:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise TransportError("host_key", f"cannot read known_hosts file {str(path)!r}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            marker = None
            if line.startswith("@"):
                marker, line = (line.split(None, 1) + [""])[:2]
            entry = _entry(line, number)
            if entry is None or marker not in (None, "@revoked", "@cert-authority"):
                skipped.append(f"{path}:{number}")
            elif marker == "@revoked":
                revoked.add(_identity(entry.key))
            elif marker == "@cert-authority":
                authorities += 1
            else:
                listed.append((path, entry))
    listed_in: dict[tuple[str, str], Path] = {}
    for path, entry in listed:
        if _identity(entry.key) in revoked:
            continue  # so that the policy sees the key, and refuses it
        listed_in.setdefault(_identity(entry.key), path)
        # As paramiko's own reader adds them (it has no call for an entry already read).
        names = [name for name in entry.hostnames if not host_keys.check(name, entry.key)]
        if names:
            host_keys._entries.append(HostKeyEntry(names, entry.key))  # noqa: SLF001
    if skipped:
        log.debug("known_hosts lines skipped (unreadable, or a key type paramiko cannot use): %s", ", ".join(skipped))
    return KnownHosts(tuple(files), frozenset(revoked), authorities, tuple(skipped), listed_in)


def _entry(line: str, number: int) -> HostKeyEntry | None:
    try:
        return HostKeyEntry.from_line(line, number)
    except (paramiko.SSHException, InvalidHostKey, ValueError, TypeError, IndexError):
        return None


def _identity(key: paramiko.PKey) -> tuple[str, str]:
    return key.get_name(), key.get_base64()


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """What happens to a host key that known_hosts does not list.

    Strict: refuse it, naming the key. ``accept_new``: append it to the first known_hosts
    file and go on. Either way a revoked key is refused. A key that differs from a listed
    one never reaches a policy: paramiko refuses it with ``BadHostKeyException``.
    """

    _write_lock = threading.Lock()

    def __init__(self, known: KnownHosts, *, accept_new: bool, alias: str | None = None) -> None:
        self.known = known
        self.accept_new = accept_new
        self.alias = alias

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        seen = f"{key.get_name()} {fingerprint(key)}"
        host = f"{hostname} (HostKeyAlias {self.alias})" if self.alias else hostname
        if _identity(key) in self.known.revoked:
            raise HostKeyRefused(
                f"the host key of {host} ({seen}) is marked @revoked in {self.known.looked_in()}: it is never accepted"
            )
        if not self.accept_new or not self.known.files:
            record = "" if self.known.files else " (no known_hosts file to record it in: UserKnownHostsFile is none)"
            raise HostKeyRefused(
                f"the host key of {host} is unknown: the server offered {seen}, which is not in "
                f"{self.known.looked_in()}{self._what_else_the_files_hold()}. Check it and add it to "
                f"{self.known.files[0] if self.known.files else 'a known_hosts file'} (for example with ssh-keyscan), "
                f"or set 'host_key_checking: accept-new' for this host to record it on first use{record}"
            )
        path = self.known.files[0]
        with self._write_lock:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as out:
                out.write(f"{self.alias or hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("recorded the new host key of %s (%s) in %s", host, seen, path)

    def _what_else_the_files_hold(self) -> str:
        notes = []
        if self.known.authorities:
            notes.append("fleetrun does not check host certificates, so @cert-authority lines vouch for no key")
        if self.known.skipped_lines:
            lines = ", ".join(self.known.skipped_lines[:5]) + (", …" if len(self.known.skipped_lines) > 5 else "")
            notes.append(f"lines it could not read were skipped: {lines}")
        return f" ({'; '.join(notes)})" if notes else ""
