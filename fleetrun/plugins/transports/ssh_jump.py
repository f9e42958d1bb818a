"""ssh's ProxyJump values (the ``jump_host`` field, ``ProxyJump`` in ssh_config), read as
ssh reads them. Kept apart from the connecting code so that the hosts file can be
checked without importing Fabric."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class JumpHop:
    """One hop of a ProxyJump list; None leaves the field to ssh_config."""

    user: str | None
    host: str
    port: int | None


def parse_jump_hosts(text: str) -> list[JumpHop]:
    """A ProxyJump value as ssh reads it, first hop first: ``[user@]host[:port]`` or
    ``ssh://[user@]host[:port]``, comma-separated, an IPv6 address in brackets
    (``[::1]:2222``); ``none`` is no jump host. Raises ValueError saying what is wrong."""
    if text.strip().lower() == "none":
        return []
    return [_jump_hop(written.strip()) for written in text.split(",")]


def _jump_hop(written: str) -> JumpHop:
    hop = written.removeprefix("ssh://").removesuffix("/") if written.startswith("ssh://") else written
    user, at, rest = hop.rpartition("@")
    port_text = ""
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"jump host {written!r}: an IPv6 address goes in brackets, then :PORT if any ([::1]:2222)")
        port_text = after[1:]
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host = rest  # a name, or an IPv6 address written without brackets (so without a port)
    # ssh splits at the last '@', so a user may hold one (user@domain@host).
    if not host or (at and not user) or any(ch in "/[]@" for ch in host) or any(ch.isspace() or ord(ch) < 32 for ch in hop):
        raise ValueError(f"jump host {written!r} is not [user@]host[:port]")
    if ":" in host and not rest.startswith("["):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"jump host {written!r} is not [user@]host[:port]") from None
    port = None
    if port_text or rest.endswith(":"):
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"jump host {written!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return JumpHop(user or None, host, port)
