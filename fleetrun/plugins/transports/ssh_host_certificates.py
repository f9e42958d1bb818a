"""OpenSSH certificates, read strictly; and host certificates, checked as ssh checks them
against the ``@cert-authority`` lines of known_hosts.

A site with an SSH certificate authority lists the authority's key once
(``@cert-authority *.example.com ssh-ed25519 AAAA...``) instead of every host's key, and
each server presents its key signed by the authority. paramiko negotiates such a key
but does not check the certificate; this module does, to the rules of OpenSSH's
``PROTOCOL.certkeys`` and of ssh itself (checked against ssh 9.2 on the same files): a
host certificate, signed by a listed authority that is not ``@revoked``, with a
signature ssh accepts (not SHA-1 RSA), valid now, naming the host among its principals
(exactly; an empty list names every host), and with no critical option.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import paramiko
from paramiko.message import Message

CERTIFICATE_SUFFIX = "-cert-v01@openssh.com"
_HOST_CERTIFICATE = 2

#: What each key type's public part is made of, between the nonce and the serial.
_PUBLIC_KEY_FIELDS = {
    "ssh-ed25519": ("string",),
    "ecdsa-sha2-nistp256": ("string", "string"),
    "ecdsa-sha2-nistp384": ("string", "string"),
    "ecdsa-sha2-nistp521": ("string", "string"),
    "ssh-rsa": ("mpint", "mpint"),
}
#: Signature algorithms ssh accepts from an authority by default (CASignatureAlgorithms):
#: not "ssh-rsa", which is RSA over SHA-1.
_ACCEPTED_SIGNATURES = {
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "rsa-sha2-256", "rsa-sha2-512",
}  # fmt: skip


@dataclass(frozen=True)
class Certificate:
    """The fields of an OpenSSH certificate that checking it needs."""

    key_type: str
    serial: int
    kind: int  # 1: user, 2: host
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: tuple[str, ...]
    signature_key: bytes
    signed: bytes  # everything the signature covers
    signature: bytes
    signature_algorithm: str
    public_key: bytes  # the certified key, as a plain public key blob


def is_certificate(key: paramiko.PKey) -> bool:
    blob = key.public_blob
    return blob is not None and blob.key_type.endswith(CERTIFICATE_SUFFIX)


def host_key_algorithms(offered: tuple[str, ...], listed: set[str], *, authorities: bool) -> tuple[str, ...]:
    """The host key algorithms to offer, ordered as ssh orders them so that the server
    presents the key ssh would be shown.

    ``listed``: the names of the keys known_hosts lists for the host (``ssh-rsa``...).
    With ``authorities`` (a ``@cert-authority`` line vouches for the host), certificates
    of every type come first; else the types of the listed keys do, each certificate
    before its bare key (a certificate may be revoked by serial where its key is not)."""
    supported = paramiko.Transport._key_info  # noqa: SLF001

    def signed(names: list[str]) -> list[str]:
        return [f"{name}{CERTIFICATE_SUFFIX}" for name in names if f"{name}{CERTIFICATE_SUFFIX}" in supported]

    # An RSA key is listed as ssh-rsa and offered as rsa-sha2-512 and rsa-sha2-256.
    known = [name for name in offered if ("ssh-rsa" if name.startswith("rsa-sha2-") else name) in listed]
    others = [name for name in offered if name not in known]
    if authorities:
        return tuple(signed(list(offered)) + known + others)
    return tuple(signed(known) + known + signed(others) + others)


def parse_certificate(blob: bytes) -> Certificate:
    """Read a certificate blob, every length checked (paramiko's reader pads what is
    cut short and takes a length past the end as "the rest"); :class:`ValueError` if it
    is not a certificate this module knows."""
    try:
        return _certificate(blob)
    except _CutShort as exc:
        raise ValueError(f"the certificate cannot be read: {exc}") from None


def _certificate(blob: bytes) -> Certificate:
    reader = WireReader(blob)
    key_type = reader.text()
    fields = _PUBLIC_KEY_FIELDS.get(key_type.removesuffix(CERTIFICATE_SUFFIX))
    if not key_type.endswith(CERTIFICATE_SUFFIX) or fields is None:
        raise ValueError(f"not a certificate type fleetrun can check: {key_type!r}")
    reader.string()  # nonce
    public_key = Message()
    public_key.add_string(key_type.removesuffix(CERTIFICATE_SUFFIX))
    for _ in fields:  # an mpint is written as a string too
        public_key.add_string(reader.string())
    serial, kind, key_id = reader.uint64(), reader.uint32(), reader.text()
    principals = WireReader(reader.string()).all_texts()
    valid_after, valid_before = reader.uint64(), reader.uint64()
    critical_options = WireReader(reader.string()).option_names()
    reader.string()  # extensions
    reader.string()  # reserved
    signature_key = reader.string()
    signed = blob[: reader.at]
    signature = WireReader(reader.string())
    signature_algorithm, signature_blob = signature.text(), signature.string()
    if not (reader.at_end() and signature.at_end()):
        raise _CutShort("it has bytes after its signature")
    clean = Message()
    clean.add_string(signature_algorithm)
    clean.add_string(signature_blob)
    return Certificate(
        key_type, serial, kind, key_id, principals, valid_after, valid_before, critical_options, signature_key, signed,
        clean.asbytes(), signature_algorithm, public_key.asbytes(),
    )


class _CutShort(ValueError):
    """Bytes in the SSH wire format that do not add up."""


class WireReader:
    """The SSH wire format (RFC 4251), strictly: a length past the end is an error
    (:class:`ValueError`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, count: int) -> bytes:
        if self.at + count > len(self.data):
            raise _CutShort("it is cut short")
        self.at += count
        return self.data[self.at - count : self.at]

    def byte(self) -> int:
        return self.take(1)[0]

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def uint64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())

    def text(self) -> str:
        try:
            return self.string().decode()
        except UnicodeDecodeError:
            raise _CutShort("a name in it is not UTF-8") from None

    def all_texts(self) -> tuple[str, ...]:
        found = []
        while not self.at_end():
            found.append(self.text())
        return tuple(found)

    def option_names(self) -> tuple[str, ...]:
        names = []
        while not self.at_end():
            names.append(self.text())
            self.string()  # the option's data
        return tuple(names)

    def at_end(self) -> bool:
        return self.at == len(self.data)


