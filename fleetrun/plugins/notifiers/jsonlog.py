"""The JSON-lines notifier: one JSON object per line per lifecycle event and per denial.

Suitable as an audit log: each line is written as the event happens, the field names
are stable (see docs/plugins.md), and a file is created with mode 0600. Several fleetrun
processes may share one file: each line goes in with a single append, so lines never mix.
A file moved or deleted away (by logrotate, say) is followed by a new one at the path, as
``logging.handlers.WatchedFileHandler`` does: a long-running MCP server never writes on
into a rotated or deleted file. Enable it with ``--json-log PATH`` (``-`` for stderr) or
``FLEETRUN_JSON_LOG``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import IO

from fleetrun.core.events import PROGRESS, LifecycleEvent, LifecycleEventPlugin, denial_to_dict
from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.secrets import redact

ENV = "FLEETRUN_JSON_LOG"

log = logging.getLogger("fleetrun.jsonlog")


class JsonLogNotifier(LifecycleEventPlugin):
    """Writes lifecycle events to ``target``: a path, ``"-"`` for stderr, or a text stream."""

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, progress: bool = True) -> None:
        self._lock = threading.Lock()
        self.include_progress = progress
        self._fd: int | None = None  # a file of our own: written with one append per line
        self._path: str | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file open at ``_path``
        self._reopen_failed = False
        self._stream: IO[str] | None = None
        if isinstance(target, (str, os.PathLike)):
            if str(target) == "-":
                self._stream = sys.stderr
            else:
                self._path = os.fspath(target)
                self._fd, self._identity = self._open(self._path)
        else:
            self._stream = target

    @staticmethod
    def _open(path: str) -> tuple[int, tuple[int, int]]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    def _follow_path(self) -> None:
        """Reopen the path if the file open is no longer there (called with the lock held)."""
        assert self._path is not None and self._fd is not None
        try:
            st = os.stat(self._path)
            if (st.st_dev, st.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return  # cannot tell: keep the file open
        try:
            fd, identity = self._open(self._path)
        except OSError as exc:
            if not self._reopen_failed:  # once: each line tries again
                log.warning("the JSON log %s was moved and cannot be opened again (%s): writing on to the old file",
                            self._path, exc.strerror or exc)
                self._reopen_failed = True
            return
        os.close(self._fd)
        self._fd, self._identity = fd, identity
        self._reopen_failed = False

    def on_event(self, event: LifecycleEvent) -> None:
        if event.event == PROGRESS and not self.include_progress:
            return
        self._write(event.to_dict())

    @hookimpl
    def fleetrun_command_denied(self, host, command, decision, origin):  # type: ignore[no-untyped-def]
        self._write(denial_to_dict(host, command, decision, time.time(), origin))

    def _write(self, record: dict) -> None:  # type: ignore[type-arg]
        line = redact(json.dumps(record, ensure_ascii=False, separators=(",", ":"))) + "\n"
        with self._lock:
            if self._fd is None:
                if self._stream is None:
                    return  # closed
                self._stream.write(line)
                self._stream.flush()
                return
            self._follow_path()
            # One write with O_APPEND lands whole at the end of the file, whoever else appends.
            data = memoryview(line.encode("utf-8"))
            while data:
                data = data[os.write(self._fd, data):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._stream = None
