"""The JSON-lines notifier: one JSON object per line per lifecycle event.

Suitable as an audit log: each line is written and flushed as the event happens, the
field names are stable (see docs/plugins.md), and a file is created with mode 0600.
Enable it with ``--json-log PATH`` (``-`` for stderr) or ``FLEETRUN_JSON_LOG``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO

from fleetrun.core.events import CANCELLED, COMPLETED, CREATED, PROGRESS, LifecycleEvent
from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.models import Progress, Task, TaskResult

ENV = "FLEETRUN_JSON_LOG"


class JsonLogNotifier:
    """Writes lifecycle events to ``target``: a path, ``"-"`` for stderr, or a text stream."""

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, progress: bool = True) -> None:
        self._lock = threading.Lock()
        self.include_progress = progress
        if isinstance(target, (str, os.PathLike)):
            if str(target) == "-":
                self._stream: IO[str] = sys.stderr
                self._owned = False
            else:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                self._stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
                self._owned = True
        else:
            self._stream = target
            self._owned = False

    def write(self, event: LifecycleEvent) -> None:
        line = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()

    @hookimpl
    def fleetrun_task_created(self, task: Task) -> None:
        self.write(LifecycleEvent(CREATED, task, time.time()))

    @hookimpl
    def fleetrun_task_progress(self, task: Task, progress: Progress) -> None:
        if self.include_progress:
            self.write(LifecycleEvent(PROGRESS, task, time.time(), progress=progress))

    @hookimpl
    def fleetrun_task_completed(self, task: Task, result: TaskResult) -> None:
        self.write(LifecycleEvent(COMPLETED, task, time.time(), result=result))

    @hookimpl
    def fleetrun_task_cancelled(self, task: Task, reason: str) -> None:
        self.write(LifecycleEvent(CANCELLED, task, time.time(), reason=reason))
