"""The ``local`` transport: commands run through the shell as child processes.

Each command gets a session (and so a process group) of its own; a timeout or a
cancel signals the whole group (TERM, then KILL after a grace period), so nothing it
started is left running. Output is read without threads: the pipes and a pidfd are
watched by the executor's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import subprocess
from typing import Any, Mapping

from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.transport import Execution, HostField, Transport, TransportError

_READ_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: After the command exits, how long its pipes may stay open (held by processes it left
#: in the background) before fleetrun stops reading them.
EXIT_DRAIN_SECONDS = 1.0
#: Between TERM and KILL when stopping a command.
KILL_GRACE_SECONDS = 2.0


class LocalTransport(Transport):
    """Runs commands on this machine with ``shell -c COMMAND``."""

    name = "local"
    host_fields = {
        "shell": HostField("string", "the shell that runs commands (default: /bin/sh)"),
    }

    def describe(self) -> Mapping[str, Any]:
        return {"shell": self.shell}

    @property
    def shell(self) -> str:
        return str(self.host.options.get("shell", "/bin/sh"))

    async def execute(self, execution: Execution) -> int:
        # Inheriting the environment as is (env=None) spares an encode of every variable.
        env = {**os.environ, **execution.env} if execution.env else None
        try:
            proc = subprocess.Popen(
                [self.shell, "-c", execution.command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd=execution.cwd,
                env=env,
            )
        except OSError as exc:
            target = exc.filename if exc.filename else self.shell
            raise TransportError("spawn", f"cannot start the command: {exc.strerror}: {target}") from None
        return await _ProcessWatch(proc, execution).run()


class _ProcessWatch:
    """Drives one child process on the running loop until it exits and its pipes drain."""

    def __init__(self, proc: subprocess.Popen[bytes], execution: Execution) -> None:
        self.proc = proc
        self.loop = asyncio.get_running_loop()
        self.sinks = {}
        self.open_pipes: set[int] = set()
        self.exited = self.loop.create_future()
        self.drained = self.loop.create_future()
        self.pidfd: int | None = None
        assert proc.stdout is not None and proc.stderr is not None
        for pipe, sink in ((proc.stdout, execution.stdout), (proc.stderr, execution.stderr)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only costs more wake-ups
            self.sinks[fd] = sink
            self.open_pipes.add(fd)
            self.loop.add_reader(fd, self._on_readable, fd)

    async def run(self) -> int:
        self._watch_exit()
        try:
            await self.exited
            if not self.drained.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self.drained), EXIT_DRAIN_SECONDS)
                except asyncio.TimeoutError:
                    pass  # background processes hold the pipes; the command itself is done
        except asyncio.CancelledError:
            await self._stop_group()
            raise
        finally:
            self._close()
        code = self.proc.returncode
        return 128 - code if code < 0 else code

    # -- output ----------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.sinks[fd].write(data)
            return
        self._close_pipe(fd)

    def _close_pipe(self, fd: int) -> None:
        if fd in self.open_pipes:
            self.open_pipes.discard(fd)
            self.loop.remove_reader(fd)
        if not self.open_pipes and not self.drained.done():
            self.drained.set_result(None)

    # -- exit ------------------------------------------------------------------------

    def _watch_exit(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
            self._poll_exit()
            return
        self.loop.add_reader(self.pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self.proc.poll() is None:
            return
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if not self.exited.done():
            self.exited.set_result(self.proc.returncode)

    def _poll_exit(self) -> None:
        # Without pidfds (old kernels), look every 20 ms.
        if self.proc.poll() is None:
            self.loop.call_later(0.02, self._poll_exit)
        elif not self.exited.done():
            self.exited.set_result(self.proc.returncode)

    async def _stop_group(self) -> None:
        """TERM the command's process group, KILL it after the grace period."""
        pgid = self.proc.pid  # start_new_session: the shell leads its own group
        _signal_group(pgid, signal.SIGTERM)
        if not self.exited.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), KILL_GRACE_SECONDS)
            except asyncio.TimeoutError:
                pass
        # Whatever is left, the shell or its children, goes now.
        _signal_group(pgid, signal.SIGKILL)
        if not self.exited.done():
            await asyncio.shield(self.exited)

    def _close(self) -> None:
        for fd in list(self.open_pipes):
            self._close_pipe(fd)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:  # pragma: no cover - EPERM would mean the group is not ours
        if exc.errno != errno.EPERM:
            raise


@hookimpl
def fleetrun_register_transports(register):  # type: ignore[no-untyped-def]
    register(LocalTransport)
