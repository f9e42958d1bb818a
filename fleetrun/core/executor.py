"""The executor: runs tasks through transports and reports their lifecycle to plugins.

All task work happens on one engine thread running an asyncio loop of its own, so the
executor can be used from plain Python (``run``, ``submit``, ``TaskHandle.wait``) and
from asyncio (``run_async``, ``submit_async``, ``TaskHandle.wait_async``) without ever
blocking the caller's event loop. A task is recorded in the store by the thread that
submits it; from then on its state changes, store writes and hook calls all happen on
the engine thread, which is what keeps every task's hooks in order.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import os
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping

from fleetrun.core import open_files
from fleetrun.core.config_files import ConfigFiles, Configuration
from fleetrun.core.errors import FleetrunError, HostBusyError, PolicyDenied
from fleetrun.core.inventory import HOST_NAME_RE, Host, Inventory, default_inventory, environment_problem
from fleetrun.core.models import Limits, Progress, Task, TaskRequest, TaskResult, TaskStatus, evolve
from fleetrun.core.output import OutputSlice, SpoolWriter, as_text, read_range, spool_path
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.policy import Decision, Policy
from fleetrun.core.secrets import redact
from fleetrun.core.slots import Slots
from fleetrun.core.progress import DEFAULT_PROGRESS_PATTERN, ProgressTracker, compile_progress_pattern
from fleetrun.core.processes import KILL_GRACE_SECONDS, boot_ticks, command_token, owner_token
from fleetrun.core.store import Retention, TaskStore
from fleetrun.core.text import CONTROL_CHARACTERS, argument_problem, encodable, text_problem
from fleetrun.core.transport import Execution, Transport, TransportError, details_of

log = logging.getLogger("fleetrun.executor")

#: Called on the engine thread with (stream name, bytes) as output arrives.
OutputListener = Callable[[str, bytes], None]

MAX_COMMAND_LENGTH = 128 * 1024
#: Longer commands are submitted from a worker thread by the asyncio API (see submit_async).
_LONG_COMMAND = 4096
_CANCEL_POLL_SECONDS = 0.5
_STORE_PROGRESS_INTERVAL = 1.0
#: A task still running this long after its start is recorded as running, with its process
#: (so that it can be stopped should this process die; until then the start log names it),
#: and gets its timers. Shorter tasks end with one store write. Long enough for `true`,
#: short for anything a person could notice.
_RUNNING_WRITE_DELAY = 0.01
#: How long the engine may wait on its own thread for a command when it runs nothing else
#: (see ``Execution.wait_inline_s``). New work waits at most this long for it.
_WAIT_INLINE_SECONDS = 0.002
#: A transport told to stop (timeout, cancel, shutdown) has this long to return; then its
#: task ends without it. Ours stop in well under KILL_GRACE_SECONDS; one that does not is a
#: bug (a third-party transport that ignores cancellation), which must not hold a task open.
_STOP_GRACE_SECONDS = KILL_GRACE_SECONDS + 8.0


@dataclass(frozen=True)
class Plan:
    """What a request resolves to before anything runs: used by dry runs and by submit."""

    host: Host
    transport: str
    command: str
    limits: Limits
    env: Mapping[str, str]
    cwd: str | None
    transport_details: Mapping[str, object]
    #: The policy's decision, when a policy applies (a dry run shows a denial; submit refuses it).
    decision: Decision | None = None


def register_inventory_secrets(inventory: Inventory, transports: Mapping[str, type[Transport]]) -> None:
    """Read the secrets of every host, not only of those tasks run on, so that they are
    redacted whatever host a command runs on or names, and so that a command on one host
    cannot print another's from this process's environment (see
    :func:`~fleetrun.core.secrets.secret_variables`)."""
    for host in inventory.hosts.values():
        cls = transports.get(host.transport)
        if cls is not None:
            cls.register_secrets(host)


def plan_task(
    request: TaskRequest,
    inventory: Inventory,
    transports: Mapping[str, type[Transport]],
    *,
    describe: bool = True,
    transport: Transport | None = None,
    policy: Policy | None = None,
) -> Plan:
    """Resolve a request against the inventory: host, transport, limits, environment,
    and the policy's decision when ``policy`` is given.

    The inventory's secrets must have been read (:func:`register_inventory_secrets`, as an
    executor and the CLI do when they take an inventory), so that a secret typed into the
    command is hidden from the first record on; planning does not read them again per task.

    Raises :class:`FleetrunError` for anything that would stop the task from being run,
    except a policy denial, which is returned in ``Plan.decision`` for the caller to show.
    """
    _check_command(request.command)
    _check_host_name(request.host)
    host = inventory.get(request.host)
    cls = transports.get(host.transport)
    if cls is None:
        available = ", ".join(sorted(transports)) or "none"
        raise FleetrunError(
            f"host {host.name!r} uses transport {host.transport!r}, which no loaded plugin provides "
            f"(available: {available})"
        )
    _check_options(request)
    env = {**host.env, **request.env}
    problem = environment_problem(env)
    if problem is not None:
        raise FleetrunError(problem)
    details: Mapping[str, object] = {}
    if describe:
        details = details_of(transport or cls(host))
    return Plan(
        host=host,
        transport=host.transport,
        command=request.command,
        limits=host.limits.lowered_by(max_seconds=request.timeout_s, max_output_bytes=request.max_output_bytes),
        env=env,
        cwd=request.cwd or host.cwd,
        transport_details=details,
        decision=(
            policy.decide(
                host, request.command, foreign_shell=cls.foreign_shell(host), environment=request.env, cwd=request.cwd
            )
            if policy is not None else None
        ),
    )


class TaskHandle:
    """A submitted task: wait for it, cancel it, or look at its current state."""

    def __init__(self, executor: Executor, task_id: str, done: concurrent.futures.Future[Task]) -> None:
        self.executor = executor
        self.id = task_id
        self._done = done

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"

    def done(self) -> bool:
        return self._done.done()

    def wait(self, timeout: float | None = None) -> Task:
        """Block until the task ends; return its final record (from a hook, only once it has ended)."""
        if not self._done.done():
            self.executor._refuse_waiting_on_engine("TaskHandle.wait()")
        return self._done.result(timeout)

    async def wait_async(self) -> Task:
        """Await the task's end without blocking the caller's event loop."""
        if not self._done.done():
            self.executor._check_process()
        return await asyncio.shield(asyncio.wrap_future(self._done))

    def cancel(self, reason: str = "cancelled by user") -> bool:
        return self.executor.cancel(self.id, reason)

    def snapshot(self) -> Task:
        return self.executor.get(self.id)


class _LiveTask:
    """The engine's mutable state for a task that has not ended yet."""

    __slots__ = (
        "record", "plan", "pattern", "listener", "done", "runner", "ending",
        "cancel_reason", "stdout", "stderr", "tracker", "last_store_write", "finished",
        "started", "timeout", "settled", "process", "generation",
    )

    def __init__(self, record: Task, plan: Plan, pattern, listener: OutputListener | None, generation: int) -> None:
        self.record = record
        self.plan = plan
        #: Which configuration of the executor planned it (see Executor.reconfigure).
        self.generation = generation
        self.pattern = pattern
        self.listener = listener
        self.done: concurrent.futures.Future[Task] = concurrent.futures.Future()
        self.runner: asyncio.Task[None] | None = None
        self.ending: TaskStatus | None = None
        self.cancel_reason: str | None = None
        self.stdout: SpoolWriter | None = None
        self.stderr: SpoolWriter | None = None
        self.tracker: ProgressTracker | None = None
        self.last_store_write = 0.0
        self.finished = False
        self.started = 0.0  # loop time when it started running
        self.timeout: asyncio.TimerHandle | None = None
        self.settled = False  # recorded as running (see Executor._settle)
        self.process: tuple[int, int] | None = None  # pid and start (boot ticks) of its local process, if any


