"""How many files this process may have open, and making room for many tasks at once.

A local command holds descriptors in fleetrun while it runs: its two pipes, a pidfd once
it outlives a moment, and its spool files while output arrives. Linux gives a process a
soft limit of 1024 open files by default, enough for about 200 such commands, while the
hard limit (which an unprivileged process may raise its soft limit to) is usually far
higher. So an executor asked to run more tasks at once raises the soft limit as far as
it needs, never past the hard limit, and never lowers it. It raises no further than it
needs because the commands it starts inherit the limit, and some programs walk every
descriptor number up to it.
"""

from __future__ import annotations

import errno
import logging
import resource

log = logging.getLogger("fleetrun.open_files")

#: Descriptors one running task may hold in this process: two pipes, a pidfd, two spool files.
PER_TASK = 5
#: Descriptors the process needs besides its tasks: the store, logs, the interpreter's own, sockets.
RESERVE = 256
#: What running out of descriptors looks like, for this process (EMFILE) or the whole system (ENFILE).
EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def make_room_for(tasks_at_once: int) -> int:
    """Raise the soft limit on open files so that ``tasks_at_once`` tasks can run, as far as
    the hard limit allows; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = RESERVE + PER_TASK * tasks_at_once
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # a sandbox may refuse; tasks then meet the old limit
        log.debug("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
        return soft
    log.debug("raised the open-file limit from %d to %d for %d tasks at once", soft, wanted, tasks_at_once)
    return wanted


def exhausted_message() -> str:
    """What to tell the user when a task cannot start for want of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = "no limit" if soft == resource.RLIM_INFINITY else str(soft)
    return (
        f"too many open files in this process (its limit: {limit}): run fewer tasks at once "
        "(max_concurrent), or raise the limit (ulimit -n)"
    )
