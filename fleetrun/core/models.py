"""The task model: what is asked (request), what is tracked (task), what happened (result).

Hooks receive frozen snapshots, so a notifier can keep a reference without seeing it
change underneath it, and cannot change the executor's state by accident.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, TypeVar

MiB = 1024 * 1024

_Model = TypeVar("_Model")


def evolve(instance: _Model, **changes: Any) -> _Model:
    """A copy of a frozen model with ``changes``: :func:`dataclasses.replace` for this module's
    models (plain fields, no ``__post_init__``), without its per-call introspection, which
    would be a noticeable share of the executor's time per task."""
    unknown = changes.keys() - instance.__dict__.keys()
    if unknown:
        raise TypeError(f"{type(instance).__name__} has no field {sorted(unknown)[0]!r}")
    copy = object.__new__(type(instance))
    copy.__dict__.update(instance.__dict__, **changes)
    return copy


class TaskStatus(str, enum.Enum):
    """Where a task is in its life. The last five are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    #: The process that owned the task died while the task was queued or running.
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Limits:
    """How long a task may run, how much output is kept, how many run at once on a host
    and how many more may wait for their turn there.

    ``max_seconds=None`` means no time limit. ``max_output_bytes`` applies to stdout and
    stderr separately: bytes past it are drained and counted but not kept. A task submitted
    while ``max_queued`` already wait is refused: a loop that submits without waiting
    would otherwise fill the memory of a long-lived server.
    """

    max_seconds: float | None = 3600.0
    max_output_bytes: int = 100 * MiB
    max_concurrent: int = 8
    max_queued: int = 1000

    def lowered_by(
        self, *, max_seconds: float | None = None, max_output_bytes: int | None = None
    ) -> "Limits":
        """The limits a request gets: it may lower the host's limits, never raise them."""
        seconds = self.max_seconds
        if max_seconds is not None:
            seconds = max_seconds if seconds is None else min(seconds, max_seconds)
        output = self.max_output_bytes
        if max_output_bytes is not None:
            output = min(output, max_output_bytes)
        if seconds == self.max_seconds and output == self.max_output_bytes:
            return self
        return replace(self, max_seconds=seconds, max_output_bytes=output)


#: The origins fleetrun's own front ends give their tasks (see :attr:`Task.origin`).
ORIGIN_CLI = "cli"
ORIGIN_MCP = "mcp"


@dataclass(frozen=True)
class TaskRequest:
    """What a caller asks for: run ``command`` through the shell on ``host``.

    ``timeout_s`` and ``max_output_bytes`` can only lower the host's limits. ``env`` is
    added to the host's environment; ``cwd`` replaces the host's working directory.
    ``progress_pattern`` overrides the executor's progress-marker pattern for this task.
    ``origin`` says who asks, and is kept with the task (see :attr:`Task.origin`).
    """

    host: str
    command: str
    timeout_s: float | None = None
    max_output_bytes: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    progress_pattern: str | None = None
    origin: str | None = None


@dataclass(frozen=True)
class Progress:
    """Real progress of a running task, measured from its output.

    ``percent`` is set only when the command printed a marker matching the progress
    pattern; it is never estimated from elapsed time. ``heartbeat`` is true when the
    event was sent because the command has been silent, not because output arrived.
    """

    elapsed_s: float
    stdout_bytes: int
    stderr_bytes: int
    stdout_lines: int
    stderr_lines: int
    latest_line: str | None = None
    latest_stream: str | None = None
    percent: float | None = None
    heartbeat: bool = False


@dataclass(frozen=True)
class Task:
    """A snapshot of one task's record, as stored and as passed to hooks.

    Byte counts are what the command produced; when a count exceeds
    ``max_output_bytes`` the matching ``*_truncated`` flag is set and only the first
    ``max_output_bytes`` bytes were kept.
    """

    id: str
    host: str
    transport: str
    command: str
    status: TaskStatus
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    error_category: str | None = None
    cancel_reason: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    max_seconds: float | None = None
    max_output_bytes: int | None = None
    owner_pid: int | None = None
    progress: Progress | None = None
    #: The policy decision that let the task run (e.g. "allowed by rule 2 of FILE: …"), if a policy applied.
    policy: str | None = None
    #: Who asked for the task: the front end that submitted it (``cli``, ``mcp``), or what a
    #: Python caller named in :attr:`TaskRequest.origin`; None when nobody said. The MCP
    #: server shows the assistant only the tasks whose origin is ``mcp``.
    origin: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at
        if end is None:
            import time

            end = time.time()
        return max(0.0, end - self.started_at)


@dataclass(frozen=True)
class TaskResult:
    """How a task ended, for every ending that is not a cancel.

    ``status`` is one of succeeded, failed or timed_out. ``exit_code`` is the command's
    exit status (128+N when a signal N killed it), or None when it never ran to an exit
    (timeout, transport error). ``error_category`` names the kind of transport failure
    (for example ``spawn`` when the local command could not be started).
    """

    status: TaskStatus
    exit_code: int | None
    duration_s: float
    error: str | None = None
    error_category: str | None = None
