"""The start log: which local command each task started, written without a system call.

A task's record names its command's process only once the task has run for a moment
(see ``_RUNNING_WRITE_DELAY`` in the executor): most tasks end sooner, and a store write
for each would cost more than the rest of their bookkeeping. Should the fleetrun process
die in that moment, the command would be left running with nothing naming it. So each
start is also noted here: a slot in a small memory-mapped file next to the process's
journal. Writing a slot is a copy into shared memory, and the kernel keeps it when the
process is killed outright. Whoever replays the journal of a dead process reads its start
log too, so that the commands of its tasks can be stopped (see
:func:`~fleetrun.core.journal.replay_abandoned`).

The file is a header (its format and this boot's id) and a ring of fixed-size slots: task
id, pid, start time in clock ticks since boot, and a checksum, so that a slot half written
when its writer was killed is skipped. A slot is reused after ``SLOTS`` starts, far more
than can start within the moment a task goes unrecorded.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import zlib
from pathlib import Path

from fleetrun.core.processes import boot_id

SUFFIX = ".starts"
SLOTS = 4096
_MAGIC = b"fleetrun-starts-1"
_HEADER = struct.Struct("<32s48s")  # format, boot id
_SLOT = struct.Struct("<12sIQI4x")  # task id, pid, start ticks, checksum of the three
_CHECKED = struct.Struct("<12sIQ")


class StartLog:
    """This process's start log, at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._next = 0
        size = _HEADER.size + SLOTS * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _allocate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._map[: _HEADER.size] = _HEADER.pack(_MAGIC, boot_id().encode())

    def note(self, task_id: str, pid: int, start_ticks: int) -> None:
        """Note that ``task_id`` started process ``pid`` at ``start_ticks``."""
        checked = _CHECKED.pack(task_id.encode(), pid, start_ticks)
        slot = _SLOT.pack(task_id.encode(), pid, start_ticks, zlib.crc32(checked))
        with self._lock:
            offset = _HEADER.size + (self._next % SLOTS) * _SLOT.size
            self._next += 1
            self._map[offset : offset + _SLOT.size] = slot

    def close(self) -> None:
        """Unmap and remove the file: every task it covers has ended."""
        with self._lock:
            if not self._map.closed:
                self._map.close()
                self.path.unlink(missing_ok=True)


def _allocate(fd: int, size: int) -> None:
    """Give the file its disk space now, not at the first write to each page: a write to a
    mapped page that a full disk cannot back kills the process (SIGBUS), where this fails."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.pwrite(fd, bytes(size), 0)  # a file system without fallocate (musl does not emulate it)


def read_starts(path: Path) -> dict[str, tuple[int, int]]:
    """The starts a (dead) process noted: task id -> (pid, start ticks). Empty if the file is missing, of another format, or from another boot (its pids
    name nothing now)."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if len(data) < _HEADER.size:
        return {}
    magic, boot = _HEADER.unpack_from(data)
    if magic.rstrip(b"\0") != _MAGIC or boot.rstrip(b"\0").decode(errors="replace") != boot_id():
        return {}
    found = {}
    body = memoryview(data)[_HEADER.size : _HEADER.size + (len(data) - _HEADER.size) // _SLOT.size * _SLOT.size]
    for task_id, pid, ticks, checksum in _SLOT.iter_unpack(body):
        if pid and checksum == zlib.crc32(_CHECKED.pack(task_id, pid, ticks)):  # else never written, or cut short
            found[task_id.decode(errors="replace")] = (pid, ticks)
    return found
