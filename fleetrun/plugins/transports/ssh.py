"""The ``ssh`` transport: commands run on remote hosts over SSH, connected through Fabric.

One transport instance serves one host and keeps a small pool of connections to it:
a task takes a channel on a live connection with a free slot, a new connection is
opened only when every one is full (or gone), and a connection nobody has used for
``idle_timeout`` seconds is closed. Keepalives detect a connection that stopped
answering; a dead connection fails the tasks running on it and is replaced on the
next task.

Fabric, invoke and paramiko are imported on first use, not when the plugin loads.
Blocking paramiko calls (connect, channel open) run on a shared pool of worker
threads; reading output does not need a thread (see :mod:`.ssh_channel`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.inventory import Host
from fleetrun.core.paths import home_problem
from fleetrun.core.shell import reads_like_sh
from fleetrun.core.transport import Execution, HostField, Transport, TransportError
from fleetrun.plugins.transports.ssh_jump import parse_jump_hosts

if TYPE_CHECKING:
    import fabric
    import paramiko

    from fleetrun.plugins.transports.ssh_channel import ChannelCommand
    from fleetrun.plugins.transports.ssh_connect import SSHSettings

log = logging.getLogger("fleetrun.ssh")
T = TypeVar("T")

#: How much of the login-shell question's answer is read (start-up files may print first).
_PROBE_OUTPUT_LIMIT = 64 << 10

_MAX_THREADS = 64


class _DaemonThreads(concurrent.futures.Executor):
    """Runs paramiko's blocking calls on at most :data:`_MAX_THREADS` daemon threads.

    ThreadPoolExecutor joins its threads at interpreter exit: a connect given up on (its
    task cancelled by Ctrl-C) kept fleetrun from exiting until it timed out, up to
    ``connect_timeout``. What still matters at exit (stopping remote commands) is awaited
    by the executor's close() before that.
    """

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._count = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._work.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                start = self._count < _MAX_THREADS
                self._count += start
                name = f"fleetrun-ssh-{self._count}"
            if start:
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            future, fn, args = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args  # nothing of the call is kept alive while idle
            self._idle.release()


_threads_lock = threading.Lock()
_thread_pool: _DaemonThreads | None = None


def _threads() -> _DaemonThreads:
    global _thread_pool
    with _threads_lock:
        if _thread_pool is None:
            _thread_pool = _DaemonThreads()
        return _thread_pool


def _forget_threads_in_child() -> None:
    # The pool's threads stayed in the parent; its bookkeeping, copied, would count them
    # as idle and never start one, and its lock may have been held at the fork.
    global _thread_pool, _threads_lock
    _thread_pool = None
    _threads_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_threads_in_child)


async def _blocking(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_threads(), function, *args)


def _check_networks(values: list[str]) -> str | None:
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not a network in CIDR notation (e.g. 10.0.0.0/8 or 2001:db8::/32)"
    return None


def _hostname_problem(value: str) -> str | None:
    if not value or value.startswith("-") or any(ch.isspace() or ord(ch) < 32 or ch in "@/" for ch in value):
        return f"{value!r} is not a host name or address (no spaces, '@' or '/'; the user goes in 'user')"
    if value.startswith("[") or value.endswith("]"):
        return f"{value!r}: write an IPv6 address without brackets ({value.strip('[]')}); the port goes in 'port'"
    if value.count(":") == 1:
        return f"{value!r}: the port goes in 'port', not after the name"
    return None


def _jump_host_problem(value: str) -> str | None:
    try:
        parse_jump_hosts(value)
    except ValueError as exc:
        return str(exc)
    return None


def _home_problem(value: str | list[str]) -> str | None:
    for path in [value] if isinstance(value, str) else value:
        problem = home_problem(path)
        if problem is not None:
            return problem
    return None


class SSHTransport(Transport):
    """Runs commands on a host over SSH; connections are pooled per host."""

    name = "ssh"
    host_fields = {
        "hostname": HostField(
            "string", "address or DNS name to connect to (default: the host's name, through ~/.ssh/config)",
            validate=_hostname_problem,
        ),
        "port": HostField("integer", "SSH port (default: from ~/.ssh/config, else 22)", minimum=1, maximum=65535),
        "user": HostField("string", "login user (default: from ~/.ssh/config, else the local user)"),
        "identity_files": HostField(
            "string-list",
            "the only keys to offer, from these files or ssh-agent (default: ~/.ssh/config, every agent key, ~/.ssh/id_*)",
            validate=_home_problem,
        ),
        "certificate_files": HostField(
            "string-list",
            "certificates (ssh-keygen -s) to log in with, each with the key it certifies, from ssh-agent or an identity file (default: "
            "~/.ssh/config's CertificateFile; a certificate beside its key, KEY-cert.pub, is always sent)",
            validate=_home_problem,
        ),
        "known_hosts": HostField(
            "string",
            "the only known_hosts file host keys are checked against (default: those ssh reads: UserKnownHostsFile "
            "and GlobalKnownHostsFile of ~/.ssh/config, else ~/.ssh/known_hosts{,2} and /etc/ssh/ssh_known_hosts{,2})",
            validate=_home_problem,
        ),
        "host_key_checking": HostField(
            "string",
            "strict: refuse unknown and changed host keys; accept-new: record an unknown key in the (first) "
            "known_hosts file on first use (changed and revoked keys are still refused). Default: ~/.ssh/config's "
            "StrictHostKeyChecking (accept-new for accept-new, no and off), else strict",
            choices=("strict", "accept-new"),
        ),
        "jump_host": HostField(
            "string",
            "jump host(s) to go through, first hop first, as ssh's ProxyJump: [user@]host[:port][,...], an IPv6 "
            "address in brackets ([::1]:2222); none: no jump host, whatever ~/.ssh/config says",
            validate=_jump_host_problem,
        ),
        # Beyond about 9e9 s the waits inside paramiko fail every task ("timestamp too large").
        "connect_timeout": HostField(
            "number", "seconds to connect and authenticate (default: ~/.ssh/config's ConnectTimeout, else 10)",
            minimum=0.1, maximum=86400,
        ),
        "keepalive_interval": HostField(
            "number", "seconds between keepalives; 0 turns them off (default: ~/.ssh/config's ServerAliveInterval, else 15)",
            minimum=0,
        ),
        "keepalive_count_max": HostField(
            "integer",
            "unanswered keepalives before the connection is dropped (default: ~/.ssh/config's ServerAliveCountMax, else 3)",
            minimum=1,
        ),
        "use_ssh_config": HostField("boolean", "read ~/.ssh/config and /etc/ssh/ssh_config for this host (default: true)"),
        "ssh_config_file": HostField("string", "read this ssh_config file instead of the default ones", validate=_home_problem),
        "max_channels": HostField(
            "integer", "channels per connection, one kept for stopping commands (default: 10, sshd's MaxSessions)", minimum=2
        ),
        "idle_timeout": HostField("number", "seconds an unused connection stays open (default: 300)", minimum=0),
        "password_env": HostField("string", "environment variable holding the login password (never the password itself)"),
        "password_file": HostField("string", "file (mode 600) holding the login password", validate=_home_problem),
        "passphrase_env": HostField("string", "environment variable holding the identity files' passphrase"),
        "passphrase_file": HostField("string", "file (mode 600) holding the identity files' passphrase", validate=_home_problem),
        "allowed_networks": HostField(
            "string-list", "CIDRs the host's address must be in (default: any)", validate=_check_networks
        ),
        "blocked_networks": HostField(
            "string-list", "CIDRs the host's address must not be in (checked first)", validate=_check_networks
        ),
    }

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        from fleetrun.plugins.transports.ssh_connect import SSHSettings

        self.settings: SSHSettings = SSHSettings.from_host(host)
        self._pool: list[_PooledConnection] = []
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False  # by aclose(): a connection still being opened is closed as it opens
        #: Closes of connections dropped from the pool, which aclose() waits for too.
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    def register_secrets(cls, host: Host) -> None:
        from fleetrun.core.secrets import SecretError
        from fleetrun.plugins.transports.ssh_connect import SECRET_KINDS, SSHSettings, read_host_secret

        settings = SSHSettings.from_host(host)
        for kind in SECRET_KINDS:
            try:
                read_host_secret(settings, kind)
            except SecretError:
                pass  # reported by the task that needs it

    def describe(self) -> Mapping[str, Any]:
        from fleetrun.plugins.transports.ssh_connect import describe

        return describe(self.settings)

    async def execute(self, execution: Execution) -> int:
        from fleetrun.plugins.transports.ssh_channel import ChannelCommand, remote_command

        def request(connection: _PooledConnection) -> tuple[str, bytes]:
            return remote_command(
                execution.command, execution.env, execution.cwd, posix_login_shell=connection.posix_login_shell
            )

        connection, channel, cancelled = await self._start(request)
        command = ChannelCommand(channel, execution, connection.describe, connection.login_shell)
        try:
            if cancelled:
                raise asyncio.CancelledError
            return await command.wait()
        except asyncio.CancelledError:
            await self._stop_remote(connection, command)
            raise
        finally:
            command.stop_reading()
            connection.close_channel(channel)
            self._release(connection)

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        pool, self._pool = self._pool, []
        await asyncio.gather(*(self._close(c) for c in pool), *self._closing)

    # -- starting and stopping commands -------------------------------------------------

    async def _start(
        self, request: Callable[[_PooledConnection], tuple[str, bytes]]
    ) -> tuple[_PooledConnection, paramiko.Channel, bool]:
        """A channel running the exec request and input that ``request`` makes for the
        connection it is on, and whether the task was cancelled meanwhile.

        A cancel that arrives while the exec request is out still gets the channel, so
        that the command it may have started can be stopped.
        """
        import paramiko

        retries = 2
        while True:
            connection = await self._acquire()
            start = functools.partial(connection.start_command, *request(connection), keep_input_open=True)
            started = asyncio.get_running_loop().run_in_executor(_threads(), start)
            cancelled = False
            try:
                try:
                    channel = await asyncio.shield(started)
                except asyncio.CancelledError:
                    cancelled = True
                    channel = await started
                return connection, channel, cancelled
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # ChannelException is an SSHException; paramiko may also report a refused
                # channel as a bare SSHException when several opens fail at once.
                self._release(connection)
                if cancelled:
                    raise asyncio.CancelledError from None
                if connection.alive:
                    if connection.channels > 0:
                        # Refused while other channels are open: the server allows fewer
                        # sessions per connection (sshd's MaxSessions) than max_channels.
                        connection.capacity = max(1, connection.channels - 1)
                        continue
                    raise TransportError("disconnected", f"{connection.describe()} refused a new channel: {_failure_in_words(exc)}") from None
                self._discard(connection)
                if retries > 0:
                    # A pooled connection that died while idle: the command never started.
                    retries -= 1
                    continue
                raise TransportError("disconnected", f"cannot start the command on {connection.describe()}: {_failure_in_words(exc)}") from None

    async def _stop_remote(self, connection: _PooledConnection, command: ChannelCommand) -> None:
        """Stop the remote command's whole process group, as the local transport does."""
        from fleetrun.plugins.transports.ssh_channel import KILL_GRACE_SECONDS, stop_script

        pgid = await command.wait_pgid(timeout=min(connection.options.connect_timeout, 5.0))
        if pgid is None:
            log.warning("%s: the command's process group is unknown; only its channel is closed", connection.describe())
            return
        script = stop_script(pgid)
        deadline = KILL_GRACE_SECONDS + connection.options.connect_timeout
        try:
            await asyncio.wait_for(_blocking(connection.run_quiet, script), deadline)
            return
        except Exception as exc:  # noqa: BLE001 - fall back to a connection of its own
            log.debug("%s: stopping on the pooled connection failed: %s", connection.describe(), _failure_in_words(exc))
        if not connection.alive:
            return  # the server is gone; there is nothing left to reach
        try:
            await asyncio.wait_for(_blocking(_run_on_new_connection, self.settings, script), deadline * 2)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not stop the remote command: %s", connection.describe(), _failure_in_words(exc))

    # -- the pool ----------------------------------------------------------------------

    async def _acquire(self) -> _PooledConnection:
        while True:
            for connection in list(self._pool):
                if not connection.alive and connection.channels == 0:
                    self._discard(connection)
            for connection in self._pool:
                if connection.alive and connection.channels < connection.capacity:
                    connection.take()
                    return connection
            if self._connecting is None or self._connecting.done():
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
                # Waiters that were all cancelled must not leave the error unretrieved.
                self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
            await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        # Not waited for by aclose(), which cancels this: the connect goes on in its thread,
        # and what it opens is closed there, or as it arrives here.
        opening = asyncio.get_running_loop().run_in_executor(_threads(), self._open)
        try:
            opened = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_if_opened)
            raise
        connection = _PooledConnection(opened, self.settings)
        try:
            await _blocking(connection.ask_login_shell)
        except BaseException:
            _close_if_opened(opening)  # with the jump hosts' connections, which Fabric's close() leaves open
            raise
        self._pool.append(connection)
        log.debug("connected to %s", connection.describe())
        if connection.options.keepalive_interval > 0:
            connection.keepalive = asyncio.get_running_loop().create_task(self._keep_alive(connection))

    def _open(self) -> fabric.Connection:
        """Open a connection (in a worker thread); one that opens after aclose() is closed."""
        from fleetrun.plugins.transports.ssh_connect import close_connection, open_connection

        opened = open_connection(self.settings)
        if self._closed:
            close_connection(opened)
            raise TransportError("disconnected", f"host {self.settings.alias!r}: the transport was closed while connecting")
        return opened

    def _release(self, connection: _PooledConnection) -> None:
        connection.channels -= 1
        if connection.channels > 0:
            return
        if not connection.alive:
            self._discard(connection)
        elif connection in self._pool:
            connection.idle_timer = asyncio.get_running_loop().call_later(
                self.settings.idle_timeout, self._discard, connection
            )

    def _discard(self, connection: _PooledConnection) -> None:
        if connection in self._pool:
            self._pool.remove(connection)
            connection.closed = True  # no task takes it from now on, even before it is closed
            closing = asyncio.get_running_loop().create_task(self._close(connection))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _close(self, connection: _PooledConnection) -> None:
        from fleetrun.plugins.transports.ssh_connect import close_connection

        connection.closed = True
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
        if connection.keepalive is not None and connection.keepalive is not asyncio.current_task():
            connection.keepalive.cancel()
        await _blocking(close_connection, connection.fabric)
        if connection.pinging is not None:
            await asyncio.gather(connection.pinging, return_exceptions=True)

    async def _keep_alive(self, connection: _PooledConnection) -> None:
        interval = connection.options.keepalive_interval
        patience = interval * connection.options.keepalive_count_max
        while connection.alive:
            await asyncio.sleep(interval)
            if not connection.alive:
                break
            # A task of its own, kept on the connection: a close waits for it (a ping in
            # flight ends when the connection does) rather than leave it to the loop's end.
            answered = connection.pinging = asyncio.ensure_future(_blocking(connection.ping))
            try:
                await asyncio.wait_for(asyncio.shield(answered), patience)
            except asyncio.TimeoutError:
                log.warning("%s: no answer to keepalives for %g s; dropping the connection", connection.describe(), patience)
                self._discard(connection)  # closing it fails the tasks still running on it
                return
            except Exception as exc:  # noqa: BLE001 - whatever paramiko raises, the connection cannot be used
                log.warning("%s: a keepalive could not be sent (%s); dropping the connection", connection.describe(), _failure_in_words(exc))
                self._discard(connection)
                return


