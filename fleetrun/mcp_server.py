"""The MCP server: an AI assistant plans, runs, follows and cancels commands on the fleet.

A thin front end over the executor: tools parse their arguments, call the core and
render results as typed models. Every command goes through the policy (the configured
one, or the built-in read-only policy); a refusal is an MCP tool error that names the
rule. Long commands never die at a client's timeout: ``run_command`` waits a bounded
time and otherwise hands back a task id to follow with ``get_task`` and
``get_task_output``.

Nothing but protocol messages goes to stdout: logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import BaseModel, Field, ValidationError

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus

from fleetrun import __version__
from fleetrun.core.batch import BatchRequest, run_batch_async, select_hosts
from fleetrun.core.errors import FleetrunError, PolicyDenied, UnknownTaskError
from fleetrun.core.executor import Executor
from fleetrun.core.models import ORIGIN_MCP, Limits, Task, TaskRequest, TaskStatus
from fleetrun.core.output import OutputSlice, check_offset
from fleetrun.core.secrets import redact
from fleetrun.mcp_subscriptions import SubscriptionsMiddleware
from fleetrun.mcp_tasks import TasksMiddleware
from fleetrun.plugins.notifiers.mcp import HOSTS_URI, McpNotifier, task_uri

log = logging.getLogger("fleetrun.mcp")

MAX_WAIT_S = 60.0
DEFAULT_WAIT_S = 10.0
TAIL_LINES = 20
TAIL_BYTES = 8192
MAX_READ_BYTES = 1 << 20
#: How long cancel_task waits for the task's processes to be gone before answering.
CANCEL_WAIT_S = 5.0

# Tool parameters, described for the assistant that calls the tools.
HostName = Annotated[str, Field(description="a host of the inventory (list_hosts names them)")]
Command = Annotated[str, Field(description="the shell command, run by the host's shell as `ssh HOST COMMAND` would run it")]
TaskId = Annotated[str, Field(description="a task id (12 hex characters), as returned by run_command, start_task or list_tasks")]
TimeoutS = Annotated[
    float | None, Field(gt=0, description="time limit in seconds; it can only lower the host's max_seconds (default: the host's)")
]
Tag = Annotated[str | None, Field(description="only hosts with this tag")]

INSTRUCTIONS = """\
fleetrun runs shell commands on the hosts of an inventory, under a policy that decides what
may run. Start with list_hosts. Before running anything unfamiliar, call plan_command: it
shows the resolved host, limits and the policy's decision (and the rule), and runs nothing.
run_command waits up to wait_s seconds; if the command is still running you get a task id:
follow it with get_task and get_task_output (by byte offset), and stop it with cancel_task.
A denied command is not an error to work around: tell the user which rule denied it."""

GUIDE = """\
How to use fleetrun well:

1. Find the host: list_hosts (optionally by tag), then describe_host for details.
2. Plan first: plan_command(host, command) shows what would run, the limits, and whether
   the policy allows it, naming the rule. It runs nothing.
3. Run: run_command(host, command, wait_s=10) for short commands; start_task for long ones.
   A command is POSIX shell (sh) on every host, whatever the user's login shell there. Write
   it plainly, and the policy can judge it: quote expansions ("$HOME", not $HOME), write paths
   and options out rather than through $_ or $1, and give shell code with sh -c '...' rather
   than piping it into a shell.
   For several hosts, run_on_hosts(command, hosts=[...] or tag=..., max_parallel, stop_on_failure).
4. Follow: get_task(task_id) for status and real progress (bytes, lines, the last line, and a
   percentage only when the command prints one); get_task_output(task_id, offset=next_offset)
   to read more output; the task's resource fleetrun://tasks/{id} updates when it ends.
5. Stop: cancel_task(task_id) stops the command and everything it started.

