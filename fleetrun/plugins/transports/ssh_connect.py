"""Opening SSH connections for the ``ssh`` transport: settings, Fabric, jump hosts, errors.

Fabric resolves where a host really is (``~/.ssh/config`` aliases, ``HostName``,
``User``, ``Port``, ``IdentityFile``) and opens the connection, hop by hop through jump
hosts. fleetrun then takes over the parts Fabric leaves loose:

* ssh_config is read with its ``Include`` directives followed (:mod:`.ssh_config_files`),
  and a value paramiko or Fabric would trip over is a config error naming it;
* jump hosts (``jump_host``, ``ProxyJump``) are read as ssh reads them, first hop first
  and with IPv6 hops in brackets (Fabric goes through several hops of ssh_config's in
  reverse order and takes ``[::1]:22`` for a host name);
* host keys are checked against the known_hosts files ssh reads, strictly unless the
  host (or ssh_config's ``StrictHostKeyChecking``) opts in to recording new keys (never
  changed ones), host certificates against their authorities, and ssh_config's
  ``RevokedHostKeys`` is honoured; Fabric's default accepts any key (see
  :mod:`.ssh_known_hosts`);
* each hop's timeouts, keepalives and address family come from the host's fields, else from ssh_config
  (see :mod:`.ssh_options`); Fabric's ``int()`` made a ``connect_timeout`` of 0.5 s no
  handshake limit at all;
* keys come from the ssh-agent ``IdentityAgent`` names, and only the identity files'
  ones when those are named, with the certificates that go with them (paramiko asks
  ``$SSH_AUTH_SOCK``'s agent for every key; see :mod:`.ssh_identities`);
* a connection is closed whole, jump hosts included, also when connecting failed;
* the socket gets ``TCP_NODELAY`` (paramiko leaves Nagle on, which costs ~40 ms a command);
* the algorithms offered are ssh's (``Ciphers``, ``MACs``, ``KexAlgorithms``,
  ``HostKeyAlgorithms`` of ssh_config, else ssh's defaults; see :mod:`.ssh_algorithms`),
  not paramiko's wider defaults (CBC, 3DES, MD5);
* channels get a large window and packet size, and AES-GCM is preferred, for throughput;
* ``exit-signal`` is understood, so a command killed by a signal reports 128+N.

Everything here blocks; the transport calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import shlex
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import fabric
import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from fleetrun.core.inventory import Host
from fleetrun.core.paths import HomeDirectoryError, expand_home
from fleetrun.core.secrets import SecretError, command_environment, read_secret
from fleetrun.core.text import printable
from fleetrun.core.transport import TransportError
from fleetrun.plugins.transports.ssh_algorithms import CIPHERS, HOST_KEY_ALGORITHMS, KEX, MACS, Algorithms, algorithms_for, kex_table
from fleetrun.plugins.transports.ssh_config_files import ConfigFile, SshConfigError, paths_of, read_ssh_config
from fleetrun.plugins.transports.ssh_config_lookup import by_user_shell
from fleetrun.plugins.transports.ssh_host_certificates import host_key_algorithms
from fleetrun.plugins.transports.ssh_identities import (
    keep_usable_identity_files,
    local_path,
    offered_in_words,
    use_certificate_files,
    use_identity_agent,
)
from fleetrun.plugins.transports.ssh_jump import JumpHop, parse_jump_hosts
from fleetrun.plugins.transports.ssh_known_hosts import HostKeyRefused, KnownHosts, check_host_keys, fingerprint, known_hosts_of
from fleetrun.plugins.transports.ssh_options import ADDRESS_FAMILIES, CONNECT_TIMEOUT, HopOptions, hop_options

log = logging.getLogger("fleetrun.ssh")

#: Where ssh looks for host keys when nothing says otherwise (UserKnownHostsFile,
#: GlobalKnownHostsFile); a key accept-new records goes in the first.
USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
SYSTEM_SSH_CONFIG = "/etc/ssh/ssh_config"
_WINDOW_SIZE = 16 << 20
_MAX_PACKET_SIZE = 256 << 10
_SIGNALS = {
    "ABRT": 6, "ALRM": 14, "FPE": 8, "HUP": 1, "ILL": 4, "INT": 2, "KILL": 9,
    "PIPE": 13, "QUIT": 3, "SEGV": 11, "TERM": 15, "USR1": 10, "USR2": 12,
}  # fmt: skip


@dataclass(frozen=True)
class SSHSettings:
    """An ssh host's fields from the hosts file, with defaults filled in."""

    alias: str
    hostname: str | None
    port: int | None
    user: str | None
    identity_files: tuple[str, ...]
    known_hosts: str | None  # None: the files ssh reads (see known_hosts_files)
    # None in these four: what ssh_config says for the hop, else the default (see options_for).
    host_key_checking: str | None
    jump_host: str | None
    connect_timeout: float | None
    keepalive_interval: float | None
    keepalive_count_max: int | None
    use_ssh_config: bool
    ssh_config_file: str | None
    max_channels: int
    idle_timeout: float
    password_env: str | None = None
    password_file: str | None = None
    passphrase_env: str | None = None
    passphrase_file: str | None = None
    allowed_networks: tuple[str, ...] = ()
    blocked_networks: tuple[str, ...] = ()
    certificate_files: tuple[str, ...] = ()

    @classmethod
    def from_host(cls, host: Host) -> SSHSettings:
        o = host.options
        return cls(
            alias=host.name,
            hostname=o.get("hostname"),
            port=o.get("port"),
            user=o.get("user"),
            identity_files=tuple(o.get("identity_files", ())),
            known_hosts=o.get("known_hosts"),
            host_key_checking=o.get("host_key_checking"),
            jump_host=o.get("jump_host"),
            connect_timeout=_number(o.get("connect_timeout"), float),
            keepalive_interval=_number(o.get("keepalive_interval"), float),
            keepalive_count_max=_number(o.get("keepalive_count_max"), int),
            use_ssh_config=bool(o.get("use_ssh_config", True)),
            ssh_config_file=o.get("ssh_config_file"),
            max_channels=int(o.get("max_channels", 10)),
            idle_timeout=float(o.get("idle_timeout", 300)),
            password_env=o.get("password_env"),
            password_file=o.get("password_file"),
            passphrase_env=o.get("passphrase_env"),
            passphrase_file=o.get("passphrase_file"),
            allowed_networks=tuple(o.get("allowed_networks", ())),
            blocked_networks=tuple(o.get("blocked_networks", ())),
            certificate_files=tuple(o.get("certificate_files", ())),
        )

    def options_for(self, hop: fabric.Connection) -> HopOptions:
        """How to connect to ``hop`` (the host, or a jump host) and keep the connection:
        the host's fields, else what ssh_config says for the hop, else the defaults."""
        return hop_options(
            hop.ssh_config, hop.host, connect_timeout=self.connect_timeout, keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max, host_key_checking=self.host_key_checking,
        )

    def known_hosts_files(self, ssh_config: Mapping[str, Any]) -> list[Path]:
        """The files a hop's host keys are checked against, the one to record a new key in
        first: the host's ``known_hosts`` alone when it sets one; else, as ssh reads them,
        ssh_config's ``UserKnownHostsFile`` then ``GlobalKnownHostsFile``, or their defaults."""
        if self.known_hosts is not None:
            return [local_path(self.known_hosts)]
        files = []
        for keyword, default in (("userknownhostsfile", USER_KNOWN_HOSTS), ("globalknownhostsfile", GLOBAL_KNOWN_HOSTS)):
            value = str(ssh_config.get(keyword, default))
            if value.strip().lower() != "none":
                files += [local_path(path) for path in paths_of(value)]
        return files


