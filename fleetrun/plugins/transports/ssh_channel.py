"""One command on one SSH channel, driven by the executor's event loop.

The command runs through the login shell, as with ``ssh HOST COMMAND``, behind a short
preamble: it prints the shell's pid first (sshd makes that shell a session leader, so
the pid is the command's process group), then sets the environment and working
directory. Knowing the group is what lets a cancel or a timeout stop the remote
command and everything it started, for any login (root included), with ``kill`` on a
second channel: closing a channel alone leaves a command without a pty running.

The preamble is POSIX shell, and so is the command: the policy judges commands as sh
reads them, and an assistant writes them so for every host. A login shell of the sh
family (bash, zsh, ksh, dash) reads both as ssh would have it. Any other (fish, csh, tcsh,
nushell: the connection asks which one it is, see :data:`SHELL_PROBE`) would read the
command otherwise (fish turns ``\\x2e\\x2e`` into ``..``, where sh and the policy see
``x2ex2e``), so it is sent only one line that every shell reads alike,
``exec /bin/sh -c '...'``, with nothing of the task's in it. That ``sh`` runs the
preamble, reading the command from stdin with the environment, and then runs the command
with ``sh -c``. The pid stays the same throughout.

The environment's values come through the channel's stdin, not in the exec request:
sshd runs that text as the shell's ``-c`` argument, which every user of the remote
host can read in ``ps`` for as long as the command runs. The input then stays open for a
watchdog that stops the command should the connection close while it runs.

Output is read without a thread per command: paramiko signals a pipe when a channel
has data, and the loop watches that pipe.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Callable, Mapping

import paramiko

from fleetrun.core.processes import KILL_GRACE_SECONDS
from fleetrun.core.transport import Execution, OutputSink, TransportError
from fleetrun.plugins.transports.ssh_connect import exit_signal

_READ_CHUNK = 1 << 20
_MARKER = b"fleetrun-pgid "
#: How much stdout may come before the pid line (from shell start-up files) before giving up on it.
_MARKER_SEARCH_LIMIT = 64 << 10
#: After the command exits, how long its output may stay open (held by processes it left
#: in the background) before fleetrun stops reading.
EXIT_DRAIN_SECONDS = 1.0


_ENV_END = "fleetrun-env-end"

#: Sent on a new connection: which login shell the user has (sshd sets ``SHELL`` to it).
#: Every shell runs it; one that has no ``$SHELL`` (nushell) fails it, and is not POSIX.
SHELL_PROBE = "echo fleetrun-shell $SHELL"
_SHELL_LINE = b"fleetrun-shell "

# Each part of the preamble is one line without ', \\, ! or a newline, so that it can also
# be sent inside single quotes to a shell that is not POSIX (see _through_sh).
_PRINT_PID = f'echo "{_MARKER.decode()}$$"'
_READ_INPUT = (
    f'while IFS= read -r __fleetrun_env; do [ "$__fleetrun_env" = {_ENV_END} ] && break; eval "$__fleetrun_env"; done; '
    "unset __fleetrun_env"
)
# fleetrun keeps the channel's input open while the command runs and never writes to it
# again: a watchdog reads it (on fd 3: a background job's stdin is /dev/null) and sees its
# end when the connection goes, with fleetrun's process killed or the network gone. If
# the command still runs then, the watchdog stops its group as a cancel would: TERM, then
# KILL after the grace period (ignoring TERM itself only from then on, so a cancel's TERM
# ends it at once). Once the command has ended, it leaves what the command put in the
# background alone. The command reads /dev/null: nothing is ever typed into a task.
_WATCHDOG = (
    "exec 3<&0 </dev/null; "
    '(read -r __fleetrun_eof <&3; kill -0 $$ 2>/dev/null || exit 0; trap "" TERM; '
    f"kill -TERM -$$; sleep {KILL_GRACE_SECONDS:g}; kill -KILL -$$) >/dev/null 2>&1 & "
    "exec 3<&-"
)


def login_shell(probe_output: bytes) -> str | None:
    """The login shell named by :data:`SHELL_PROBE`'s output (after whatever start-up files printed)."""
    for line in reversed(probe_output.splitlines()):
        if line.startswith(_SHELL_LINE):
            return line[len(_SHELL_LINE):].decode(errors="replace").strip() or None
    return None


