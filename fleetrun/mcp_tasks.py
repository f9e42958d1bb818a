"""MCP Tasks (SEP-1686, protocol 2025-11-25) for the fleetrun MCP server.

A client that sends a task-augmented ``tools/call`` for ``run_command`` gets a
``CreateTaskResult`` at once; the MCP task *is* the executor task (same id, same store
record), so ``get_task`` and ``get_task_output`` work on it too. ``tasks/get``,
``tasks/result``, ``tasks/list`` and ``tasks/cancel`` are served, and the session gets
``notifications/tasks/status`` when the task ends. An MCP task is forgotten once it has
ended and its ``ttl`` has passed (counted from its creation; the server grants between a
second and a day), or once the store's retention has removed its record.

The SDK (2.3) carries the types but does not dispatch these methods, so this is a server
middleware: it answers the task methods itself, advertises ``capabilities.tasks`` in the
``initialize`` result, and marks each tool's ``execution.taskSupport`` in ``tools/list``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from fleetrun.core.errors import UnknownTaskError
from fleetrun.core.events import iso_time
from fleetrun.core.models import Task, TaskStatus
from fleetrun.core.secrets import redact

if TYPE_CHECKING:
    from fleetrun.mcp_server import FleetrunMcp

INVALID_PARAMS = -32602
TASK_TOOLS = {"run_command": "optional"}
DEFAULT_TTL_MS = MAX_TTL_MS = 24 * 3600 * 1000
MIN_TTL_MS = 1000
POLL_INTERVAL_MS = 500
RELATED_TASK = "io.modelcontextprotocol/related-task"
_METHODS = ("tasks/get", "tasks/result", "tasks/list", "tasks/cancel")


@dataclass
class _McpTask:
    task_id: str
    ttl_ms: int
    session: Any
    expires: float  # time.monotonic() after which the ended task may be forgotten


def mcp_status(task: Task) -> tuple[str, str]:
    """The MCP task status of an executor task, and a status message."""
    if not task.status.is_terminal:
        return "working", task.status.value
    if task.status is TaskStatus.CANCELLED:
        return "cancelled", redact(task.cancel_reason) or "cancelled"
    if task.exit_code is None and task.status is not TaskStatus.TIMED_OUT:
        return "failed", redact(task.error) or task.status.value
    detail = f"exit code {task.exit_code}" if task.exit_code is not None else "timed out"
    return "completed", f"{task.status.value} ({detail})"


class TasksMiddleware:
    """Serves MCP Tasks for ``run_command`` on top of the executor."""

    def __init__(
        self,
        state: FleetrunMcp,
        result_for: Callable[[Task], Any],
        check_arguments: Callable[[str, Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        self.state = state
        self.result_for = result_for
        self.check_arguments = check_arguments
        self.tasks: dict[str, _McpTask] = {}

    def wire_task(self, task: Task, ttl_ms: int) -> dict[str, Any]:
        status, message = mcp_status(task)
        return {
            "taskId": task.id, "status": status, "statusMessage": message,
            "createdAt": iso_time(task.created_at), "lastUpdatedAt": iso_time(task.ended_at or task.started_at or task.created_at),
            "ttl": ttl_ms, "pollInterval": POLL_INTERVAL_MS,
        }

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        method, params = ctx.method, dict(ctx.params or {})
        if ctx.request_id is None or ctx.protocol_version == "2026-07-28":
            return await call_next(ctx)
        if method == "initialize":
            result = dict(await call_next(ctx))
            capabilities = dict(result.get("capabilities") or {})
            capabilities["tasks"] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            result["capabilities"] = capabilities
            return result
        if method == "tools/list":
            result = dict(await call_next(ctx))
            result["tools"] = [
                {**tool, "execution": {"taskSupport": TASK_TOOLS.get(tool["name"], "forbidden")}} for tool in result["tools"]
            ]
            return result
        if method == "tools/call" and params.get("task") is not None:
            return await self._create(ctx, params)
        if method in _METHODS:
            return await self._task_method(method, params)
        return await call_next(ctx)

    async def _create(self, ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if name not in TASK_TOOLS:
            raise MCPError(code=INVALID_PARAMS, message=f"tool {name!r} does not support task-augmented calls")
        arguments = params.get("arguments") or {}
        # The receiver may grant a different ttl than asked; it answers with the one it keeps.
        ttl = min(max(int((params.get("task") or {}).get("ttl") or DEFAULT_TTL_MS), MIN_TTL_MS), MAX_TTL_MS)
        await self._forget_expired()
        try:
            if not isinstance(arguments, dict):
                raise ToolError(f"invalid arguments for {name}: expected an object")
            await self.check_arguments(name, arguments)
            for required in ("host", "command"):
                if not isinstance(arguments.get(required), str):
                    got = "missing" if required not in arguments else f"got {type(arguments[required]).__name__}"
                    raise ToolError(f"invalid arguments for {name}: {required}: a string is required ({got})")
            handle, _ = await self.state.submit(
                ctx.session, arguments["host"], arguments["command"],
                arguments.get("timeout_s"), open_call=False, status=lambda t: self.wire_task(t, ttl),
            )
        except ToolError as exc:  # refused: a bad request or the policy, already worded and redacted
            raise MCPError(code=INVALID_PARAMS, message=str(exc)) from None
        self.tasks[handle.id] = _McpTask(handle.id, ttl, ctx.session, time.monotonic() + ttl / 1000)
        return {"task": self.wire_task(self.state.executor.get(handle.id), ttl)}

    async def _record(self, task_id: str) -> Task | None:
        """The task's record; None (and the MCP task forgotten) if the store no longer has it."""
        try:
            return await self.state.executor.get_async(task_id)  # the store, once it has ended
        except UnknownTaskError:
            self.tasks.pop(task_id, None)
            return None

    async def _forget_expired(self) -> None:
        now = time.monotonic()
        for task_id in [t.task_id for t in self.tasks.values() if t.expires <= now]:
            task = await self._record(task_id)
            if task is not None and task.status.is_terminal:
                del self.tasks[task_id]  # a task still running stays: it can still be cancelled

    async def _task_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        await self._forget_expired()
        if method == "tasks/list":
            tasks = [task for task in [await self._record(task_id) for task_id in list(self.tasks)] if task is not None]
            tasks.sort(key=lambda t: t.created_at, reverse=True)
            return {"tasks": [self.wire_task(t, self.tasks[t.id].ttl_ms) for t in tasks]}
        task_id = params.get("taskId")
        entry = self.tasks.get(task_id) if isinstance(task_id, str) else None
        task = await self._record(task_id) if entry is not None else None
        if entry is None or task is None:
            raise MCPError(code=INVALID_PARAMS, message=f"unknown task {task_id!r}")
        executor = self.state.executor
        if method == "tasks/get":
            return self.wire_task(task, entry.ttl_ms)
        if method == "tasks/cancel":
            if task.status.is_terminal:
                raise MCPError(code=INVALID_PARAMS, message=f"task {task_id} has already ended ({task.status.value})")
            await executor.cancel_async(task_id, "cancelled through tasks/cancel")
            return self.wire_task(await executor.wait_async(task_id), entry.ttl_ms)
        task = await executor.wait_async(task_id)  # tasks/result blocks until the task ends
        result = await asyncio.to_thread(self.result_for, task)
        body = json.loads(result.model_dump_json())
        return {
            "content": [{"type": "text", "text": json.dumps(body)}],
            "structuredContent": body,
            "isError": False,
            "_meta": {RELATED_TASK: {"taskId": task_id}},
        }
