"""The ``fleetrun`` command line: parse, call the core, render.

Exit codes of ``fleetrun run``: the command's own exit status; 124 when it timed out;
125 when fleetrun itself failed (a usage error, bad hosts file, unknown host, the command
could not be started); 130 when it was cancelled (Ctrl-C, SIGTERM, SIGHUP or ``fleetrun tasks cancel``);
141 when the reader of its output went away (``| head``) and the command was stopped.
Other subcommands exit 0 on success, 1 on an error and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fleetrun import __version__
from fleetrun.core import paths
from fleetrun.core.errors import FleetrunError, PolicyDenied
from fleetrun.core.events import CANCELLED, COMPLETED, PROGRESS, LifecycleEvent, LifecycleEventPlugin
from fleetrun.core.models import ORIGIN_CLI, Progress, Task, TaskRequest, TaskStatus
from fleetrun.core.output import check_offset
from fleetrun.core.secrets import install_log_redaction, redact
from fleetrun.core.text import printable

if TYPE_CHECKING:
    from fleetrun.core.plugin_manager import PluginManager

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_FLEETRUN_ERROR = 125
EXIT_DENIED = 126
EXIT_CANCELLED = 130
#: 128 + SIGPIPE: what a command in a shell pipeline exits with when its reader goes away.
EXIT_OUTPUT_CLOSED = 141

log = logging.getLogger("fleetrun.cli")

EPILOG_RUN = """\
The words after -- are joined with spaces and run by the host's shell, as ssh does:
quote the whole command to keep it one string, e.g. fleetrun run local -- 'ls | wc -l'.
Commands run unattended: their stdin is at end of file (as with ssh -n), and what is piped
into fleetrun is not passed on.

Several hosts (a fan-out): name them with commas (fleetrun run web1,web2 -- uptime) or
pick them by tag (fleetrun run --tag web -- uptime). Each host gets its own task; output
lines are prefixed with the host, and a summary table follows on stderr.

