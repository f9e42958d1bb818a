"""fleetrun's hook specifications: the contract between the executor and its plugins.

Lifecycle hooks fire on the executor's engine thread, exactly once per transition and
in order for each task::

    fleetrun_task_created -> fleetrun_task_progress* -> fleetrun_task_completed
                                                       | fleetrun_task_cancelled

They must return quickly and must not block (hand slow work to your own thread or
loop). An exception raised by one implementation is logged with its plugin's name; it
never fails the task and never stops the other plugins from being called.

Every hook here is documented in ``docs/plugins.md``; a test keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from fleetrun.core.models import Progress, Task, TaskResult
    from fleetrun.core.policy import Decision
    from fleetrun.core.transport import Transport

PROJECT_NAME = "fleetrun"

#: Marks a function as a fleetrun hook specification (used only by this module).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function as an implementation of a fleetrun hook: ``from fleetrun import hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The lifecycle hooks, in the order a task moves through them.
LIFECYCLE_HOOKS = (
    "fleetrun_task_created",
    "fleetrun_task_progress",
    "fleetrun_task_completed",
    "fleetrun_task_cancelled",
)
#: Hooks that report to notifiers without a task (isolated per plugin like the lifecycle hooks).
NOTIFY_HOOKS = (*LIFECYCLE_HOOKS, "fleetrun_command_denied")


@hookspec
def fleetrun_task_created(task: Task) -> None:
    """A task was accepted and recorded; it is queued and has not started yet.

    Called once per task, before any other lifecycle hook for it.

    :param task: the new task's record: ``status`` is ``queued``; ``id``, ``host``,
        ``transport``, ``command`` and the resolved limits (``max_seconds``,
        ``max_output_bytes``) are set; ``policy`` is the decision that let it run (None
        without a policy), ``origin`` who asked for it (see :attr:`Task.origin`).

    The return value is ignored.
    """


@hookspec
def fleetrun_task_progress(task: Task, progress: Progress) -> None:
    """A running task made progress, or has been silent for a heartbeat interval.

    Called zero or more times between created and the final hook, at most about ten
    times a second per task while output arrives, and once per heartbeat interval while
    the command is silent. Never called after the task has ended.

    :param task: the task's record at this moment (``status`` is ``running``).
    :param progress: bytes and lines so far on each stream, elapsed seconds, the latest
        line, and ``percent`` only when the command printed a progress marker matching
        the configured pattern. ``progress.heartbeat`` is true for a silence heartbeat.

    The return value is ignored.
    """


@hookspec
def fleetrun_task_completed(task: Task, result: TaskResult) -> None:
    """A task ended in any way other than a cancel.

    Called once per task that was not cancelled: the command exited (zero or not), the
    time limit expired, or the transport failed (for example the command could not be
    started, or a connection dropped).

    :param task: the final record: ``status``, ``exit_code``, ``ended_at``, byte counts
        and truncation flags are final.
    :param result: how it ended: ``result.status`` is ``succeeded``, ``failed`` or
        ``timed_out``; ``exit_code``, ``duration_s``, and for a transport failure
        ``error`` and ``error_category``.

    The return value is ignored.
    """


@hookspec
def fleetrun_task_cancelled(task: Task, reason: str) -> None:
    """A task was cancelled, while queued or while running.

    Called once per cancelled task, instead of :func:`fleetrun_task_completed`. When it
    is called the task's processes have been stopped.

    :param task: the final record (``status`` is ``cancelled``).
    :param reason: why, in words for a person (for example ``"cancelled by user"``).

    The return value is ignored.
    """


@hookspec
def fleetrun_command_denied(host: str, command: str, decision: Decision, origin: str | None) -> None:
    """The policy refused a command: no task was created and nothing ran.

    Called once per refused request, before the caller gets the refusal. Audit logs use
    it to record what was asked for and which rule said no.

    :param host: the host name the command was meant for.
    :param command: the command as it was asked for.
    :param decision: the policy's decision: ``decision.rule`` is the rule that denied it
        (None for the policy's default), ``decision.reason`` says why in words, and
        ``decision.to_dict()`` gives it with stable field names.
    :param origin: who asked, as a task's ``origin`` would have said: ``"cli"``, ``"mcp"``
        (the assistant), what a Python caller named, or None.

    The return value is ignored.
    """


@hookspec
def fleetrun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    """Add transports: call ``register(TransportClass)`` once per transport class.

    Called once per plugin, in the order plugins were registered (built-in ones first),
    when a plugin manager first needs its transports. The class's ``name`` is what hosts
    name in their ``transport`` field. A class under a name already taken, anything but a
    :class:`fleetrun.Transport` subclass, or an exception refuses the whole plugin: an
    installed one is left out with a warning, one registered by code raises ``PluginError``.

    :param register: the function that records a :class:`fleetrun.Transport` subclass.

    The return value is ignored.
    """
