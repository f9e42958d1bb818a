"""The connection options a host of the hosts file may leave to ssh_config, resolved for
one hop: how long connecting may take and how often to try, how often to check that the
server is still there, whether an unknown host key is recorded, which address family to
connect over and from, and whether to compress.

A host's own field wins; else ssh_config's keyword for that hop (``ConnectTimeout``,
``ServerAliveInterval``, ``ServerAliveCountMax``, ``StrictHostKeyChecking``, and
``ConnectionAttempts``, ``AddressFamily``, ``BindAddress`` and ``Compression``, which have
no field), read as ssh reads it; else fleetrun's default. A value ssh would refuse is a config error naming
it, as ssh refuses the file. Fabric, left to itself, reads ``ConnectTimeout`` with
``int()`` (``5s`` is a traceback) and none of the others.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Mapping

from fleetrun.core.transport import TransportError

CONNECT_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3
#: The longest connect timeout fleetrun waits (the hosts file's maximum): past about
#: 9e9 s the waits inside paramiko fail.
MAX_CONNECT_TIMEOUT = 86400.0

#: StrictHostKeyChecking as ssh reads it (any case), and what fleetrun does for it. ``no``
#: records an unknown key as ``accept-new`` does; where ssh, told ``no``, would go on with
#: a *changed* key, fleetrun refuses it as under every setting.
_HOST_KEY_CHECKING = {
    "yes": "strict", "true": "strict", "ask": "strict",
    "accept-new": "accept-new", "no": "accept-new", "false": "accept-new", "off": "accept-new",
}  # fmt: skip

#: AddressFamily as ssh reads it (any case): the addresses of the host's name to try.
ADDRESS_FAMILIES = {"any": socket.AF_UNSPEC, "inet": socket.AF_INET, "inet6": socket.AF_INET6}

_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_INT_MAX = 2**31 - 1  # ssh refuses a time or count past it


@dataclass(frozen=True)
class HopOptions:
    """How to connect to one hop and keep the connection."""

    connect_timeout: float
    keepalive_interval: float  # 0: no keepalives
    keepalive_count_max: int
    host_key_checking: str  # strict or accept-new
    #: ssh_config's ``StrictHostKeyChecking`` as written, when it is what decided.
    host_key_checking_written: str | None = None
    address_family: str = "any"  # a key of ADDRESS_FAMILIES
    connection_attempts: int = 1  # TCP connects tried, a second apart, as ssh tries them
    compression: bool = False
    bind_address: str | None = None  # the local address to connect from

    def host_key_checking_in_words(self) -> str:
        if self.host_key_checking_written is None:
            return self.host_key_checking
        return f"{self.host_key_checking} (StrictHostKeyChecking {self.host_key_checking_written} of ssh_config)"


def hop_options(
    ssh_config: Mapping[str, str], host: str, *, connect_timeout: float | None, keepalive_interval: float | None,
    keepalive_count_max: int | None, host_key_checking: str | None,
) -> HopOptions:
    """The options for the hop ``host``, whose ssh_config lookup is ``ssh_config``: each
    argument given wins (the host's field), else ssh_config's value, else the default.

    Raises :class:`TransportError` (``config``) for an ssh_config value ssh refuses."""
    written_checking = None
    if host_key_checking is None:
        written_checking = ssh_config.get("stricthostkeychecking")
        if written_checking is not None:
            host_key_checking = _HOST_KEY_CHECKING.get(written_checking.lower())
            if host_key_checking is None:
                raise value_refused(host, "StrictHostKeyChecking", written_checking, "one of yes, ask, accept-new, no, off")
    if connect_timeout is None:
        seconds = _seconds(ssh_config, host, "ConnectTimeout")
        # 0 is ssh's "no timeout of its own": fleetrun keeps its default rather than wait forever.
        connect_timeout = min(float(seconds), MAX_CONNECT_TIMEOUT) if seconds else CONNECT_TIMEOUT
    if keepalive_interval is None:
        seconds = _seconds(ssh_config, host, "ServerAliveInterval")
        keepalive_interval = KEEPALIVE_INTERVAL if seconds is None else float(seconds)
    if keepalive_count_max is None:
        count = _count(ssh_config, host, "ServerAliveCountMax", minimum=0)
        # ssh drops the connection after COUNT unanswered keepalives, and at the first with 0.
        keepalive_count_max = KEEPALIVE_COUNT_MAX if count is None else max(1, count)
    address_family = ssh_config.get("addressfamily", "any").lower()
    if address_family not in ADDRESS_FAMILIES:
        raise value_refused(host, "AddressFamily", ssh_config["addressfamily"], "one of any, inet, inet6")
    attempts = _count(ssh_config, host, "ConnectionAttempts", minimum=1) or 1
    compression = ssh_config.get("compression", "no")
    if compression.lower() not in ("yes", "no"):
        raise value_refused(host, "Compression", compression, "yes or no")
    return HopOptions(
        connect_timeout, keepalive_interval, keepalive_count_max, host_key_checking or "strict", written_checking,
        address_family, attempts, compression.lower() == "yes", ssh_config.get("bindaddress"),
    )


def _seconds(ssh_config: Mapping[str, str], host: str, keyword: str) -> int | None:
    """A time of ssh_config (``30``, ``90s``, ``1m30s``, ``2h``), in seconds; None if not written."""
    written = ssh_config.get(keyword.lower())
    if written is None:
        return None
    if not re.fullmatch(r"(?:\+?[0-9]+[sSmMhHdDwW]?)+", written):  # ssh reads each number with strtol: + may lead
        raise value_refused(host, keyword, written, "a time in seconds, or with units as 1m30s")
    total = sum(int(number) * _TIME_UNITS[unit.lower()] for number, unit in re.findall(r"([0-9]+)([a-zA-Z]?)", written))
    if total > _INT_MAX:
        raise value_refused(host, keyword, written, "a time in seconds, or with units as 1m30s")
    return total


def _count(ssh_config: Mapping[str, str], host: str, keyword: str, *, minimum: int) -> int | None:
    """A whole number of ssh_config (``3``, ``+3``), at least ``minimum``; None if not written."""
    written = ssh_config.get(keyword.lower())
    if written is None:
        return None
    if not (re.fullmatch(r"\+?[0-9]+", written) and minimum <= int(written) <= _INT_MAX):
        raise value_refused(host, keyword, written, "a whole number" + (f" from {minimum}" if minimum else ""))
    return int(written)


def value_refused(host: str, keyword: str, written: str, expected: str) -> TransportError:
    """The config error for an ssh_config value ssh would refuse, naming the host, keyword and value."""
    return TransportError("config", f"ssh_config gives {host} {keyword} {written!r}: expected {expected}")