def _number(value: Any, kind: type[float] | type[int]) -> Any:
    return None if value is None else kind(value)


# -- connecting ------------------------------------------------------------------------


def build_connection(settings: SSHSettings, *, host_keys: bool = True) -> fabric.Connection:
    """A Fabric connection for the host, jump hosts included; nothing is opened yet. Each
    hop gets its own options (see :meth:`SSHSettings.options_for`) and, with
    ``host_keys``, the known_hosts keys to check its server's against."""
    config = _fabric_config(settings)
    connect_kwargs: dict[str, Any] = {}
    if settings.identity_files:
        connect_kwargs["key_filename"] = [str(local_path(p)) for p in settings.identity_files]
        connect_kwargs["look_for_keys"] = False
    connection = _reach(JumpHop(settings.user, settings.hostname or settings.alias, settings.port), settings.jump_host, config, connect_kwargs)
    for hop in _chain(connection):
        options = settings.options_for(hop)
        # Fabric's own reading of ConnectTimeout (int()) is never used: it is always given one.
        hop.connect_timeout = options.connect_timeout  # the SSH negotiation
        hop.connect_kwargs.update(
            banner_timeout=options.connect_timeout, auth_timeout=options.connect_timeout, compress=options.compression
        )
        listed, authorities = None, False
        if host_keys:
            known = check_host_keys(
                hop.client, settings.known_hosts_files(hop.ssh_config), accept_new=options.host_key_checking == "accept-new",
                looked_up_as=hop.host if hop.port == 22 else f"[{hop.host}]:{hop.port}", alias=hop.ssh_config.get("hostkeyalias"),
                hash_names=str(hop.ssh_config.get("hashknownhosts", "no")).lower() == "yes",
                revoked_host_keys=_revoked_host_keys(hop),
            )
            # paramiko, given no listed key (the policy checks them), orders nothing by them.
            listed, authorities = {key.get_name() for key in known.keys}, bool(known.authorities)
        hop.connect_kwargs["transport_factory"] = functools.partial(
            _transport_factory, algorithms=algorithms_for(hop.ssh_config, hop.host), listed=listed, authorities=authorities
        )
    return connection


