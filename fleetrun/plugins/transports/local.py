"""The ``local`` transport: commands run through the shell as child processes.

A command that is only a program and plain arguments is started without the shell, with
the same result (see :mod:`~fleetrun.plugins.transports.local_exec`). Each command gets a
session (and so a process group) of its own; a timeout or a cancel signals the whole
group (TERM, then KILL after a grace period), so nothing it started is left running.
A command inherits fleetrun's environment, less the variables that fleetrun reads secrets
from (a host's ``password_env``, say): those are there for fleetrun, not for commands.
Output is read without threads: the executor's event loop watches the pipes and, for a
command that runs longer than a moment, a pidfd. When the executor runs nothing else, a
command that ends within a couple of milliseconds is waited for directly instead.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import subprocess
import time
from typing import Any, Mapping

from fleetrun.core import open_files
from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.inventory import Host
from fleetrun.core.processes import KILL_GRACE_SECONDS, signal_group
from fleetrun.core.secrets import command_environment
from fleetrun.core.shell import reads_like_sh
from fleetrun.core.transport import Execution, HostField, Transport, TransportError
from fleetrun.plugins.transports.local_exec import DEFAULT_SHELL, direct_argv, direct_environment

_READ_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
#: A read this large found the pipe full (Linux pipes start at 64 KiB): the command is chatty.
_GROW_PIPE_AT = 1 << 16
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: After the command exits, how long its pipes may stay open (held by processes it left
#: in the background) before fleetrun stops reading them.
EXIT_DRAIN_SECONDS = 1.0
#: A command still running after this long gets its exit watched through a pidfd. One that
#: ends sooner is reaped when its pipes close, which is cheaper than a pidfd per command.
_EXIT_WATCH_DELAY = 0.02


class LocalTransport(Transport):
    """Runs commands on this machine with ``shell -c COMMAND`` (plain ones without the shell)."""

    name = "local"
    host_fields = {
        "shell": HostField("string", "the shell that runs commands (default: /bin/sh)"),
    }

    def describe(self) -> Mapping[str, Any]:
        return {"shell": self.shell}

    @property
    def shell(self) -> str:
        return self.shell_of(self.host)

    @staticmethod
    def shell_of(host: Host) -> str:
        return str(host.options.get("shell", DEFAULT_SHELL))

    @classmethod
    def foreign_shell(cls, host: Host) -> str | None:
        shell = cls.shell_of(host)
        return None if reads_like_sh(shell) else shell

    async def execute(self, execution: Execution) -> int:
        env = command_environment(execution.env)
        # Plain descriptors rather than Popen's PIPE: no file objects to build and tear down per command.
        try:
            stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
            try:
                stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
            except OSError:
                os.close(stdout_read)
                os.close(stdout_write)
                raise
        except OSError as exc:
            raise self._start_error(exc, execution) from None
        # Set up before the spawn, not after it: work done right after a fork and exec
        # runs on cold CPU caches and costs a few times more.
        watch = _ProcessWatch(execution, stdout_read, stderr_read)
        if not execution.wait_inline_s:
            watch.watch_pipes()
        try:
            proc = self._spawn(execution, env, stdout_write, stderr_write)
        except OSError as exc:
            watch.close()
            raise self._start_error(exc, execution) from None
        finally:
            os.close(stdout_write)
            os.close(stderr_write)
        if execution.process_started is not None:
            execution.process_started(proc.pid)
        return await watch.run(proc, execution.wait_inline_s)

    def _start_error(self, exc: OSError, execution: Execution) -> TransportError:
        if exc.errno in open_files.EXHAUSTED:
            return TransportError("spawn", f"cannot start the command: {open_files.exhausted_message()}")
        if execution.cwd and exc.filename == execution.cwd:
            return TransportError("spawn", f"cannot use the working directory {execution.cwd}: {exc.strerror}")
        target = exc.filename if exc.filename else self.shell
        return TransportError("spawn", f"cannot start the command: {exc.strerror}: {target}")

    def _spawn(self, execution: Execution, env: Mapping[str, str] | None, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
        argv = direct_argv(execution.command, self.shell)
        if argv is not None:
            usable, direct_env = direct_environment(env, execution.cwd)
            if usable:
                try:
                    return _popen(argv, direct_env, execution.cwd, stdout, stderr)
                except OSError:
                    pass  # not found, not executable, not a binary: the shell says so in its own words
        return _popen([self.shell, "-c", execution.command], env, execution.cwd, stdout, stderr)


def _popen(argv: list[str], env: Mapping[str, str] | None, cwd: str | None, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=_devnull(), stdout=stdout, stderr=stderr, start_new_session=True, cwd=cwd, env=env
    )


_DEVNULL: int | None = None


def _devnull() -> int:
    """One read-only /dev/null for every command's stdin (the child gets a copy as its fd 0)."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


