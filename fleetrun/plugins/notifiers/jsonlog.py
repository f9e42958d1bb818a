"""The JSON-lines notifier: one JSON object per line per lifecycle event and per denial.

Suitable as an audit log: each line is written as the event happens, the field names
are stable (see docs/plugins.md), and a file is created with mode 0600. Several fleetrun
processes may share one file: each line goes in with a single append, so lines never mix.
A file moved or deleted away (by logrotate, say) is followed by a new one at the path, as
``logging.handlers.WatchedFileHandler`` does: a long-running MCP server never writes on
into a rotated or deleted file. A file that cannot be written (a full disk) is said once,
and so is its recovery, with the count of lost lines. Enable it with ``--json-log PATH`` (``-`` for stderr) or
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
        self._failure: str | None = None  # why the last line could not be written, until one is
        self._lost = 0  # lines not written since then
        self._cut_short = False  # the file ends in part of a line: the next one starts on a line of its own
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
            if self._fd is None and self._stream is None:
                return  # closed
            # A full disk or a closed stderr: said once, not with a traceback per event, and
            # the task goes on either way (a notifier never fails one).
            try:
                self._put(line)
            except (OSError, ValueError) as exc:
                self._lost += 1
                if self._failure is None:
                    self._failure = getattr(exc, "strerror", None) or str(exc)
                    log.warning("cannot write the JSON log %s (%s): its events are lost until it can be written again",
                                self._where(), self._failure)
                return
            if self._failure is not None:
                log.warning("the JSON log %s is written again; %d events before this one could not be written (%s)",
                            self._where(), self._lost, self._failure)
                self._failure, self._lost = None, 0

    def _put(self, line: str) -> None:
        if self._fd is None:
            assert self._stream is not None
            self._stream.write(line)
            self._stream.flush()
            return
        self._follow_path()
        # One write with O_APPEND lands whole at the end of the file, whoever else appends.
        data = memoryview((("\n" if self._cut_short else "") + line).encode("utf-8"))
        while data:
            written = os.write(self._fd, data)
            self._cut_short = data[written - 1] != ord("\n") if written else self._cut_short
            data = data[written:]

    def _where(self) -> str:
        return self._path if self._path is not None else str(getattr(self._stream, "name", "stream"))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._stream = None