def _revoked_host_keys(hop: fabric.Connection) -> Path | None:
    written = hop.ssh_config.get("revokedhostkeys")
    return None if written is None or written.lower() == "none" else local_path(written)


#: Jump hosts whose own ssh_config names jump hosts, at most this deep.
_MAX_JUMP_DEPTH = 10


def _reach(
    hop: JumpHop, jump_hosts: str | None, config: fabric.Config, connect_kwargs: dict[str, Any], *, carried: tuple[str, ...] = ()
) -> fabric.Connection:
    """A connection to ``hop`` through ``jump_hosts``, or through what ssh_config says for it
    (ProxyJump, ProxyCommand) when that is None; nothing is opened yet. ``carried``: the
    hosts this one is the first jump host of, the nearest last."""
    connection = _connection(hop, config, connect_kwargs, gateway=False)
    from_ssh_config = jump_hosts is None
    if from_ssh_config:
        jump_hosts = connection.ssh_config.get("proxyjump")
    if jump_hosts is None:
        command = connection.ssh_config.get("proxycommand")  # None for `ProxyCommand none`
        if command:
            connection.gateway = command
        return connection
    try:
        hops = parse_jump_hosts(jump_hosts)
    except ValueError as exc:
        where = f"ssh_config's ProxyJump for {hop.host}" if from_ssh_config else "jump_host"
        raise TransportError("config", f"{where}: {exc}") from None
    if from_ssh_config and any(h.host == hop.host for h in hops):
        return connection  # a jump host that Host * sends through itself: reached directly, as Fabric does
    if hops and hops[0].host in carried:
        chain = " -> ".join((*carried, hop.host, hops[0].host))
        raise TransportError("config", f"ssh_config's ProxyJump goes round in a loop: {chain}")
    if len(carried) >= _MAX_JUMP_DEPTH:
        raise TransportError("config", f"jump hosts whose ssh_config names jump hosts, more than {_MAX_JUMP_DEPTH} deep")
    gateway: fabric.Connection | None = None
    for each in hops:
        if gateway is None:  # the first hop is reached as ssh reaches it, its own ProxyJump included
            gateway = _reach(each, None, config, connect_kwargs, carried=(*carried, hop.host))
        else:
            gateway = _connection(each, config, connect_kwargs, gateway=gateway)
    connection.gateway = gateway if gateway is not None else False
    return connection


def _connection(
    hop: JumpHop, config: fabric.Config, connect_kwargs: dict[str, Any], *, gateway: fabric.Connection | bool
) -> fabric.Connection:
    # Reading ssh_config for the host, paramiko and Fabric raise what they meet: ValueError
    # for `Port ssh`, KeyError for `CanonicalizeHostname yes` without CanonicalDomains, and
    # so on; and `Port 99999` would be tried.
    try:
        connection = fabric.Connection(
            hop.host, user=hop.user, port=hop.port, config=config, gateway=gateway, connect_timeout=CONNECT_TIMEOUT,
            connect_kwargs=dict(connect_kwargs),
            forward_agent=False,  # fleetrun opens its channels itself and forwards no agent
        )
    except (ValueError, LookupError, TypeError, paramiko.SSHException) as exc:
        written = config.base_ssh_config.lookup(hop.host).get("port") if isinstance(exc, ValueError) else None
        if written is not None and not (written.isascii() and written.isdigit()):
            raise _port_error(hop.host, written) from None
        raise TransportError("config", f"ssh_config cannot be read for {hop.host}: {type(exc).__name__}: {exc}") from None
    if not 0 < connection.port < 65536:
        raise _port_error(hop.host, str(connection.port))
    return connection


