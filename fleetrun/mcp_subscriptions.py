"""``resources/subscribe`` for 2025-11-25 clients of the fleetrun MCP server.

The SDK (2.3) serves 2026-07-28's ``subscriptions/listen`` but not the older per-URI
subscription, so this server middleware answers ``resources/subscribe`` and
``resources/unsubscribe``, advertises ``capabilities.resources.subscribe``, and records
each session's URIs with the MCP notifier, which sends
``notifications/resources/updated`` to every subscriber when a task's resource changes.
"""

from __future__ import annotations

from typing import Any

from mcp.shared.exceptions import MCPError

from fleetrun.plugins.notifiers.mcp import McpNotifier

INVALID_PARAMS = -32602


class SubscriptionsMiddleware:
    def __init__(self, notifier: McpNotifier) -> None:
        self.notifier = notifier

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
            if method == "resources/subscribe":
                self.notifier.subscribe(ctx.session, uri)
            else:
                self.notifier.unsubscribe(ctx.session, uri)
            return {}
        return await call_next(ctx)