When the policy denies a command: do not try to rephrase it to slip past the policy (chains,
wrappers and substitutions are all checked). Tell the user what was denied and by which rule,
and suggest the policy change they could make (a policy file with an allow rule) if they want it.
The server reads the policy file again when it changes: once the user has saved the change,
ask again; no restart is needed."""


# -- result models -----------------------------------------------------------------------------


class LimitsInfo(BaseModel):
    max_seconds: float | None = Field(description="time limit of a task, seconds (null: none)")
    max_output_bytes: int = Field(description="bytes kept of stdout and of stderr each")
    max_concurrent: int = Field(description="tasks at once on the host")
    max_queued: int = Field(description="tasks that may wait for their turn on the host; more are refused")


class HostInfo(BaseModel):
    name: str
    transport: str
    tags: list[str]
    description: str | None = None
    limits: LimitsInfo
    details: dict[str, Any] | None = Field(default=None, description="how the host is reached (no secrets)")


class HostList(BaseModel):
    hosts: list[HostInfo]
    inventory: str = Field(description="where the inventory came from")


class PolicyInfo(BaseModel):
    allowed: bool
    explanation: str = Field(description="the decision in words, with the rule that made it")
    rule: str | None = Field(description="the deciding rule (file, number, line, text); null: the default deny")
    policy: str = Field(description="the policy's source")


class PlanResult(BaseModel):
    host: str
    transport: str
    command: str
    limits: LimitsInfo
    transport_details: dict[str, Any]
    policy: PolicyInfo
    ran: bool = Field(default=False, description="always false: planning runs nothing")


class ProgressInfo(BaseModel):
    elapsed_s: float
    stdout_bytes: int
    stderr_bytes: int
    stdout_lines: int
    stderr_lines: int
    latest_line: str | None = None
    percent: float | None = Field(default=None, description="only when the command printed a progress marker")


class TaskInfo(BaseModel):
    task_id: str
    host: str
    transport: str
    command: str
    status: Literal["queued", "running", "succeeded", "failed", "timed_out", "cancelled", "interrupted"]
    ended: bool
    exit_code: int | None = None
    error: str | None = None
    error_category: str | None = None
    cancel_reason: str | None = None
    duration_s: float | None = None
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    max_seconds: float | None = None
    progress: ProgressInfo | None = None
    policy: str | None = None
    resource: str


class RunResult(BaseModel):
    finished: bool = Field(description="true: the command ended within wait_s; false: follow task.task_id")
    task: TaskInfo
    stdout_tail: str | None = Field(default=None, description="the last lines of stdout, when finished")
    stderr_tail: str | None = Field(default=None, description="the last lines of stderr, when finished")
    hint: str | None = None


class OutputChunk(BaseModel):
    task_id: str
    stream: Literal["stdout", "stderr"]
    offset: int
    next_offset: int = Field(description="pass it as offset to read on")
    data: str = Field(description="the bytes, decoded as UTF-8 (invalid bytes replaced)")
    size: int = Field(description="bytes kept so far")
    ended: bool = Field(description="true when the task has ended and this read reached the end of the stream: nothing more to read")
    truncated: bool = Field(description="output past max_output_bytes was not kept")


class BatchResult(BaseModel):
    succeeded: bool
    tasks: list[TaskInfo]
    not_started: list[str] = Field(
        description="hosts that got no task: refused when their turn came (a full queue, a policy changed since), "
        "or skipped after a failure (stop_on_failure)"
    )
    why_not_started: dict[str, str] = Field(description="for each host in not_started, why")


class TaskListing(BaseModel):
    tasks: list[TaskInfo]


class CancelResult(BaseModel):
    task_id: str
    cancelled: bool = Field(description="false when the task had already ended")
    status: str


# -- rendering -----------------------------------------------------------------------------------


def _task_info(task: Task) -> TaskInfo:
    progress = None
    if task.progress is not None:
        # The wire model keeps a subset of Progress's fields; pydantic drops the rest.
        progress = ProgressInfo.model_validate({**asdict(task.progress), "elapsed_s": round(task.progress.elapsed_s, 3)})
    duration = task.duration_s
    return TaskInfo(
        task_id=task.id, host=task.host, transport=task.transport, command=task.command, status=task.status.value,
        ended=task.status.is_terminal, exit_code=task.exit_code, error=task.error, error_category=task.error_category,
        cancel_reason=task.cancel_reason, duration_s=round(duration, 3) if duration is not None else None,
        stdout_bytes=task.stdout_bytes, stderr_bytes=task.stderr_bytes, stdout_truncated=task.stdout_truncated,
        stderr_truncated=task.stderr_truncated, max_seconds=task.max_seconds, progress=progress, policy=task.policy,
        resource=task_uri(task.id),
    )


def _limits(limits: Limits) -> LimitsInfo:
    return LimitsInfo.model_validate(asdict(limits))


def _details(details: Mapping[str, object]) -> dict[str, Any]:
    """A transport's description of a host, as JSON data with any secret value redacted."""
    return json.loads(redact(json.dumps(dict(details), default=str)) or "{}")