exit status, one host:
  the command's own exit status (128+N when signal N killed it)
  124  the command timed out (--timeout or the host's max_seconds)
  125  fleetrun failed: a usage error, bad hosts file, unknown host, the command could
       not start or the host could not be reached
  126  the policy denied the command (the message names the rule); nothing ran
  130  the task was cancelled (Ctrl-C, SIGTERM, SIGHUP, or `fleetrun tasks cancel`)
  141  the reader of fleetrun's output went away (| head): the command was stopped
exit status, several hosts:
  0    every host's task succeeded
  1    at least one failed, timed out, was cancelled or was not started
  125  fleetrun failed before starting anything (a usage error, bad hosts file,
       unknown host)
  126  the policy denied the command on at least one host; nothing ran
  130  the batch was cancelled (Ctrl-C, SIGTERM or SIGHUP)
  141  the reader of fleetrun's output went away: every task was stopped

policy: with --policy, $FLEETRUN_POLICY or ~/.config/fleetrun/policy.yaml, every command
must pass the policy; without any, the CLI runs what it is given.
"""


# -- small renderers -------------------------------------------------------------------


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped: they carry plugins' and servers' text too."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    cells = [[printable(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _task_dict(task: Task) -> dict[str, Any]:
    data = asdict(task)
    data["status"] = task.status.value
    data["duration_s"] = task.duration_s
    return data


class _Console:
    """fleetrun's stdout and stderr while commands run, written from the engine thread only.

    When the reader of either goes away (``fleetrun run ... | head``), nothing more is
    written anywhere and the main thread, which looks at :attr:`closed` while it waits,
    stops the run, as SIGPIPE stops a command in a shell pipeline. Without this, the
    command would run on with its output going nowhere, and every write would log a
    traceback.
    """

    def __init__(self) -> None:
        self.closed: str | None = None  # "stdout" or "stderr", once its reader has gone
        self.unwritable: set[str] = set()

    def write(self, stream: str, data: bytes) -> None:
        if self.closed is not None or stream in self.unwritable:
            return
        target = sys.stdout if stream == "stdout" else sys.stderr
        try:
            target.buffer.write(data)
            target.buffer.flush()
        except BrokenPipeError:
            # What is still buffered, and the interpreter's flush at exit, go nowhere instead of failing again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, target.fileno())
            os.close(devnull)
            self.closed = stream
        except OSError:
            # Not a reader that went away: a descriptor closed before fleetrun started
            # (`2>&-`). The output goes nowhere, as it would in the shell; the command runs on.
            self.unwritable.add(stream)

    def text(self, stream: str) -> _ConsoleText:
        """A text stream onto ``stream`` for a notifier."""
        return _ConsoleText(self, stream)


class _ConsoleText:
    def __init__(self, console: _Console, stream: str) -> None:
        self.console = console
        self.stream = stream

    def write(self, text: str) -> int:
        self.console.write(self.stream, text.encode("utf-8"))
        return len(text)

    def flush(self) -> None:
        pass  # every write is flushed


class _Terminal(LifecycleEventPlugin):
    """Live output and a progress line for ``fleetrun run`` (engine thread only).

    With ``--json`` the command's output is not shown: stdout carries the events alone.
    """

    def __init__(self, console: _Console, *, show_progress: bool, show_output: bool) -> None:
        self.console = console
        self.show_progress = show_progress
        self.show_output = show_output
        self.line_shown = False

    def clear_line(self) -> None:
        if self.line_shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.line_shown = False

    def on_output(self, stream: str, data: bytes) -> None:
        if not self.show_output:
            return
        self.clear_line()
        self.console.write(stream, data)

    def on_event(self, event: LifecycleEvent) -> None:
        if event.event in (COMPLETED, CANCELLED):
            self.clear_line()
        elif event.event == PROGRESS and self.show_progress and event.progress is not None:
            self.show(event.task, event.progress)

    def show(self, task: Task, progress: Progress) -> None:
        parts = [f"[fleetrun] {task.host}", f"{progress.elapsed_s:.1f}s"]
        if progress.percent is not None:
            parts.append(f"{progress.percent:.0f}%")
        parts.append(f"out {_human_bytes(progress.stdout_bytes)}/{progress.stdout_lines} lines")
        if progress.stderr_bytes:
            parts.append(f"err {_human_bytes(progress.stderr_bytes)}")
        line = " · ".join(parts)
        try:
            # A terminal whose size was never set says 0 columns (`script`, `docker exec -t`).
            width = os.get_terminal_size(sys.stderr.fileno()).columns or 80
        except OSError:
            width = 80
        # One row only: a line that wraps would leave its first rows behind when cleared.
        sys.stderr.write("\r\x1b[K" + line[: max(width - 1, 1)])
        sys.stderr.flush()
        self.line_shown = True


# -- context ---------------------------------------------------------------------------


class _Context:
    """What subcommands share: plugins, inventory and store, each built on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._plugins = None
        self._inventory = None
        self._store = None

    @property
    def plugins(self):  # type: ignore[no-untyped-def]
        if self._plugins is None:
            from fleetrun.core.plugin_manager import PluginManager

            self._plugins = PluginManager()
        return self._plugins

    @property
    def inventory(self):  # type: ignore[no-untyped-def]
        if self._inventory is None:
            from fleetrun.core.executor import register_inventory_secrets
            from fleetrun.core.inventory import load_inventory

            self._inventory = load_inventory(self.args.hosts, self.plugins.transports)
            register_inventory_secrets(self._inventory, self.plugins.transports)  # before anything is shown
        return self._inventory

    @property
    def store(self):  # type: ignore[no-untyped-def]
        if self._store is None:
            from fleetrun.core.store import TaskStore

            self._store = TaskStore()
        return self._store

    @functools.cached_property
    def policy(self):  # type: ignore[no-untyped-def]
        """The configured policy, or None (a valid answer): the CLI applies one only when it is given."""
        from fleetrun.core.policy import load_policy

        return load_policy(self.args.policy)

    @functools.cached_property
    def task_id(self) -> str:
        """The task the command names: its ID argument, or the one id in the store that starts so."""
        return self.store.complete_id(self.args.task_id)

    def register_json_log(self, plugins: PluginManager) -> None:
        """Register the JSON log of --json-log or $FLEETRUN_JSON_LOG, if one is asked for."""
        from fleetrun.plugins.notifiers import jsonlog

        target = self.args.json_log or os.environ.get(jsonlog.ENV)
        if not target:
            return
        path = target if target == "-" else paths.expand_home(target, given_by="cannot open the JSON log")
        try:
            plugins.register(jsonlog.JsonLogNotifier(path), name="fleetrun.notifiers.jsonlog")
        except OSError as exc:
            raise FleetrunError(f"cannot open the JSON log {path}: {exc.strerror}") from None


# -- commands --------------------------------------------------------------------------


def _request(args: argparse.Namespace) -> TaskRequest:
    words = list(args.command)
    if not words:
        raise FleetrunError("no command given: write it after --, e.g. fleetrun run local -- uname -a")
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetrunError(f"--env takes NAME=VALUE, got {item!r}")
        env[key] = value
    return TaskRequest(
        host=args.host or "",
        command=" ".join(words),
        timeout_s=args.timeout,
        max_output_bytes=args.max_output_bytes,
        env=env,
        cwd=args.cwd,
        progress_pattern=args.progress_pattern,
        origin=ORIGIN_CLI,
    )


def cmd_run(ctx: _Context) -> int:
    from fleetrun.core.executor import Executor
    from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier

    args = ctx.args
    request = _request(args)
    hosts = _selected_hosts(ctx)
    if args.dry_run:
        return _dry_run(ctx, request, hosts)
    if _input_is_waiting():
        _note("note: fleetrun does not pass its input on: the command's stdin is at end of file (as with ssh -n)")
    batch = len(hosts) > 1 or args.tag is not None
    console = _Console()
    terminal = _Terminal(
        console, show_progress=sys.stderr.isatty() and not (args.quiet or args.json or batch), show_output=not args.json
    )
    plugins = ctx.plugins
    plugins.register(terminal, name="fleetrun.cli.terminal")
    if args.json:
        plugins.register(JsonLogNotifier(console.text("stdout")), name="fleetrun.cli.json")
    ctx.register_json_log(plugins)
    executor = Executor(inventory=ctx.inventory, store=ctx.store, plugins=plugins, policy=ctx.policy)
    if batch:
        return _run_batch(executor, args, request, hosts, console)
    request = replace(request, host=hosts[0])
    try:
        with _StopRequests() as stops:
            handle = executor.submit(request, on_output=terminal.on_output)
            task = _wait_interruptibly(handle, console, stops)
    finally:
        executor.close()
    if console.closed is not None and task.status is TaskStatus.CANCELLED:
        return EXIT_OUTPUT_CLOSED  # quietly, as a command in a pipeline whose reader went away
    return _run_exit_code(task)


def _input_is_waiting() -> bool:
    """Whether data was piped or redirected into fleetrun, which no command will read."""
    import select
    import stat

    try:
        descriptor = sys.stdin.fileno()
        status = os.fstat(descriptor)
        if stat.S_ISREG(status.st_mode):
            return status.st_size > os.lseek(descriptor, 0, os.SEEK_CUR)
        if stat.S_ISFIFO(status.st_mode):
            # Reading cannot block once select says so, and the byte is not wanted anyway.
            return bool(select.select([descriptor], [], [], 0)[0]) and os.read(descriptor, 1) != b""
    except (AttributeError, OSError, ValueError):
        pass  # no stdin at all (closed, or replaced by something without a descriptor)
    return False


def _selected_hosts(ctx: _Context) -> tuple[str, ...]:
    from fleetrun.core.batch import select_hosts

    args = ctx.args
    if args.host is None and args.tag is None:
        raise FleetrunError("name a host (or several: web1,web2) or give --tag; `fleetrun hosts` lists them")
    return select_hosts(ctx.inventory, [args.host] if args.host else [], args.tag)


async def _batch_until_stopped(executor, batch, on_output, console: _Console, stops: _StopRequests):  # type: ignore[no-untyped-def]
    """The batch's outcome; None if it was stopped by a signal or because a reader of
    fleetrun's output went away."""
    import asyncio

    from fleetrun.core.batch import run_batch_async

    work = asyncio.ensure_future(run_batch_async(executor, batch, on_output=on_output))
    while not work.done():
        await asyncio.wait([work], timeout=0.1)
        if stops.why_stop(console) is not None and not work.done():
            work.cancel()  # cancels its tasks and waits until their processes are stopped
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return None
    return work.result()


class _PrefixedOutput:
    """Fan-out output: whole lines, each prefixed with its host (engine thread only)."""

    def __init__(self, hosts: Sequence[str], console: _Console) -> None:
        self.console = console
        self.width = max(len(h) for h in hosts)
        self.partial: dict[tuple[str, str], bytes] = {}

    def write(self, host: str, stream: str, data: bytes) -> None:
        lines = (self.partial.pop((host, stream), b"") + data).split(b"\n")
        if lines[-1]:
            self.partial[(host, stream)] = lines[-1]
        self._emit(host, stream, lines[:-1])

    def flush(self) -> None:
        for (host, stream), rest in list(self.partial.items()):
            self._emit(host, stream, [rest])
        self.partial.clear()

    def _emit(self, host: str, stream: str, lines: list[bytes]) -> None:
        if not lines:
            return
        prefix = f"{host.ljust(self.width)} | ".encode()
        self.console.write(stream, b"".join(prefix + line + b"\n" for line in lines))


def _run_batch(executor, args: argparse.Namespace, request: TaskRequest, hosts: tuple[str, ...], console: _Console) -> int:  # type: ignore[no-untyped-def]
    import asyncio

    from fleetrun.core.batch import BatchRequest

    show_output = not args.json
    batch = BatchRequest(
        hosts=hosts, command=request.command, timeout_s=request.timeout_s,
        max_output_bytes=request.max_output_bytes, env=request.env, cwd=request.cwd,
        max_parallel=args.max_parallel, stop_on_failure=args.stop_on_failure, origin=request.origin,
    )
    output = _PrefixedOutput(hosts, console)
    stops = _StopRequests()
    try:
        with stops:
            outcome = asyncio.run(_batch_until_stopped(executor, batch, output.write if show_output else None, console, stops))
    except KeyboardInterrupt:  # a second signal: no more waiting for the cancel
        outcome = None
    finally:
        executor.close()
    if outcome is None:
        if stops.reason is None:
            return EXIT_OUTPUT_CLOSED
        output.flush()
        _note("the batch was cancelled; its running tasks were stopped")
        return EXIT_CANCELLED
    output.flush()
    rows = []
    for task in outcome.tasks:
        rows.append([
            task.host, task.status.value, "-" if task.exit_code is None else str(task.exit_code),
            "-" if task.duration_s is None else f"{task.duration_s:.2f}s", task.id, task.error or "",
        ])
    rows += [[host, "not started", "-", "-", "-", outcome.why_not_started[host]] for host in outcome.not_started]
    sys.stderr.write("\n" + redact(_table(rows, ["HOST", "STATUS", "EXIT", "DURATION", "TASK", "ERROR"])) + "\n")
    good = sum(1 for t in outcome.tasks if t.status is TaskStatus.SUCCEEDED)
    _note(f"{good} of {len(hosts)} hosts succeeded")
    return EXIT_OK if outcome.succeeded else EXIT_ERROR


class _StopRequests:
    """Ctrl-C, SIGTERM and SIGHUP while tasks run: each asks for them to be cancelled.

    SIGHUP is the terminal closing: commands run in sessions of their own, so it reaches
    only fleetrun, which would die and leave them running. The handler only notes the
    request, and the waiting loop acts on it: raised at whatever line the main thread was
    on, KeyboardInterrupt could land inside an import or a lock and leave it held, and the
    engine thread then waited for it forever. A second signal raises KeyboardInterrupt at
    once, for a user who will not wait for the cancel.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        self._previous = {sig: signal.signal(sig, self._note) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def why_stop(self, console: _Console) -> str | None:
        """Why the tasks should be stopped now: a signal, or a reader of the output gone; None to go on."""
        if self.reason is None and console.closed is not None:
            return f"the reader of fleetrun's {console.closed} went away (broken pipe)"
        return self.reason

    def _note(self, signum: int, frame: object) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupted by the user" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _wait_interruptibly(handle, console: _Console, stops: _StopRequests) -> Task:  # type: ignore[no-untyped-def]
    cancelled = False
    while True:
        if not cancelled:
            reason = stops.why_stop(console)
            if reason is not None:
                cancelled = True
                handle.cancel(reason)
        try:
            return handle.wait(timeout=None if cancelled else 0.1)
        except TimeoutError:
            continue


def _run_exit_code(task: Task) -> int:
    if task.status is TaskStatus.SUCCEEDED:
        return EXIT_OK
    if task.status is TaskStatus.TIMED_OUT:
        _note(f"task {task.id} timed out after {task.max_seconds:g} s; its processes were stopped")
        return EXIT_TIMEOUT
    if task.status is TaskStatus.CANCELLED:
        _note(f"task {task.id} was cancelled: {task.cancel_reason}")
        return EXIT_CANCELLED
    if task.exit_code is None:
        _note(f"task {task.id} failed: {task.error or 'no exit status'}")
        return EXIT_FLEETRUN_ERROR
    return task.exit_code & 0xFF


def _note(message: str) -> None:
    try:
        sys.stderr.write(f"fleetrun: {printable(redact(message), keep_newlines=True)}\n")
    except OSError:
        pass  # stderr was closed (`2>&-`): the exit status still says what happened


def _dry_run(ctx: _Context, request: TaskRequest, hosts: Sequence[str]) -> int:
    from fleetrun.core.executor import plan_task

    plans = [
        plan_task(replace(request, host=host), ctx.inventory, ctx.plugins.transports, policy=ctx.policy) for host in hosts
    ]
    if ctx.args.json:
        infos = [
            {
                "host": plan.host.name,
                "transport": plan.transport,
                "transport_details": dict(plan.transport_details),
                "command": redact(plan.command),
                "limits": asdict(plan.limits),
                "env": sorted(plan.env),
                "cwd": plan.cwd,
                "policy": plan.decision.to_dict() if plan.decision else None,
                "inventory": ctx.inventory.source,
                "ran": False,
            }
            for plan in plans
        ]
        print(redact(json.dumps(infos[0] if len(infos) == 1 and ctx.args.tag is None else infos, indent=2)))
        return _dry_run_status(plans)
    for index, plan in enumerate(plans):
        if index:
            print()
        details = "; ".join(f"{k}: {_in_words(v)}" for k, v in plan.transport_details.items() if v is not None)
        limits = plan.limits
        rows = [
            ("host", plan.host.name),
            ("transport", plan.transport + (f" ({details})" if details else "")),
            ("command", redact(plan.command)),
            (
                "limits",
                f"max_seconds={'none' if limits.max_seconds is None else f'{limits.max_seconds:g}'} "
                f"max_output_bytes={limits.max_output_bytes} max_concurrent={limits.max_concurrent} "
                f"max_queued={limits.max_queued}",
            ),
            ("environment", ", ".join(sorted(plan.env)) or "(nothing added)"),
            ("cwd", plan.cwd or "(inherited)"),
            ("policy", plan.decision.explanation if plan.decision else "none configured: the CLI runs any command when no policy is set"),
            ("inventory", ctx.inventory.source),
            ("dry run", "nothing was run"),
        ]
        width = max(len(k) for k, _ in rows) + 1
        for key, value in rows:
            print(f"{(key + ':').ljust(width)} {value}")
    return _dry_run_status(plans)


def _in_words(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _dry_run_status(plans) -> int:  # type: ignore[no-untyped-def]
    # A dry run answers "would this run?": a denial is a non-zero answer, as for a real run.
    return EXIT_DENIED if any(p.decision is not None and not p.decision.allowed for p in plans) else EXIT_OK


def _configured_or_builtin_policy(ctx: _Context):  # type: ignore[no-untyped-def]
    """The configured policy, or the built-in one when ``--builtin`` asks for it."""
    from fleetrun.core.policy import read_only_policy

    policy = ctx.policy
    if policy is None:
        if not ctx.args.builtin:
            raise FleetrunError(
                "no policy configured (none given with --policy, $FLEETRUN_POLICY or ~/.config/fleetrun/policy.yaml); "
                "add --builtin for the built-in read-only policy the MCP server uses"
            )
        policy = read_only_policy()
    return policy


def cmd_policy_show(ctx: _Context) -> int:
    policy = _configured_or_builtin_policy(ctx)
    if ctx.args.json:
        print(json.dumps(
            {"policy": policy.source, "rules": [rule.to_dict() for rule in policy.rules], "default": "deny",
             "warnings": policy.warnings},
            indent=2,
        ))
        return EXIT_OK
    print(f"policy: {policy.source}")
    for rule in policy.rules:
        line = f", line {rule.line}" if rule.line is not None else ""
        print(f"  rule {rule.index}{line}: {rule.text}")
    print("  default: deny (a command no rule matches)")
    for warning in policy.warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def cmd_policy_check(ctx: _Context) -> int:
    args = ctx.args
    if not args.command:
        raise FleetrunError("no command given: write it after --, e.g. fleetrun policy check web1 -- systemctl status nginx")
    from fleetrun.core.executor import plan_task

    policy = _configured_or_builtin_policy(ctx)
    # Planned as `run` plans it, so that the two always agree (the host's shell included).
    request = TaskRequest(host=args.host, command=" ".join(args.command))
    decision = plan_task(request, ctx.inventory, ctx.plugins.transports, describe=False, policy=policy).decision
    assert decision is not None
    if args.json:
        print(redact(json.dumps(decision.to_dict(), indent=2)))
    else:
        print(printable(redact(decision.explanation)))
        if len(decision.verdicts) > 1:
            for verdict in decision.verdicts:
                rule = verdict.rule.describe() if verdict.rule else "no rule (default: deny)"
                print(printable(redact(f"  {'allow' if verdict.allowed else 'DENY '}  {verdict.command}  <- {rule}")))
    # A rule that allowed the command but lets any command through is worth a second look.
    from fleetrun.core.policy_warnings import rule_warning

    deciding = dict.fromkeys(v.rule for v in decision.verdicts if v.allowed and v.rule is not None)
    for warning in filter(None, map(rule_warning, deciding)):
        print(f"fleetrun: warning: {warning}", file=sys.stderr)
    return EXIT_OK if decision.allowed else EXIT_DENIED


def cmd_hosts(ctx: _Context) -> int:
    from fleetrun.core.transport import details_of

    inventory = ctx.inventory
    hosts = sorted(inventory.hosts.values(), key=lambda h: h.name)
    # How each host is reached, as its transport resolves it (ssh_config included); never a secret.
    details = {h.name: details_of(ctx.plugins.transports[h.transport](h)) for h in hosts}
    if ctx.args.json:
        print(json.dumps(
            {
                "source": inventory.source,
                "hosts": [
                    {"name": h.name, "transport": h.transport, "tags": list(h.tags), "description": h.description,
                     "limits": asdict(h.limits), "details": details[h.name]}
                    for h in hosts
                ],
            },
            indent=2,
        ))
        return EXIT_OK
    rows = [
        [h.name, h.transport, str(details[h.name].get("address") or details[h.name].get("error") or "-"),
         ",".join(h.tags) or "-", "none" if h.limits.max_seconds is None else f"{h.limits.max_seconds:g}",
         _human_bytes(h.limits.max_output_bytes), str(h.limits.max_concurrent), h.description or ""]
        for h in hosts
    ]
    print(_table(rows, ["HOST", "TRANSPORT", "ADDRESS", "TAGS", "MAX_SECONDS", "MAX_OUTPUT", "MAX_CONCURRENT", "DESCRIPTION"]))
    print(f"\ninventory: {inventory.source}")
    return EXIT_OK


def cmd_tasks_list(ctx: _Context) -> int:
    store = ctx.store
    store.sweep_orphans()
    statuses = [TaskStatus(s) for s in ctx.args.status] if ctx.args.status else None
    tasks = store.list(status=statuses, host=ctx.args.host, limit=ctx.args.limit, origin=ctx.args.origin)
    if ctx.args.json:
        print(json.dumps([_task_dict(t) for t in tasks], indent=2))
        return EXIT_OK
    if not tasks:
        print(f"no tasks (store: {store.home})")
        return EXIT_OK
    rows = []
    for t in tasks:
        duration = t.duration_s
        command = " ".join(t.command.split())  # one line: `tasks show` has it as it is
        if len(command) > 50:
            command = command[:47] + "..."
        rows.append([
            t.id, t.status.value, "-" if t.exit_code is None else str(t.exit_code), t.host, t.origin or "-",
            _when(t.created_at), "-" if duration is None else f"{duration:.2f}s", command,
        ])
    print(_table(rows, ["ID", "STATUS", "EXIT", "HOST", "ORIGIN", "CREATED", "DURATION", "COMMAND"]))
    return EXIT_OK


def cmd_tasks_show(ctx: _Context) -> int:
    store = ctx.store
    store.sweep_orphans()
    task = store.get(ctx.task_id)
    data = _task_dict(task)
    if ctx.args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    progress = data.pop("progress")
    for key in ("created_at", "started_at", "ended_at"):
        data[key] = _when(data[key])
    if data["duration_s"] is not None:
        data["duration_s"] = f"{data['duration_s']:.3f}"
    width = max(len(k) for k in data) + 1
    for key, value in data.items():
        print(f"{(key + ':').ljust(width)} {'-' if value is None else printable(value)}")
    if progress:
        print(f"{'progress:'.ljust(width)} " + ", ".join(f"{k}={printable(v)}" for k, v in progress.items() if v is not None))
    return EXIT_OK


#: How many tasks ``tasks list`` shows unless told.
_LIST_LIMIT = 50
#: How much ``tasks output`` reads at a time, whatever the stream's size.
_OUTPUT_PIECE = 1 << 20
_TAIL_MAX_BYTES = 16 << 20


def cmd_tasks_output(ctx: _Context) -> int:
    args = ctx.args
    store = ctx.store
    task_id = ctx.task_id
    out = sys.stdout.buffer
    left = args.max_bytes  # None: the whole stream
    if args.tail is not None:
        piece = store.tail_output(task_id, args.stream, lines=args.tail, max_bytes=left or _TAIL_MAX_BYTES)
        out.write(piece.data)
        offset = piece.next_offset
        left = None  # the cap was the tail's; what --follow prints after it is not capped
    else:
        offset = args.offset
        piece = store.read_output(task_id, args.stream, offset=offset, max_bytes=0)
        if piece.complete or not args.follow:  # following a running task: its output may yet get there
            check_offset(task_id, piece)
    # Read in pieces, so that a stream of any size is copied in bounded memory.
    while left is None or left > 0:
        want = _OUTPUT_PIECE if left is None else min(_OUTPUT_PIECE, left)
        piece = store.read_output(task_id, args.stream, offset=offset, max_bytes=want)
        if piece.data:
            out.write(piece.data)
            offset = piece.next_offset
            if left is not None:
                left -= len(piece.data)
            continue
        out.flush()
        if piece.complete or not args.follow:
            break
        if not store.get(task_id).status.is_terminal:
            store.sweep_orphans()
        time.sleep(0.1)
    out.flush()
    if left == 0 and piece.size > offset:  # ``piece``, the last one read, knows the size
        _note(f"stopped after --max-bytes {args.max_bytes}: {piece.size - offset} more bytes are kept (continue with --offset {offset})")
        return EXIT_OK
    if piece.truncated and piece.complete:
        task = store.get(task_id)
        seen = task.stdout_bytes if args.stream == "stdout" else task.stderr_bytes
        why = "its max_output_bytes" if piece.size >= task.max_output_bytes else "the disk took no more; see the run's log"
        _note(f"the {args.stream} of task {task_id} was cut short: {piece.size} of its {seen} bytes were kept ({why})")
    return EXIT_OK


def cmd_tasks_cancel(ctx: _Context) -> int:
    store = ctx.store
    store.sweep_orphans()
    task = store.get(ctx.task_id)
    if task.status.is_terminal:
        _note(f"task {task.id} has already ended ({task.status.value})")
        return EXIT_ERROR
    store.request_cancel(task.id, ctx.args.reason)
    deadline = time.monotonic() + ctx.args.wait
    while time.monotonic() < deadline:
        task = store.get(task.id)
        if task.status.is_terminal:
            break
        store.sweep_orphans()
        time.sleep(0.1)
    if task.status is TaskStatus.CANCELLED:
        print(f"task {task.id} cancelled")
        return EXIT_OK
    if task.status.is_terminal:
        _note(f"task {task.id} ended as {task.status.value} before the cancel took effect")
        return EXIT_ERROR
    _note(f"cancel of task {task.id} requested; its owner (pid {task.owner_pid}) has not confirmed it yet")
    return EXIT_ERROR


def cmd_tasks_retention(ctx: _Context) -> int:
    store = ctx.store
    args = ctx.args
    if args.days is None and args.max_tasks is None:
        retention = store.retention()
        print(f"ended tasks are kept {retention.max_age_days:g} days, at most {retention.max_tasks} of them "
              f"(store: {store.home})")
        return EXIT_OK
    retention = store.set_retention(max_age_days=args.days, max_tasks=args.max_tasks)
    removed = store.prune(retention)
    print(f"ended tasks are now kept {retention.max_age_days:g} days, at most {retention.max_tasks} of them "
          f"(store: {store.home}); {removed} removed now")
    return EXIT_OK


TOKEN_ENV = "FLEETRUN_MCP_TOKEN"


def cmd_serve(ctx: _Context) -> int:
    from fleetrun import mcp_http
    from fleetrun.core.config_files import ConfigFiles
    from fleetrun.core.executor import Executor
    from fleetrun.core.policy import read_only_policy

    args = ctx.args
    # The server lives as long as its client: it follows edits of both files (no restart).
    config_files = ConfigFiles(
        hosts=args.hosts, policy=args.policy, transports=ctx.plugins.transports, fallback_policy=read_only_policy
    )
    policy = config_files.current.policy
    assert policy is not None
    log.info("MCP server policy: %s", policy.source)
    plugins = ctx.plugins
    ctx.register_json_log(plugins)
    options: dict[str, Any] = {}
    if not args.http:
        given = [flag for flag, value in (("--token-file", args.token_file), ("--insecure-no-auth", args.insecure_no_auth),
                                          ("--allow-host", args.allow_host)) if value]
        if given:
            raise FleetrunError(f"{given[0]} applies to HTTP only: add --http [HOST:]PORT, or leave it out to serve stdio")
    else:
        host, port = _http_address(args.http)
        token = _server_token(args)
        listening = mcp_http.listen(host, port)
        if token is not None:
            options.update(mcp_http.token_options(token, host, port))
    executor = Executor(config_files=config_files, store=ctx.store, plugins=plugins)
    from fleetrun.mcp_server import create_server

    server = create_server(executor, **options)
    _StopServerOnSignals(executor, ctx.store)
    try:
        if args.http:
            names = mcp_http.allowed_host_names(host, port, args.allow_host)
            _note(f"serving MCP over streamable HTTP at http://{mcp_http.url_host(host)}:{port}/mcp (policy: {policy.source}); "
                  f"requests must name the server as {', '.join(names)} (--allow-host NAME adds a name)")
            mcp_http.serve_http(server, listening, host, port, names)
        else:
            if sys.stdin.isatty():
                _note("serving MCP on stdin and stdout, for an MCP client that starts this command "
                      "(see `fleetrun serve --help`); Ctrl-D or Ctrl-C stops it")
            server.run()
    finally:
        executor.close("the MCP server stopped")
        if args.http:
            listening.close()
    return EXIT_OK


class _StopServerOnSignals:
    """SIGTERM, SIGHUP and SIGINT stop ``fleetrun serve`` cleanly: its tasks are cancelled
    (their commands stopped), the store is written, and the process exits 0.

    Over stdio the server waits for the client in a thread that nothing can interrupt, so
    the process could not unwind to its ``finally``; over HTTP, uvicorn re-raises the
    signal after its own shutdown, which would kill the process before it. Either way the
    commands would be left running. The handler only writes to a pipe (it may interrupt
    any code, locks held); a thread of its own does the work, then ends the process.
    """

    def __init__(self, executor, store) -> None:  # type: ignore[no-untyped-def]
        self.executor = executor
        self.store = store
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC)
        threading.Thread(target=self._stop_when_signalled, name="fleetrun-serve-stop", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        os.write(self._wake_write, bytes([signum]))

    def _stop_when_signalled(self) -> None:
        name = signal.Signals(os.read(self._wake_read, 1)[0]).name
        log.info("stopping on %s: cancelling the running tasks", name)
        try:
            self.executor.close(f"the MCP server stopped ({name})")
            self.store.close()
        except Exception:
            log.exception("stopping the MCP server")
            code = EXIT_ERROR
        else:
            code = EXIT_OK
        logging.shutdown()
        os._exit(code)


def _http_address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise FleetrunError(f"--http takes [HOST:]PORT, got {text!r}") from None
    if not 0 < port < 65536:
        raise FleetrunError(f"--http: port {port} is out of range")
    return host, port


def _server_token(args: argparse.Namespace) -> str | None:
    from fleetrun.core.secrets import SecretError, read_secret
    from fleetrun.mcp_http import MIN_TOKEN_LENGTH

    what = "the MCP bearer token"
    try:
        if args.token_file:
            token = read_secret(env=None, file=args.token_file, what=what, min_length=MIN_TOKEN_LENGTH)
        else:
            token = read_secret(env=TOKEN_ENV, file=None, what=what, min_length=MIN_TOKEN_LENGTH) if os.environ.get(TOKEN_ENV) else None
    except SecretError as exc:
        raise FleetrunError(str(exc)) from None
    if token is None and not args.insecure_no_auth:
        raise FleetrunError(
            f"refusing to serve HTTP without a bearer token: set {TOKEN_ENV} or pass --token-file PATH "
            "(or, only on a trusted network, --insecure-no-auth)"
        )
    if token is None:
        _note("WARNING: serving HTTP with NO authentication (--insecure-no-auth): anyone who can reach the port can run commands")
    return token


def cmd_plugins(ctx: _Context) -> int:
    from fleetrun.core.plugin_manager import DISABLE_ENV, PluginInfo

    plugins = ctx.plugins.plugins()
    transports = ctx.plugins.transports
    if ctx.args.json:
        print(json.dumps(
            {"plugins": [asdict(p) for p in plugins],
             "transports": {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in transports.items()}},
            indent=2,
        ))
        return EXIT_OK
    def hooks(plugin: PluginInfo) -> str:
        if plugin.blocked:
            return f"blocked by ${DISABLE_ENV}"
        return ", ".join(plugin.hooks) if plugin.error is None else f"FAILED TO LOAD: {plugin.error}"

    rows = [[p.name, p.source, hooks(p)] for p in plugins]
    print(_table(rows, ["PLUGIN", "SOURCE", "HOOKS"]))
    print("\ntransports: " + (", ".join(sorted(transports)) or "none"))
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------


def _positive_number_of(unit: str) -> Callable[[str], float]:
    def positive(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number of {unit}, got {text}")
        return value

    return positive


_positive_float = _positive_number_of("seconds")


def _progress_pattern(text: str) -> str:
    from fleetrun.core.progress import compile_progress_pattern

    try:
        compile_progress_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with ``usage_exit``.

    ``fleetrun run`` passes the command's exit status through, and 2 is a common one
    (grep, diff, ls), so its own usage errors exit 125, as GNU ``timeout`` and ``env`` do.
    Subparsers are made of the same class.
    """

    usage_exit = EXIT_USAGE

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"{self.prog}: error: {message}\n")


