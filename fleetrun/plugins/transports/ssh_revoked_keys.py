"""ssh_config's ``RevokedHostKeys``: host keys and certificates that are never accepted,
read as ssh reads them.

The file is either a list of public keys, one a line, or an OpenSSH key revocation list
(KRL, ``ssh-keygen -k``), which can also revoke certificates by serial number or key id
under an authority. As in ssh, a host key is refused when the file revokes it, when it
is a certificate the file revokes, or when it is a certificate whose authority's key the
file revokes; and a file that cannot be read refuses every host (it fails closed).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from fleetrun.plugins.transports.ssh_host_certificates import WireReader, is_certificate, parse_certificate

_KRL_MAGIC = b"SSHKRL\n\0"
_KRL_FORMAT_VERSION = 1
_CERTIFICATES, _EXPLICIT_KEY, _SHA1, _SIGNATURE, _SHA256 = 1, 2, 3, 4, 5
_SERIAL_LIST, _SERIAL_RANGE, _SERIAL_BITMAP, _KEY_ID = 0x20, 0x21, 0x22, 0x23


class UnreadableRevocations(ValueError):
    """The file cannot be read, or is neither a list of keys nor a KRL."""


@dataclass
class _ByAuthority:
    """Certificates one authority signed that are revoked."""

    serials: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges
    bitmaps: list[tuple[int, int]] = field(default_factory=list)  # (first serial, bits): bit N revokes first + N
    key_ids: set[str] = field(default_factory=set)

    def revokes(self, serial: int, key_id: str) -> bool:
        return (
            key_id in self.key_ids
            or any(low <= serial <= high for low, high in self.serials)
            or any(serial >= first and bits >> (serial - first) & 1 for first, bits in self.bitmaps)
        )


@dataclass
class RevokedKeys:
    """What a RevokedHostKeys file revokes."""

    path: Path
    keys: set[bytes] = field(default_factory=set)  # plain public key blobs
    sha1: set[bytes] = field(default_factory=set)
    sha256: set[bytes] = field(default_factory=set)
    certificates: dict[bytes, _ByAuthority] = field(default_factory=dict)  # by authority key blob; b"": any authority

    def refuses(self, key: paramiko.PKey) -> str | None:
        """Why ``key`` (a server's host key, a certificate or not) is revoked, or None."""
        if self._revokes_key(key.asbytes()):
            return "its key is revoked"
        if not is_certificate(key):
            return None
        assert key.public_blob is not None
        try:
            certificate = parse_certificate(key.public_blob.key_blob)
        except ValueError:
            return None  # not one fleetrun can read: the certificate check refuses it
        if self._revokes_key(certificate.signature_key):
            return "the key of the authority that signed its certificate is revoked"
        for authority in (certificate.signature_key, b""):
            by = self.certificates.get(authority)
            if by is not None and by.revokes(certificate.serial, certificate.key_id):
                return f"its certificate (serial {certificate.serial}, key id {certificate.key_id!r}) is revoked"
        return None

    def _revokes_key(self, blob: bytes) -> bool:
        return blob in self.keys or hashlib.sha1(blob).digest() in self.sha1 or hashlib.sha256(blob).digest() in self.sha256


def read_revoked_keys(path: Path) -> RevokedKeys:
    """Read a RevokedHostKeys file; :class:`UnreadableRevocations` if it cannot be."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableRevocations(exc.strerror or str(exc)) from None
    revoked = RevokedKeys(path)
    if data.startswith(_KRL_MAGIC):
        try:
            _read_krl(data, revoked)
        except ValueError as exc:
            raise UnreadableRevocations(f"not a key revocation list ssh can read: {exc}") from None
        return revoked
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        blob = _blob(words)  # TYPE BASE64 [comment]; ssh reads nothing else (no options)
        if blob is None:
            raise UnreadableRevocations(f"line {number} is not a public key")
        revoked.keys.add(_plain(blob))
    return revoked


def _blob(words: list[str]) -> bytes | None:
    try:
        blob = base64.b64decode(words[1], validate=True)
        return blob if WireReader(blob).text() == words[0] else None
    except (ValueError, IndexError):
        return None


def _plain(blob: bytes) -> bytes:
    """A certificate's key as a plain public key blob; any other blob as it is."""
    try:
        return parse_certificate(blob).public_key
    except ValueError:
        return blob


def _read_krl(data: bytes, revoked: RevokedKeys) -> None:
    reader = WireReader(data)
    reader.take(len(_KRL_MAGIC))
    if reader.uint32() != _KRL_FORMAT_VERSION:
        raise ValueError("an unknown format version")
    reader.uint64(), reader.uint64(), reader.uint64()  # version, date, flags
    reader.string(), reader.string()  # reserved, comment
    while not reader.at_end():
        kind, section = reader.byte(), WireReader(reader.string())
        if kind == _CERTIFICATES:
            authority = section.string()
            section.string()  # reserved
            by = revoked.certificates.setdefault(authority, _ByAuthority())
            while not section.at_end():
                _read_certificate_section(section.byte(), WireReader(section.string()), by)
        elif kind in (_EXPLICIT_KEY, _SHA1, _SHA256):
            into = {_EXPLICIT_KEY: revoked.keys, _SHA1: revoked.sha1, _SHA256: revoked.sha256}[kind]
            while not section.at_end():
                into.add(section.string())
        elif kind == _SIGNATURE:
            return  # ssh does not check a KRL's signature for RevokedHostKeys; nothing follows it
        else:
            raise ValueError(f"an unknown section ({kind})")


def _read_certificate_section(kind: int, section: WireReader, by: _ByAuthority) -> None:
    if kind == _SERIAL_LIST:
        while not section.at_end():
            serial = section.uint64()
            by.serials.append((serial, serial))
    elif kind == _SERIAL_RANGE:
        low, high = section.uint64(), section.uint64()
        by.serials.append((low, high))
    elif kind == _SERIAL_BITMAP:
        first = section.uint64()
        by.bitmaps.append((first, int.from_bytes(section.string(), "big")))
    elif kind == _KEY_ID:
        while not section.at_end():
            by.key_ids.add(section.text())
    else:
        raise ValueError(f"an unknown certificate section ({kind})")
