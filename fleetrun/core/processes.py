"""Processes told apart across pid reuse, and commands stopped after their owner died.

A pid alone names a process only while it lives: once it is gone, the number can be
given to another one. So the store names a process by a *token*: this boot's id, the
pid, and the process's start time in clock ticks since boot (field 22 of
``/proc/PID/stat``). A token matches a live process only if all three agree.

Two kinds of process get tokens: the fleetrun process that owns a task (while it lives,
its tasks are its own), and the local command a task runs, which leads a session and a
process group of its own. When an owner dies without ending its tasks (killed with
SIGKILL, say), the next fleetrun process to open the store marks those tasks
``interrupted`` and stops each command that is still running, with everything it started.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Iterable

log = logging.getLogger("fleetrun.processes")

#: Between TERM and KILL when stopping a command's process group.
KILL_GRACE_SECONDS = 2.0
#: A command's start, read from the clock just after the spawn, may lag the kernel's
#: record of it by the time the spawn took; a slower spawn than this is not a match.
_START_TOLERANCE_SECONDS = 1.0


@functools.cache
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


@functools.cache
def _ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (the state) on, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, as the kernel shows it."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that ``/proc/PID/stat`` counts start times in."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * _ticks_per_second() // 1_000_000_000


# -- the owner of tasks ------------------------------------------------------------------


def owner_token(pid: int | None = None) -> str:
    """Identifies a process across pid reuse: boot id, pid and the process's start time."""
    pid = os.getpid() if pid is None else pid
    return f"{boot_id()}:{pid}:{process_start(pid) or '?'}"


def _pid_of_this_boot(token: str | None) -> tuple[int, str] | None:
    """The pid and start time a token names, or None for another boot's or a malformed one."""
    boot, _, rest = (token or "").partition(":")
    pid_text, _, start = rest.partition(":")
    if boot != boot_id():
        return None
    try:
        return int(pid_text), start
    except ValueError:
        return None


def owner_alive(token: str | None) -> bool:
    named = _pid_of_this_boot(token)
    if named is None:
        return False
    pid, start = named
    current = process_start(pid)
    if current is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start == "?"
    return current == start


# -- the commands tasks run --------------------------------------------------------------


def command_token(pid: int, seen_at_ticks: int) -> str:
    """The token of a command's process that started just before ``seen_at_ticks`` (:func:`boot_ticks`)."""
    return f"{boot_id()}:{pid}:{seen_at_ticks}"


def leftover_command(token: str | None) -> int | None:
    """The process group of the command ``token`` names, if that command still runs here.

    The process must be the one that started then (not a later one given the same pid)
    and still lead its own process group, as the local transport starts every command.
    """
    named = _pid_of_this_boot(token)
    if named is None or not named[1].isdigit():
        return None
    pid, seen = named[0], int(named[1])
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None  # gone, or exited and waiting to be reaped: nothing of it runs
    process_group, started = int(fields[2]), int(fields[19])
    if process_group != pid or not 0 <= seen - started <= _START_TOLERANCE_SECONDS * _ticks_per_second():
        return None
    return pid


def stop_leftover_commands(tokens: Iterable[str | None], grace: float = KILL_GRACE_SECONDS) -> dict[str, int]:
    """Stop the commands ``tokens`` name that still run: TERM their process groups, KILL
    what is left of them after ``grace`` seconds. Returns the process group of each
    token whose command was stopped."""
    groups = {token: group for token in tokens if token and (group := leftover_command(token)) is not None}
    for group in groups.values():
        signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(leftover_command(token) is not None for token in groups) and time.monotonic() < deadline:
        time.sleep(0.02)
    for group in groups.values():
        signal_group(group, signal.SIGKILL)  # also what the command started and left behind
    return groups


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group; one that is gone already is no error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