_ID_HELP = "the task id (`fleetrun tasks` lists them), or its first 4 or more characters if no other id starts so"


def _shown_dir(where: Callable[[], Path]) -> str:
    # --help still works when the directory cannot be found; it says why instead.
    try:
        return str(where())
    except paths.HomeDirectoryError as exc:
        return f"(none: {exc})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleetrun",
        description="Run shell commands as tasks on hosts, through pluggable transports.",
        epilog=(
            f"The task store lives in {_shown_dir(paths.data_dir)} (set {paths.HOME_ENV} to move it). "
            f"Hosts come from --hosts, ${paths.HOSTS_ENV}, or {_shown_dir(paths.config_dir)}/hosts.yaml; "
            "without any, the embedded inventory has one host, 'local'."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fleetrun {__version__}")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="run a command on a host", description="Run a command on a host and stream its output.",
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "host", nargs="?",
        help="a host name from the inventory (`fleetrun hosts` lists them), or several: web1,web2",
    )
    run.add_argument("--tag", help="run on every host with this tag (with or without HOST)")
    run.add_argument(
        "--max-parallel", type=_positive_int, default=10, metavar="N",
        help="several hosts: at most N tasks at once (default 10)",
    )
    run.add_argument(
        "--stop-on-failure", action="store_true",
        help="several hosts: start no new task once one has failed (running ones finish)",
    )
    run.add_argument("command", nargs="*", metavar="-- COMMAND", help="the command, after --")
    run.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="time limit (can only lower the host's max_seconds)")
    run.add_argument("--max-output-bytes", type=_positive_int, metavar="N", help="bytes kept of stdout and of stderr (can only lower the host's limit)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE", help="add an environment variable (repeatable)")
    run.add_argument("--cwd", metavar="DIR", help="working directory of the command")
    run.add_argument("--progress-pattern", type=_progress_pattern, metavar="REGEX", help="regex with a 'percent' group that marks progress in the output")
    run.add_argument("--dry-run", action="store_true", help="show host, transport, limits and policy decision; run nothing")
    run.add_argument("--json", action="store_true", help="print lifecycle events as JSON lines on stdout instead of the output")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress line on a terminal")
    run.usage_exit = EXIT_FLEETRUN_ERROR
    run.set_defaults(func=cmd_run, error_exit=EXIT_FLEETRUN_ERROR)

    hosts = sub.add_parser("hosts", help="list the hosts of the inventory", description="List the hosts of the inventory.")
    hosts.add_argument("--json", action="store_true", help="print JSON")
    hosts.set_defaults(func=cmd_hosts)

    tasks = sub.add_parser(
        "tasks", help="list, show, read or cancel tasks in the store",
        usage="%(prog)s [-h] [--status STATUS] [--host HOST] [--origin ORIGIN] [--limit N] [--json] [ACTION ...]",
        description="Tasks in the store. With no ACTION, lists them as `fleetrun tasks list` does, with its options.",
    )
    # prog given: argparse would otherwise put the custom usage above in every action's usage.
    tasks_sub = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", prog=tasks.prog)
    listing = tasks_sub.add_parser("list", help="list tasks, newest first (the default)", description="List tasks, newest first.")
    # Both take the list's options (`fleetrun tasks --json` is a list too). Neither sets a
    # default of its own, so that one given to either counts; the defaults are the tasks parser's.
    for lister in (tasks, listing):
        lister.add_argument(
            "--status", action="append", choices=[s.value for s in TaskStatus], default=argparse.SUPPRESS,
            metavar="STATUS", help=f"only this status (repeatable): {', '.join(s.value for s in TaskStatus)}",
        )
        lister.add_argument("--host", default=argparse.SUPPRESS, help="only tasks of this host")
        lister.add_argument(
            "--origin", default=argparse.SUPPRESS,
            help="only tasks asked for by ORIGIN: cli (fleetrun run), mcp (the MCP server's assistant)",
        )
        lister.add_argument(
            "--limit", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
            help=f"at most this many (default {_LIST_LIMIT})",
        )
        lister.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    listing.set_defaults(func=cmd_tasks_list)
    tasks.set_defaults(func=cmd_tasks_list, status=None, host=None, origin=None, limit=_LIST_LIMIT, json=False)
    show_task = tasks_sub.add_parser("show", help="show one task's record", description="Show one task's record.")
    show_task.add_argument("task_id", metavar="ID", help=_ID_HELP)
    show_task.add_argument("--json", action="store_true", help="print JSON")
    show_task.set_defaults(func=cmd_tasks_show)
    output = tasks_sub.add_parser(
        "output", help="print a task's output (also while it runs)",
        description="Print a task's stdout or stderr, from a byte offset or as a tail; --follow keeps reading until the task ends.",
    )
    output.add_argument("task_id", metavar="ID", help=_ID_HELP)
    output.add_argument("--stream", choices=("stdout", "stderr"), default="stdout", help="which stream (default stdout)")
    start = output.add_mutually_exclusive_group()
    start.add_argument("--offset", type=_non_negative_int, default=0, help="start at this byte offset (default 0)")
    start.add_argument("--tail", type=_non_negative_int, metavar="LINES", help="only the last LINES lines")
    output.add_argument(
        "--max-bytes", type=_positive_int,
        help="print at most this many bytes, and say where to continue (default: all of it; a tail: 16 MiB)",
    )
    output.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the task ends")
    output.set_defaults(func=cmd_tasks_output)
    cancel = tasks_sub.add_parser(
        "cancel", help="cancel a queued or running task",
        description="Cancel a queued or running task, also one run by another fleetrun process.",
    )
    cancel.add_argument("task_id", metavar="ID", help=_ID_HELP)
    cancel.add_argument("--reason", default="cancelled with `fleetrun tasks cancel`", help="recorded as the cancel reason")
    cancel.add_argument("--wait", type=_positive_float, default=10.0, metavar="SECONDS", help="how long to wait for the owner to confirm (default 10)")
    cancel.set_defaults(func=cmd_tasks_cancel)
    keep = tasks_sub.add_parser(
        "retention", help="how long ended tasks are kept in the store; change it",
        description=(
            "Show how long ended tasks (their records and output) are kept in the store, or change it. "
            "The setting belongs to the store: every fleetrun process that opens it applies it when it "
            "starts, and a long-running one (the MCP server) also while it runs. A change is applied at once."
        ),
    )
    keep.add_argument("--days", type=_positive_number_of("days"), metavar="N", help="keep ended tasks N days (default 30)")
    keep.add_argument("--max-tasks", type=_positive_int, metavar="N", help="keep at most the N newest ended tasks (default 10000; at most 1000000000000)")
    keep.set_defaults(func=cmd_tasks_retention)

    policy = sub.add_parser(
        "policy", help="check commands against the command policy, or list its rules",
        description="Check what the command policy decides, and why, without running anything; or list its rules.",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    policy_sub.required = True
    check = policy_sub.add_parser(
        "check", help="say whether a command may run on a host, and which rule decides",
        description=(
            "Say whether the policy allows COMMAND on HOST and which rule decided (file, rule number, "
            "line, text). Exits 0 when allowed, 126 when denied."
        ),
    )
    check.add_argument("host", help="a host name from the inventory")
    check.add_argument("command", nargs="*", metavar="-- COMMAND", help="the command, after --")
    check.add_argument("--builtin", action="store_true", help="with no policy configured, use the built-in read-only policy")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=cmd_policy_check)
    show = policy_sub.add_parser(
        "show", help="list the policy's rules, in the order they are written",
        description="List the rules of the policy that applies (file, rule number, line, text); the default is deny.",
    )
    show.add_argument("--builtin", action="store_true", help="with no policy configured, show the built-in read-only policy")
    show.add_argument("--json", action="store_true", help="print the rules as JSON")
    show.set_defaults(func=cmd_policy_show)

    serve = sub.add_parser(
        "serve", help="run the MCP server (stdio by default)",
        description=(
            "Serve fleetrun to an MCP client (an AI assistant): tools to list hosts, plan, run, follow and cancel "
            "commands, under the policy (--policy, $FLEETRUN_POLICY, ~/.config/fleetrun/policy.yaml, else the "
            "built-in read-only policy). The hosts file and the policy are read again when they change: an edit "
            "applies to the next request, no restart needed (a file that changes into a mistake stops new tasks, "
            "with its error, until it is fixed). "
            "stdio by default: stdout carries protocol messages only, logs go to stderr. "
            "It stops when the client closes stdin, or on SIGTERM, SIGHUP or SIGINT: it cancels its running tasks "
            "(stopping their commands) and exits 0."
        ),
    )
    serve.add_argument(
        "--http", metavar="[HOST:]PORT",
        help=f"serve streamable HTTP at http://HOST:PORT/mcp instead (HOST defaults to 127.0.0.1; an IPv6 address "
             f"in brackets: [::1]:8765); needs a bearer token from ${TOKEN_ENV} or --token-file",
    )
    serve.add_argument("--token-file", metavar="PATH", help="file (mode 600) holding the bearer token HTTP clients must send")
    serve.add_argument(
        "--insecure-no-auth", action="store_true",
        help="serve HTTP WITHOUT authentication (anyone reaching the port can run commands): trusted networks only",
    )
    serve.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="(HTTP) a name clients reach the server by, besides its address (and, on loopback or all "
             "addresses, 127.0.0.1, localhost and [::1]); requests naming any other host, or coming from a "
             "web page of any other origin, are refused (DNS rebinding); repeatable",
    )
    serve.set_defaults(func=cmd_serve)

    plugins = sub.add_parser("plugins", help="list loaded plugins and the hooks each implements", description="List plugins and hooks.")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(func=cmd_plugins)
    for command in (run, hosts, tasks, listing, show_task, output, cancel, keep, check, show, serve, plugins):
        _add_global_options(command.add_argument_group("global options (also accepted before the command)"), after_command=True)
        raw = command.formatter_class is argparse.RawDescriptionHelpFormatter
        command.formatter_class = _RawSubcommandHelp if raw else _SubcommandHelp
        # An argument the command does not take is reported with that command's usage
        # (`fleetrun tasks list --tag web` shows the options of `tasks list`).
        command.set_defaults(usage_parser=command)
    return parser


