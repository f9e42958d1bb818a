"""One command on one SSH channel, driven by the executor's event loop.

The command runs through the login shell, as with ``ssh HOST COMMAND``, behind a short
preamble: it prints the shell's pid first (sshd makes that shell a session leader, so
the pid is the command's process group), then sets the environment and working
directory. Knowing the group is what lets a cancel or a timeout stop the remote
command and everything it started, for any login (root included), with ``kill`` on a
second channel: closing a channel alone leaves a command without a pty running.

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


def remote_script(command: str, env: Mapping[str, str], cwd: str | None) -> str:
    """The text sent in the exec request: preamble, then the command unchanged. The
    preamble reads the environment from stdin (see :func:`environment_input`)."""
    lines = [f"printf '{_MARKER.decode()}%s\\n' \"$$\""]
    if env:
        lines.append(
            f'while IFS= read -r __fleetrun_env && [ "$__fleetrun_env" != {_ENV_END} ]; do eval "$__fleetrun_env"; done; '
            "unset __fleetrun_env"
        )
    lines.append(_WATCHDOG)
    if cwd:
        lines.append(f"cd -- {shlex.quote(cwd)} || exit 1")
    lines.append(command)
    return "\n".join(lines)


# fleetrun keeps the channel's input open while the command runs and never writes to it
# again: a watchdog reads it (on fd 3: a background job's stdin is /dev/null) and sees its
# end when the connection goes, with fleetrun's process killed or the network gone. If
# the command still runs then, the watchdog stops its group as a cancel would: TERM, then
# KILL after the grace period (ignoring TERM itself only from then on, so a cancel's TERM
# ends it at once). Once the command has ended, it leaves what the command put in the
# background alone. The command reads /dev/null: nothing is ever typed into a task.
_WATCHDOG = (
    "exec 3<&0 </dev/null\n"
    "(read -r __fleetrun_eof <&3; kill -0 $$ 2>/dev/null || exit 0; trap '' TERM; "
    f"kill -TERM -$$; sleep {KILL_GRACE_SECONDS:g}; kill -KILL -$$) >/dev/null 2>&1 &\n"
    "exec 3<&-"
)


def environment_input(env: Mapping[str, str]) -> bytes:
    """What the preamble reads from stdin: one line per variable, then an end line.

    Each value is written as ``printf`` octal escapes (letters and digits as they are),
    so that any value, newlines included, is one line of plain characters; the
    ``x`` keeps the command substitution from dropping trailing newlines.
    """
    if not env:
        return b""
    lines = []
    for name, value in env.items():
        escaped = "".join(chr(byte) if chr(byte).isalnum() and byte < 128 else f"\\{byte:03o}" for byte in value.encode())
        lines.append(f"export {name}=\"$(printf '{escaped}x')\"; {name}=\"${{{name}%x}}\"")
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
    # No "--" before the negative pid: dash's kill builtin rejects it.
    return (
        f"p={pgid}; kill -TERM -$p 2>/dev/null || exit 0; i=0; "
        "running() { kill -0 -$p 2>/dev/null || return 1; "
        "s=$(ps -A -o pgid= -o stat= 2>/dev/null) && [ -n \"$s\" ] || return 0; "
        "printf '%s\\n' \"$s\" | { while read -r g st; do "
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
            self._finish(self.head, None)

    def _finish(self, rest: bytes, pgid: int | None) -> None:
        self.searching = False
        self.head = b""
        self.on_pgid(pgid)
        if rest:
            self.sink.write(rest)


class ChannelCommand:
    """Streams a started command's output into its sinks and reports how it ended."""

    def __init__(self, channel: paramiko.Channel, execution: Execution, describe_peer: Callable[[], str]) -> None:
        self.channel = channel
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
        return self._exit_code()

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