class _Sink:
    __slots__ = ("live", "stream", "spool", "track")

    def __init__(self, live: _LiveTask, stream: str, spool: SpoolWriter, track: Callable[[_LiveTask], ProgressTracker]) -> None:
        self.live = live
        self.stream = stream
        self.spool = spool
        self.track = track

    def write(self, data: bytes) -> None:
        live = self.live
        if live.finished:
            return
        self.spool.write(data)
        if live.listener is not None:
            try:
                live.listener(self.stream, data)
            except Exception:
                log.exception("output listener of task %s failed", live.record.id)
        (live.tracker or self.track(live)).on_output(self.stream, data)


class Executor:
    """Runs tasks on the hosts of an inventory, with bounded concurrency.

    :param inventory: the hosts (default: the embedded inventory with ``local``).
    :param store: where records and output go (default: the user's data directory).
    :param plugins: the plugin manager (default: a new one, with entry-point plugins).
    :param max_concurrent: tasks running at once over all hosts; more are queued.
    :param progress_pattern: regex with a ``percent`` group (or ``current`` and
        ``total``) that finds progress markers in output; None turns percentages off.
    :param heartbeat_s: a progress event is sent after this long without output.
    :param progress_interval_s: the shortest time between two progress events of a task.
    :param retention: ended tasks kept in the store (applied when the executor starts,
        then again while it runs: see :class:`~fleetrun.core.store.Retention`). By default
        the store's own (:meth:`~fleetrun.core.store.TaskStore.set_retention`), read again
        at each prune; None: never prune.
    :param policy: the command policy every request must pass (None: no policy; the
        caller decides whether that is acceptable, as the CLI does without one).
    :param config_files: instead of ``inventory`` and ``policy``: the hosts and policy
        files, read again whenever they change (a long-running process, like the MCP server).
    """

    def __init__(
        self,
        *,
        inventory: Inventory | None = None,
        store: TaskStore | None = None,
        plugins: PluginManager | None = None,
        max_concurrent: int = 64,
        progress_pattern: str | None = DEFAULT_PROGRESS_PATTERN,
        heartbeat_s: float = 5.0,
        progress_interval_s: float = 0.1,
        retention: Retention | None | Literal["store"] = "store",
        policy: Policy | None = None,
        config_files: ConfigFiles | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if config_files is not None and (inventory is not None or policy is not None):
            raise ValueError("pass config_files, or inventory and policy, not both")
        self.plugins = plugins if plugins is not None else PluginManager()
        self._config_files = config_files
        #: The files' configuration last taken: a newer one replaces what reconfigure() set.
        self._taken_from_files = config_files.current if config_files is not None else None
        #: What requests are planned with and its generation (how many times it was replaced),
        #: one tuple so that a reader never sees one without the other (see reconfigure).
        self._configuration = (
            self._taken_from_files or Configuration(inventory if inventory is not None else default_inventory(), policy),
            0,
        )
        self._register_secrets(self._configuration[0])
        self._reconfigure_lock = threading.Lock()
        self.store = store if store is not None else TaskStore()
        self._owns_store = store is None
        self.max_concurrent = max_concurrent
        self.progress_pattern = compile_progress_pattern(progress_pattern) if progress_pattern else None
        self.heartbeat_s = heartbeat_s
        self.progress_interval_s = progress_interval_s
        self.owner = owner_token()
        self._live: dict[str, _LiveTask] = {}
        #: Recorded tasks the engine has not taken yet, oldest first (guarded by ``_start_lock``).
        self._arrivals: list[_LiveTask] = []
        #: Per host name: its tasks that have not ended, queued or running (guarded by ``_start_lock``).
        self._unfinished: dict[str, int] = {}
        self._transports: dict[str, Transport] = {}
        #: Tasks running on each transport, so that one replaced by a changed host is closed after its last.
        self._transport_users: dict[Transport, int] = {}
        self._replaced_transports: set[Transport] = set()
        self._closing_transports: set[asyncio.Task[None]] = set()
        #: Per host name: the slots, and the configuration generation that sized them.
        self._host_slots: dict[str, tuple[Slots, int]] = {}
        self._global_slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._close_done = threading.Event()
        self._cancel_poller: asyncio.Task[None] | None = None
        #: Set in a child forked from this process: see :func:`_after_fork_in_child`.
        self._forked_from: int | None = None
        self._retention_of_store = retention == "store"
        self._retention = self.store.retention() if retention == "store" else retention
        self._endings_since_prune = 0
        self._pruning: asyncio.Future[None] | None = None
        self.store.sweep_orphans()
        if self._retention is not None:
            self.store.prune(self._retention)
        _OPEN_EXECUTORS.add(self)

    # -- public API: configuration -----------------------------------------------------

    @property
    def inventory(self) -> Inventory:
        """The hosts requests are planned with now."""
        return self._current()[0].inventory

    @property
    def policy(self) -> Policy | None:
        """The policy requests must pass now (None: no policy)."""
        return self._current()[0].policy

    def reconfigure(self, *, inventory: Inventory, policy: Policy | None) -> None:
        """Plan requests with ``inventory`` and ``policy`` from now on.

        Tasks already submitted keep what they were planned with: host entry, limits and
        the policy's decision. A host whose entry changed gets a new transport (for SSH, a
        new connection) for its next task, and the old one is closed after its last task;
        a changed ``max_concurrent`` applies from the host's next task on, to its queued
        tasks too. An executor that follows ``config_files`` keeps this until they change.
        """
        self._check_process()
        configuration = Configuration(inventory, policy)
        self._register_secrets(configuration)
        with self._reconfigure_lock:
            self._configuration = (configuration, self._configuration[1] + 1)

    def _current(self) -> tuple[Configuration, int]:
        """The configuration to plan with, and its generation; a changed file is taken first."""
        if self._config_files is not None:
            latest = self._config_files.refresh()
            if latest is not self._taken_from_files:
                with self._reconfigure_lock:
                    if latest is not self._taken_from_files:
                        self._register_secrets(latest)
                        self._taken_from_files = latest
                        self._configuration = (latest, self._configuration[1] + 1)
        return self._configuration

    def _register_secrets(self, configuration: Configuration) -> None:
        register_inventory_secrets(configuration.inventory, self.plugins.transports)

    # -- public API: planning ----------------------------------------------------------

    def plan(self, request: TaskRequest, *, describe: bool = True) -> Plan:
        """Resolve host, transport, limits, environment and the policy's decision; run nothing.

        ``describe=False`` skips asking the transport how the host would be reached.
        """
        self._check_process()
        configuration, _ = self._current()
        host = configuration.inventory.get(request.host)
        transport = self._transports.get(host.name)
        return plan_task(
            request, configuration.inventory, self.plugins.transports, describe=describe,
            transport=transport if transport is not None and transport.host == host else None,
            policy=configuration.policy,
        )

    # -- public API: running -----------------------------------------------------------

    def submit(self, request: TaskRequest, *, on_output: OutputListener | None = None) -> TaskHandle:
        """Queue a task and return at once.

        When this returns, the task is in the store, where other processes can look it
        up by the handle's id, and this executor's ``get``, ``list`` and ``cancel`` know
        it. Its hooks fire on the engine thread, ``created`` first.
        """
        live = self._enqueue(request, on_output)
        return TaskHandle(self, live.record.id, live.done)

    async def submit_async(self, request: TaskRequest, *, on_output: OutputListener | None = None) -> TaskHandle:
        """:meth:`submit` for asyncio callers. Recording the task is one append to a local
        file, so this does not leave the caller's loop, unless the command is long: the
        policy reads it first, a tenth of a second for 128 KiB."""
        if len(request.command) > _LONG_COMMAND:
            return await asyncio.to_thread(self.submit, request, on_output=on_output)
        return self.submit(request, on_output=on_output)

    def run(self, request: TaskRequest, *, on_output: OutputListener | None = None) -> Task:
        """Run a task to its end and return the final record (not from a hook: see :meth:`submit`)."""
        self._refuse_waiting_on_engine("run()")
        return self._enqueue(request, on_output).done.result()

    async def run_async(self, request: TaskRequest, *, on_output: OutputListener | None = None) -> Task:
        return await (await self.submit_async(request, on_output=on_output)).wait_async()

    def cancel(self, task_id: str, reason: str = "cancelled by user") -> bool:
        """Cancel a queued or running task; False if it has already ended.

        A task owned by another process is cancelled through the store: its owner picks
        the request up within a second. A plugin's hook may call this too.
        """
        self._check_process()
        loop = self._loop
        if loop is not None and not self._closed:
            if self._on_engine_thread():
                found = self._cancel_now(task_id, reason)  # from a hook: waiting on the engine would wait forever
            else:
                found = asyncio.run_coroutine_threadsafe(self._cancel_live(task_id, reason), loop).result()
            if found is not None:
                return found
        return self._cancel_through_store(task_id, reason)

    async def cancel_async(self, task_id: str, reason: str = "cancelled by user") -> bool:
        """:meth:`cancel` for asyncio callers: never blocks the caller's event loop."""
        self._check_process()
        loop = self._loop
        if loop is not None and not self._closed:
            pending = asyncio.run_coroutine_threadsafe(self._cancel_live(task_id, reason), loop)
            found = await asyncio.wrap_future(pending)
            if found is not None:
                return found
        return await asyncio.to_thread(self._cancel_through_store, task_id, reason)

    def _cancel_through_store(self, task_id: str, reason: str) -> bool:
        """A task this executor does not hold: its owner picks the request up from the store."""
        task = self.store.get(task_id)
        if task.status.is_terminal:
            return False
        self.store.request_cancel(task_id, reason)
        return True

    async def wait_async(self, task_id: str, *, poll_s: float = 0.1) -> Task:
        """Await the end of any task by id: this executor's own at once, another process's by polling the store."""
        self._check_process()
        live = self._live.get(task_id)
        if live is not None:
            return await asyncio.shield(asyncio.wrap_future(live.done))
        while True:
            task = await asyncio.to_thread(self.get, task_id)
            if task.status.is_terminal:
                return task
            await asyncio.sleep(poll_s)

    # -- public API: reading -----------------------------------------------------------

    def get(self, task_id: str) -> Task:
        self._check_process()
        live = self._live.get(task_id)
        if live is not None:
            return live.record
        return self.store.get(task_id)

    async def get_async(self, task_id: str) -> Task:
        """:meth:`get` without blocking the event loop: a task this executor runs is answered
        from memory, any other is read from the store on a worker thread."""
        self._check_process()
        live = self._live.get(task_id)
        if live is not None:
            return live.record
        return await asyncio.to_thread(self.store.get, task_id)

    async def list_async(
        self, *, status: Iterable[TaskStatus] | None = None, host: str | None = None, limit: int = 50,
        origin: str | None = None,
    ) -> list[Task]:
        """:meth:`list` on a worker thread: it first waits for this process's records to reach SQLite."""
        return await asyncio.to_thread(self.list, status=status, host=host, limit=limit, origin=origin)

    def list(
        self, *, status: Iterable[TaskStatus] | None = None, host: str | None = None, limit: int = 50,
        origin: str | None = None,
    ) -> list[Task]:
        """Tasks newest first (only those of ``host``, or of ``origin``, when given); this
        executor's own live tasks as they are now, not as last stored."""
        self._check_process()
        wanted = set(status) if status is not None else None
        fetch = wanted
        if wanted is not None and wanted & {TaskStatus.QUEUED, TaskStatus.RUNNING}:
            fetch = wanted | {TaskStatus.QUEUED, TaskStatus.RUNNING}  # the store may lag a live task's state
        live = {task_id: entry.record for task_id, entry in list(self._live.items())}
        stored = self.store.list(status=fetch, host=host, limit=limit + len(live), origin=origin)
        merged = [live.get(task.id, task) for task in stored]
        if wanted is not None:
            merged = [task for task in merged if task.status in wanted]
        return merged[:limit]

    def read_output(self, task_id: str, stream: str = "stdout", offset: int = 0, max_bytes: int = 65536) -> OutputSlice:
        self._check_process()
        return self.store.read_output(task_id, stream, offset, max_bytes)

    def tail_output(self, task_id: str, stream: str = "stdout", lines: int = 20, max_bytes: int = 65536) -> OutputSlice:
        self._check_process()
        return self.store.tail_output(task_id, stream, lines, max_bytes)

    def read_output_text(self, task_id: str, stream: str = "stdout", offset: int = 0, max_bytes: int = 65536) -> tuple[OutputSlice, str]:
        """:meth:`read_output` for a reader of text, piece by piece: whole characters and
        no secret (see :func:`~fleetrun.core.output.as_text`); go on from the slice's ``next_offset``."""
        return as_text(self.read_output(task_id, stream, offset, max_bytes), self._spool_reader(task_id, stream))

    def tail_output_text(self, task_id: str, stream: str = "stdout", lines: int = 20, max_bytes: int = 65536) -> tuple[OutputSlice, str]:
        """:meth:`tail_output` for a reader of text, as :meth:`read_output_text`."""
        piece = self.tail_output(task_id, stream, lines, max_bytes)
        return as_text(piece, self._spool_reader(task_id, stream), align_start=True)

    def _spool_reader(self, task_id: str, stream: str) -> Callable[[int, int], bytes]:
        path = spool_path(self.store.output_dir(task_id), stream)
        return lambda offset, size: read_range(path, offset, size)[0]

    # -- shutdown ----------------------------------------------------------------------

    def close(self, reason: str = "the executor was closed") -> None:
        """Cancel what has not ended, stop the engine thread, release connections.

        Returns once all that is done, also when another thread's close() is doing it.
        Called from a hook (on the engine thread, which cannot wait for itself), it starts
        all that and returns at once; it is done soon after the hook has returned.

        In a child forked from the executor's process it does nothing: the tasks, the
        engine thread and the connections are the parent's.
        """
        if self._forked_from is not None:
            return
        with self._start_lock:
            closing_already = self._closed
            self._closed = True
        from_engine = self._on_engine_thread()
        if closing_already:
            if not from_engine:
                self._close_done.wait()
            return
        if from_engine:
            threading.Thread(target=self._shut_down, args=(reason,), name="fleetrun-close", daemon=True).start()
            return
        self._shut_down(reason)

    def _check_process(self) -> None:
        if self._forked_from is not None:
            raise FleetrunError(
                f"this executor belongs to process {self._forked_from}, and process {os.getpid()} is a fork of it: "
                "its tasks, engine thread and connections stayed there. Make an Executor in this process "
                "(with multiprocessing: in the worker, or use the 'spawn' or 'forkserver' start method)"
            )

    def _on_engine_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _refuse_waiting_on_engine(self, what: str) -> None:
        self._check_process()  # a forked child's engine is the parent's: nothing would answer
        if self._on_engine_thread():
            raise FleetrunError(
                f"{what} was called from a hook, on the executor's engine thread, and would wait for that "
                "thread itself: use submit(), which returns at once"
            )

    def _shut_down(self, reason: str) -> None:
        """The work of :meth:`close`, on a thread other than the engine's."""
        try:
            loop, thread = self._loop, self._thread
            if loop is not None and thread is not None:
                asyncio.run_coroutine_threadsafe(self._shutdown(reason), loop).result()
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
            if self._owns_store:
                self.store.close()
            else:
                self.store.flush()  # False if the store refuses writes: the journal keeps them, and says so
        finally:
            _OPEN_EXECUTORS.discard(self)
            self._close_done.set()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engine ------------------------------------------------------------------------

    def _engine_loop(self) -> asyncio.AbstractEventLoop:
        """The engine's loop, started on first use; called with ``_start_lock`` held."""
        if self._closed:
            raise FleetrunError("this executor is closed")
        if self._loop is None:
            open_files.make_room_for(self.max_concurrent)
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                if self._retention is not None:
                    loop.call_later(self._retention.every_s, self._prune_on_timer)
                loop.run_forever()

            self._thread = threading.Thread(target=serve, name="fleetrun-engine", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def _enqueue(self, request: TaskRequest, listener: OutputListener | None) -> _LiveTask:
        """Validate and record a task in the caller's thread, then hand it to the engine.

        The caller does not wait for the engine: a round trip per task would cost more
        than the task's own bookkeeping when many are submitted at once.
        """
        self._check_process()
        live = self._prepare(request, listener)
        host, limits = live.plan.host.name, live.plan.limits
        # Under the lock, close() cannot come between: every recorded task is in
        # ``_arrivals`` before the engine's shutdown, which takes them and ends them.
        with self._start_lock:
            unfinished = self._unfinished.get(host, 0)
            waiting = unfinished - limits.max_concurrent
            if waiting >= limits.max_queued:
                raise HostBusyError(
                    f"host {host!r} already has {waiting} task{'s' if waiting > 1 else ''} waiting for a turn "
                    f"(its max_queued; {limits.max_concurrent} run{'s' if limits.max_concurrent == 1 else ''} at once): "
                    "wait for some to end or cancel some"
                )
            loop = self._engine_loop()
            try:
                self.store.insert(live.record, self.owner)
            except Exception as exc:
                reason = (exc.strerror if isinstance(exc, OSError) else None) or exc
                raise FleetrunError(f"cannot record the task in the store: {reason}") from exc
            self._unfinished[host] = unfinished + 1
            self._live[live.record.id] = live
            self._arrivals.append(live)
            # One wake-up serves every task that arrives before the engine gets to them:
            # waking another thread is dear, more so on a VM, where it costs an interrupt.
            wake = len(self._arrivals) == 1
        if wake:
            # Outside the lock: the engine, woken, takes the lock at once to collect the
            # arrivals, and would only have to wait for this thread to let go of it.
            try:
                loop.call_soon_threadsafe(self._admit_arrivals)
            except RuntimeError:  # the loop is closed
                if not self._closed:
                    raise
                # close() came in between: its shutdown took the task and ended it.
        return live

    def _prepare(self, request: TaskRequest, listener: OutputListener | None) -> _LiveTask:
        """Validate a request and build its task; nothing is recorded yet."""
        configuration, generation = self._current()
        plan = plan_task(request, configuration.inventory, self.plugins.transports, describe=False, policy=configuration.policy)
        if plan.decision is not None and not plan.decision.allowed:
            self.plugins.command_denied(plan.host.name, request.command, plan.decision, request.origin)
            raise PolicyDenied(plan.decision)
        pattern = self.progress_pattern
        if request.progress_pattern:
            try:
                pattern = compile_progress_pattern(request.progress_pattern)
            except ValueError as exc:
                raise FleetrunError(str(exc)) from None
        record = Task(
            id=secrets.token_hex(6),
            host=plan.host.name,
            transport=plan.transport,
            command=redact(plan.command),  # the record never holds a secret; the plan runs the real command
            status=TaskStatus.QUEUED,
            created_at=time.time(),
            max_seconds=plan.limits.max_seconds,
            max_output_bytes=plan.limits.max_output_bytes,
            owner_pid=os.getpid(),
            policy=plan.decision.summary if plan.decision is not None else None,
            origin=request.origin,
        )
        return _LiveTask(record, plan, pattern, listener, generation)

    def _admit_arrivals(self) -> None:
        with self._start_lock:
            arrivals, self._arrivals = self._arrivals, []
        for live in arrivals:
            try:
                self._admit(live)
            except Exception:  # taken together, one task's failure must not strand the others
                log.exception("admitting task %s failed", live.record.id)

    def _admit(self, live: _LiveTask) -> None:
        """On the engine loop: fire ``created``, start driving the task."""
        self.plugins.task_created(live.record)
        if live.ending is not None:
            # Cancelled (from the store or by shutdown) before the engine saw it: nothing ran.
            self._finish(live, live.ending, exit_code=None, error=None, category=None)
            return
        loop = asyncio.get_running_loop()
        live.runner = loop.create_task(self._drive(live), name=f"fleetrun-task-{live.record.id}")
        if self._cancel_poller is None:
            self._cancel_poller = loop.create_task(self._poll_cancel_requests())

    async def _drive(self, live: _LiveTask) -> None:
        host_slots = self._slots_of(live)
        if self._global_slots is None:
            self._global_slots = asyncio.Semaphore(self.max_concurrent)
        try:
            async with host_slots, self._global_slots:
                await self._execute(live)
        except asyncio.CancelledError:
            if live.ending is None:
                raise  # not ours: the engine is shutting down
            # Cancelled while queued: nothing ran.
            self._finish(live, live.ending, exit_code=None, error=None, category=None)
        except Exception:  # a bug in fleetrun or a transport must still end the task
            log.exception("task %s failed inside fleetrun", live.record.id)
            self._finish(live, TaskStatus.FAILED, exit_code=None, error="internal error in fleetrun (see the log)", category="internal")

    async def _execute(self, live: _LiveTask) -> None:
        loop = asyncio.get_running_loop()
        directory = self.store.output_dir(live.record.id)
        kept = live.plan.limits.max_output_bytes
        live.stdout = SpoolWriter(directory, "stdout", kept)
        live.stderr = SpoolWriter(directory, "stderr", kept)
        live.record = evolve(live.record, status=TaskStatus.RUNNING, started_at=time.time())
        live.started = loop.time()
        # What only a task still running a moment later needs waits for that moment: most
        # short tasks end with one store write, no progress tracker and no timeout timer.
        # The moment comes sooner for a heartbeat or a timeout that is due sooner.
        limit = live.plan.limits.max_seconds
        moment = min(_RUNNING_WRITE_DELAY, self.heartbeat_s, limit if limit is not None else _RUNNING_WRITE_DELAY)
        settle = loop.call_later(moment, self._settle, live)
        execution = Execution(
            task_id=live.record.id,
            command=live.plan.command,
            env=live.plan.env,
            cwd=live.plan.cwd,
            stdout=_Sink(live, "stdout", live.stdout, self._track),
            stderr=_Sink(live, "stderr", live.stderr, self._track),
            wait_inline_s=self._inline_wait(live),
            process_started=functools.partial(self._process_started, live),
        )
        status, exit_code, error, category = TaskStatus.FAILED, None, None, None
        transport: Transport | None = None
        try:
            transport = self._transport_for(live.plan.host)
            self._transport_users[transport] = self._transport_users.get(transport, 0) + 1
            exit_code = await transport.execute(execution)
            status = TaskStatus.SUCCEEDED if exit_code == 0 else TaskStatus.FAILED
            if live.ending is not None:
                # Stopped, but the transport returned instead of letting the cancellation
                # through: what it reports is not how the task ended.
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            if live.ending is None:
                raise
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                current.uncancel()
            status, exit_code = live.ending, None
            if status is TaskStatus.TIMED_OUT:
                error = f"timed out after {live.plan.limits.max_seconds:g} s"
        except TransportError as exc:
            error, category = exc.message, exc.category
        except Exception as exc:  # a bug in the transport: this task fails, the engine goes on
            log.exception("task %s: the %s transport failed", live.record.id, live.plan.transport)
            # The type only: the message of an unexpected error may hold anything.
            error = f"the {live.plan.transport} transport failed unexpectedly ({type(exc).__name__}; see the log)"
            category = "internal"
        finally:
            settle.cancel()
            if live.timeout is not None:
                live.timeout.cancel()
            if transport is not None:
                self._transport_users[transport] -= 1
                if not self._transport_users[transport] and transport in self._replaced_transports:
                    self._close_replaced(transport)
        self._finish(live, status, exit_code=exit_code, error=error, category=category)

    def _settle(self, live: _LiveTask) -> None:
        """A moment after the start: record the task as running, arm its heartbeat and timeout."""
        if live.finished:
            return
        live.settled = True
        self._persist(live)
        self._record_process(live)
        if live.tracker is None:
            self._track(live)
        limit = live.plan.limits.max_seconds
        if limit is not None:
            live.timeout = asyncio.get_running_loop().call_at(live.started + limit, self._expire, live)

    def _process_started(self, live: _LiveTask, pid: int) -> None:
        # Its start is taken now, while the process cannot have been reaped (and its pid
        # given to another). It is stored with the running record, as most tasks end
        # sooner; until then the start log (no store write) names it.
        live.process = (pid, boot_ticks())
        self.store.note_start(live.record.id, *live.process)
        if live.settled:
            self._record_process(live)

    def _record_process(self, live: _LiveTask) -> None:
        if live.process is not None and not live.finished:
            self.store.record_process(live.record, command_token(*live.process))

    def _track(self, live: _LiveTask) -> ProgressTracker:
        """The task's progress tracker, made at its first output or when it settles."""
        assert live.stdout is not None and live.stderr is not None
        live.tracker = ProgressTracker(
            loop=asyncio.get_running_loop(),
            stdout=live.stdout,
            stderr=live.stderr,
            emit=lambda progress: self._on_progress(live, progress),
            pattern=live.pattern,
            min_interval=self.progress_interval_s,
            heartbeat=self.heartbeat_s,
            started=live.started,
        )
        return live.tracker

    def _inline_wait(self, live: _LiveTask) -> float:
        if len(self._live) > 1:
            return 0.0  # others need the loop
        limit = live.plan.limits.max_seconds
        return _WAIT_INLINE_SECONDS if limit is None else min(_WAIT_INLINE_SECONDS, limit)

    def _slots_of(self, live: _LiveTask) -> Slots:
        """The host's slots, sized by the newest configuration that planned one of its tasks."""
        name, limit = live.plan.host.name, live.plan.limits.max_concurrent
        found = self._host_slots.get(name)
        if found is None:
            slots = Slots(limit)
            self._host_slots[name] = (slots, live.generation)
            return slots
        slots, generation = found
        if live.generation > generation:
            self._host_slots[name] = (slots, live.generation)
            if slots.limit != limit:
                slots.resize(limit)
        return slots

    def _transport_for(self, host: Host) -> Transport:
        transport = self._transports.get(host.name)
        if transport is not None and transport.host is not host and transport.host != host:
            # The host's entry changed: its next tasks go through a transport made for the new
            # one, and the old one is closed once the tasks that use it end. (A host's tasks
            # get here in the order they were planned, through its slots: an entry never
            # comes back after a newer one.)
            self._replaced_transports.add(transport)
            if not self._transport_users.get(transport):
                self._close_replaced(transport)
            transport = None
        if transport is None:
            transport = self._transports[host.name] = self.plugins.transports[host.transport](host)
        return transport

    def _close_replaced(self, transport: Transport) -> None:
        self._replaced_transports.discard(transport)
        self._transport_users.pop(transport, None)
        closing = asyncio.get_running_loop().create_task(_close(transport), name=f"fleetrun-close-{transport.host.name}")
        self._closing_transports.add(closing)
        closing.add_done_callback(self._closing_transports.discard)

    def _persist(self, live: _LiveTask) -> None:
        if not live.finished:
            live.last_store_write = time.monotonic()
            self.store.update(live.record)

    def _on_progress(self, live: _LiveTask, progress: Progress) -> None:
        if live.finished:
            return
        live.record = evolve(
            live.record, progress=progress, stdout_bytes=progress.stdout_bytes, stderr_bytes=progress.stderr_bytes
        )
        if time.monotonic() - live.last_store_write >= _STORE_PROGRESS_INTERVAL:
            self._persist(live)
        self.plugins.task_progress(live.record, progress)

    def _expire(self, live: _LiveTask) -> None:
        if live.ending is None and not live.finished and live.runner is not None:
            live.ending = TaskStatus.TIMED_OUT
            self._stop(live)

    def _stop(self, live: _LiveTask) -> None:
        """Cancel the task's runner (``live.ending`` says why), and end the task without it
        if its transport does not return in time."""
        assert live.runner is not None
        live.runner.cancel()
        asyncio.get_running_loop().call_later(_STOP_GRACE_SECONDS, self._abandon, live)

    def _abandon(self, live: _LiveTask) -> None:
        if live.finished or live.ending is None:
            return
        stuck = f"the {live.plan.transport} transport did not stop within {_STOP_GRACE_SECONDS:g} s"
        log.error("task %s: %s of being told to; the task ends without it", live.record.id, stuck)
        error = f"{stuck} (see the log)"
        if live.ending is TaskStatus.TIMED_OUT:
            error = f"timed out after {live.plan.limits.max_seconds:g} s; {error}"
        self._finish(live, live.ending, exit_code=None, error=error, category="internal")

    async def _cancel_live(self, task_id: str, reason: str) -> bool | None:
        return self._cancel_now(task_id, reason)

    def _cancel_now(self, task_id: str, reason: str) -> bool | None:
        """On the engine loop: True if cancelling, False if already ended here, None if not this executor's.

        A task the engine has not taken yet has no runner: :meth:`_admit` ends it instead.
        """
        live = self._live.get(task_id)
        if live is None:
            return None
        if live.finished or live.ending is not None:
            return False
        live.ending = TaskStatus.CANCELLED
        live.cancel_reason = reason
        if live.runner is not None:
            self._stop(live)
        return True

    async def _poll_cancel_requests(self) -> None:
        # Sleeps first, so that tasks which end at once share one poller instead of starting one each.
        while True:
            await asyncio.sleep(_CANCEL_POLL_SECONDS)
            if not self._live:
                break
            try:
                requests = await asyncio.to_thread(self.store.cancel_requests, self.owner)
            except RuntimeError:
                break  # the interpreter is exiting (no more worker threads); close() follows
            except Exception:
                log.exception("reading cancel requests failed")
                continue
            for task_id, reason in requests:
                self._cancel_now(task_id, reason)
        self._cancel_poller = None

    def _finish(
        self, live: _LiveTask, status: TaskStatus, *, exit_code: int | None, error: str | None, category: str | None
    ) -> None:
        if live.finished:
            return
        if live.tracker is not None:
            live.tracker.stop()  # may emit the last progress event; before `finished` is set
        live.finished = True
        # Both may quote what a user or server wrote (a path, a reason), which may not be text.
        error = encodable(redact(error)) if error is not None else None
        if live.cancel_reason is not None:
            live.cancel_reason = encodable(redact(live.cancel_reason))
        stdout, stderr = live.stdout, live.stderr
        for spool in (stdout, stderr):
            if spool is not None:
                spool.close()
        record = evolve(
            live.record,
            status=status,
            ended_at=time.time(),
            exit_code=exit_code,
            error=error,
            error_category=category,
            cancel_reason=live.cancel_reason if status is TaskStatus.CANCELLED else None,
            stdout_bytes=stdout.bytes_seen if stdout else 0,
            stderr_bytes=stderr.bytes_seen if stderr else 0,
            stdout_truncated=stdout.truncated if stdout else False,
            stderr_truncated=stderr.truncated if stderr else False,
        )
        if record.progress is not None and live.tracker is not None:
            record = evolve(record, progress=live.tracker.snapshot())
        live.record = record
        try:
            self.store.update(record)
        finally:
            del self._live[record.id]
            with self._start_lock:
                self._unfinished[record.host] -= 1
            if status is TaskStatus.CANCELLED:
                self.plugins.task_cancelled(record, live.cancel_reason or "cancelled")
            else:
                duration = (record.ended_at or 0) - (record.started_at or record.ended_at or 0)
                self.plugins.task_completed(
                    record,
                    TaskResult(status=status, exit_code=exit_code, duration_s=round(duration, 6), error=error, error_category=category),
                )
            live.done.set_result(record)
            self._endings_since_prune += 1
            self._prune_if_due()

    # -- retention -------------------------------------------------------------------

    def _prune_on_timer(self) -> None:
        assert self._retention is not None
        self._prune_soon()
        asyncio.get_running_loop().call_later(self._retention.every_s, self._prune_on_timer)

    def _prune_if_due(self, _: object = None) -> None:
        """Prune once enough tasks have ended; also when a prune finishes (tasks that
        ended while it ran count towards the next)."""
        if self._retention is not None and self._endings_since_prune >= self._retention.endings_between_prunes:
            self._prune_soon()

    def _prune_soon(self) -> None:
        """Apply the retention on a worker thread (it deletes files), one prune at a time."""
        if self._closed or (self._pruning is not None and not self._pruning.done()):
            return
        self._endings_since_prune = 0
        self._pruning = asyncio.get_running_loop().run_in_executor(None, self._prune)
        self._pruning.add_done_callback(self._prune_if_due)

    def _prune(self) -> None:
        assert self._retention is not None
        try:
            if self._retention_of_store:  # changed by another process meanwhile, perhaps
                self._retention = self.store.retention()
            removed = self.store.prune(self._retention)
        except Exception:  # the next prune tries again; the tasks are unharmed
            log.exception("applying the task retention to the store failed")
            return
        if removed:
            log.info("removed %d ended tasks past the retention (%s)", removed, self._retention)

    async def _shutdown(self, reason: str) -> None:
        runners = []
        for live in list(self._live.values()):
            self._cancel_now(live.record.id, reason)
            # Also those being stopped already (a cancel or a timeout before close()): the
            # engine must run until they have ended.
            if not live.finished and live.runner is not None:
                runners.append(live.runner)
        # Tasks recorded before close() whose wake-up has not come yet: cancelled above,
        # they end as they are taken, with nothing run.
        self._admit_arrivals()
        if runners:
            # A runner whose transport does not stop has its task ended by _abandon meanwhile.
            await asyncio.wait(runners, timeout=_STOP_GRACE_SECONDS + 0.5)
        if self._cancel_poller is not None:
            self._cancel_poller.cancel()
        if self._pruning is not None:
            await self._pruning  # it uses the store, which close() closes next
        for transport in [*self._transports.values(), *self._replaced_transports]:
            await _close(transport)
        if self._closing_transports:
            await asyncio.wait(self._closing_transports)


async def _close(transport: Transport) -> None:
    try:
        await transport.aclose()
    except Exception:  # the others still get closed
        log.exception("closing transport of host %r failed", transport.host.name)


def _check_command(command: str) -> None:
    if not isinstance(command, str) or not command.strip():
        raise FleetrunError("the command is empty")
    if len(command) > MAX_COMMAND_LENGTH:
        raise FleetrunError(f"the command is {len(command)} characters long; the limit is {MAX_COMMAND_LENGTH}")
    problem = text_problem(command, "the command")
    if problem is not None:
        raise FleetrunError(f"{problem}; fleetrun runs and records commands as UTF-8 text")
    bad = _CONTROL_CHARACTER.search(command)
    if bad is not None:
        raise FleetrunError(
            f"the command contains the control character U+{ord(bad.group()):04X} at position {bad.start()}: "
            "only tabs and newlines are accepted (terminal escapes, NUL and bidirectional overrides are refused)"
        )


#: What an origin may be: a name shown in tables and kept in audit logs.
_ORIGIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def _check_options(request: TaskRequest) -> None:
    """A request made in Python can hold any type: a wrong one is an error here, not deep in a transport."""
    for name, value, kinds, unit in (
        ("timeout_s", request.timeout_s, (int, float), "a number of seconds"),
        ("max_output_bytes", request.max_output_bytes, (int,), "a whole number of bytes"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise FleetrunError(f"{name} must be {unit}, got {value!r}")
        if not value > 0:
            raise FleetrunError(f"{name} must be greater than 0, got {value}")
    # The values are never shown: an environment is where secrets are passed.
    if not isinstance(request.env, Mapping):
        raise FleetrunError(f"env must map variable names to strings, got a {type(request.env).__name__}")
    for name, value in request.env.items():
        if not isinstance(name, str):
            raise FleetrunError(f"env must map variable names to strings, got the name {_shown(name)}")
        if not isinstance(value, str):
            raise FleetrunError(f"env[{name!r}] must be a string, got a {type(value).__name__}")
    for name, value in (("cwd", request.cwd), ("progress_pattern", request.progress_pattern)):
        if value is not None and not isinstance(value, str):
            raise FleetrunError(f"{name} must be a string, got {_shown(value)}")
    problem = argument_problem(request.cwd, "the working directory") if request.cwd else None
    if problem is not None:
        raise FleetrunError(problem)
    if request.origin is not None and not (isinstance(request.origin, str) and _ORIGIN_RE.fullmatch(request.origin)):
        raise FleetrunError(f"origin must be a short name (letters, digits, '.', '_', '-'; at most 32), got {_shown(request.origin)}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


#: What a command may not contain: the control characters other than tab and newline.
_CONTROL_CHARACTER = re.compile(f"(?![\t\n])[{CONTROL_CHARACTERS}]")


def _check_host_name(name: str) -> None:
    if not isinstance(name, str) or not HOST_NAME_RE.fullmatch(name):
        shown = _shown(name)
        raise FleetrunError(
            f"invalid host name {shown}: names are ASCII letters, digits, '.', '_' and '-', at most 63 characters"
        )


_OPEN_EXECUTORS: "weakref.WeakSet[Executor]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child has none of the engine threads; the tasks and connections are the parent's.
    # Closing an executor here would wait forever for its thread (at exit too), and
    # cancelling its tasks would stop the parent's commands.
    parent = os.getppid()
    for executor in list(_OPEN_EXECUTORS):
        executor._forked_from = parent
    _OPEN_EXECUTORS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_open_executors() -> None:
    # Executors left open at exit still own running commands: stop them, keep records true.
    for executor in list(_OPEN_EXECUTORS):
        try:
            executor.close("the fleetrun process exited")
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
