"""``resources/subscribe`` for 2025-11-25 clients of the fleetrun MCP server.

The SDK (2.3) serves 2026-07-28's ``subscriptions/listen`` but not the older per-URI
subscription, so this server middleware answers ``resources/subscribe`` and
``resources/unsubscribe``, advertises ``capabilities.resources.subscribe``, and records
each session's URIs with the MCP notifier, which sends
``notifications/resources/updated`` to every subscriber when a task's resource changes.

Only a task that has not ended can change, once, when it ends; then its subscriptions
go. So a subscription is kept only for such a task. An ended task never changes, and
``fleetrun://hosts`` changes unannounced (an edit of the hosts file is noticed only when a
request looks): their subscriptions are acknowledged and not kept, so that sessions which
leave without unsubscribing leave nothing behind.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from mcp.shared.exceptions import MCPError

from fleetrun.core.errors import FleetrunError
from fleetrun.core.models import Task
from fleetrun.plugins.notifiers.mcp import HOSTS_URI, TASK_URI_PREFIX, McpNotifier

INVALID_PARAMS = -32602


class SubscriptionsMiddleware:
    def __init__(self, notifier: McpNotifier, visible_task: Callable[[str], Awaitable[Task]]) -> None:
        self.notifier = notifier
        #: The task of an id, as the assistant may see it (it raises for one it may not).
        self.visible_task = visible_task

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        method = ctx.method
        if ctx.request_id is None or ctx.protocol_version == "2026-07-28":
            return await call_next(ctx)
        if method == "initialize":
            result = dict(await call_next(ctx))
            capabilities = dict(result.get("capabilities") or {})
            capabilities["resources"] = {**(capabilities.get("resources") or {}), "subscribe": True}
            result["capabilities"] = capabilities
            return result
        if method in ("resources/subscribe", "resources/unsubscribe"):
            uri = (ctx.params or {}).get("uri")
            if not isinstance(uri, str) or not uri.startswith("fleetrun://"):
                raise MCPError(code=INVALID_PARAMS, message=f"cannot subscribe to {uri!r}: only fleetrun:// resources")
            if method == "resources/unsubscribe":
                self.notifier.unsubscribe(ctx.session, uri)
            elif await self._may_change(uri):
                self.notifier.subscribe(ctx.session, uri)
                if not await self._may_change(uri):  # it ended meanwhile, and its last update is gone
                    self.notifier.unsubscribe(ctx.session, uri)
            return {}
        return await call_next(ctx)

    async def _may_change(self, uri: str) -> bool:
        """Whether the resource can still change: only a task that has not ended can."""
        if uri == HOSTS_URI:
            return False
        task_id = uri.removeprefix(TASK_URI_PREFIX)
        if task_id == uri:
            raise MCPError(code=INVALID_PARAMS, message=f"cannot subscribe to {uri!r}: no such resource")
        try:
            task = await self.visible_task(task_id)  # the store, for a task not running here
            return not task.status.is_terminal
        except FleetrunError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"cannot subscribe to {uri!r}: {exc}") from None
