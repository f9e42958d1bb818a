"""Host keys for the ``ssh`` transport: the known_hosts files, read as ssh reads them, and
what happens to a key they do not list.

paramiko's own reader gives up on the whole file at the first line it cannot read, and
a line with a marker (``@cert-authority``, ``@revoked``) is such a line: every host of
a user whose known_hosts trusts an SSH certificate authority failed. It also decodes
every key and compares each with all before it: 11.5 s per connection for a file of
10,000 lines. Here, as in ssh, only the lines whose names match the host are decoded
(patterns with ``*`` and ``?``, ``!`` to negate, hashed names), and each stands alone: a
line that cannot be read is skipped, as ssh skips it; a ``@cert-authority`` line names an
authority whose host certificates are accepted for the host (checked in
:mod:`.ssh_host_certificates`); and a key marked ``@revoked`` is refused for every host,
even one that lists it, even under ``accept-new``, as is one that ssh_config's
``RevokedHostKeys`` revokes (:mod:`.ssh_revoked_keys`).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from fleetrun.core.transport import TransportError
from fleetrun.plugins.transports.ssh_host_certificates import certificate_problem, is_certificate
from fleetrun.plugins.transports.ssh_revoked_keys import RevokedKeys, UnreadableRevocations, read_revoked_keys

log = logging.getLogger("fleetrun.ssh")


def fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint OpenSSH shows for a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class HostKeyRefused(paramiko.SSHException):
    """A host key that known_hosts does not list (under strict checking), or marks revoked."""


@dataclass(frozen=True)
class KnownHosts:
    """What the known_hosts files say about one host."""

    files: tuple[Path, ...]  # a new key is recorded in the first
    keys: tuple[paramiko.PKey, ...] = ()  # listed for the host, and not revoked
    revoked: frozenset[tuple[str, str]] = frozenset()  # (key type, base64)
    authorities: tuple[paramiko.PKey, ...] = ()  # of @cert-authority lines for the host, and not revoked
    skipped_lines: tuple[str, ...] = ()  # FILE:LINE that could not be read, or hold a key paramiko cannot use
    listed_in: Mapping[tuple[str, str], Path] = field(default_factory=dict)  # the file each listed key came from
    revocations: RevokedKeys | None = None  # ssh_config's RevokedHostKeys, read

    def looked_in(self) -> str:
        """The files that were read, in words (the first one if none exists)."""
        if not self.files:
            return "any known_hosts file"
        existing = [str(path) for path in self.files if path.is_file()]
        return " or ".join(existing or [str(self.files[0])])


def check_host_keys(
    client: paramiko.SSHClient, files: list[Path], *, looked_up_as: str, accept_new: bool, alias: str | None = None,
    hash_names: bool = False, revoked_host_keys: Path | None = None,
) -> KnownHosts:
    """Set how ``client`` checks the host's key against what ``files`` say about the host
    (returned): by fleetrun's policy alone. paramiko, given the listed keys, would accept
    one that a revocation list revokes before anything else is looked at, and call a host
    whose key changed but whose certificate is valid changed; the policy decides as ssh
    does, in order: revocations, a valid certificate, the listed keys, an unknown key.

    ``looked_up_as`` is the name paramiko looks the key up by (``host``, or ``[host]:port``
    on another port than 22). ``alias`` is ssh_config's ``HostKeyAlias``: as in ssh, the
    keys listed for it are the ones that count, and a new key is recorded under it.
    ``hash_names`` (ssh_config's ``HashKnownHosts``): a new key's line names its host by
    a hash, as ssh writes it, so that the file does not list the hosts one reaches.
    ``revoked_host_keys`` (ssh_config's ``RevokedHostKeys``): keys and certificates never
    accepted; a file that cannot be read refuses the host, as in ssh."""
    known = _load(files, (alias or looked_up_as).lower())
    if revoked_host_keys is not None:
        try:
            known = dataclasses.replace(known, revocations=read_revoked_keys(revoked_host_keys))
        except UnreadableRevocations as exc:
            raise TransportError(
                "host_key", f"RevokedHostKeys {revoked_host_keys} cannot be read ({exc}): ssh refuses every host then, and so does fleetrun"
            ) from None
    # paramiko would rewrite the whole file on every new key; the policy appends instead,
    # and only when the host opted in.
    client._host_keys_filename = None  # noqa: SLF001
    client.set_missing_host_key_policy(_KnownHostsPolicy(known, accept_new=accept_new, alias=alias, hash_names=hash_names))
    return known


def known_hosts_of(client: paramiko.SSHClient) -> KnownHosts | None:
    """What :func:`check_host_keys` read for ``client``."""
    policy = getattr(client, "_policy", None)
    return policy.known if isinstance(policy, _KnownHostsPolicy) else None


def _load(files: list[Path], name: str) -> KnownHosts:
    """The lines of ``files`` for the host ``name``, and every ``@revoked`` key."""
    keys: list[paramiko.PKey] = []
    revoked: set[tuple[str, str]] = set()
    authorities: list[paramiko.PKey] = []
    skipped: list[str] = []
    listed_in: dict[tuple[str, str], Path] = {}
    for path in files:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise TransportError("host_key", f"cannot read known_hosts file {str(path)!r}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if len(fields) < 3 or marker not in (None, "@revoked", "@cert-authority"):
                skipped.append(f"{path}:{number}")
                continue
            # An authority's line may name the host without its port, as ssh finds it.
            names = (name, _without_port(name)) if marker == "@cert-authority" else (name,)
            if marker != "@revoked" and not any(_names_match(fields[0], each) for each in names):
                continue
            key = _key(fields)
            if key is None:
                skipped.append(f"{path}:{number}")
            elif marker == "@revoked":
                revoked.add(_identity(key))
            elif marker == "@cert-authority":
                authorities.append(key)
            else:
                keys.append(key)
                listed_in.setdefault(_identity(key), path)
    if skipped:
        log.debug("known_hosts lines skipped (unreadable, or a key type paramiko cannot use): %s", ", ".join(skipped))
    usable = tuple(key for key in keys if _identity(key) not in revoked)  # a revoked one goes to the policy, which refuses it
    trusted = tuple(key for key in authorities if _identity(key) not in revoked)
    return KnownHosts(tuple(files), usable, frozenset(revoked), trusted, tuple(skipped), listed_in)


def _without_port(name: str) -> str:
    found = re.fullmatch(r"\[(.*)\]:[0-9]+", name)
    return found.group(1) if found else name


def _names_match(patterns: str, name: str) -> bool:
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("|1|"):  # base64: its case counts
            matched = matched or _hashed_name_is(pattern, name)
            continue
        pattern = pattern.lower()
        if pattern.startswith("!"):
            if _pattern(pattern[1:]).fullmatch(name):
                return False
        elif _pattern(pattern).fullmatch(name):
            matched = True
    return matched


def _hashed(name: str, salt: bytes | None = None) -> str:
    """``name`` as HashKnownHosts writes it: ``|1|SALT|HMAC-SHA1(SALT, name)``, base64
    (with a new random salt unless one is given)."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _hashed_name_is(hashed: str, name: str) -> bool:
    """Whether ``hashed`` (``|1|SALT|HASH``, as HashKnownHosts writes it) is ``name``."""
    parts = hashed.split("|")
    try:
        salt = base64.b64decode(parts[2], validate=True) if len(parts) == 4 else None
    except ValueError:
        salt = None
    return salt is not None and hmac.compare_digest(_hashed(name, salt).encode(), hashed.encode())


@functools.lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str]:
    """ssh's host pattern: ``*`` and ``?`` only (``[`` is a character, as in ``[host]:2222``)."""
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), re.DOTALL)


