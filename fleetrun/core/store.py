"""The embedded task store: SQLite for records, one directory of spool files per task.

Records and output outlive the process that ran the task. Any process can open the
store and read, also while the owner writes (WAL mode). A task that is queued or
running has an owner token; when that process is gone the task is ``interrupted``.
A process that does not own a task cancels it by leaving a request in the store,
which the owner picks up.

Writes of task records go through this process's journal (:mod:`fleetrun.core.journal`):
durable when ``insert``/``update`` return, visible to this store's reads at once, and to
other processes from the journal until the writer thread has applied them, a few
milliseconds later.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from fleetrun.core import journal, paths
from fleetrun.core.errors import FleetrunError, UnknownTaskError
from fleetrun.core.models import Progress, Task, TaskStatus
from fleetrun.core.output import OutputSlice, read_range, read_tail, spool_path
from fleetrun.core.processes import command_token, owner_alive, stop_leftover_commands
from fleetrun.core.text import encodable

log = logging.getLogger("fleetrun.store")

SCHEMA_VERSION = 6
TASK_ID_RE = re.compile(r"[0-9a-f]{12}")  # with fullmatch: "$" would let a trailing newline through
_ID_START_RE = re.compile(r"[0-9a-f]{4,12}")
DB_NAME = "tasks.sqlite3"
JOURNAL_DIR = "journal"
#: How long a write waits for another process's transaction before it fails (and the
#: journal's writer tries again later).
BUSY_TIMEOUT_S = 10.0
#: An output directory with no task row is deleted once it has not changed for this long.
_ORPHAN_OUTPUT_AGE_S = 86400.0
_ORPHAN_SCAN_EVERY_S = 3600.0
_ORPHAN_SCAN_MARKER = ".orphans-scanned"
#: Less free space than this, and a store that cannot be opened is blamed on its full disk.
_NO_SPACE_BYTES = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    transport TEXT NOT NULL,
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    exit_code INTEGER,
    error TEXT,
    error_category TEXT,
    cancel_reason TEXT,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    max_seconds REAL,
    max_output_bytes INTEGER,
    owner_pid INTEGER,
    owner_token TEXT,
    progress TEXT,
    policy TEXT,
    origin TEXT,
    -- the local command's process, stopped if the owner dies (fleetrun.core.processes)
    process_token TEXT
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
-- Written by the process that asks, read by the owner: never a column of the task's own
-- record, which only its owner writes (a request there would be overwritten by its next write).
CREATE TABLE IF NOT EXISTS cancel_requests (
    task_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    requested_at REAL NOT NULL
);
-- The store's own settings, the same for every process that opens it: the retention
-- (a process that kept tasks for less time would delete what the others keep).
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_TASK_COLUMNS = [f.name for f in fields(Task)]
_LIVE = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)
_COLUMNS = ", ".join(_TASK_COLUMNS)
_SELECT = f"SELECT {_COLUMNS} FROM tasks"
_SELECT_ONE_WITH_OWNER = f"SELECT {_COLUMNS}, owner_token FROM tasks WHERE id = ?"
_INSERT_ROW = f"INSERT INTO tasks ({_COLUMNS}, owner_token) VALUES ({', '.join('?' for _ in _TASK_COLUMNS)}, ?)"
_INSERT = f"{_INSERT_ROW} ON CONFLICT(id) DO NOTHING"  # a replayed journal may hold a record that is already in
_UPDATE = f"UPDATE tasks SET {', '.join(f'{name} = ?' for name in _TASK_COLUMNS[1:])} WHERE id = ?"
#: An insert and a later update in one: the record's state, whether or not it is in yet.
_UPSERT = f"{_INSERT_ROW} ON CONFLICT(id) DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in _TASK_COLUMNS[1:])}"
_STATUS, _PROGRESS = _TASK_COLUMNS.index("status"), _TASK_COLUMNS.index("progress")
_FLAGS = [_TASK_COLUMNS.index("stdout_truncated"), _TASK_COLUMNS.index("stderr_truncated")]


#: More rows than a store holds, and within SQLite's 64-bit integers (a bigger LIMIT raised OverflowError).
_MOST_ROWS = 10**12


@dataclass(frozen=True)
class Retention:
    """How long ended tasks are kept: by age and by count (the newest are kept).

    An executor applies it when it starts and, while it lives, every ``every_s`` seconds
    and after every tenth of ``max_tasks`` tasks that end, so a long-running one (the
    MCP server) keeps the store within its limits too.
    """

    max_age_days: float = 30.0
    max_tasks: int = 10_000
    every_s: float = 3600.0

    @property
    def endings_between_prunes(self) -> int:
        return max(1, self.max_tasks // 10)


def check_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        raise UnknownTaskError(_invalid_id(task_id))
    return task_id


def _invalid_id(task_id: object) -> str:
    shown = repr(task_id[:40]) + ("…" if len(task_id) > 40 else "") if isinstance(task_id, str) else type(task_id).__name__
    return f"invalid task id {shown}: a task id is 12 lowercase hex characters"


class TaskStore:
    """Task records and output under ``home`` (default: the user's data directory)."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home) if home is not None else paths.data_dir()
        self.output_root = self.home / "output"
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.output_root.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FleetrunError(f"cannot create the task store at {self.home}: {_mkdir_problem(self.home, exc)}") from None
        self._lock = threading.Lock()
        self._journal: journal.Journal | None = None  # made at the first write
        try:
            self._db = _connect(self.home / DB_NAME)
            # Only a new or older store is written to here: reading one must work on a full disk too.
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                self._migrate()
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            # SQLite says "disk I/O error" when it cannot make its shared-memory file on a full disk.
            database = self.home / DB_NAME
            if _no_space_left(self.home):
                hint = " (its file system has no space left)"
            elif isinstance(exc, sqlite3.DatabaseError) and _is_damaged(exc):
                hint = f"; to start a new, empty store, move it (with any {database.name}-wal and -shm files beside it) out of the way"
            else:
                hint = ""
            raise FleetrunError(f"cannot open the task store {database}: {exc}{hint}") from None
        _OPEN_STORES.add(self)

    def _migrate(self) -> None:
        # Stores written by older versions lack newer columns; records are kept as they are
        # (and the cancel_requested column of a version-2 store stays, unused).
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for column, kind in (("policy", "TEXT"), ("process_token", "TEXT"), ("origin", "TEXT")):
            if column not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")

    def output_dir(self, task_id: str) -> Path:
        return self.output_root / check_task_id(task_id)

    def close(self) -> None:
        """Apply what the journal holds, then close."""
        _OPEN_STORES.discard(self)
        if self._journal is not None:
            self._journal.close()
        with self._lock:
            self._db.close()

    def _reopen_in_forked_child(self) -> None:
        """A connection and (at the first write) a journal of the child's own: an SQLite
        connection must not be used across a fork, and the journal's writer thread stayed
        with the parent. The inherited connection is kept, unused: closing it could undo
        the parent's locks on the database."""
        _INHERITED_CONNECTIONS.append(self._db)
        self._lock = threading.Lock()  # another thread of the parent may have held it
        self._journal = None
        try:
            self._db = _connect(self.home / DB_NAME)
        except sqlite3.Error as exc:
            log.warning("cannot open the task store %s again in forked process %d: %s", self.home, os.getpid(), exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this store's writes are visible to other processes; False on timeout."""
        return self._journal.flush(timeout) if self._journal is not None else True

    # -- writing ---------------------------------------------------------------------

    def insert(self, task: Task, owner: str) -> None:
        """Record a new task (durable when this returns). Its output directory is made when output first arrives."""
        check_task_id(task.id)
        self._journaled().append(["insert", *_values(task), owner], task)

    def update(self, task: Task) -> None:
        """Write a task's current state (all but its identity and owner); durable when this
        returns, unless the disk refuses it: then it is applied when the store can take it."""
        self._journaled().append(["update", *_values(task)], task, required=False)

    def record_process(self, task: Task, token: str) -> None:
        """Note the local process (:func:`~fleetrun.core.processes.command_token`) that runs
        ``task``, ``task`` being its current state: should this process die while the
        command runs, whoever marks the task interrupted stops the command."""
        self._journaled().append(["process", task.id, token], task, required=False)

    def note_start(self, task_id: str, pid: int, start_ticks: int) -> None:
        """Note, without a store write, that a task started local process ``pid``: should
        this process die before :meth:`record_process`, whoever marks the task interrupted
        still stops the command (see :mod:`~fleetrun.core.start_log`)."""
        self._journaled().note_start(task_id, pid, start_ticks)

    def _journaled(self) -> journal.Journal:
        if self._journal is None:
            with self._lock:
                if self._journal is None:
                    connect = functools.partial(_connect, self.home / DB_NAME)
                    self._journal = journal.Journal(self.home / JOURNAL_DIR, connect, _apply)
        return self._journal

    def _replay_abandoned(self) -> int:
        with self._lock:
            return journal.replay_abandoned(self.home / JOURNAL_DIR, self._db, _apply, _process_entries)

    def request_cancel(self, task_id: str, reason: str) -> None:
        """Ask the task's owner to cancel it (the first request's reason is the one kept).

        The request stands on its own, so it holds even when the owner has not applied
        the task's record yet; the owner finds it once it has.
        """
        with self._lock:
            self._db.execute(
                "INSERT INTO cancel_requests (task_id, reason, requested_at) VALUES (?, ?, ?) "
                "ON CONFLICT(task_id) DO NOTHING",
                (check_task_id(task_id), encodable(reason), time.time()),
            )

    def cancel_requests(self, owner: str) -> list[tuple[str, str]]:
        """Cancels that other processes asked for, of tasks this owner runs."""
        with self._lock:
            return self._db.execute(
                "SELECT c.task_id, c.reason FROM cancel_requests c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.owner_token = ? AND t.status IN (?, ?)",
                (owner, *_LIVE),
            ).fetchall()

    def sweep_orphans(self) -> list[str]:
        """Mark tasks whose owning process is gone as interrupted, and stop their commands
        that still run on this machine; returns the tasks' ids.

        What such a process journaled but did not apply is applied first, so a task that
        ended before its owner died keeps its real ending.
        """
        self._replay_abandoned()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, owner_token, owner_pid, process_token FROM tasks WHERE status IN (?, ?)", _LIVE
            ).fetchall()
        dead = [(task_id, pid, process) for task_id, token, pid, process in rows if not owner_alive(token)]
        stopped_groups = stop_leftover_commands(process for _, _, process in dead)
        marked = []
        for task_id, pid, process in dead:
            error = f"the fleetrun process that owned this task (pid {pid}) is gone"
            stopped = stopped_groups.get(process)
            if stopped is not None:
                error += f"; its command, still running, was stopped (process group {stopped})"
                log.warning("task %s: %s", task_id, error)
            with self._lock:
                try:
                    self._db.execute(
                        "UPDATE tasks SET status = ?, ended_at = ?, error = ? WHERE id = ? AND status IN (?, ?)",
                        (TaskStatus.INTERRUPTED.value, time.time(), error, task_id, *_LIVE),
                    )
                except sqlite3.Error as exc:  # a full disk: the next sweep marks it
                    log.warning("task %s: cannot mark it interrupted in the store (%s)", task_id, exc)
                    continue
            marked.append(task_id)
        return marked

    def retention(self) -> Retention:
        """The retention set for this store (:meth:`set_retention`), else the default one."""
        default = Retention()
        with self._lock:
            stored = dict(self._db.execute("SELECT name, value FROM settings WHERE name IN ('max_age_days', 'max_tasks')"))
        try:
            # A larger count, set before set_retention refused one, made every prune fail;
            # the largest it takes keeps the same tasks.
            return Retention(
                max_age_days=float(stored.get("max_age_days", default.max_age_days)),
                max_tasks=min(int(stored.get("max_tasks", default.max_tasks)), _MOST_ROWS),
            )
        except ValueError:
            log.warning("the store's retention setting %r is unreadable: using the default", stored)
            return default

    def set_retention(self, *, max_age_days: float | None = None, max_tasks: int | None = None) -> Retention:
        """Keep ended tasks ``max_age_days`` and at most ``max_tasks`` of them, in every
        process that opens this store (each applies it when it starts); return the result."""
        if max_age_days is not None and not (max_age_days > 0 and math.isfinite(max_age_days)):
            raise FleetrunError(f"the days to keep tasks must be a number above 0, got {max_age_days}")
        if max_tasks is not None and max_tasks < 1:
            raise FleetrunError(f"the number of tasks to keep must be at least 1, got {max_tasks}")
        if max_tasks is not None and max_tasks > _MOST_ROWS:
            raise FleetrunError(f"the number of tasks to keep must be at most {_MOST_ROWS}, got {max_tasks}")
        values = [(name, str(value)) for name, value in (("max_age_days", max_age_days), ("max_tasks", max_tasks)) if value is not None]
        with self._lock:
            try:
                self._db.executemany(
                    "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    values,
                )
            except sqlite3.Error as exc:
                raise FleetrunError(f"cannot change the retention of the store at {self.home}: {exc}") from None
        return self.retention()

    def prune(self, retention: Retention) -> int:
        """Delete ended tasks older than the retention age or beyond its count."""
        cutoff = time.time() - retention.max_age_days * 86400
        if not self.flush():
            return 0  # the store refuses writes: its rows may be behind this process's records
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM tasks WHERE status NOT IN (?, ?) AND "
                "(created_at < ? OR id NOT IN (SELECT id FROM tasks WHERE status NOT IN (?, ?) "
                "ORDER BY created_at DESC LIMIT ?))",
                (*_LIVE, cutoff, *_LIVE, retention.max_tasks),
            ).fetchall()
            ids = [task_id for (task_id,) in rows]
            for chunk in _chunks(ids, 500):
                marks = ", ".join("?" for _ in chunk)
                self._db.execute(f"DELETE FROM tasks WHERE id IN ({marks})", tuple(chunk))
                self._db.execute(f"DELETE FROM cancel_requests WHERE task_id IN ({marks})", tuple(chunk))
        for task_id in ids:
            shutil.rmtree(self.output_root / task_id, ignore_errors=True)
        self._remove_orphan_output()
        return len(ids)

    def _remove_orphan_output(self) -> None:
        """Delete output directories that no task owns any more: left by a prune that died
        between deleting the rows and the files, or whose deletion failed. Only those
        untouched for a day: a new task's row can lag behind its output (another process's
        journal), never by that long. At most once an hour per store, as every `fleetrun`
        command prunes when it starts, and a scan of a full store costs about 10 ms."""
        marker = self.output_root / _ORPHAN_SCAN_MARKER
        try:
            if time.time() - marker.stat().st_mtime < _ORPHAN_SCAN_EVERY_S:
                return
        except OSError:
            pass  # never scanned
        try:
            marker.touch(mode=0o600)  # an existing one gets the time of now
        except OSError:
            return
        self._replay_abandoned()
        try:
            names = [entry.name for entry in os.scandir(self.output_root) if TASK_ID_RE.fullmatch(entry.name)]
        except OSError:
            return
        owned: set[str] = set()
        with self._lock:
            for chunk in _chunks(names, 500):
                marks = ", ".join("?" for _ in chunk)
                owned.update(row[0] for row in self._db.execute(f"SELECT id FROM tasks WHERE id IN ({marks})", tuple(chunk)))
        stale = time.time() - _ORPHAN_OUTPUT_AGE_S
        removed = 0
        for name in set(names) - owned:
            directory = self.output_root / name
            try:
                status = directory.lstat()
            except OSError:
                continue
            if not stat.S_ISDIR(status.st_mode) or status.st_mtime >= stale:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
        if removed:
            log.info("removed %d output directories of tasks no longer in the store", removed)

    # -- reading ---------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        check_task_id(task_id)
        if self._journal is not None:
            pending = self._journal.pending(task_id)
            if pending is not None:
                return pending  # type: ignore[return-value]
        row = self._select(task_id)
        if row is None:
            # Just created by another process, whose writer has not applied it yet?
            entry = journal.find_latest(self.home / JOURNAL_DIR, task_id, kinds=("insert", "update"))
            if entry is not None:
                state = entry[1:-1] if entry[0] == "insert" else entry[1:]  # an insert ends with the owner
                return _task(tuple(_task_state(state)))
            row = self._select(task_id)  # applied while we looked
        if row is None or (row[_STATUS] in _LIVE and not owner_alive(row[-1])):
            # Its owner may have died with the record's last writes still in its journal.
            if self._replay_abandoned():
                row = self._select(task_id)
        if row is None:
            raise UnknownTaskError(f"no task {task_id!r} in the store at {self.home}")
        return _task(row[:-1])

    def complete_id(self, text: str) -> str:
        """The task id that ``text`` is, or is the start of (at least 4 of its characters),
        as ``git`` takes a commit's; an unknown or ambiguous start is an :class:`UnknownTaskError`."""
        text = text.strip().lower() if isinstance(text, str) else text  # as copied from a terminal or a log
        if not isinstance(text, str) or not _ID_START_RE.fullmatch(text):
            raise UnknownTaskError(f"{_invalid_id(text)}, or a unique start of one (4 or more of them)")
        if len(text) == 12:
            return text
        with self._lock:
            # The ids are hex: every id that starts with `text` sorts between it and `text` + "g".
            ids = [row[0] for row in self._db.execute("SELECT id FROM tasks WHERE id > ? AND id < ? ORDER BY id LIMIT 4", (text, text + "g"))]
        if not ids:
            raise UnknownTaskError(f"no task id starts with {text!r} in the store at {self.home}")
        if len(ids) > 1:
            shown = ", ".join(ids[:3]) + (", …" if len(ids) > 3 else "")
            raise UnknownTaskError(f"{text!r} starts more than one task id ({shown}): give more of it")
        return ids[0]

    def _select(self, task_id: str) -> tuple | None:
        with self._lock:
            return self._db.execute(_SELECT_ONE_WITH_OWNER, (task_id,)).fetchone()

    def list(
        self, *, status: Iterable[TaskStatus] | None = None, host: str | None = None, limit: int = 50,
        origin: str | None = None,
    ) -> list[Task]:
        """Tasks, newest first; only those of ``host``, or of ``origin``, when given."""
        where, params = [], []
        if status is not None:
            values = [TaskStatus(s).value for s in status]
            where.append(f"status IN ({', '.join('?' for _ in values)})")
            params.extend(values)
        for column, value in (("host", host), ("origin", origin)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        limit = min(max(0, int(limit)), _MOST_ROWS)
        # What this process wrote is in SQLite after the flush; if the store refuses writes,
        # the writes not applied are taken from the journal instead.
        unapplied = [] if self.flush() or self._journal is None else self._journal.pending_values()
        with self._lock:
            rows = self._db.execute(
                f"{_SELECT} {clause} ORDER BY created_at DESC LIMIT ?", (*params, limit + len(unapplied))
            ).fetchall()
        tasks = {task.id: task for task in map(_task, rows)}
        tasks.update((task.id, task) for task in unapplied if isinstance(task, Task))
        wanted = {TaskStatus(s) for s in status} if status is not None else None
        chosen = [
            t for t in tasks.values()
            if (wanted is None or t.status in wanted) and host in (None, t.host) and origin in (None, t.origin)
        ]
        return sorted(chosen, key=lambda t: t.created_at, reverse=True)[:limit]

    def read_output(self, task_id: str, stream: str, offset: int = 0, max_bytes: int = 65536) -> OutputSlice:
        """A slice of a task's stream from ``offset`` (also while the task runs)."""
        task = self.get(task_id)
        path = spool_path(self.output_dir(task_id), stream)
        data, size = read_range(path, offset, max_bytes)
        return self._slice(task, stream, offset, data, size)

    def tail_output(self, task_id: str, stream: str, lines: int = 20, max_bytes: int = 65536) -> OutputSlice:
        """The last ``lines`` lines of a task's stream."""
        task = self.get(task_id)
        path = spool_path(self.output_dir(task_id), stream)
        data, offset, size = read_tail(path, lines, max_bytes)
        return self._slice(task, stream, offset, data, size)

    @staticmethod
    def _slice(task: Task, stream: str, offset: int, data: bytes, size: int) -> OutputSlice:
        next_offset = offset + len(data)
        return OutputSlice(
            stream=stream,
            offset=offset,
            next_offset=next_offset,
            data=data,
            size=size,
            complete=task.status.is_terminal and next_offset >= size,
            truncated=task.stdout_truncated if stream == "stdout" else task.stderr_truncated,
            ended=task.status.is_terminal,
        )


def _mkdir_problem(home: Path, exc: OSError) -> str:
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), home)
        return f"{blocker} is not a directory (set ${paths.HOME_ENV} to a directory fleetrun may create)"
    return exc.strerror or str(exc)