def certificate_problem(
    key: paramiko.PKey, authorities: tuple[paramiko.PKey, ...], names: tuple[str, ...], now: float | None = None
) -> str | None:
    """Why the host certificate ``key`` presented is not accepted for a host called any of
    ``names`` (the one connected to, or its HostKeyAlias), or None when it is."""
    assert key.public_blob is not None
    try:
        certificate = parse_certificate(key.public_blob.key_blob)
    except ValueError as exc:
        return str(exc)
    if certificate.kind != _HOST_CERTIFICATE:
        return "it is not a host certificate"
    authority = next((a for a in authorities if a.asbytes() == certificate.signature_key), None)
    if authority is None:
        return "no @cert-authority line for the host lists the authority that signed it"
    if certificate.signature_algorithm not in _ACCEPTED_SIGNATURES:  # checked before any work on the signature
        return f"its authority signed it with {certificate.signature_algorithm!r}, which ssh does not accept"
    try:
        signed_by_authority = authority.verify_ssh_sig(certificate.signed, Message(certificate.signature))
    except Exception:  # noqa: BLE001 - the server wrote these bytes: whatever they hold, the signature does not verify
        signed_by_authority = False
    if not signed_by_authority:
        return "its signature does not verify"
    now = time.time() if now is None else now
    if now < certificate.valid_after:
        return "it is not valid yet"
    if now >= certificate.valid_before:
        return "it has expired"
    if certificate.principals and not set(names) & set(certificate.principals):
        return f"{names[0]} is not one of its principals ({', '.join(certificate.principals)})"
    if certificate.critical_options:
        return f"it has critical options fleetrun does not know ({', '.join(certificate.critical_options)})"
    return None
