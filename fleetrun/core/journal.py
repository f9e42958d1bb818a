"""The store's write journal: a task's record is durable at once, and reaches SQLite in batches.

A short task writes its record twice on the path from request to result (when it is
created, when it ends). A SQLite commit costs 50-100 µs there, more than everything
else fleetrun does for the task. So a write is first appended to this process's journal
file with one ``write()`` (which survives a crash of fleetrun just as a SQLite commit in
WAL mode does), and a writer thread applies what the journal holds to SQLite, many
writes to a transaction, while the engine goes on.

Readers see a write at once in this process (:meth:`Journal.pending`); in other processes
once it is applied, within about 50 ms, and a record not applied yet can be found
in the journals (:func:`find_latest`). The owner holds an exclusive ``flock`` on its
journal for as long as it lives; a journal whose lock can be taken belongs to a process
that died before its writer caught up, and any process that opens the store replays it
(:func:`replay_abandoned`) before judging that process's tasks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fleetrun.core.start_log import SUFFIX as START_LOG_SUFFIX
from fleetrun.core.start_log import StartLog, read_starts

log = logging.getLogger("fleetrun.store")

#: Applies journal entries (JSON-able lists) to the store's database, inside a transaction.
Apply = Callable[[sqlite3.Connection, Sequence[list[Any]]], None]

SUFFIX = ".journal"
#: Past this size, a write waits for the writer to catch up first, so the journal stays bounded.
_MAX_BYTES = 16 * 1024 * 1024
_RETRY_SECONDS = (0.1, 0.5, 2.0)
#: How long a write waits for a full journal to be applied before it fails.
_BACKLOG_WAIT_SECONDS = 30.0
#: After this many failed attempts in a row (about 2.6 s of retries, or more while another
#: process holds the database past its busy timeout), a wait for the writer gives up: the
#: store refuses writes (a full disk, a read-only file system) until someone acts.
_GIVE_UP_AFTER_FAILURES = len(_RETRY_SECONDS)
#: How long the writer lets writes gather into one transaction, unless someone waits for them.
BATCH_SECONDS = 0.05
_BATCH_MAX = 512
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


class Journal:
    """One process's journal for one store, and the thread that applies it."""

    def __init__(self, directory: Path, connect: Callable[[], sqlite3.Connection], apply: Apply) -> None:
        self._connect = connect
        self._apply = apply
        directory.mkdir(mode=0o700, exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Locked before it gets the name replayers look for, so no replayer can take it for abandoned.
        claiming = directory / f"{name}.claiming"
        self._fd = os.open(claiming, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = directory / f"{name}{SUFFIX}"
        os.rename(claiming, self.path)
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[str, object, list[Any]]] = []
        self._pending: dict[str, object] = {}
        self._written = 0
        self._applied = 0
        self._size = 0
        self._thread: threading.Thread | None = None
        self._urgent = False  # someone waits for what is written to be applied
        self._failures = 0  # the writer's failed attempts in a row
        # Sequence numbers of writes the journal file could not take (kept in memory only).
        self._unsaved: list[int] = []
        self._journal_refused = False  # the last write to the journal file failed
        self._closing = False
        self._closed = False
        # Made now, not at the first start: a note must follow its start as closely as it
        # can, as a process killed in between leaves its command unnamed.
        self._starts: StartLog | None = None
        try:
            self._starts = StartLog(self.path.with_suffix(START_LOG_SUFFIX))
        except (OSError, ValueError) as exc:  # a file system that cannot map files, say
            # Tasks still run and are recorded: only the start log's extra safety is lost.
            log.warning(
                "no start log in %s (%s): a command whose fleetrun process dies in the task's first 10 ms "
                "will not be stopped", directory, getattr(exc, "strerror", None) or exc,
            )
        _OPEN_JOURNALS.add(self)

    def note_start(self, task_id: str, pid: int, start_ticks: int) -> None:
        """Note in the start log beside this journal that a task started a local process
        (no system call: see :mod:`~fleetrun.core.start_log`)."""
        if self._starts is not None:
            self._starts.note(task_id, pid, start_ticks)

    # -- writing ---------------------------------------------------------------------

    def append(self, entry: list[Any], value: object, *, required: bool = True) -> None:
        """Make ``entry`` (``[kind, key, ...]``) durable now and apply it soon; ``value`` is
        what :meth:`pending` returns for its key until then.

        When the journal file cannot take it (a full disk), a ``required`` entry raises
        :class:`OSError`. Any other is kept in memory instead and applied when the store
        takes writes again, with a warning: it is lost if this process ends first.
        """
        key = entry[1]
        line = (_ENCODER.encode(entry) + "\n").encode()
        with self._cond:
            if self._closed:
                raise RuntimeError("the store is closed")
            try:
                if self._size > _MAX_BYTES:
                    if not self._wait_applied(self._written, timeout=_BACKLOG_WAIT_SECONDS):
                        raise OSError(f"it holds {self._size} bytes the task store has not taken (see the log)")
                    self._truncate_if_applied()
                self._write_line(line)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                if required:
                    raise OSError(exc.errno, f"cannot write to the journal {self.path}: {reason}") from None
                self._unsaved.append(self._written + 1)
                if not self._journal_refused:
                    log.warning(
                        "cannot write to the journal %s (%s): task records are kept in memory until the store "
                        "takes them, and are lost if this process ends first", self.path, reason,
                    )
                self._journal_refused = True
            else:
                if self._journal_refused:
                    log.warning("the journal %s takes writes again", self.path)
                    self._journal_refused = False
            self._written += 1
            self._queue.append((key, value, entry))
            self._pending[key] = value
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="fleetrun-store-writer", daemon=True)
                self._thread.start()
            if len(self._queue) == 1 or len(self._queue) >= _BATCH_MAX:
                self._cond.notify_all()

    def _write_line(self, line: bytes) -> None:
        # Called with the condition held. A line the file took only in part is cut off
        # again: the next line would otherwise be glued to it, and both would be unreadable.
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            if len(view) < len(line):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line)

    def pending(self, key: str) -> object | None:
        """The latest value written for ``key`` that is not in SQLite yet, if any."""
        return self._pending.get(key)

    def pending_values(self) -> list[object]:
        """The latest value of every key with a write not in SQLite yet."""
        with self._cond:
            return list(self._pending.values())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write made so far is in SQLite; False if ``timeout`` passed
        first, or the store keeps refusing writes (see :data:`_GIVE_UP_AFTER_FAILURES`)."""
        with self._cond:
            return self._wait_applied(self._written, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Apply what is left, stop the writer, remove the journal (kept if it could not be applied)."""
        with self._cond:
            if self._closed:
                return
            applied = self._wait_applied(self._written, timeout)
            self._closing = self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if applied:
            self.path.unlink(missing_ok=True)
            if self._starts is not None:
                self._starts.close()  # every task it covers has ended, in the store
        else:
            log.error("task records not yet in the store are kept in %s; the next fleetrun to open it applies them", self.path)
            if self._unsaved:
                log.error(
                    "%d task record write(s) that the journal could not take are lost: their tasks will show "
                    "their last saved state, and running ones as interrupted", len(self._unsaved),
                )
        os.close(self._fd)
        _OPEN_JOURNALS.discard(self)

    def let_go_in_forked_child(self) -> None:
        """In a child forked from the journal's process: write nothing more to it, and close
        the child's copy of its file. The lock on it then ends with the parent, so a parent
        killed while the child lives is seen as dead (its tasks marked interrupted, its
        commands stopped) without waiting for the child."""
        self._closed = True
        os.close(self._fd)

    def _wait_applied(self, target: int, timeout: float | None) -> bool:
        # Called with the condition held.
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._applied < target:
            self._urgent = True
            self._cond.notify_all()
        while self._applied < target:
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or self._failures >= _GIVE_UP_AFTER_FAILURES:
                return False
            self._cond.wait(remaining)
        return True

    def _truncate_if_applied(self) -> None:
        # Called with the condition held: nothing unapplied may be cut off.
        if self._applied == self._written and self._size:
            os.ftruncate(self._fd, 0)
            self._size = 0

    # -- the writer thread -------------------------------------------------------------

    def _serve(self) -> None:
        db = self._connect()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    # Let the writes of the next moment share this transaction: a commit
                    # costs more than the rows it writes, and a task's two writes then become one.
                    deadline = time.monotonic() + BATCH_SECONDS
                    while not (self._urgent or self._closing or len(self._queue) >= _BATCH_MAX):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if not self._queue:
                        return
                    batch, self._queue = self._queue, []
                    self._urgent = False
                try:
                    apply_entries(db, self._apply, [entry for _, _, entry in batch], self.path)
                except Exception as exc:  # the thread must not die: flush() and close() wait on it
                    with self._cond:
                        self._queue[:0] = batch
                        if self._closing:
                            return  # close() keeps the journal for the next process
                        failures = self._failures
                        self._failures += 1
                        self._cond.notify_all()  # a waiter may give up now
                    if failures == 0:
                        log.warning(
                            "cannot write task records to the store (%s); they are kept in %s, retrying",
                            exc, self.path, exc_info=not isinstance(exc, sqlite3.Error),
                        )
                    time.sleep(_RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)])
                    continue
                if self._failures:
                    log.warning("task records reach the store again")
                self._applied_batch(batch)
        finally:
            db.close()

    def _applied_batch(self, batch: list[tuple[str, object, list[Any]]]) -> None:
        with self._cond:
            self._failures = 0
            self._applied += len(batch)
            while self._unsaved and self._unsaved[0] <= self._applied:
                self._unsaved.pop(0)
            for key, value, _ in batch:
                if self._pending.get(key) is value:
                    del self._pending[key]
            # Emptied as soon as everything in it is in SQLite: an applied entry left here
            # would outlive its row, and a reader that finds no row (the retention deleted
            # it) would take the task from the journal instead.
            self._truncate_if_applied()
            self._cond.notify_all()