class _PooledConnection:
    """One open SSH connection and the channels that tasks hold on it."""

    def __init__(self, opened: fabric.Connection, settings: SSHSettings) -> None:
        self.fabric = opened
        self.transport: paramiko.Transport = opened.transport
        self.settings = settings
        self.options = settings.options_for(opened)  # checked when the connection was built
        self.channels = 0
        self.capacity = settings.max_channels - 1  # one channel stays free for stopping commands
        self.closed = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.keepalive: asyncio.Task[None] | None = None
        self.pinging: asyncio.Future[None] | None = None  # the keepalive's request in flight, if any
        #: The user's login shell (see ask_login_shell); None: unknown.
        self.login_shell: str | None = None

    @property
    def posix_login_shell(self) -> bool:
        """Whether the login shell reads fleetrun's preamble, and commands, as sh does."""
        return reads_like_sh(self.login_shell)

    @property
    def alive(self) -> bool:
        return not self.closed and self.transport.is_active()

    def describe(self) -> str:
        from fleetrun.plugins.transports.ssh_connect import address

        return f"host {self.settings.alias!r} ({address(self.fabric)})"

    def take(self) -> None:
        self.channels += 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    # These block: call them from worker threads.

    def start_command(self, script: str, stdin: bytes = b"", *, keep_input_open: bool = False) -> paramiko.Channel:
        """Run ``script`` on a new channel and send ``stdin``; then end the input, unless
        ``keep_input_open`` (a task's preamble watches it, see ``ssh_channel.remote_script``)."""
        with self._sending():
            channel = self.transport.open_session(timeout=self.options.connect_timeout)
        try:
            channel.exec_command(script)
            if stdin:
                try:
                    channel.sendall(stdin)  # read by the script's preamble, before the command starts
                except OSError:
                    if not (channel.closed and self.transport.is_active()):
                        raise
                    # The server ended the channel before its input was sent: a login shell
                    # that runs nothing (nologin) exits at once. Its exit status says so.
                    return channel
            if not keep_input_open:
                channel.shutdown_write()
        except BaseException:
            self.close_channel(channel)
            raise
        return channel

    def close_channel(self, channel: paramiko.Channel) -> None:
        """Close ``channel``. A close that cannot be sent does not fail what the channel
        ran: that ended as it ended (see :meth:`_sending` for the connection)."""
        from fleetrun.plugins.transports.ssh_connect import SEND_FAILURES

        with contextlib.suppress(*SEND_FAILURES), self._sending():
            channel.close()

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        """Around what sends on the connection. paramiko finds a link broken when it reads,
        and one that fails only one way (a jump host's or a ProxyCommand's) reads on: one
        that cannot send is closed here, so that the pool replaces it."""
        import paramiko

        try:
            yield
        except (EOFError, paramiko.ProxyCommandFailure):
            self.transport.close()
            raise

    def ask_login_shell(self) -> None:
        """Learn the user's login shell: one that is not POSIX is sent commands another way
        (see ``ssh_channel``). Unknown (the question failed or went unanswered): that way too,
        which works with every shell."""
        import paramiko

        from fleetrun.plugins.transports.ssh_channel import SHELL_PROBE, login_shell

        output = b""
        try:
            channel = self.start_command(SHELL_PROBE)
            try:
                channel.settimeout(self.options.connect_timeout)
                while len(output) < _PROBE_OUTPUT_LIMIT:
                    data = channel.recv(_PROBE_OUTPUT_LIMIT)
                    if not data:
                        break
                    output += data
            finally:
                self.close_channel(channel)
        except (paramiko.SSHException, EOFError, OSError) as exc:  # a timeout is an OSError
            if not self.transport.is_active():
                raise TransportError("disconnected", f"{self.describe()} closed the connection after the login: {_failure_in_words(exc)}") from None
            log.warning("%s: no answer to which login shell the user has (%s); taking it as not POSIX", self.describe(), _failure_in_words(exc))
        self.login_shell = login_shell(output)
        log.debug("%s: login shell %s", self.describe(), self.login_shell or "unknown")

    def run_quiet(self, script: str) -> int:
        channel = self.start_command(script)
        try:
            return channel.recv_exit_status()
        finally:
            self.close_channel(channel)

    def ping(self) -> None:
        with self._sending():
            self.transport.global_request("keepalive@openssh.com", wait=True)


def _close_if_opened(opening: asyncio.Future[fabric.Connection]) -> None:
    """Close, in a worker thread, the connection ``opening`` opened, if it did."""
    from fleetrun.plugins.transports.ssh_connect import close_connection

    if not opening.cancelled() and opening.exception() is None:
        _threads().submit(close_connection, opening.result())


def _failure_in_words(exc: BaseException) -> str:
    """paramiko's failure, for a message: a ProxyCommand's by its error alone (its words
    would repeat the whole command line, which may hold what only the user should see)."""
    import paramiko

    if isinstance(exc, paramiko.ProxyCommandFailure):
        return f"the ProxyCommand failed: {exc.error}"
    return getattr(exc, "text", None) or str(exc) or type(exc).__name__


def _run_on_new_connection(settings: SSHSettings, script: str) -> None:
    from fleetrun.plugins.transports.ssh_connect import close_connection, open_connection

    opened = open_connection(settings)
    try:
        _PooledConnection(opened, settings).run_quiet(script)
    finally:
        close_connection(opened)


@hookimpl
def fleetrun_register_transports(register):  # type: ignore[no-untyped-def]
    register(SSHTransport)
