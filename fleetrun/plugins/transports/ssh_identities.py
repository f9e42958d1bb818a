"""The keys the ``ssh`` transport offers, as ssh offers them: identity files (the host's,
ssh_config's, ``~/.ssh/id_*``), the ssh-agent ssh_config's ``IdentityAgent`` names, and
the certificates that go with those keys.

paramiko, left to itself, asks only ``$SSH_AUTH_SOCK``'s agent and for every key it holds,
fails a connection on an identity file that does not exist with a bare "No such file or
directory", offers a private key anyone may read, and sends a certificate only when it
is named ``KEY-cert.pub`` beside its key (not ``CertificateFile``).

Everything here blocks; it runs on the transport's worker threads.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import stat
from pathlib import Path

import fabric
import paramiko

from fleetrun.core.paths import HomeDirectoryError, expand_home
from fleetrun.core.transport import TransportError
from fleetrun.plugins.transports.ssh_config_lookup import SshConfigLookup
from fleetrun.plugins.transports.ssh_host_certificates import CERTIFICATE_SUFFIX, WireReader, parse_certificate

log = logging.getLogger("fleetrun.ssh")


def local_path(path: str) -> Path:
    """A path of the hosts file (``~`` and ``~user`` expanded). The inventory refuses one
    that cannot be expanded; hosts built in Python are not read through it."""
    try:
        return expand_home(path)
    except HomeDirectoryError as exc:
        raise TransportError("config", str(exc)) from None


def keep_usable_identity_files(hop: fabric.Connection, identity_files: tuple[str, ...], where: str) -> None:
    """Refuse an identity file of the hosts file that cannot be used, saying why; drop one of
    ssh_config's that does not exist, as ssh does. paramiko would fail the connection with
    a bare "No such file or directory", or offer a private key that anyone may read."""
    as_written = {str(local_path(p)): p for p in identity_files}
    kept = []
    for path in hop.connect_kwargs.get("key_filename") or []:
        written = as_written.get(str(Path(path)))
        problem = _identity_file_problem(written or path)
        if problem is None:
            kept.append(path)
        elif written is not None:
            raise TransportError("auth", f"cannot log in to {where}: {problem}")
        else:
            log.debug("skipping ssh_config's %s", problem)
    if "key_filename" in hop.connect_kwargs:
        hop.connect_kwargs["key_filename"] = kept
    if hop.ssh_config.get("identityfile"):
        # ssh offers ~/.ssh/id_* only where no IdentityFile is written (even one that does
        # not exist); paramiko would offer them after these, against the server's MaxAuthTries.
        hop.connect_kwargs["look_for_keys"] = False


def offered_in_words(hop: fabric.Connection) -> str:
    """What logging in to the hop offered, in words (for a refusal's message)."""
    agent_keys = getattr(getattr(hop.client, "_agent", None), "_keys", None) or ()
    certificates = [getattr(key, "fleetrun_certificate", None) for key in (hop.connect_kwargs.get("pkey"), *agent_keys)]
    offered = [f"{path} (certificate)" for path in certificates if path]
    offered += list(dict.fromkeys(hop.connect_kwargs.get("key_filename") or []))
    held = sum(1 for key in agent_keys if not hasattr(key, "fleetrun_certificate"))
    if held:
        offered.append(f"{held} key{'' if held == 1 else 's'} of ssh-agent")
    if hop.connect_kwargs.get("look_for_keys", True):
        offered.append("~/.ssh/id_*")
    if hop.connect_kwargs.get("password"):
        offered.append("the password")
    return ", ".join(offered) or "nothing"


def _identity_file_problem(path: str) -> str | None:
    """Why the identity file at ``path`` cannot be offered, or None."""
    try:
        expanded = local_path(path)
        info = expanded.stat()
    except TransportError as exc:
        return str(exc)
    except FileNotFoundError:
        hint = " (environment variables are not expanded in it; write ~ for the home directory)" if "$" in path else ""
        return f"identity file {path} does not exist{hint}"
    except OSError as exc:
        return f"identity file {path}: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"identity file {path} is not a file"
    if info.st_uid == os.geteuid() and info.st_mode & 0o077 and _holds_a_private_key(expanded):
        return f"identity file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it, as ssh requires"
    return None


def _holds_a_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as key:
            return b"PRIVATE KEY" in key.read(64)
    except OSError:
        return False


def use_identity_agent(hop: fabric.Connection, identity_files: tuple[str, ...]) -> None:
    """Offer the keys of the ssh-agent ssh would use for the hop (``IdentityAgent`` in
    ssh_config, else ``$SSH_AUTH_SOCK``); paramiko knows only ``$SSH_AUTH_SOCK``.

    With identity files named (the host's ``identity_files``, or ``IdentitiesOnly yes`` in
    ssh_config), offer those keys only, as OpenSSH does under IdentitiesOnly: of the agent's
    keys, the ones that are those files' (an encrypted file's key unlocked in the agent),
    and no other. Without, every agent key is offered, as paramiko does; a server that
    allows few attempts (MaxAuthTries) may refuse the connection before the right key."""
    identities_only = str(hop.ssh_config.get("identitiesonly", "no")).lower() == "yes"
    only = hop.connect_kwargs.get("key_filename") or [] if identity_files or identities_only else None
    # paramiko 5.1 takes the agent's keys from the client's _agent (get_keys(), close()).
    hop.client._agent = _IdentityAgent(*_agent_socket(hop), only=only)  # noqa: SLF001


def _agent_socket(hop: fabric.Connection) -> tuple[str | None, str]:
    """The agent's socket for the hop, or None; and, in words, what an empty agent is."""
    value = hop.ssh_config.get("identityagent")
    if value is None or value == "SSH_AUTH_SOCK":
        socket_path = os.environ.get("SSH_AUTH_SOCK")
        return (socket_path, "none in ssh-agent") if socket_path else (None, "no ssh-agent (SSH_AUTH_SOCK is not set)")
    if value.lower() == "none":
        return None, "no ssh-agent (IdentityAgent none)"
    if value.startswith("$") and not value.startswith("${"):  # ssh's older form: a variable holding the path
        name = value[1:]
        socket_path = os.environ.get(name)
        return (socket_path, f"none in the ssh-agent at ${name}") if socket_path else (None, f"no ssh-agent (IdentityAgent: ${name} is not set)")
    return str(local_path(value)), f"none in the ssh-agent at {value}"


class _IdentityAgent(paramiko.agent.AgentSSH):
    """An ssh-agent's keys (those of the identity files ``only``, when given)."""

    def __init__(self, socket_path: str | None, when_empty: str, *, only: list[str] | None) -> None:
        super().__init__()
        self.when_empty = when_empty
        wanted = None if only is None else set().union(*(_public_key_blobs(path) for path in only))
        if socket_path is None or wanted == set():
            return
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(socket_path)
            self._connect(connection)
        except (OSError, paramiko.SSHException) as exc:
            connection.close()
            self._conn, self._keys = None, ()
            self.when_empty = f"no ssh-agent answering at {socket_path}"
            log.debug("ssh-agent at %s not usable: %s", socket_path, exc)
            return
        for key in self._keys:
            if key.name.endswith(CERTIFICATE_SUFFIX):
                # paramiko names a certificate's algorithm in the login request but sends the
                # bare key of an RSA one, which sshd refuses ("key type mismatch"); given
                # the certificate as its public blob, it sends the certificate.
                key.public_blob = paramiko.PublicBlob(key.name, key.blob)
        if wanted is not None:
            # A certificate in the agent is not its key's: ssh, under IdentitiesOnly, does not send it either.
            self._keys = tuple(key for key in self._keys if key.blob in wanted)

    def put_first(self, keys: list[paramiko.PKey]) -> None:
        """Offer ``keys`` (certificates of the hop's) before the agent's own."""
        self._keys = (*keys, *self._keys)

    def close(self) -> None:
        self._close()


_OPENSSH_PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_KEY_MAGIC = b"openssh-key-v1\0"


def _encrypted(path: Path) -> bool:
    """Whether the private key file at ``path`` is encrypted (OpenSSH or PEM format)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    if "ENCRYPTED" in text[:200]:  # PEM: "Proc-Type: 4,ENCRYPTED", or "BEGIN ENCRYPTED PRIVATE KEY"
        return True
    header = _openssh_header(text)
    try:
        return header is not None and header.text() != "none"  # the cipher
    except ValueError:
        return False


def _openssh_header(text: str) -> WireReader | None:
    """The clear header of an OpenSSH-format private key (cipher, KDF, KDF options, number
    of keys, public keys), or None for another text."""
    if not text.startswith(_OPENSSH_PRIVATE_KEY):
        return None
    try:
        data = base64.b64decode("".join(text.strip().splitlines()[1:-1]))
    except ValueError:
        return None
    return WireReader(data[len(_OPENSSH_KEY_MAGIC) :]) if data.startswith(_OPENSSH_KEY_MAGIC) else None


def _public_key_blobs(path: str) -> set[bytes]:
    """The public key of an identity file, found without its passphrase: from ``PATH.pub``,
    from PATH itself when it is a public key (its private half then lives in the agent), or
    from the clear header of an OpenSSH-format private key."""
    path_ = local_path(path)
    blobs = set()
    for candidate in (path_, path_.with_name(path_.name + ".pub")):
        try:
            text = candidate.read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            continue
        blob = _public_key_blob(text)
        if blob:
            blobs.add(blob)
    return blobs


def _public_key_blob(text: str) -> bytes | None:
    try:
        if text.startswith(_OPENSSH_PRIVATE_KEY):
            header = _openssh_header(text)
            if header is None:
                return None
            for _ in range(3):  # cipher name, KDF name, KDF options
                header.string()
            return header.string() if header.uint32() >= 1 else None
        words = text.split()
        return base64.b64decode(words[1], validate=True) if len(words) >= 2 and not text.startswith("-----") else None
    except (ValueError, IndexError):
        return None


def use_certificate_files(hop: fabric.Connection, certificate_files: tuple[str, ...], where: str, passphrase: str | None) -> None:
    """Log in with a certificate as ssh does with ``CertificateFile``: the host's
    ``certificate_files``, else ssh_config's ``CertificateFile`` for the hop; each goes
    with the key it certifies: one ssh-agent holds (an encrypted file's key unlocked there
    needs no passphrase), else an identity file of those the hop offers (else
    ``~/.ssh/id_*``). Each that pairs is offered, in order, as ssh offers them: the first
    before any other key, the others before the agent's.

    One of the host's that cannot be used fails the connection, saying why; one of
    ssh_config's is skipped, as ssh skips it."""
    written = [(path, True) for path in certificate_files]
    if not written:
        lookup = hop.config.base_ssh_config
        from_config = lookup.certificate_files(hop.original_host) if isinstance(lookup, SshConfigLookup) else []
        written = [(path, False) for path in from_config]
    if not written:
        return
    offered = hop.connect_kwargs.get("key_filename") or [f"~/.ssh/id_{kind}" for kind in ("rsa", "ecdsa", "ed25519")]
    identities = list(dict.fromkeys(offered))  # the host's and ssh_config's may name the same file
    agent = getattr(hop.client, "_agent", None)
    certified = []
    for path, own in written:
        try:
            certified.append(_certified_key(path, identities, passphrase, agent=agent))
        except _Unusable as exc:
            if own:
                raise TransportError("auth", f"cannot log in to {where}: certificate file {path} {exc}") from None
            log.debug("skipping ssh_config's CertificateFile %s: %s", path, exc)
    if certified:
        # paramiko takes one key of its own (pkey), tried first; the others go with the
        # agent's keys, which it tries after the identity files, before them.
        hop.connect_kwargs["pkey"] = certified[0]
        if isinstance(agent, _IdentityAgent):
            agent.put_first(certified[1:])


class _Unusable(Exception):
    """Why a certificate file cannot be used."""


def _certified_key(
    path: str, identities: list[str], passphrase: str | None, *, agent: paramiko.agent.AgentSSH | None
) -> paramiko.PKey:
    """The key that the certificate at ``path`` certifies, with the certificate loaded into
    it: ``agent``'s, else the private key of one of ``identities``."""
    try:
        text = local_path(path).read_text(encoding="ascii")
        words = text.split()
        blob = base64.b64decode(words[1], validate=True) if len(words) >= 2 else b""
        certificate = parse_certificate(blob)
    except FileNotFoundError:
        raise _Unusable("does not exist") from None
    except TransportError as exc:
        raise _Unusable(f"cannot be used: {exc.message}") from None
    except OSError as exc:
        raise _Unusable(f"cannot be read: {exc.strerror}") from None
    except ValueError as exc:  # not ASCII, not base64, not a certificate
        raise _Unusable(f"is not an OpenSSH certificate ({exc})") from None
    for held in agent.get_keys() if agent is not None else ():
        if held.blob == certificate.public_key:
            paired = paramiko.AgentKey(held.agent, held.blob)  # a key of its own: the agent's is offered bare too
            paired.public_blob = paramiko.PublicBlob(certificate.key_type, blob)
            paired.fleetrun_certificate = path  # type: ignore[attr-defined]
            return paired
    public_only = []
    for identity in identities:
        try:
            if certificate.public_key not in _public_key_blobs(identity):
                continue
            if not _holds_a_private_key(local_path(identity)):
                public_only.append(identity)
                continue
        except TransportError:  # ~ with no home directory to expand it to
            continue
        encrypted = _encrypted(local_path(identity))
        if encrypted and passphrase is None:
            raise _Unusable(f"certifies the key of {identity}, which is encrypted, and no passphrase was given")
        try:
            key = paramiko.PKey.from_path(local_path(identity), password=None if passphrase is None else passphrase.encode())
        except (OSError, ValueError, TypeError, paramiko.SSHException) as exc:
            # A wrong passphrase reads as garbage: paramiko then says it found no PEM delimiters.
            why = "the passphrase given does not decrypt" if encrypted else f"cannot be read: {exc}"
            raise _Unusable(f"certifies the key of {identity}, which {why}") from None
        key.load_certificate(str(local_path(path)))
        key.fleetrun_certificate = path  # type: ignore[attr-defined]  # named in a refusal
        return key
    if public_only:
        raise _Unusable(
            f"certifies the key of {public_only[0]}, which is a public key, and ssh-agent does not hold its private key"
        )
    raise _Unusable(f"certifies a key that none of the identity files holds ({', '.join(identities)})")

