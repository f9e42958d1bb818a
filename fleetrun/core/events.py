"""Lifecycle events as plain data: one shape for the JSON log, ``--json`` and tests.

Field names are stable (``v`` is the schema version); docs/plugins.md lists them.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.models import Progress, Task, TaskResult

if TYPE_CHECKING:
    from fleetrun.core.policy import Decision

SCHEMA_VERSION = 1

CREATED = "task.created"
PROGRESS = "task.progress"
COMPLETED = "task.completed"
CANCELLED = "task.cancelled"
#: Not a task event: the policy refused a command, so no task exists.
DENIED = "command.denied"


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time as UTC ISO 8601 with milliseconds (``2026-11-24T06:43:30.123Z``); None stays None."""
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle hook call: which event, the task at that moment, and its payload."""

    event: str
    task: Task
    time: float
    progress: Progress | None = None
    result: TaskResult | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        task = self.task
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "event": self.event,
            "time": iso_time(self.time),
            "task_id": task.id,
            "host": task.host,
            "transport": task.transport,
            "command": task.command,
            "status": task.status.value,
        }
        if self.event == CREATED:
            out.update(
                created_at=iso_time(task.created_at), max_seconds=task.max_seconds,
                max_output_bytes=task.max_output_bytes, policy=task.policy, origin=task.origin,
            )
        elif self.event == PROGRESS and self.progress is not None:
            out.update(asdict(self.progress))
        elif self.event in (COMPLETED, CANCELLED):
            out.update(
                exit_code=task.exit_code,
                duration_s=round(task.duration_s, 6) if task.duration_s is not None else None,
                started_at=iso_time(task.started_at),
                ended_at=iso_time(task.ended_at),
                stdout_bytes=task.stdout_bytes,
                stderr_bytes=task.stderr_bytes,
                stdout_truncated=task.stdout_truncated,
                stderr_truncated=task.stderr_truncated,
                error=task.error,
                error_category=task.error_category,
            )
            if self.event == CANCELLED:
                out["reason"] = self.reason
        return out


class LifecycleEventPlugin:
    """Base for plugins that handle every lifecycle hook as one :class:`LifecycleEvent`."""

    def on_event(self, event: LifecycleEvent) -> None:
        raise NotImplementedError

    @hookimpl
    def fleetrun_task_created(self, task: Task) -> None:
        self.on_event(LifecycleEvent(CREATED, task, time.time()))

    @hookimpl
    def fleetrun_task_progress(self, task: Task, progress: Progress) -> None:
        self.on_event(LifecycleEvent(PROGRESS, task, time.time(), progress=progress))

    @hookimpl
    def fleetrun_task_completed(self, task: Task, result: TaskResult) -> None:
        self.on_event(LifecycleEvent(COMPLETED, task, time.time(), result=result))

    @hookimpl
    def fleetrun_task_cancelled(self, task: Task, reason: str) -> None:
        self.on_event(LifecycleEvent(CANCELLED, task, time.time(), reason=reason))


def denial_to_dict(host: str, command: str, decision: Decision, when: float, origin: str | None) -> dict[str, Any]:
    """The ``command.denied`` record: what was asked for, and the decision (see docs/plugins.md)."""
    return {
        "v": SCHEMA_VERSION,
        "event": DENIED,
        "time": iso_time(when),
        "host": host,
        "command": command,
        "status": "denied",
        "decision": decision.to_dict(),
        "origin": origin,
    }


class EventRecorder(LifecycleEventPlugin):
    """A plugin that keeps every lifecycle event it sees, in order (used by tests)."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    def on_event(self, event: LifecycleEvent) -> None:
        self.events.append(event)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> LifecycleEvent:
        return self.events[index]

    def names(self, task_id: str | None = None) -> list[str]:
        """Event names in order, for one task or for all."""
        return [e.event for e in self.events if task_id is None or e.task.id == task_id]

    def clear(self) -> None:
        self.events.clear()