def _key(fields: list[str]) -> paramiko.PKey | None:
    try:
        entry = HostKeyEntry.from_line(" ".join(fields[:3]))
    except (paramiko.SSHException, InvalidHostKey, ValueError, TypeError, IndexError):
        return None
    return entry.key if entry is not None else None


def _identity(key: paramiko.PKey) -> tuple[str, str]:
    return key.get_name(), key.get_base64()


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Whether the server's host key is accepted; paramiko, given no key of its own to
    compare, asks for every connection.

    A revoked key is refused, a certificate signed by a listed authority accepted, a listed
    key accepted and another where some are listed refused as changed
    (``BadHostKeyException``). A key nothing lists is refused under strict checking,
    naming it; under ``accept_new`` it is appended to the first known_hosts file.
    """

    _write_lock = threading.Lock()

    def __init__(self, known: KnownHosts, *, accept_new: bool, alias: str | None = None, hash_names: bool = False) -> None:
        self.known = known
        self.accept_new = accept_new
        self.alias = alias
        self.hash_names = hash_names

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        seen = f"{key.get_name()} {fingerprint(key)}"
        host = f"{hostname} (HostKeyAlias {self.alias})" if self.alias else hostname
        if _identity(key) in self.known.revoked:
            raise HostKeyRefused(
                f"the host key of {host} ({seen}) is marked @revoked in {self.known.looked_in()}: it is never accepted"
            )
        revoked = self.known.revocations.refuses(key) if self.known.revocations else None
        if revoked:
            raise HostKeyRefused(
                f"the host key of {host} ({seen}) is refused: {revoked} in RevokedHostKeys {self.known.revocations.path}"
            )
        certificate = None
        if is_certificate(key) and self.known.authorities:  # without one, only the key itself counts, as in ssh
            problem = certificate_problem(key, self.known.authorities, (self.alias or _without_port(hostname),))
            if problem is None:
                log.debug("the host certificate of %s (%s) is signed by a listed authority", host, seen)
                return
            certificate = f"its certificate is not accepted: {problem}"
            log.info("the host certificate of %s (%s) is not accepted (%s): checking the key itself", host, seen, problem)
        if _identity(key) in {_identity(listed) for listed in self.known.keys}:
            return
        if self.known.keys:  # the listed key of the same type, as ssh names it, else the first
            expected = next((listed for listed in self.known.keys if listed.get_name() == key.get_name()), self.known.keys[0])
            raise paramiko.BadHostKeyException(hostname, key, expected)
        if not self.accept_new or not self.known.files:
            raise HostKeyRefused(
                f"the host key of {host} is unknown: the server offered {seen}, which is not in "
                f"{self.known.looked_in()}{self._what_else_the_files_hold(certificate)}. {self._what_to_do()}"
            )
        path = self.known.files[0]
        with self._write_lock:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as out:
                name = self.alias or hostname
                out.write(f"{_hashed(name) if self.hash_names else name} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        if path.is_file():
            log.warning("recorded the new host key of %s (%s) in %s", host, seen, path)
        else:  # UserKnownHostsFile /dev/null, as `vagrant ssh-config` writes it: accepted every time
            log.warning("accepted the unknown host key of %s (%s); %s is not a file, so it is not recorded", host, seen, path)

    def _what_to_do(self) -> str:
        first = self.known.files[0] if self.known.files else None
        if first is None:
            return (
                "Check it and add it to a known_hosts file named with the host's known_hosts field "
                "(ssh_config's UserKnownHostsFile and GlobalKnownHostsFile are none)"
            )
        if first.exists() and not first.is_file():
            return (
                f"Check it and add it to a known_hosts file named with the host's known_hosts field ({first} is not a file), "
                "or set 'host_key_checking: accept-new' for this host to accept it unrecorded"
            )
        return (
            f"Check it and add it to {first} (for example with ssh-keyscan), "
            "or set 'host_key_checking: accept-new' for this host to record it on first use"
        )

    def _what_else_the_files_hold(self, certificate: str | None) -> str:
        notes = [certificate] if certificate else []
        if self.known.authorities and not certificate:
            notes.append("the server presented no certificate for the @cert-authority lines to vouch for")
        if self.known.skipped_lines:
            lines = ", ".join(self.known.skipped_lines[:5]) + (", …" if len(self.known.skipped_lines) > 5 else "")
            notes.append(f"lines it could not read were skipped: {lines}")
        return f" ({'; '.join(notes)})" if notes else ""