def _port_error(host: str, port: str) -> TransportError:
    return TransportError("config", f"ssh_config gives {host} the port {port!r}: a port is a number from 1 to 65535")


def open_connection(settings: SSHSettings) -> fabric.Connection:
    """Connect and authenticate; raise :class:`TransportError` naming what failed."""
    connection = build_connection(settings)
    hops = list(reversed(_chain(connection)))  # the first hop first
    try:
        secrets = _secrets(settings)
    except SecretError as exc:
        raise TransportError("auth", str(exc)) from None
    for hop in hops:
        where = address(hop)
        try:
            hop.connect_kwargs.update(secrets)
            keep_usable_identity_files(hop, settings.identity_files, where)
            use_identity_agent(hop, settings.identity_files)
            use_certificate_files(hop, settings.certificate_files, where, secrets.get("passphrase"))
            if not hop.gateway:
                hop.connect_kwargs["sock"] = _tcp_connect(hop.host, hop.port, settings, settings.options_for(hop))
            elif isinstance(hop.gateway, str):
                if settings.allowed_networks or settings.blocked_networks:
                    raise TransportError(
                        "network",
                        f"{where} is reached through a ProxyCommand of ssh_config, which connects where fleetrun cannot "
                        "check: the host's network rules (allowed_networks, blocked_networks) refuse it",
                    )
                # Fabric would read the command again as ssh_config and split it into words itself.
                hop.open_gateway = functools.partial(ShellProxyCommand, hop.gateway)
            else:
                hop.open_gateway = functools.partial(_jump_channel, hop)
            hop.open()
        except TransportError:
            close_connection(connection)
            raise
        except BaseException as exc:
            agent = getattr(hop.client, "_agent", None)
            error = connect_error(
                exc, where, settings, settings.options_for(hop), agent=getattr(agent, "when_empty", None),
                known_hosts=known_hosts_of(hop.client), offered=offered_in_words(hop),
                algorithms=algorithms_for(hop.ssh_config, hop.host), transport=hop.client.get_transport(),
            )
            close_connection(connection)
            raise error from None
    return connection


#: What paramiko raises where it cannot send (a socket's EOFError, a ProxyCommand's
#: ProxyCommandFailure, which is an SSHException): the connection is gone or going.
SEND_FAILURES = (EOFError, OSError, paramiko.SSHException)


def _jump_channel(hop: fabric.Connection) -> paramiko.Channel:
    """The channel through the jump host that carries ``hop``'s connection, as Fabric
    opens it, but closed without raising. paramiko closes it when the connection ends
    (in its own thread, where an error is printed as a traceback), and that close fails
    where the jump host's connection can no longer send: it is ending too."""
    channel = fabric.Connection.open_gateway(hop)
    close = channel.close

    def close_quietly() -> None:
        with contextlib.suppress(*SEND_FAILURES):
            close()

    channel.close = close_quietly  # type: ignore[method-assign]
    return channel


class ShellProxyCommand(paramiko.ProxyCommand):
    """ssh_config's ProxyCommand (its tokens expanded), run as ssh runs it: by the user's
    shell, ``$SHELL -c 'exec COMMAND'``, so that ``$VAR``, ``$(...)`` and quoting mean what
    they mean to ssh, and with fleetrun's stderr, where the proxy's own errors show; like
    every command fleetrun runs on this machine, without the variables secrets come from.
    paramiko split the command into words itself, and kept its stderr in a pipe nobody read."""

    def __init__(self, command: str) -> None:  # noqa: D107 - paramiko's constructor, run through the shell
        self.cmd = by_user_shell(f"exec {command}")
        self.process = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=command_environment({})
        )
        self.timeout = None