def apply_entries(db: sqlite3.Connection, apply: Apply, entries: Sequence[list[Any]], source: Path) -> None:
    """Apply ``entries`` from the journal at ``source`` in one transaction.

    Raises when the store refuses writes (locked, full): they can be applied later. An
    entry that the store can never take (a bug: a value SQLite cannot hold) is dropped,
    with an error, so that it does not hold back every entry after it, for ever.
    """
    try:
        in_transaction(db, lambda: apply(db, entries))
        return
    except Exception as exc:
        if _store_refused(exc):
            raise
    dropped = set()
    for entry in entries:  # again one at a time, in order, to find the bad ones
        try:
            in_transaction(db, lambda: apply(db, [entry]))
        except Exception as exc:
            if _store_refused(exc):
                raise
            key = entry[1] if len(entry) > 1 else "?"
            if key not in dropped:
                dropped.add(key)
                log.error("%s: dropped records of task %s that the store cannot take (%s: %s)", source, key, type(exc).__name__, exc)


def _store_refused(exc: Exception) -> bool:
    # What the database says about itself (locked, full, an I/O error), not about an entry.
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def in_transaction(db: sqlite3.Connection, work: Callable[[], None]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def replay_abandoned(
    directory: Path, db: sqlite3.Connection, apply: Apply,
    starts_to_entries: Callable[[dict[str, tuple[int, int]]], list[list[Any]]] | None = None,
) -> int:
    """Apply the journals of processes that died before their writer caught up; returns how many.

    Each one's start log is applied with it, after its own entries, as the entries
    ``starts_to_entries`` makes of the starts it noted. ``db`` must not be in a
    transaction. A journal whose owner lives is left alone.
    """
    try:
        paths = sorted(directory.glob(f"*{SUFFIX}"))
        _remove_abandoned_claims(directory)
    except OSError:
        return 0
    replayed = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replayed by another process just now
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            if os.fstat(fd).st_nlink == 0:
                continue  # another process replayed it while we waited
            with os.fdopen(os.dup(fd), "rb") as handle:
                entries = list(_entries(handle, path))
            starts = path.with_suffix(START_LOG_SUFFIX)
            if starts_to_entries is not None:
                entries += starts_to_entries(read_starts(starts))
            if entries:
                try:
                    apply_entries(db, apply, entries, path)
                except sqlite3.Error as exc:  # a full disk, say: it stays for the next try
                    log.warning("cannot apply the journal %s of a fleetrun process that is gone (%s); kept for later", path, exc)
                    continue
            path.unlink(missing_ok=True)
            starts.unlink(missing_ok=True)
            replayed += 1
        finally:
            os.close(fd)
    _remove_orphan_start_logs(directory)
    if replayed:
        log.info("applied %d journal(s) left by fleetrun processes that ended early", replayed)
    return replayed


def _remove_orphan_start_logs(directory: Path) -> None:
    # A start log outlives its journal only if the process that replayed the journal died
    # before it could remove the start log too (it is made after its journal, removed after it).
    for path in directory.glob(f"*{START_LOG_SUFFIX}"):
        if not path.with_suffix(SUFFIX).exists():
            path.unlink(missing_ok=True)


def _remove_abandoned_claims(directory: Path) -> None:
    # A process that died between creating its journal and naming it leaves an empty file.
    for path in directory.glob("*.claiming"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < 60:
                continue  # perhaps being claimed right now, before its owner could lock it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def find_latest(directory: Path, key: str, kinds: Iterable[str]) -> list[Any] | None:
    """The last entry of one of ``kinds`` for ``key`` (``[kind, key, ...]``) in any journal,
    live or abandoned, or None.

    For a reader that does not find a record in SQLite: its owner may not have applied it yet.
    """
    kinds = frozenset(kinds)
    needle = key.encode()
    latest = None
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            with open(path, "rb") as handle:
                lines = [line for line in handle if needle in line]
        except OSError:
            continue  # replayed and removed meanwhile
        for entry in _entries(lines, path, quiet=True):
            if len(entry) > 1 and entry[1] == key and entry[0] in kinds:  # not one that only mentions it (a command naming a task)
                latest = entry
    return latest


def _entries(lines: Iterable[bytes], path: Path, *, quiet: bool = False) -> Iterable[list[Any]]:
    unreadable: list[int] = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            # Only the last line can be cut short (its process died, or is still writing it); nothing was promised for it.
            unreadable.append(number)
            continue
        if isinstance(entry, list) and entry:
            yield entry
    if unreadable and not quiet:
        # A damaged file would otherwise print a warning per line.
        if len(unreadable) == 1:
            log.warning("%s: skipping a journal line that cannot be read (line %d)", path, unreadable[0])
        else:
            shown = ", ".join(map(str, unreadable[:5])) + (", …" if len(unreadable) > 5 else "")
            log.warning("%s: skipping %d journal lines that cannot be read (lines %s)", path, len(unreadable), shown)


#: Journals not closed yet. Held strongly: a journal dropped unclosed would leave its file
#: (and what it holds) for another process to replay, instead of applying it at exit.
_OPEN_JOURNALS: set[Journal] = set()


def _forget_all_in_child() -> None:
    # A forked child's copies of the parent's journals have no writer thread, and closing
    # one (Journal.close) would remove the parent's file: the child only lets go of its
    # descriptors, and the journals stay the parent's.
    for journal in _OPEN_JOURNALS:
        journal.let_go_in_forked_child()
    _OPEN_JOURNALS.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)


def close_all(timeout: float = 10.0) -> None:
    """Apply and close every journal still open (at interpreter exit)."""
    for journal in list(_OPEN_JOURNALS):
        try:
            journal.close(timeout)
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("closing the journal %s failed", journal.path)