class FleetrunMcp:
    """The server's state: one executor (with the MCP notifier) and the policy it applies."""

    def __init__(self, executor: Executor, notifier: McpNotifier) -> None:
        self.executor = executor
        self.notifier = notifier

    async def visible_task(self, task_id: str) -> Task:
        """The task, if it was started through an MCP server (this one or another, earlier):
        the assistant sees no other. What the user ran with ``fleetrun run`` is the user's:
        its output may hold what the policy would not let the assistant read, and cancelling
        it is not the assistant's to do."""
        task = await self.executor.get_async(task_id)
        if task.origin != ORIGIN_MCP:
            raise UnknownTaskError(f"no task {task_id!r} was started through the MCP server (the assistant sees only those)")
        return task

    def finished_result(self, task: Task) -> RunResult:
        """The result of a task that ended (reads its output: call it off the event loop)."""
        return RunResult(
            finished=True, task=_task_info(task),
            stdout_tail=self.tail(task.id, "stdout"), stderr_tail=self.tail(task.id, "stderr"),
        )

    def tail(self, task_id: str, stream: str) -> str:
        return self.executor.tail_output_text(task_id, stream, lines=TAIL_LINES, max_bytes=TAIL_BYTES)[1]

    async def submit(  # type: ignore[no-untyped-def]
        self, session: Any, host: str, command: str, timeout_s: float | None, *, open_call: bool,
        status: Callable[[Task], dict[str, Any]] | None = None,
    ):
        """Start a task and relay its lifecycle to ``session``; a refusal is a :class:`ToolError`."""
        request = TaskRequest(host=host, command=command, timeout_s=timeout_s, origin=ORIGIN_MCP)
        try:
            handle = await self.executor.submit_async(request)
        except FleetrunError as exc:
            raise _fail(exc) from None
        follower = self.notifier.follow(self.executor.get(handle.id), session, open_call=open_call, status=status)
        return handle, follower


def _fail(exc: FleetrunError) -> ToolError:
    """The tool error for a refusal; a policy denial says so first."""
    message = redact(str(exc)) or type(exc).__name__
    return ToolError(f"policy: {message}" if isinstance(exc, PolicyDenied) else message)


class _FleetrunServer(MCPServer):
    """An MCP server whose tools refuse arguments they do not take.

    pydantic would drop them unseen, and an assistant that misspells ``timeout_s`` would
    believe its command runs with a time limit. A refused call names the unknown and the
    accepted arguments, and type errors come back one line per argument.
    """

    _accepted: dict[str, tuple[str, ...]] | None = None

    async def list_tools(self):  # type: ignore[no-untyped-def]
        tools = await super().list_tools()
        for tool in tools:
            tool.input_schema = {**tool.input_schema, "additionalProperties": False}
        return tools

    async def check_arguments(self, name: str, arguments: Mapping[str, Any]) -> None:
        """Raise :class:`ToolError` if ``arguments`` holds one that the tool ``name`` does not take."""
        if self._accepted is None:
            self._accepted = {tool.name: tuple(tool.input_schema.get("properties", {})) for tool in await super().list_tools()}
        accepted = self._accepted.get(name)
        if accepted is None:
            return  # an unknown tool: the SDK says so
        unknown = [key for key in arguments if key not in accepted]
        if unknown:
            shown = ", ".join(repr(key[:64]) for key in unknown[:5]) + (", …" if len(unknown) > 5 else "")
            raise ToolError(f"{name} takes no argument {shown} (its arguments: {', '.join(accepted) or 'none'})")

    async def call_tool(self, name, arguments, context=None):  # type: ignore[no-untyped-def]
        await self.check_arguments(name, arguments)
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}" for error in exc.__cause__.errors()
            )
            raise ToolError(f"invalid arguments for {name}: {problems}") from exc.__cause__