def close_connection(connection: fabric.Connection) -> None:
    """Close the connection and each jump host's it goes through.

    Fabric's ``close`` closes only the connection's own, and only once it is open: one that
    failed (a refused host key or login) kept its socket and paramiko's thread, and a jump
    host's connection outlived the one it carried."""
    for hop in _chain(connection):
        hop.close()
        hop.client.close()  # paramiko's, which Fabric leaves open when connecting failed


def address(connection: fabric.Connection) -> str:
    """``user@host:port``, an IPv6 address in brackets (``user@[::1]:2222``) as ssh writes it."""
    host = f"[{connection.host}]" if ":" in connection.host else connection.host
    return f"{connection.user}@{host}:{connection.port}"


def _chain(connection: fabric.Connection) -> list[fabric.Connection]:
    """The connection, then each gateway it goes through (from the last hop back)."""
    chain = [connection]
    while isinstance(chain[-1].gateway, fabric.Connection):
        chain.append(chain[-1].gateway)
    if any(isinstance(c.gateway, str) for c in chain):
        log.debug("a ProxyCommand from ssh_config is in use for %s", connection.host)
    return chain


# A Fabric config costs about 0.4 ms to make, and Fabric only reads it: one serves every
# connection with the same ssh_config (read_ssh_config returns the same lookup while its
# files are unchanged), and one every connection without.
@functools.lru_cache(maxsize=1)
def _without_ssh_config() -> fabric.Config:
    return fabric.Config(overrides={"load_ssh_configs": False})


@functools.lru_cache(maxsize=32)
def _fabric_config_of(lookup: paramiko.SSHConfig) -> fabric.Config:
    return fabric.Config(ssh_config=lookup)


def _fabric_config(settings: SSHSettings) -> fabric.Config:
    if not settings.use_ssh_config:
        return _without_ssh_config()
    system = Path(SYSTEM_SSH_CONFIG)
    try:
        user_directory = expand_home("~/.ssh")
    except HomeDirectoryError:  # no home directory: no user file, as ssh would read none
        user_directory = None
    if settings.ssh_config_file:
        path = local_path(settings.ssh_config_file)
        if not path.is_file():
            raise TransportError("config", f"ssh_config_file {str(path)!r} does not exist")
        files, where = [ConfigFile(path, user_directory or system.parent)], str(path)  # as `ssh -F`: not guarded
    else:  # as ssh: the user's file first (a value found first wins), then the system's
        files = [ConfigFile(user_directory / "config", user_directory, guarded=True)] if user_directory else []
        files.append(ConfigFile(system, system.parent))
        where = f"~/.ssh/config or {SYSTEM_SSH_CONFIG}"
    try:
        return _fabric_config_of(read_ssh_config(files))
    except SshConfigError as exc:
        raise TransportError("config", f"cannot read {where}: {exc}") from None
    except (ValueError, LookupError, TypeError) as exc:  # `Match a\`: shlex's "No escaped character"
        raise TransportError("config", f"cannot read {where}: {type(exc).__name__}: {exc}") from None


SECRET_KINDS = {"password": "the password", "passphrase": "the identity passphrase"}


def read_host_secret(settings: SSHSettings, kind: str) -> str | None:
    """The host's ``password`` or ``passphrase``, from the env variable or file it names (registered for redaction)."""
    return read_secret(env=getattr(settings, f"{kind}_env"), file=getattr(settings, f"{kind}_file"), what=SECRET_KINDS[kind])


def _secrets(settings: SSHSettings) -> dict[str, str]:
    found = {kind: read_host_secret(settings, kind) for kind in SECRET_KINDS}
    return {kind: value for kind, value in found.items() if value is not None}


def _tcp_connect(hostname: str, port: int, settings: SSHSettings, options: HopOptions) -> socket.socket:
    """Resolve once (IPv4 and IPv6, or the one ssh_config's AddressFamily names), keep the
    addresses the network rules allow, connect to one of those: each in turn, and as ssh
    does for ConnectionAttempts, all of them again a second later until one answers."""
    resolved = socket.getaddrinfo(hostname, int(port), ADDRESS_FAMILIES[options.address_family], socket.SOCK_STREAM)
    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
    blocked = [ipaddress.ip_network(n, strict=False) for n in settings.blocked_networks]
    permitted, refused = [], []
    for family, kind, proto, _, address in resolved:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        rule = next((n for n in blocked if ip in n), None)
        if rule is not None:
            refused.append(f"{ip} (in blocked_networks {rule})")
        elif allowed and not any(ip in n for n in allowed):
            refused.append(f"{ip} (not in allowed_networks)")
        else:
            permitted.append((family, kind, proto, address))
    if not permitted:
        raise TransportError("network", f"{hostname} resolves to {', '.join(refused)}: the host's network rules refuse it")
    error: OSError | None = None
    for attempt in range(options.connection_attempts):
        if attempt:
            time.sleep(1)
        for family, kind, proto, address in permitted:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(options.connect_timeout)
            try:
                if options.bind_address is not None:
                    sock.bind(_local_end(options.bind_address, family))
                sock.connect(address)  # the checked address itself: no second lookup
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _SOCKETS.add(sock)
            return sock
    assert error is not None
    raise error


