"""The JSON-lines notifier: one JSON object per line per lifecycle event and per denial.

Suitable as an audit log: each line is written as the event happens, the field names
are stable (see docs/plugins.md), and a file is created with mode 0600. Several fleetrun
processes may share one file: each line goes in with a single append, so lines never mix.
Enable it with ``--json-log PATH`` (``-`` for stderr) or ``FLEETRUN_JSON_LOG``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO

from fleetrun.core.events import PROGRESS, LifecycleEvent, LifecycleEventPlugin, denial_to_dict
from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.secrets import redact

ENV = "FLEETRUN_JSON_LOG"


class JsonLogNotifier(LifecycleEventPlugin):
    """Writes lifecycle events to ``target``: a path, ``"-"`` for stderr, or a text stream."""

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, progress: bool = True) -> None:
        self._lock = threading.Lock()
        self.include_progress = progress
        self._fd: int | None = None  # a file of our own: written with one append per line
        self._stream: IO[str] | None = None
        if isinstance(target, (str, os.PathLike)):
            if str(target) == "-":
                self._stream = sys.stderr
            else:
                self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        else:
            self._stream = target

    def on_event(self, event: LifecycleEvent) -> None:
        if event.event == PROGRESS and not self.include_progress:
            return
        self._write(event.to_dict())

    @hookimpl
    def fleetrun_command_denied(self, host, command, decision):  # type: ignore[no-untyped-def]
        self._write(denial_to_dict(host, command, decision, time.time()))

    def _write(self, record: dict) -> None:  # type: ignore[type-arg]
        line = redact(json.dumps(record, ensure_ascii=False, separators=(",", ":"))) + "\n"
        with self._lock:
            if self._fd is None:
                if self._stream is None:
                    return  # closed
                self._stream.write(line)
                self._stream.flush()
                return
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