class _ProcessWatch:
    """Drives one child process until it exits and its pipes drain: for a moment on this
    thread if the executor allows it, then on the running loop."""

    def __init__(self, execution: Execution, stdout: int, stderr: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None  # set by run(), once the command is spawned
        self.loop = asyncio.get_running_loop()
        self.sinks = {}
        self.open_pipes: set[int] = set()
        self.small_pipes: set[int] = set()
        self.exited = self.loop.create_future()
        self.drained = self.loop.create_future()
        self.pidfd: int | None = None
        self.watching_exit = False
        self.watch_later: asyncio.TimerHandle | None = None
        self.pipes_watched = False  # False while _wait_inline reads them itself
        for fd, sink in ((stdout, execution.stdout), (stderr, execution.stderr)):
            os.set_blocking(fd, False)
            self.sinks[fd] = sink
            self.open_pipes.add(fd)
            self.small_pipes.add(fd)

    def watch_pipes(self) -> None:
        """Have the loop read the pipes from now on."""
        self.pipes_watched = True
        for fd in self.open_pipes:
            self.loop.add_reader(fd, self._on_readable, fd)

    async def run(self, proc: subprocess.Popen[bytes], wait_inline_s: float = 0.0) -> int:
        self.proc = proc
        try:
            if not (wait_inline_s > 0 and self._wait_inline(wait_inline_s)):
                if not self.pipes_watched:
                    self.watch_pipes()
                if not self.open_pipes:
                    self._watch_exit()  # the output ended: so does the command, nearly always
                else:
                    self.watch_later = self.loop.call_later(_EXIT_WATCH_DELAY, self._watch_exit)
                await self._wait()
        finally:
            self.close()
        code = self.proc.returncode
        return 128 - code if code < 0 else code

    async def _wait(self) -> None:
        # Shielded: a cancel of the task would cancel the futures awaited, and a cancelled
        # ``exited`` reads as an exit, so that _stop_group sent KILL right after TERM.
        try:
            await asyncio.shield(self.exited)
            if not self.drained.done():
                # Background processes may hold the pipes open: the command itself is done.
                give_up = self.loop.call_later(EXIT_DRAIN_SECONDS, self._stop_draining)
                try:
                    await asyncio.shield(self.drained)
                finally:
                    give_up.cancel()
        except asyncio.CancelledError:
            await self._stop_group()
            raise

    def _wait_inline(self, seconds: float) -> bool:
        """Block this thread for up to ``seconds`` while the command runs; True if it ended
        (exited, pipes drained) in that time. Most short commands do, and then cost the
        loop nothing: no readers to add and remove, no trips through it."""
        poller = select.poll()
        for fd in self.open_pipes:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + seconds
        while self.open_pipes:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0:
                return False
            for fd, _ in poller.poll(remaining_ms):
                self._on_readable(fd)
                if fd not in self.open_pipes:
                    poller.unregister(fd)
        if self.exited.done() or self._reap():
            return True
        # The pipes closed a moment before the exit can be reaped: wait for it here too.
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            return False
        try:
            poller.register(pidfd, select.POLLIN)
            remaining_ms = (deadline - time.monotonic()) * 1000
            return remaining_ms > 0 and bool(poller.poll(remaining_ms)) and self._reap()
        finally:
            os.close(pidfd)

    # -- output ----------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if len(data) >= _GROW_PIPE_AT and fd in self.small_pipes:
                self.small_pipes.discard(fd)
                try:
                    fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)  # fewer wake-ups for a lot of output
                except OSError:
                    pass
            self.sinks[fd].write(data)
            return
        self._close_pipe(fd)

    def _stop_draining(self) -> None:
        if not self.drained.done():
            self.drained.set_result(None)

    def _close_pipe(self, fd: int) -> None:
        if fd in self.open_pipes:
            self.open_pipes.discard(fd)
            if self.pipes_watched:
                self.loop.remove_reader(fd)
            os.close(fd)
        if not self.open_pipes and not self.drained.done():
            self.drained.set_result(None)
            # Closing both pipes is nearly always the command exiting. (Unwatched, the
            # pipes are being read by _wait_inline, which waits for the exit itself.)
            if self.proc is not None and not self.exited.done() and not self._reap() and self.pipes_watched:
                self._watch_exit()

    # -- exit ------------------------------------------------------------------------

    def _watch_exit(self) -> None:
        if self.watching_exit or self.exited.done():
            return
        self._stop_watching_exit()
        self.watching_exit = True
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
            self._poll_exit()
            return
        self.loop.add_reader(self.pidfd, self._reap)

    def _reap(self) -> bool:
        """Resolve ``exited`` if the command has exited; False while it runs."""
        if self.proc.poll() is None:
            return False
        self._stop_watching_exit()
        if not self.exited.done():
            self.exited.set_result(self.proc.returncode)
        return True

    def _poll_exit(self) -> None:
        # Without pidfds (old kernels), look every 20 ms.
        if not self._reap():
            self.loop.call_later(0.02, self._poll_exit)

    def _stop_watching_exit(self) -> None:
        if self.watch_later is not None:
            self.watch_later.cancel()
            self.watch_later = None
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    async def _stop_group(self) -> None:
        """TERM the command's process group, KILL it after the grace period."""
        pgid = self.proc.pid  # start_new_session: the command (or its shell) leads its own group
        self._watch_exit()
        signal_group(pgid, signal.SIGTERM)
        if not self.exited.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), KILL_GRACE_SECONDS)
            except asyncio.TimeoutError:
                pass
        # Whatever is left, the shell or its children, goes now.
        signal_group(pgid, signal.SIGKILL)
        if not self.exited.done():
            await asyncio.shield(self.exited)

    def close(self) -> None:
        """Stop watching; close the pipes and the pidfd."""
        for fd in list(self.open_pipes):
            self._close_pipe(fd)
        self._stop_watching_exit()  # last: closing the pipes may have started a watch


@hookimpl
def fleetrun_register_transports(register):  # type: ignore[no-untyped-def]
    register(LocalTransport)