def _local_end(bind_address: str, family: int) -> tuple[Any, ...]:
    """ssh_config's BindAddress, in the family of the address being connected to, as ssh binds it."""
    try:
        return socket.getaddrinfo(bind_address, 0, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"BindAddress {bind_address} of ssh_config: {exc.strerror}") from None


#: The sockets of this process's connections, for :func:`_close_inherited_sockets`.
_SOCKETS: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()


def _close_inherited_sockets() -> None:
    # A forked child holds copies of the parent's connections. While it lived, a server
    # would see none of them end (the parent closing one, or dying), and the watchdog of a
    # remote command would wait for the child. The child's copies go; the parent's stay.
    for sock in list(_SOCKETS):
        sock.close()
    _SOCKETS.clear()


os.register_at_fork(after_in_child=_close_inherited_sockets)


def _transport_factory(
    sock: Any, *, algorithms: Algorithms, listed: set[str] | None, authorities: bool, **kwargs: Any
) -> paramiko.Transport:
    """paramiko's transport, tuned. ``algorithms``: what to offer (see :mod:`.ssh_algorithms`);
    ``listed``: the names of the keys known_hosts lists for the host,
    whose host key algorithms are offered first where ssh_config orders none (see
    :func:`host_key_algorithms`; None where no key is checked); ``authorities``: an
    authority vouches for the host."""
    transport = paramiko.Transport(
        sock, default_window_size=_WINDOW_SIZE, default_max_packet_size=_MAX_PACKET_SIZE, **kwargs
    )
    options = transport.get_security_options()
    transport._kex_info = kex_table()  # noqa: SLF001 - read by paramiko per transport; options.kex checks names against it
    options.ciphers, options.digests, options.kex = algorithms.ciphers, algorithms.digests, algorithms.kex
    if algorithms.key_types is not None:
        options.key_types = algorithms.key_types
    elif listed is not None:
        options.key_types = host_key_algorithms(tuple(options.key_types), listed, authorities=authorities)
    # paramiko ignores exit-signal; this table is per class, so copy it for this transport.
    table = dict(transport._channel_handler_table)  # noqa: SLF001
    table[MSG_CHANNEL_REQUEST] = _on_channel_request
    transport._channel_handler_table = table  # noqa: SLF001
    # paramiko only logs why a server ended the connection; errors name it, as ssh does.
    transport._parse_disconnect = functools.partial(_on_disconnect, transport)  # noqa: SLF001
    return transport


def _on_disconnect(transport: paramiko.Transport, message: paramiko.Message) -> None:
    """Keep, as ``fleetrun_disconnect``, the reason the server gave for ending the connection
    (SSH_MSG_DISCONNECT: sshd's "Too many authentication failures", say)."""
    message.get_int()  # the reason code: its words say the same
    transport.fleetrun_disconnect = printable(message.get_text())  # type: ignore[attr-defined]
    message.rewind()
    paramiko.Transport._parse_disconnect(transport, message)  # noqa: SLF001


def _on_channel_request(channel: paramiko.Channel, message: paramiko.Message) -> None:
    start = message.packet.tell()
    kind = message.get_text()
    if kind == "exit-signal":
        message.get_boolean()  # want_reply
        name = message.get_text()
        channel.fleetrun_exit_signal = _SIGNALS.get(name, 0) or name  # type: ignore[attr-defined]
        channel.status_event.set()
    else:
        message.packet.seek(start)
        paramiko.Channel._handle_request(channel, message)  # noqa: SLF001
    if kind in ("exit-status", "exit-signal"):
        notify: Callable[[], None] | None = getattr(channel, "fleetrun_on_status", None)
        if notify is not None:
            notify()