class _SubcommandHelp(argparse.HelpFormatter):
    """Leaves the global options out of a subcommand's usage line (its help lists them)."""

    def _format_usage(self, usage, actions, groups, prefix):  # type: ignore[no-untyped-def]
        shown = [action for action in actions if not getattr(action, "global_option", False)]
        return super()._format_usage(usage, shown, groups, prefix)


class _RawSubcommandHelp(_SubcommandHelp, argparse.RawDescriptionHelpFormatter):
    pass


def _add_global_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, after_command: bool = False) -> None:
    # After the command (`fleetrun serve --policy p.yaml`) they default to "not given", so
    # that they never undo the same option given before it.
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    added = [
        parser.add_argument(
            "--hosts", metavar="PATH", default=default(None),
            help="the hosts file (default: $FLEETRUN_HOSTS, then the config dir)",
        ),
        parser.add_argument(
            "--policy", metavar="PATH", default=default(None),
            help=(
                "the command policy (default: $FLEETRUN_POLICY, then ~/.config/fleetrun/policy.yaml; without one "
                "the CLI runs any command and the MCP server uses its built-in read-only policy)"
            ),
        ),
        parser.add_argument(
            "--json-log", metavar="PATH", default=default(None),
            help="append lifecycle events as JSON lines to PATH ('-' for stderr)",
        ),
        parser.add_argument("-v", "--verbose", action="count", default=default(0), help="log more to stderr (-vv for debug)"),
    ]
    for action in added:
        action.global_option = after_command  # type: ignore[attr-defined]


