"""The algorithms offered to an SSH server, as ssh offers them: ``Ciphers``, ``MACs``,
``KexAlgorithms`` and ``HostKeyAlgorithms`` of ssh_config, read as ssh reads them.

paramiko, left to itself, offers what ssh stopped offering by default (CBC ciphers,
3DES, MD5 MACs), so a server that speaks nothing better was reached where ssh refuses
it, and a hardened ssh_config that narrows the list was ignored. fleetrun starts from
ssh's defaults instead, and applies ssh_config's lists over them as ssh does: a list
replaces the defaults, ``+LIST`` appends to them, ``^LIST`` puts LIST first, and
``-PATTERNS`` removes what matches (``*``, ``?``, and ``!`` to keep what a pattern before
it would remove).

What paramiko cannot speak is left out (``chacha20-poly1305@openssh.com``,
``umac-64@openssh.com``; ``curve25519-sha256`` is spoken, as the exchange paramiko knows
by its older name), and so is a name fleetrun does not know at all: ssh would refuse
the file for it, but a system-wide policy written for a newer ssh (RHEL's
crypto-policies include one) must not fail every host. A list ssh cannot read (a
pattern outside a ``-`` list, a space), or one that leaves nothing fleetrun can speak,
is a config error naming the keyword.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Mapping

import paramiko

from fleetrun.plugins.transports.ssh_config_lookup import matches_pattern_list
from fleetrun.plugins.transports.ssh_options import value_refused

#: Key exchanges paramiko speaks under another name: RFC 8731 named curve25519-sha256 what
#: libssh had named curve25519-sha256@libssh.org; some servers offer the RFC's name alone.
_KEX_ALIASES = {"curve25519-sha256": "curve25519-sha256@libssh.org"}

#: How an algorithm's name is written (RFC 4251 section 6, lowercase as every one is).
_NAME = re.compile(r"[a-z0-9][a-z0-9.@_+-]*")


@functools.cache
def kex_table() -> dict[str, type]:
    """paramiko's table of key exchanges (name: class), with the names it lacks for the same
    exchanges; one table, shared by every transport (paramiko only reads it)."""
    table = dict(paramiko.Transport._kex_info)  # noqa: SLF001
    table.update({alias: table[name] for alias, name in _KEX_ALIASES.items() if name in table})
    return table


@dataclass(frozen=True)
class _Kind:
    keyword: str  # as ssh_config writes it
    option: str  # paramiko's SecurityOptions attribute
    ssh_default: tuple[str, ...]  # OpenSSH's client default, in its order

    @functools.cache  # noqa: B019 - four kinds, made once
    def speakable(self) -> frozenset[str]:
        table = {
            "ciphers": paramiko.Transport._cipher_info,  # noqa: SLF001 - paramiko's own tables of what it can speak
            "digests": paramiko.Transport._mac_info,  # noqa: SLF001
            "kex": kex_table(),
            "key_types": paramiko.Transport._key_info,  # noqa: SLF001
        }[self.option]
        return frozenset(table)


def _certificate(name: str) -> str:
    # The algorithm of a certificate of a key of algorithm ``name`` (sk- keys drop their '@openssh.com').
    return name.removesuffix("@openssh.com") + "-cert-v01@openssh.com"


_HOST_KEYS = (
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com", "rsa-sha2-512", "rsa-sha2-256",
)  # fmt: skip

CIPHERS = _Kind(
    "Ciphers", "ciphers",
    ("chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"),
)  # fmt: skip
MACS = _Kind(
    "MACs", "digests",
    (
        "umac-64-etm@openssh.com", "umac-128-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
        "hmac-sha1-etm@openssh.com", "umac-64@openssh.com", "umac-128@openssh.com", "hmac-sha2-256", "hmac-sha2-512", "hmac-sha1",
    ),
)  # fmt: skip
KEX = _Kind(
    "KexAlgorithms", "kex",
    (
        "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
        "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
        "diffie-hellman-group14-sha256",
    ),
)  # fmt: skip
HOST_KEY_ALGORITHMS = _Kind("HostKeyAlgorithms", "key_types", tuple(map(_certificate, _HOST_KEYS)) + _HOST_KEYS)
KINDS = (CIPHERS, MACS, KEX, HOST_KEY_ALGORITHMS)


@dataclass(frozen=True)
class Algorithms:
    """What to offer one hop's server, for each of paramiko's SecurityOptions."""

    ciphers: tuple[str, ...]
    digests: tuple[str, ...]
    kex: tuple[str, ...]
    #: None: ssh_config writes no HostKeyAlgorithms, so they are ordered by the host's
    #: known keys (see :func:`~.ssh_host_certificates.host_key_algorithms`), as ssh does.
    key_types: tuple[str, ...] | None


@functools.cache
def defaults(kind: _Kind) -> tuple[str, ...]:
    """ssh's default for ``kind``, without what paramiko cannot speak. AES-GCM goes first
    among the ciphers: it is the fastest paramiko has (ssh's first, ChaCha20, it lacks)."""
    speakable = kind.speakable()
    names = [name for name in kind.ssh_default if name in speakable]
    if kind is CIPHERS:
        names.sort(key=lambda name: "gcm" not in name)
    return tuple(names)


def algorithms_for(ssh_config: Mapping[str, str], host: str) -> Algorithms:
    """The algorithms to offer the hop ``host``, whose ssh_config lookup is ``ssh_config``.

    Raises :class:`~fleetrun.core.transport.TransportError` (``config``) for a list ssh cannot read, or one that
    leaves nothing fleetrun can speak."""
    chosen = {kind.option: offered(kind, ssh_config.get(kind.keyword.lower()), host) for kind in KINDS}
    if ssh_config.get(HOST_KEY_ALGORITHMS.keyword.lower()) is None:
        chosen["key_types"] = None
    return Algorithms(**chosen)


def offered(kind: _Kind, written: str | None, host: str) -> tuple[str, ...]:
    """What fleetrun offers for ``kind`` when ssh_config writes ``written`` (None: nothing)."""
    base = defaults(kind)
    if written is None:
        return base
    if not written or any(ch.isspace() for ch in written):
        raise value_refused(host, kind.keyword, written, "a comma-separated list of names, with no spaces")
    first, names = (written[0], written[1:]) if written[0] in "+-^" else ("", written)
    listed = names.split(",")
    if first == "-":
        result = [name for name in base if not matches_pattern_list(names, name)]
    else:
        unreadable = [name for name in listed if not _NAME.fullmatch(name)]
        if unreadable:
            raise value_refused(
                host, kind.keyword, written,
                f"names of algorithms (ssh -Q {kind.keyword} lists them; patterns only after '-'): {unreadable[0]!r} is not one",
            )
        result = list(base) + listed if first == "+" else listed + list(base) if first == "^" else listed
    speakable = kind.speakable()
    kept = tuple(dict.fromkeys(name for name in result if name in speakable))
    if not kept:
        raise value_refused(host, kind.keyword, written, f"a list that keeps one fleetrun can use: {', '.join(sorted(speakable))}")
    return kept