def exit_signal(channel: paramiko.Channel) -> int | str | None:
    """The signal (number, or name if unknown) that ended the command, if one did."""
    return getattr(channel, "fleetrun_exit_signal", None)


# -- errors ----------------------------------------------------------------------------


def connect_error(
    exc: BaseException, where: str, settings: SSHSettings, options: HopOptions, *, agent: str | None = None,
    known_hosts: KnownHosts | None = None, offered: str | None = None, algorithms: Algorithms | None = None,
    transport: paramiko.Transport | None = None,
) -> TransportError:
    """Turn a failure to connect to a hop (``options`` are its own) into a categorised
    error that carries no secret; ``agent`` says, in words, what the ssh-agent had to offer
    when it offered nothing, ``offered`` what the login offered, ``algorithms`` what the
    key exchange offered, and ``transport`` is the hop's, if it got that far."""
    if isinstance(exc, paramiko.BadHostKeyException):
        listed_in = known_hosts.listed_in.get((exc.expected_key.get_name(), exc.expected_key.get_base64())) if known_hosts else None
        return TransportError(
            "host_key",
            f"the host key of {where} has CHANGED: the server offered {exc.key.get_name()} {fingerprint(exc.key)}, "
            f"but {listed_in or 'known_hosts'} lists {exc.expected_key.get_name()} {fingerprint(exc.expected_key)}. "
            f"The connection was refused{_even_so(options)}. If the change is expected, remove the old entry "
            f"(ssh-keygen -R HOST -f FILE) and add the new key",
        )
    if isinstance(exc, HostKeyRefused):
        return TransportError("host_key", str(exc))
    if isinstance(exc, paramiko.PasswordRequiredException):
        return TransportError("auth", f"authentication to {where} failed: an identity file is encrypted and no passphrase was given")
    keys = offered or ", ".join(settings.identity_files) or "default keys and agent"
    if transport is not None and transport.initial_kex_done and not transport.is_active():
        # Ended during the login. paramiko's words then ("transport shut down or saw EOF",
        # or "No existing session" from the next key tried) say neither who ended it nor why.
        reason = getattr(transport, "fleetrun_disconnect", None)  # see _on_disconnect
        if reason:
            return TransportError("auth", f'authentication to {where} failed (tried: {keys}): the server ended the connection: "{reason}"')
        return TransportError("disconnected", f"the connection to {where} was closed during the login, without a reason (tried: {keys})")
    if isinstance(exc, paramiko.AuthenticationException):
        return TransportError("auth", f"authentication to {where} failed (tried: {keys}): {exc}")
    if _caused_by_timeout(exc):
        return TransportError("timeout", f"connecting to {where} timed out after {options.connect_timeout:g} s")
    if isinstance(exc, paramiko.SSHException) and str(exc) == "No existing session":
        # paramiko stops waiting for the SSH handshake at the timeout without a word (the
        # server sent no banner, or no key exchange); the next step then finds no session.
        return TransportError(
            "timeout", f"connecting to {where} timed out after {options.connect_timeout:g} s: the SSH handshake did not finish"
        )
    if isinstance(exc, socket.gaierror):
        family = "" if options.address_family == "any" else f" (ssh_config's AddressFamily is {options.address_family})"
        return TransportError("unreachable", f"cannot resolve {where}: {exc.strerror}{family}")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return TransportError("unreachable", f"cannot connect to {where}: connection refused")
    if isinstance(exc, OSError):
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        if options.bind_address is not None and options.bind_address not in reason:
            reason += f" (from BindAddress {options.bind_address} of ssh_config)"
        tries = f" ({options.connection_attempts} attempts: ConnectionAttempts of ssh_config)" if options.connection_attempts > 1 else ""
        return TransportError("unreachable", f"cannot connect to {where}: {reason}{tries}")
    if isinstance(exc, paramiko.ChannelException):
        return TransportError("unreachable", f"the jump host could not reach {where}: {exc.text}")
    if isinstance(exc, paramiko.ssh_exception.IncompatiblePeer) and algorithms is not None:
        return TransportError("unreachable", f"SSH negotiation with {where} failed: {exc}{_no_common_algorithm(str(exc), algorithms)}")
    if isinstance(exc, paramiko.SSHException) and str(exc) == "No authentication methods available":
        return TransportError(
            "auth",
            f"authentication to {where} failed: there was no key or password to offer "
            f"({_what_could_be_offered(settings, agent)})",
        )
    if isinstance(exc, paramiko.SSHException) and "key" in str(exc).lower():
        # paramiko's words for an identity file it could not decrypt or parse ("Invalid key", ...).
        keys = ", ".join(settings.identity_files) or "the default keys"
        return TransportError("auth", f"authentication to {where} failed: cannot use the identity file ({keys}): {exc} (wrong passphrase?)")
    if isinstance(exc, (paramiko.SSHException, EOFError)):
        text = str(exc) or type(exc).__name__
        if "banner" in text.lower() or isinstance(exc, EOFError):
            return TransportError("unreachable", f"{where} did not answer as an SSH server: {text}")
        return TransportError("unreachable", f"SSH negotiation with {where} failed: {text}")
    return TransportError("unreachable", f"cannot connect to {where}: {type(exc).__name__}: {exc}")