def create_server(executor: Executor, *, name: str = "fleetrun", **server_options: Any) -> MCPServer:
    """The MCP server over ``executor``, whose policy must be set (the server never runs without one)."""
    if executor.policy is None:
        raise ValueError("the MCP server needs a policy: pass the configured one or read_only_policy()")
    bus = InMemorySubscriptionBus()
    notifier = McpNotifier(bus=bus)
    executor.plugins.register(notifier, name="fleetrun.notifiers.mcp")
    state = FleetrunMcp(executor, notifier)
    tasks = TasksMiddleware(
        state, result_for=state.finished_result, check_arguments=lambda tool, arguments: server.check_arguments(tool, arguments)
    )
    server = _FleetrunServer(
        name, version=__version__, instructions=INSTRUCTIONS, subscriptions=bus, middleware=[SubscriptionsMiddleware(notifier, state.visible_task), tasks], **server_options
    )

    @server.tool(description="List the hosts of the inventory (optionally those with a tag).")
    async def list_hosts(tag: Tag = None) -> HostList:
        try:
            inventory = executor.inventory
        except FleetrunError as exc:  # the hosts file or the policy changed into a mistake
            raise _fail(exc) from None
        hosts = inventory.with_tag(tag) if tag else list(inventory.hosts.values())
        return HostList(
            hosts=[HostInfo(name=h.name, transport=h.transport, tags=list(h.tags), description=h.description, limits=_limits(h.limits))
                   for h in sorted(hosts, key=lambda h: h.name)],
            inventory=inventory.source,
        )

    @server.tool(description="Describe one host: transport, tags, limits and how it is reached (never a secret).")
    async def describe_host(host: HostName) -> HostInfo:
        try:
            found = executor.inventory.get(host)
            plan = await asyncio.to_thread(executor.plan, TaskRequest(host=host, command="true"))
        except FleetrunError as exc:
            raise _fail(exc) from None
        return HostInfo(
            name=found.name, transport=found.transport, tags=list(found.tags), description=found.description,
            limits=_limits(found.limits), details=_details(plan.transport_details),
        )

    @server.tool(description="Dry run: the resolved host, transport, limits and the policy's decision with its rule. Runs nothing.")
    async def plan_command(host: HostName, command: Command) -> PlanResult:
        try:
            plan = await asyncio.to_thread(executor.plan, TaskRequest(host=host, command=command))
        except FleetrunError as exc:
            raise _fail(exc) from None
        decision = plan.decision
        assert decision is not None
        return PlanResult(
            host=plan.host.name, transport=plan.transport, command=redact(plan.command) or "",
            limits=_limits(plan.limits), transport_details=_details(plan.transport_details),
            policy=PolicyInfo(
                allowed=decision.allowed, explanation=redact(decision.explanation) or "",
                rule=decision.rule.describe() if decision.rule else None, policy=decision.source,
            ),
        )

    @server.tool(
        description=(
            "Run a command and wait up to wait_s seconds (at most 60). If it ends in time: status, exit code, "
            "output tails and duration. If not: finished=false and the task id to follow with get_task "
            "(the task also goes on if the call is cancelled: list_tasks finds it)."
        )
    )
    async def run_command(
        host: HostName, command: Command, ctx: Context, timeout_s: TimeoutS = None,
        wait_s: Annotated[
            float, Field(ge=0, description=f"how long to wait for the end, seconds (at most {MAX_WAIT_S:g}); the task goes on after it")
        ] = DEFAULT_WAIT_S,
    ) -> RunResult:
        wait = min(wait_s, MAX_WAIT_S)  # the schema refuses a negative one
        handle, follower = await state.submit(ctx.session, host, command, timeout_s, open_call=True)
        queue = follower.call_queue
        assert queue is not None
        deadline = time.monotonic() + wait
        done = asyncio.ensure_future(handle.wait_async())
        try:
            while not done.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({done, getter}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                progress = getter.result()
                if progress is None:
                    continue
                message = f"{progress.stdout_bytes} B out, {progress.stderr_bytes} B err"
                if progress.latest_line:
                    message += f"; {redact(progress.latest_line)}"
                if progress.percent is not None:
                    await ctx.report_progress(progress.percent, 100.0, message)
                else:
                    await ctx.report_progress(round(progress.elapsed_s, 3), None, message)
        finally:
            state.notifier.close_call(follower)
            if not done.done():
                done.cancel()
        task = await executor.get_async(handle.id)
        if not task.status.is_terminal:
            return RunResult(
                finished=False, task=_task_info(task),
                hint=f"still running after {wait:g} s: follow it with get_task('{task.id}') and "
                     f"get_task_output('{task.id}'), or stop it with cancel_task",
            )
        return await asyncio.to_thread(state.finished_result, task)

    @server.tool(description="Start a command and return its task id at once; follow it with get_task.")
    async def start_task(host: HostName, command: Command, ctx: Context, timeout_s: TimeoutS = None) -> TaskInfo:
        handle, _ = await state.submit(ctx.session, host, command, timeout_s, open_call=False)
        return _task_info(executor.get(handle.id))

    @server.tool(
        description=(
            "Run one command on several hosts (a list, or every host with a tag) as a batch of tasks; "
            "waits for all of them, reporting progress as each ends (cancelling the call cancels them). "
            "max_parallel caps how many run at once; stop_on_failure starts no new task after one fails."
        )
    )
    async def run_on_hosts(
        command: Command,
        ctx: Context,
        hosts: Annotated[list[str] | None, Field(description="host names; with tag too, the hosts of both")] = None,
        tag: Annotated[str | None, Field(description="every host with this tag")] = None,
        max_parallel: Annotated[int, Field(ge=1, description="at most this many tasks at once")] = 10,
        stop_on_failure: Annotated[bool, Field(description="start no new task once one has failed (running ones finish)")] = False,
        timeout_s: TimeoutS = None,
    ) -> BatchResult:
        ended = 0

        async def report(task: Task) -> None:
            # A long batch is otherwise silent until its end: a client shows these, and some
            # extend their request timeout on each one.
            nonlocal ended
            ended += 1
            exit_code = "" if task.exit_code is None else f" (exit {task.exit_code})"
            await ctx.report_progress(
                ended, len(batch.hosts), f"{task.host}: {task.status.value}{exit_code}; {ended} of {len(batch.hosts)} ended"
            )

        try:
            selected = select_hosts(executor.inventory, hosts or [], tag)
            batch = BatchRequest(
                hosts=selected, command=command, timeout_s=timeout_s, max_parallel=max_parallel,
                stop_on_failure=stop_on_failure, origin=ORIGIN_MCP,
            )
            outcome = await run_batch_async(executor, batch, on_task_ended=report)
        except FleetrunError as exc:
            raise _fail(exc) from None
        return BatchResult(
            succeeded=outcome.succeeded, tasks=[_task_info(t) for t in outcome.tasks],
            not_started=list(outcome.not_started), why_not_started=dict(outcome.why_not_started),
        )

    @server.tool(description="A task's status, real progress (bytes, lines, last line, percent if printed) and exit code.")
    async def get_task(task_id: TaskId) -> TaskInfo:
        try:
            return _task_info(await state.visible_task(task_id))
        except FleetrunError as exc:
            raise _fail(exc) from None

    @server.tool(
        description=(
            "Read a task's stdout or stderr: from a byte offset (then continue at next_offset), or the last "
            "tail_lines lines. Works while the task runs."
        )
    )
    async def get_task_output(
        task_id: TaskId,
        stream: Annotated[Literal["stdout", "stderr"], Field(description="which stream")] = "stdout",
        offset: Annotated[int, Field(ge=0, description="the byte offset to read from (the previous read's next_offset)")] = 0,
        max_bytes: Annotated[int, Field(ge=1, description=f"read at most this many bytes (at most {MAX_READ_BYTES})")] = 65536,
        tail_lines: Annotated[int | None, Field(ge=0, description="instead of offset: the last this many lines")] = None,
    ) -> OutputChunk:
        size = min(max_bytes, MAX_READ_BYTES)

        def read(task: Task) -> tuple[Task, OutputSlice, str]:
            if tail_lines is not None:
                return task, *executor.tail_output_text(task_id, stream, lines=tail_lines, max_bytes=size)
            piece, text = executor.read_output_text(task_id, stream, offset=offset, max_bytes=size)
            check_offset(task_id, piece)
            return task, piece, text

        try:
            task, piece, text = await asyncio.to_thread(read, await state.visible_task(task_id))
        except FleetrunError as exc:
            raise _fail(exc) from None
        return OutputChunk(
            task_id=task_id, stream=stream, offset=piece.offset, next_offset=piece.next_offset, data=text,
            size=piece.size, ended=task.status.is_terminal and piece.next_offset >= piece.size, truncated=piece.truncated,
        )

    @server.tool(description="Cancel a queued or running task: the command and everything it started are stopped.")
    async def cancel_task(task_id: TaskId) -> CancelResult:
        try:
            await state.visible_task(task_id)
            cancelled = await executor.cancel_async(task_id, "cancelled through the MCP server")
            task = await executor.get_async(task_id)
            if cancelled:
                try:  # its processes take a moment to stop
                    task = await asyncio.wait_for(executor.wait_async(task_id), CANCEL_WAIT_S)
                except asyncio.TimeoutError:
                    task = await executor.get_async(task_id)
        except FleetrunError as exc:
            raise _fail(exc) from None
        return CancelResult(task_id=task_id, cancelled=cancelled, status=task.status.value)

    @server.tool(description="List the tasks started through the MCP server, newest first, optionally by status and host.")
    async def list_tasks(
        status: Annotated[
            Literal["queued", "running", "succeeded", "failed", "timed_out", "cancelled", "interrupted"] | None,
            Field(description="only tasks in this state"),
        ] = None,
        host: Annotated[str | None, Field(description="only tasks of this host")] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="at most this many, newest first")] = 20,
    ) -> TaskListing:
        statuses = [TaskStatus(status)] if status else None
        tasks = await executor.list_async(status=statuses, host=host, limit=limit, origin=ORIGIN_MCP)
        return TaskListing(tasks=[_task_info(t) for t in tasks])

    @server.resource(HOSTS_URI, name="hosts", description="The inventory's hosts", mime_type="application/json")
    async def hosts_resource() -> str:
        return (await list_hosts()).model_dump_json(indent=2)

    @server.resource(
        "fleetrun://tasks/{task_id}", name="task", description="A task's record and the tails of its output",
        mime_type="application/json",
    )
    async def task_resource(task_id: str) -> str:
        def read(task: Task) -> dict[str, Any]:
            return {
                "task": _task_info(task).model_dump(),
                "stdout_tail": state.tail(task_id, "stdout"),
                "stderr_tail": state.tail(task_id, "stderr"),
            }

        try:
            body = await asyncio.to_thread(read, await state.visible_task(task_id))
        except UnknownTaskError as exc:
            # Not found (the SDK's invalid-params answer, with this message), not a server failure.
            raise ResourceNotFoundError(str(exc)) from None
        return json.dumps(body, indent=2)

    @server.prompt(name="fleetrun_guide", description="How to plan, run, follow and cancel commands with fleetrun")
    def fleetrun_guide() -> str:
        return GUIDE

    return server