def _is_damaged(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _no_space_left(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < _NO_SPACE_BYTES
    except OSError:
        return False


def _connect(database: Path) -> sqlite3.Connection:
    db = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA synchronous=NORMAL")  # per connection; with WAL, safe against crashes of fleetrun
    return db


# -- rows ------------------------------------------------------------------------------


def _values(task: Task) -> list[Any]:
    """A task as column values, in ``_TASK_COLUMNS`` order."""
    values = [getattr(task, name) for name in _TASK_COLUMNS]
    values[_STATUS] = task.status.value
    values[_PROGRESS] = json.dumps(asdict(task.progress)) if task.progress is not None else None
    for index in _FLAGS:
        values[index] = int(bool(values[index]))
    return values


def _process_entries(starts: dict[str, tuple[int, int]]) -> list[list[Any]]:
    """Journal entries naming the processes that a dead owner's tasks started."""
    return [["process", task_id, command_token(pid, ticks)] for task_id, (pid, ticks) in starts.items()]


def _apply(db: sqlite3.Connection, entries: Sequence[list[Any]]) -> None:
    """Journal entries into the database (the journal runs this inside a transaction).

    An update writes a task's whole state, so only the latest one of each task in the
    batch is applied; a task created in the batch too is written once, with that state
    (a short task's two writes become one row write). An insert never overwrites: a
    replayed journal may hold a record that is already in.
    """
    inserted: dict[str, list[Any]] = {}
    latest: dict[str, list[Any]] = {}
    processes: dict[str, str] = {}
    for kind, *values in entries:
        if kind == "insert":
            if len(values) != len(_TASK_COLUMNS) + 1:  # another version's journal
                values = [*_task_state(values[:-1]), values[-1]]
            inserted.setdefault(values[0], values)
        elif kind == "update":
            latest[values[0]] = _task_state(values)
        elif kind == "process":
            processes[values[0]] = values[1]
        else:
            log.warning("skipping a journal entry of unknown kind %r (written by another fleetrun version?)", kind)
    inserts, upserts = [], []
    for task_id, values in inserted.items():
        state = latest.pop(task_id, None)
        if state is None:
            inserts.append(values)
        else:
            upserts.append([*state, values[-1]])  # the owner comes only with the insert
    if inserts:
        db.executemany(_INSERT, inserts)
    if upserts:
        db.executemany(_UPSERT, upserts)
    if latest:
        db.executemany(_UPDATE, [(*values[1:], values[0]) for values in latest.values()])
    if processes:  # last: the task's row may have come in with this batch
        db.executemany("UPDATE tasks SET process_token = ? WHERE id = ?", [(token, task_id) for task_id, token in processes.items()])


def _task_state(values: list[Any]) -> list[Any]:
    """A journal entry's task columns, as many as this version has. New columns are only
    ever appended to :class:`Task`: a journal left by an older version lacks the newest
    ones (they stay NULL), and one by a newer version has more, which this one drops."""
    missing = len(_TASK_COLUMNS) - len(values)
    if not missing:
        return values  # this version's: the entries of every batch the journal applies
    return [*values, *[None] * missing] if missing > 0 else values[: len(_TASK_COLUMNS)]


def _task(row: tuple) -> Task:
    values = dict(zip(_TASK_COLUMNS, row))
    values["status"] = TaskStatus(values["status"])
    values["stdout_truncated"] = bool(values["stdout_truncated"])
    values["stderr_truncated"] = bool(values["stderr_truncated"])
    if values["progress"]:
        values["progress"] = Progress(**json.loads(values["progress"]))
    return Task(**values)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_OPEN_STORES: "weakref.WeakSet[TaskStore]" = weakref.WeakSet()
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []


def _reopen_stores_in_child() -> None:
    for store in list(_OPEN_STORES):
        store._reopen_in_forked_child()


os.register_at_fork(after_in_child=_reopen_stores_in_child)
atexit.register(journal.close_all)