def _no_common_algorithm(text: str, algorithms: Algorithms) -> str:
    # paramiko's words: "... (no acceptable ciphers)", "macs", "kex algorithm", "host key".
    for words, kind, listed in (
        ("cipher", CIPHERS, algorithms.ciphers), ("mac", MACS, algorithms.digests), ("kex", KEX, algorithms.kex),
        ("host key", HOST_KEY_ALGORITHMS, algorithms.key_types),
    ):
        if words in text:
            what = f"{', '.join(listed)} (ssh's defaults, or ssh_config's {kind.keyword})" if listed is not None else "ssh's defaults"
            return (
                f". fleetrun offered: {what}; for a server that speaks only others, add one in ssh_config for this "
                f"host ({kind.keyword} +NAME), as ssh needs too"
            )
    return ""


def _even_so(options: HopOptions) -> str:
    written = options.host_key_checking_written
    if written is None or written.lower() not in ("no", "off", "false"):
        return ""
    # ssh, told `no`, would go on with a changed key (without passwords): fleetrun never does.
    return f" (ssh_config's StrictHostKeyChecking {written} does not let a changed key through)"


def _what_could_be_offered(settings: SSHSettings, agent: str | None) -> str:
    if settings.identity_files:
        keys = f"identity_files {', '.join(settings.identity_files)}: none readable, none of their keys in ssh-agent"
    else:
        agent = agent or ("none in ssh-agent" if os.environ.get("SSH_AUTH_SOCK") else "no ssh-agent (SSH_AUTH_SOCK is not set)")
        config = "~/.ssh/config or " if settings.use_ssh_config else ""
        keys = f"no identity_files, none in {config}~/.ssh/id_*, {agent}"
    return f"{keys}; no password_env or password_file"


def _program_of(command: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return words[0] if words else command


def _caused_by_timeout(exc: BaseException | None) -> bool:
    # paramiko raises "Error reading SSH protocol banner" from inside its timeout handler.
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def describe(settings: SSHSettings) -> Mapping[str, Any]:
    """Where and how the host would be reached, as resolved through ssh_config; no secret."""
    try:
        connection = build_connection(settings, host_keys=False)
    except TransportError as exc:
        return {"error": exc.message}
    hops = [address(c) for c in reversed(_chain(connection)[1:])]
    options = settings.options_for(connection)
    proxied = next((c.gateway for c in _chain(connection) if isinstance(c.gateway, str)), None)
    return {
        "address": address(connection),
        "address_family": None if options.address_family == "any" else options.address_family,
        "jump_hosts": hops or None,
        # Its program only: the rest of a command may hold what only the user should see.
        "proxy_command": f"{_program_of(proxied)} … (ssh_config's ProxyCommand)" if proxied else None,
        "known_hosts": [str(path) for path in settings.known_hosts_files(connection.ssh_config)],
        "host_key_checking": options.host_key_checking_in_words(),
        "identity_files": list(settings.identity_files) or None,
        "certificate_files": list(settings.certificate_files) or None,
        "secrets_from": [
            f"{what} from {where}"
            for what, where in (
                ("password", settings.password_env and f"${settings.password_env}"),
                ("password", settings.password_file),
                ("passphrase", settings.passphrase_env and f"${settings.passphrase_env}"),
                ("passphrase", settings.passphrase_file),
            )
            if where
        ] or None,
        "allowed_networks": list(settings.allowed_networks) or None,
        "blocked_networks": list(settings.blocked_networks) or None,
    }
