"""The MCP notifier: lifecycle hooks become MCP notifications for the session that started a task.

While the tool call that started a task is still open (``run_command`` waiting), progress
goes to that call as progress notifications (the server relays what this plugin queues).
Whether the call is open or not, the end of a task is sent to the session as a log
message and as ``notifications/resources/updated`` for ``fleetrun://tasks/{id}``; and
clients on the 2026-07-28 protocol, which listen for resource events instead of
receiving session notifications, get the same resource event through the server's
subscription bus. Hooks run on the executor's engine thread; sending happens on the
server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from fleetrun.core.hookspecs import hookimpl
from fleetrun.core.models import Progress, Task, TaskResult, TaskStatus
from fleetrun.core.secrets import redact

log = logging.getLogger("fleetrun.mcp")

LOGGER_NAME = "fleetrun"


HOSTS_URI = "fleetrun://hosts"
TASK_URI_PREFIX = "fleetrun://tasks/"


def task_uri(task_id: str) -> str:
    return f"{TASK_URI_PREFIX}{task_id}"


@dataclass
class Follower:
    """One MCP session following one task."""

    task_id: str
    session: Any
    loop: asyncio.AbstractEventLoop
    #: Progress for the tool call that is still waiting on the task, if any; None marks the end.
    call_queue: asyncio.Queue[Progress | None] | None = None
    #: For an MCP Task (SEP-1686): builds the ``notifications/tasks/status`` params from the final record.
    task_status: Callable[[Task], dict[str, Any]] | None = None
    ended: bool = field(default=False)


class McpNotifier:
    """Relays task lifecycle hooks to the MCP sessions that follow the tasks."""

    def __init__(self, bus: Any | None = None) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self._followers: dict[str, list[Follower]] = {}
        #: resources/subscribe (2025-11-25): URI -> {session: its event loop}, for tasks
        #: that have not ended; a task's entry goes when it ends (see _end). Not weak: the
        #: session object the server hands over lives only as long as the request, and the
        #: entry keeps it usable.
        self._subscribers: dict[str, dict[Any, asyncio.AbstractEventLoop]] = {}

    def subscribe(self, session: Any, uri: str) -> None:
        with self._lock:
            self._subscribers.setdefault(uri, {})[session] = asyncio.get_running_loop()

    def subscribed(self, uri: str) -> int:
        """How many sessions are subscribed to ``uri``."""
        with self._lock:
            return len(self._subscribers.get(uri, ()))

    def unsubscribe(self, session: Any, uri: str) -> None:
        with self._lock:
            self._subscribers.get(uri, {}).pop(session, None)

    # -- called by the server, on its loop ---------------------------------------------------

    def follow(
        self, task: Task, session: Any, *, open_call: bool, status: Callable[[Task], dict[str, Any]] | None = None
    ) -> Follower:
        """Start relaying ``task``'s lifecycle to ``session``; announce that it was created."""
        follower = Follower(task.id, session, asyncio.get_running_loop(), asyncio.Queue() if open_call else None, status)
        with self._lock:
            self._followers.setdefault(task.id, []).append(follower)
        self._send(follower, "info", {"event": "task.created", **_summary(task)}, resource=False)
        return follower

    def close_call(self, follower: Follower) -> None:
        """The tool call returned: progress stops; the end is still announced."""
        follower.call_queue = None

    # -- hooks, on the engine thread ----------------------------------------------------------

    @hookimpl
    def fleetrun_task_progress(self, task: Task, progress: Progress) -> None:
        for follower in self._for(task.id):
            queue = follower.call_queue
            if queue is not None:
                follower.loop.call_soon_threadsafe(queue.put_nowait, progress)

    @hookimpl
    def fleetrun_task_completed(self, task: Task, result: TaskResult) -> None:
        level = "info" if result.status is TaskStatus.SUCCEEDED else "warning"
        self._end(task, level, {"event": "task.completed", **_summary(task)})

    @hookimpl
    def fleetrun_task_cancelled(self, task: Task, reason: str) -> None:
        self._end(task, "warning", {"event": "task.cancelled", "reason": redact(reason), **_summary(task)})

    # -- sending -----------------------------------------------------------------------------

    def _for(self, task_id: str) -> list[Follower]:
        with self._lock:
            return list(self._followers.get(task_id, ()))

    def _end(self, task: Task, level: str, data: dict[str, Any]) -> None:
        with self._lock:
            followers = self._followers.pop(task.id, [])
            # An ended task's resource changes no more: this is its subscribers' last update.
            subscribers = dict(self._subscribers.pop(task_uri(task.id), {}))
        for session, loop in subscribers.items():
            if all(f.session is not session for f in followers):  # followers are told anyway
                asyncio.run_coroutine_threadsafe(_resource_updated(session, task_uri(task.id)), loop)
        for follower in followers:
            follower.ended = True
            queue = follower.call_queue
            if queue is not None:
                follower.loop.call_soon_threadsafe(queue.put_nowait, None)
            self._send(follower, level, data, resource=True, final=task)

    def _send(
        self, follower: Follower, level: str, data: dict[str, Any], *, resource: bool, final: Task | None = None
    ) -> None:
        coroutine = self._deliver(follower, level, data, resource, final)
        try:
            if _running_loop() is follower.loop:
                follower.loop.create_task(coroutine)
            else:
                asyncio.run_coroutine_threadsafe(coroutine, follower.loop)
        except RuntimeError:  # the server's loop is gone: nobody is left to tell
            coroutine.close()

    async def _deliver(
        self, follower: Follower, level: str, data: dict[str, Any], resource: bool, final: Task | None
    ) -> None:
        uri = task_uri(follower.task_id)
        try:
            if final is not None and follower.task_status is not None:
                from mcp import types

                params = types.TaskStatusNotificationParams.model_validate(follower.task_status(final))
                await follower.session.send_notification(types.TaskStatusNotification(params=params))
            with warnings.catch_warnings():
                # Log messages are how 2025-11-25 clients hear about a task after the call returned.
                warnings.simplefilter("ignore")
                await follower.session.send_log_message(level=level, data=data, logger=LOGGER_NAME)
            if resource:
                await follower.session.send_resource_updated(uri)
        except Exception as exc:  # noqa: BLE001 - a client that went away must not break the others
            log.debug("could not notify a session about task %s: %s", follower.task_id, exc)
        if resource and self.bus is not None:
            from mcp.server.subscriptions import ResourceUpdated

            try:
                await self.bus.publish(ResourceUpdated(uri=uri))
            except Exception as exc:  # noqa: BLE001
                log.debug("could not publish the update of %s: %s", uri, exc)


async def _resource_updated(session: Any, uri: str) -> None:
    try:
        await session.send_resource_updated(uri)
    except Exception as exc:  # noqa: BLE001
        log.debug("could not tell a subscriber that %s changed: %s", uri, exc)


def _summary(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.id,
        "host": task.host,
        "command": task.command,
        "status": task.status.value,
        "exit_code": task.exit_code,
        "error": task.error,
        "resource": task_uri(task.id),
    }


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