def remote_command(command: str, env: Mapping[str, str], cwd: str | None, *, posix_login_shell: bool) -> tuple[str, bytes]:
    """The exec request and the input that run ``command`` behind the preamble.

    To a POSIX login shell: the preamble, then the command unchanged; the input holds
    the environment. To another: a fixed line that runs the preamble in ``sh``; the input
    holds the environment, the working directory and the command.
    """
    through_sh = not posix_login_shell
    internal = {"__fleetrun_command": command, **({"__fleetrun_cwd": cwd} if cwd else {})} if through_sh else {}
    steps = [_PRINT_PID]
    if env or internal:
        steps.append(_READ_INPUT)
    steps.append(_WATCHDOG)
    if cwd:
        directory = '"$__fleetrun_cwd"' if through_sh else shlex.quote(cwd)
        steps.append(f"cd -- {directory} || exit 1")
    steps.append('exec /bin/sh -c "$__fleetrun_command"' if through_sh else command)
    request = _through_sh("; ".join(steps)) if through_sh else "\n".join(steps)
    return request, _input_lines(env, internal)


def _through_sh(script: str) -> str:
    """``script`` run by /bin/sh, in a form that any login shell reads alike: inside single
    quotes sh, bash, zsh, fish, csh, tcsh and nushell all take every character but ', \\,
    ! and a newline as it is, and the script has none of them."""
    unsafe = set(script) & {"'", "\\", "!", "\n"}
    if unsafe:
        raise ValueError(f"cannot send {sorted(unsafe)} through any login shell")
    return f"exec /bin/sh -c '{script}'"


def _input_lines(env: Mapping[str, str], internal: Mapping[str, str]) -> bytes:
    """What the preamble reads from stdin: one line per variable (``env`` exported,
    ``internal`` not), then an end line; nothing when there are none.

    Each value is written as ``printf`` octal escapes (letters and digits as they are),
    so that any value, newlines included, is one line of plain characters; the
    ``x`` keeps the command substitution from dropping trailing newlines.
    """
    if not env and not internal:
        return b""
    lines = []
    for export, variables in (("export ", env), ("", internal)):
        for name, value in variables.items():
            escaped = "".join(chr(byte) if chr(byte).isalnum() and byte < 128 else f"\\{byte:03o}" for byte in value.encode())
            lines.append(f"{export}{name}=\"$(printf '{escaped}x')\"; {name}=\"${{{name}%x}}\"")
    lines.append(_ENV_END)
    return ("\n".join(lines) + "\n").encode()


def stop_script(pgid: int) -> str:
    """TERM the process group, then KILL whatever is left after the grace period.

    The group counts as gone once only zombies are left in it: a process orphaned by the
    command's shell stays in the group, dead, until the server's init reaps it, which some
    inits (a container's, a VM's) do only about once a second or never. Where ``ps`` cannot
    say (no ``ps``, no ``stat`` field), ``kill -0`` alone decides, zombies included.
    """
    rounds = int(KILL_GRACE_SECONDS * 10)
    # No "--" before the negative pid: dash's kill builtin rejects it. Run by sh whatever
    # the login shell is: the connection that sends it may not have asked which that is.
    return _through_sh(
        f"p={pgid}; kill -TERM -$p 2>/dev/null || exit 0; i=0; "
        "running() { kill -0 -$p 2>/dev/null || return 1; "
        "s=$(ps -A -o pgid= -o stat= 2>/dev/null) && [ -n \"$s\" ] || return 0; "
        "echo \"$s\" | { while read -r g st; do "
        "if [ \"$g\" = \"$p\" ]; then case $st in Z*) ;; *) exit 0;; esac; fi; done; exit 1; }; }; "
        f"while running; do i=$((i+1)); "
        f"if [ $i -gt {rounds} ]; then kill -KILL -$p 2>/dev/null; exit 0; fi; sleep 0.1; done"
    )


class _PgidFilter:
    """Takes the preamble's pid line out of stdout and passes everything else on."""

    def __init__(self, sink: OutputSink, on_pgid: Callable[[int | None], None]) -> None:
        self.sink = sink
        self.on_pgid = on_pgid
        self.head = b""
        self.searching = True
        #: The output ended without the pid line: the preamble never ran, nor the command.
        self.never_printed = False

    def write(self, data: bytes) -> None:
        if not self.searching:
            self.sink.write(data)
            return
        self.head += data
        start = self.head.find(_MARKER)
        while start > 0 and self.head[start - 1 : start] != b"\n":
            start = self.head.find(_MARKER, start + 1)
        end = self.head.find(b"\n", start) if start >= 0 else -1
        if end >= 0:
            pid = self.head[start + len(_MARKER) : end]
            self._finish(self.head[:start] + self.head[end + 1 :], int(pid) if pid.isdigit() else None)
        elif len(self.head) > _MARKER_SEARCH_LIMIT:
            self._finish(self.head, None)

    def flush(self) -> None:
        if self.searching:
            self.never_printed = True
            self._finish(self.head, None)

    def _finish(self, rest: bytes, pgid: int | None) -> None:
        self.searching = False
        self.head = b""
        self.on_pgid(pgid)
        if rest:
            self.sink.write(rest)