def entry() -> None:
    """The ``fleetrun`` command (and ``python -m fleetrun``): :func:`main`, then exit with its status."""
    try:
        status = main()
    finally:
        # Exiting, Python joins the worker threads a run leaves; a Ctrl-C then would raise
        # KeyboardInterrupt there, which Python prints as a traceback. It ends the process
        # as the signal ends any program instead.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            # Started with the descriptor closed (`2>&-`): what goes there goes nowhere,
            # and the exit status is still the one documented.
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the process's life
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command, options included (argparse would
    # otherwise read `fleetrun run local -- ls -l` as fleetrun's own -l).
    command_words: list[str] | None = None
    if "--" in argv:
        split = argv.index("--")
        argv, command_words = argv[:split], argv[split + 1 :]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so that `run` exits with its own usage code.
        getattr(args, "usage_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if command_words is not None:
        if getattr(args, "command", None) is None:
            parser.error("'--' is only used by `fleetrun run HOST -- COMMAND` and `fleetrun policy check HOST -- COMMAND`")
        args.command = [*args.command, *command_words]
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("fleetrun: %(levelname)s: %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    install_log_redaction()
    # paramiko logs every refused channel and failed handshake itself; fleetrun reports
    # them on the task, so its own lines are only wanted when debugging.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.verbose >= 2 else logging.CRITICAL)
    if os.environ.get("FLEETRUN_TRACE", "") not in ("", "0", "false", "no"):
        logging.getLogger("fleetrun.trace").setLevel(logging.INFO)
    ctx = _Context(args)
    try:
        return args.func(ctx)
    except PolicyDenied as exc:
        _note(str(exc))
        return EXIT_DENIED
    except FleetrunError as exc:
        _note(f"error: {exc}")
        return getattr(args, "error_exit", EXIT_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("fleetrun: interrupted\n")
        return EXIT_CANCELLED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
