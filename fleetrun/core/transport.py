"""The transport contract: how a command gets from a task to a host and back.

A transport instance serves one host and lives as long as its executor. It connects
lazily, on its first :meth:`Transport.execute`, and may keep a connection for later
tasks. Transports are added by plugins through ``fleetrun_register_transports``.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol

if TYPE_CHECKING:
    from fleetrun.core.inventory import Host

log = logging.getLogger("fleetrun.transport")


class OutputSink(Protocol):
    """Where a transport writes a stream's bytes. Call it on the executor's loop."""

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class HostField:
    """A transport-specific field a host may set in the hosts file.

    ``kind`` is one of ``string``, ``integer``, ``number``, ``boolean``,
    ``string-list`` or ``string-map``; the inventory checks it before any task runs,
    along with ``choices`` (allowed strings), ``minimum`` and ``maximum`` (for numbers)
    and ``validate`` (returns an error message for a bad value, else None), if given.
    The string kinds take a value as written (``user: 1000`` is ``"1000"``).
    """

    kind: str
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    validate: Callable[[Any], str | None] | None = None


@dataclass
class Execution:
    """One command for a transport to run, with the sinks its output goes to."""

    task_id: str
    command: str
    env: Mapping[str, str]
    cwd: str | None
    stdout: OutputSink
    stderr: OutputSink
    #: How long the transport may block the executor's thread right after starting the
    #: command, waiting for it to end, before it goes back to the event loop. The
    #: executor allows it only when this is its one task, so a quick command ends without
    #: a trip through the loop; 0 means never block. Transports are free to ignore it.
    wait_inline_s: float = 0.0
    #: For a transport that runs the command as a process on this machine, leading a
    #: process group of its own with everything it starts: call this with its pid right
    #: after the start. Should fleetrun's process die while the command runs, the next
    #: fleetrun process to find the task ``interrupted`` stops that group.
    process_started: Callable[[int], None] | None = None


class TransportError(Exception):
    """The transport could not run the command to an exit status.

    ``category`` says what kind of failure it was (for example ``spawn``,
    ``unreachable``, ``auth``, ``disconnected``); the message must carry no secret.
    """

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


class Transport(abc.ABC):
    """Base class for transports.

    Subclasses set :attr:`name` and, if hosts can configure them, :attr:`host_fields`;
    they implement :meth:`execute`.
    """

    #: What a host's ``transport`` field names.
    name: ClassVar[str]
    #: The host fields this transport understands, beyond the common ones.
    host_fields: ClassVar[Mapping[str, HostField]] = {}

    def __init__(self, host: Host) -> None:
        self.host = host

    @abc.abstractmethod
    async def execute(self, execution: Execution) -> int:
        """Run ``execution.command`` and return its exit status.

        The command gets no input: its stdin is at end of file from the start (nothing
        answers a prompt, so a command that asks a question fails at once instead of
        waiting until its timeout).
        Write output to ``execution.stdout`` and ``execution.stderr`` as it arrives.
        Return 128+N when signal N ended the command. Raise :class:`TransportError` when
        the command could not be run to an exit status. When cancelled (the executor
        cancels for a timeout and for a cancel request), stop the command and everything
        it started, then let :class:`asyncio.CancelledError` propagate. A command run
        elsewhere should not outlive the connection it was started through.
        """

    @classmethod
    def register_secrets(cls, host: Host) -> None:
        """Read the secrets ``host`` names (see :mod:`fleetrun.core.secrets`) so they are redacted.

        An executor (and the CLI) calls this for every host of its inventory when it takes
        the inventory (at its start and whenever the inventory changes), before any task is
        planned: a secret typed into a command, or printed by a command on another host, is
        hidden from the first record on. Read secrets through
        :func:`~fleetrun.core.secrets.read_secret`, which also keeps the variables they come
        from out of the environment of local commands. A secret that cannot be read is
        ignored here; the task that needs it fails with the reason.
        """

    @classmethod
    def foreign_shell(cls, host: Host) -> str | None:
        """The shell that reads commands on ``host`` when it is not of the sh family (fish,
        say), else None. The policy reads commands as sh does, so it judges nothing on a
        host that names a shell here (unless a rule allows raw shell there). The default,
        None, says that commands are read as sh reads them."""
        return None

    def describe(self) -> Mapping[str, Any]:
        """How this host would be reached, for a dry run, ``fleetrun hosts`` and the MCP
        server's ``describe_host``: plain values, never a secret, found without connecting."""
        return {}

    async def aclose(self) -> None:
        """Release connections; called when the executor closes, and when the host's entry
        changed (see ``Executor.reconfigure``), after the last task that used this one."""


def details_of(transport: Transport) -> dict[str, Any]:
    """``transport.describe()``; if it raises, an ``error`` entry saying so (and a log
    line), so that one host a transport cannot describe (a third-party transport's bug,
    a configuration its library cannot read) does not fail a dry run or a host listing."""
    from fleetrun.core.secrets import redact

    try:
        return dict(transport.describe())
    except Exception as exc:
        log.exception("the %s transport could not describe host %r", transport.name, transport.host.name)
        return {"error": redact(f"the {transport.name} transport could not describe this host: {type(exc).__name__}: {exc}")}
