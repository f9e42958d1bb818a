"""The MCP server over streamable HTTP (``fleetrun serve --http``).

Two guards stand in front of the server's tools: a bearer token, compared in constant
time, and the Host and Origin of every request, which must name the server as it was
told it is reached. A web page can make a browser send requests to any address by
pointing a name of its own at it (DNS rebinding); such a request names the page's host,
which is not among them.
"""

from __future__ import annotations

import copy
import functools
import hmac
import ipaddress
import os
import socket
from typing import Any

from fleetrun.core.errors import FleetrunError

#: A shorter bearer token could be found by trying; 16 random hex characters are 64 bits.
MIN_TOKEN_LENGTH = 16


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def token_options(token: str, host: str, port: int) -> dict[str, Any]:
    """``create_server``'s options that refuse every request without ``token``."""
    from mcp.server.auth.settings import AuthSettings

    base = f"http://{url_host(host)}:{port}"
    return {
        "token_verifier": _StaticTokenVerifier(token),
        "auth": AuthSettings(issuer_url=base, resource_server_url=f"{base}/mcp", validate_token_resource=False),
    }


def allowed_host_names(host: str, port: int, extra: list[str]) -> list[str]:
    """The Host header values (and so origins) a request to the server listening on
    ``host``:``port`` may carry; ``extra`` are names given with ``--allow-host``."""
    try:
        address = ipaddress.ip_address(host)
        local = address.is_loopback or address.is_unspecified
    except ValueError:
        local = host == "localhost"
    names: list[str] = []
    for name in [host, *(("127.0.0.1", "localhost", "::1") if local else ())]:
        if name not in ("0.0.0.0", "::"):  # an address to listen on, never one a request names
            # A client leaves out the scheme's own port (http://localhost/mcp sends "localhost").
            names += [f"{url_host(name)}:{port}"] + ([url_host(name)] if port == 80 else [])
    for name in extra:
        if name.startswith("[") or name.count(":") == 1:  # given with its port, or a bracketed address
            names.append(name)
        else:  # reached directly, or through a proxy on the scheme's own port
            names += [url_host(name), f"{url_host(name)}:{port}"]
    return list(dict.fromkeys(names))


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port``; :class:`FleetrunError` saying why not (taken,
    an address this machine does not have) before the server announces itself. uvicorn
    would log the failure after the announcement and exit with status 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise FleetrunError(f"cannot listen on {url_host(host)}:{port}: {reason}") from None


def serve_http(server, listening: socket.socket, host: str, port: int, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Serve ``server`` at ``http://host:port/mcp`` on ``listening`` until the process is stopped.

    The SDK's streamable-HTTP app under uvicorn, as ``server.run`` would serve it, but with
    uvicorn's access log on stderr beside every other log line (uvicorn prints it on
    stdout unless told otherwise), and with the Host and Origin of every request checked
    against ``names`` whatever the address (the SDK checks them only on 127.0.0.1,
    localhost and ::1, leaving 127.0.0.2 or a LAN address open to DNS rebinding).
    """
    import anyio
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=names,
        allowed_origins=[f"{scheme}://{name}" for name in names for scheme in ("http", "https")],
    )
    app = server.streamable_http_app(streamable_http_path="/mcp", host=host, transport_security=security)
    config = uvicorn.Config(app, host=host, port=port, log_level=server.settings.log_level.lower(), log_config=log_config)
    anyio.run(functools.partial(uvicorn.Server(config).serve, sockets=[listening]))


class _StaticTokenVerifier:
    """Accepts exactly one bearer token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str):  # type: ignore[no-untyped-def]
        from mcp.server.auth.provider import AccessToken

        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="fleetrun", scopes=[])
        return None