class ChannelCommand:
    """Streams a started command's output into its sinks and reports how it ended."""

    def __init__(
        self, channel: paramiko.Channel, execution: Execution, describe_peer: Callable[[], str], login_shell: str | None
    ) -> None:
        self.channel = channel
        self.login_shell = login_shell
        self.loop = asyncio.get_running_loop()
        self.describe_peer = describe_peer
        self.pgid_known = self.loop.create_future()
        self.stdout = _PgidFilter(execution.stdout, self._on_pgid)
        self.stderr = execution.stderr
        self.eof = self.loop.create_future()
        self.status = self.loop.create_future()
        self.fd: int | None = channel.fileno()
        self.loop.add_reader(self.fd, self._on_readable)
        channel.fleetrun_on_status = lambda: self.loop.call_soon_threadsafe(self._on_status)  # type: ignore[attr-defined]
        if channel.exit_status >= 0 or exit_signal(channel) is not None:
            self._on_status()

    @property
    def pgid(self) -> int | None:
        return self.pgid_known.result() if self.pgid_known.done() else None

    async def wait_pgid(self, timeout: float) -> int | None:
        """The remote process group, waiting a little for the preamble if it is not in yet."""
        if not self.pgid_known.done():
            await asyncio.wait({self.pgid_known}, timeout=timeout)
        return self.pgid

    async def wait(self) -> int:
        """Until the command has ended and its output is read; its exit status."""
        # Cancelled, this keeps reading: the pid line may still be on its way.
        await asyncio.wait({self.eof, self.status}, return_when=asyncio.FIRST_COMPLETED)
        if not self.eof.done():
            await asyncio.wait({self.eof}, timeout=EXIT_DRAIN_SECONDS)
        # Output ended first: the status follows at once, unless the connection died.
        while not self.status.done() and not self.channel.closed:
            await asyncio.wait({self.status}, timeout=0.05)
        self.stop_reading()
        code = self._exit_code()
        if self.stdout.never_printed:
            # Reporting the shell's status would call a command that never ran a success or
            # a failure of its own (a shell that cannot read the preamble may even exit 0).
            raise TransportError(
                "spawn",
                f"{self.describe_peer()} did not run the command: the user's login shell "
                f"({self.login_shell or 'unknown'}) did not start it, as a shell that runs nothing (nologin), "
                f"a restricted one (rbash) or the server's ForceCommand would not (exit status {code}; its output may say why)",
            )
        return code

    def _exit_code(self) -> int:
        signal = exit_signal(self.channel)
        if signal is not None:
            return 128 + signal if isinstance(signal, int) else 255
        if self.channel.exit_status >= 0:
            return self.channel.exit_status
        transport = self.channel.get_transport()
        if transport is None or not transport.is_active():
            raise TransportError("disconnected", f"the connection to {self.describe_peer()} was lost while the command ran")
        raise TransportError("disconnected", f"{self.describe_peer()} closed the command's channel without an exit status")

    def _on_readable(self) -> None:
        channel = self.channel
        while channel.recv_stderr_ready():
            data = channel.recv_stderr(_READ_CHUNK)
            if not data:
                break
            self.stderr.write(data)
        while channel.recv_ready():
            data = channel.recv(_READ_CHUNK)
            if not data:
                break
            self.stdout.write(data)
        if (channel.eof_received or channel.closed) and not channel.recv_ready() and not channel.recv_stderr_ready():
            self.stop_reading()

    def _on_status(self) -> None:
        if not self.status.done():
            self.status.set_result(None)

    def _on_pgid(self, pgid: int | None) -> None:
        if not self.pgid_known.done():
            self.pgid_known.set_result(pgid)

    def stop_reading(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None
            self.stdout.flush()
        if not self.eof.done():
            self.eof.set_result(None)
