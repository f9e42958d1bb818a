"""Fan-out: one command on several hosts, as a batch of ordinary tasks.

Each host gets its own task (with its own record, hooks, output and limits); the batch
adds a cap on how many run at once and, optionally, stops launching new ones after the
first task that does not succeed. Tasks already running are left to finish. A host whose
task is refused when its turn comes (its queue is full, a policy changed since the batch
was planned) is not started, with the reason; the other hosts' commands go on, since
stopping them half-way would do more harm than one host left out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Mapping

from fleetrun.core.errors import FleetrunError, PolicyDenied
from fleetrun.core.inventory import Inventory, names_hint
from fleetrun.core.models import Task, TaskRequest, TaskStatus

if TYPE_CHECKING:
    from fleetrun.core.executor import Executor

#: Called on the engine thread with (host, stream name, bytes) as output arrives.
BatchOutputListener = Callable[[str, str, bytes], None]
#: Awaited in the batch's own loop with each task's final record, as each one ends.
BatchEndListener = Callable[[Task], Awaitable[None]]

DEFAULT_MAX_PARALLEL = 10

#: Why a host got no task under ``stop_on_failure``.
STOPPED_ON_FAILURE = "an earlier host did not succeed, and the batch stops on failure"


@dataclass(frozen=True)
class BatchRequest:
    """Run ``command`` on each of ``hosts``; the other fields are as in :class:`TaskRequest`."""

    hosts: tuple[str, ...]
    command: str
    timeout_s: float | None = None
    max_output_bytes: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    max_parallel: int = DEFAULT_MAX_PARALLEL
    stop_on_failure: bool = False
    origin: str | None = None

    def task_request(self, host: str) -> TaskRequest:
        return TaskRequest(
            host=host, command=self.command, timeout_s=self.timeout_s,
            max_output_bytes=self.max_output_bytes, env=self.env, cwd=self.cwd, origin=self.origin,
        )


@dataclass(frozen=True)
class BatchOutcome:
    """How a batch ended: each launched task's final record, in the order of the hosts."""

    tasks: tuple[Task, ...]
    #: Hosts that got no task: refused when their turn came, or left out after a failure
    #: (with ``stop_on_failure``), in the order of the hosts.
    not_started: tuple[str, ...] = ()
    #: For each host in ``not_started``, why.
    why_not_started: Mapping[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return not self.not_started and all(t.status is TaskStatus.SUCCEEDED for t in self.tasks)


def select_hosts(inventory: Inventory, names: Iterable[str] = (), tag: str | None = None) -> tuple[str, ...]:
    """Hosts named (comma lists allowed) or carrying ``tag``, in order, without duplicates."""
    selected: list[str] = []
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                raise FleetrunError(f"empty host name in {item!r}")
            inventory.get(name)  # an unknown name fails here, listing the known ones
            if name not in selected:
                selected.append(name)
    if tag is not None:
        tagged = [h.name for h in inventory.with_tag(tag)]
        if not tagged:
            in_use = {t for h in inventory.hosts.values() for t in h.tags}
            raise FleetrunError(f"no host has tag {tag!r} ({names_hint(tag, in_use, 'tags in use')})")
        selected += [name for name in sorted(tagged) if name not in selected]
    if not selected:
        raise FleetrunError("no hosts selected: name hosts or give a tag")
    return tuple(selected)


async def run_batch_async(
    executor: Executor,
    batch: BatchRequest,
    *,
    on_output: BatchOutputListener | None = None,
    on_task_ended: BatchEndListener | None = None,
) -> BatchOutcome:
    """Run the batch; cancelling this coroutine cancels every task it launched."""
    if batch.max_parallel < 1:
        raise FleetrunError(f"max_parallel must be at least 1, got {batch.max_parallel}")
    # Refuse the whole batch before anything runs: an unknown host, a bad limit, a denial.
    plans = [executor.plan(batch.task_request(host), describe=False) for host in batch.hosts]
    denied = [p for p in plans if p.decision is not None and not p.decision.allowed]
    if denied:
        for plan in denied:
            executor.plugins.command_denied(plan.host.name, batch.command, plan.decision, batch.origin)
        raise PolicyDenied(denied[0].decision)
    slots = asyncio.Semaphore(batch.max_parallel)
    finished: dict[str, Task] = {}
    refused: dict[str, str] = {}
    stopping = False

    async def one(host: str) -> None:
        nonlocal stopping
        async with slots:
            if stopping:
                return
            listener = None
            if on_output is not None:
                listener = lambda stream, data: on_output(host, stream, data)  # noqa: E731
            try:
                handle = await executor.submit_async(batch.task_request(host), on_output=listener)
            except FleetrunError as exc:  # nothing was recorded or started for this host
                refused[host] = str(exc)
                stopping = stopping or batch.stop_on_failure
                return
            try:
                task = await handle.wait_async()
            except asyncio.CancelledError:
                await executor.cancel_async(handle.id, "the batch was cancelled")
                await handle.wait_async()  # its processes are stopped before the batch says so
                raise
            finished[host] = task
            if batch.stop_on_failure and task.status is not TaskStatus.SUCCEEDED:
                stopping = True
            if on_task_ended is not None:
                await on_task_ended(task)

    workers = [asyncio.ensure_future(one(host)) for host in batch.hosts]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for worker in workers:
            if not worker.done() and not worker.cancelling():  # a second cancel would cut its clean-up short
                worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    not_started = tuple(h for h in batch.hosts if h not in finished)
    return BatchOutcome(
        tasks=tuple(finished[h] for h in batch.hosts if h in finished),
        not_started=not_started,
        why_not_started={h: refused.get(h, STOPPED_ON_FAILURE) for h in not_started},
    )


def run_batch(executor: Executor, batch: BatchRequest, *, on_output: BatchOutputListener | None = None) -> BatchOutcome:
    """:func:`run_batch_async` for plain Python callers; Ctrl-C cancels the batch's tasks."""
    return asyncio.run(run_batch_async(executor, batch, on_output=on_output))
