"""Real progress, measured from a task's output as it arrives.

The tracker counts bytes and lines per stream, remembers the latest line, and finds a
percentage only in a progress marker the command printed. It emits at most one event
per ``min_interval`` while output flows (the last state is always emitted), and one per
``heartbeat`` while the command is silent.
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable

from fleetrun.core.models import Progress
from fleetrun.core.output import SpoolWriter
from fleetrun.core.secrets import longest_secret, redact_bytes, secret_begun_at_end, secret_ended_at_start
from fleetrun.core.text import cut_character_at_end, cut_character_at_start

#: Lines such as "progress: 42%", "Progress 42.5 %" or "PROGRESS=7%". Blanks, not \s: \s*
#: at each line's start would also take the lines after it, and a window of blank lines
#: would cost quadratic time, 60 ms a look at 4 KiB.
DEFAULT_PROGRESS_PATTERN = r"(?im)^[ \t]*progress[ \t]*[:=]?[ \t]*(?P<percent>\d{1,3}(?:\.\d+)?)[ \t]*%"

_WINDOW = 4096
_MAX_LINE_CHARS = 500
#: Terminal escape sequences (colours, cursor moves, window titles): ECMA-48 CSI, OSC ended by
#: BEL or ST, and the two-character ones. They style the text, they are not part of it.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def compile_progress_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a progress pattern; it needs a ``percent`` group or ``current`` and ``total``."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid progress pattern {pattern!r}: {exc}") from None
    groups = set(compiled.groupindex)
    if "percent" not in groups and not {"current", "total"} <= groups:
        raise ValueError(
            f"progress pattern {pattern!r} needs a named group 'percent', or groups 'current' and 'total'"
        )
    return compiled


def percent_from(match: re.Match[str]) -> float | None:
    groups = match.groupdict()
    try:
        if groups.get("percent") is not None:
            value = float(groups["percent"])
        else:
            total = float(groups["total"])
            if total <= 0:
                return None
            value = 100.0 * float(groups["current"]) / total
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 100.0 else None


class _StreamWindow:
    """The last few KiB of a stream: for the latest line and the progress marker."""

    __slots__ = ("tail", "dirty", "cut", "_text")

    def __init__(self) -> None:
        self.tail = b""
        self.dirty = False  # fed since the progress pattern last looked
        self.cut = False  # the window no longer starts where the stream does
        self._text: str | None = None

    def feed(self, data: bytes) -> None:
        self.cut = self.cut or len(self.tail) + len(data) > _WINDOW
        self.tail = (self.tail + data[-_WINDOW:])[-_WINDOW:]
        self.dirty = True
        self._text = None

    def text(self) -> str:
        """The window as lines of text, as a terminal would show them: without escape
        sequences (a coloured `progress: 40%` is still a marker), and with a line redrawn
        after a carriage return (a progress bar) counted as a line of its own, the last
        one being what a terminal shows. Made once per feed: the pattern and the latest
        line both read it."""
        if self._text is None:
            # Whole characters only: the window's start, and a read's end, can cut one in two.
            tail = self.tail
            tail = tail[cut_character_at_start(tail) : len(tail) - cut_character_at_end(tail)]
            if longest_secret():
                # No secret, and no part of one: its rest may be in the next read, or its
                # beginning before the window.
                start = secret_ended_at_start(tail) if self.cut else 0
                tail = redact_bytes(tail[start : len(tail) - secret_begun_at_end(tail)])
            text = _ESCAPE_SEQUENCE.sub("", tail.decode("utf-8", errors="replace"))
            self._text = text.replace("\r\n", "\n").replace("\r", "\n")
        return self._text

    def latest_line(self) -> str | None:
        for line in reversed(self.text().split("\n")):
            line = line.strip()
            if line:
                return line[:_MAX_LINE_CHARS]
        return None


class ProgressTracker:
    """Turns a running task's output into rate-limited :class:`Progress` events."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        stdout: SpoolWriter,
        stderr: SpoolWriter,
        emit: Callable[[Progress], None],
        pattern: re.Pattern[str] | None,
        min_interval: float = 0.1,
        heartbeat: float = 5.0,
        started: float | None = None,
    ) -> None:
        # All times are the loop's (``loop.time()``), the clock its timers run on.
        self.loop = loop
        self.spools = {"stdout": stdout, "stderr": stderr}
        self.windows = {"stdout": _StreamWindow(), "stderr": _StreamWindow()}
        self.emit_callback = emit
        self.pattern = pattern
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        # ``started`` may be a while ago: the tracker is made at the task's first output,
        # or when a silent task has run for a moment.
        self.started = loop.time() if started is None else started
        self.last_emit = float("-inf")
        self.latest_stream: str | None = None
        self.percent: float | None = None
        self._deferred: asyncio.TimerHandle | None = None
        self._stopped = False
        self._heartbeat: asyncio.TimerHandle | None = loop.call_at(self.started + heartbeat, self._beat)

    def on_output(self, stream: str, data: bytes) -> None:
        """Note ``data`` (already written to the spool) and emit if the rate allows."""
        if self._stopped or not data:
            return
        self.windows[stream].feed(data)
        self.latest_stream = stream
        now = self.loop.time()
        due = self.last_emit + self.min_interval
        if now >= due:
            self._emit(heartbeat=False)
        elif self._deferred is None:
            self._deferred = self.loop.call_at(due, self._emit_deferred)

    def snapshot(self, *, heartbeat: bool = False) -> Progress:
        if self.pattern is not None:
            for window in self.windows.values():
                if window.dirty:
                    window.dirty = False
                    for match in self.pattern.finditer(window.text()):
                        value = percent_from(match)
                        if value is not None:
                            self.percent = value
        latest = None
        if self.latest_stream is not None:
            latest = self.windows[self.latest_stream].latest_line()
        out, err = self.spools["stdout"], self.spools["stderr"]
        return Progress(
            elapsed_s=round(self.loop.time() - self.started, 3),
            stdout_bytes=out.bytes_seen,
            stderr_bytes=err.bytes_seen,
            stdout_lines=out.lines,
            stderr_lines=err.lines,
            latest_line=latest,
            latest_stream=self.latest_stream if latest is not None else None,
            percent=self.percent,
            heartbeat=heartbeat,
        )

    def stop(self) -> None:
        """Emit any output not yet reported, then nothing more; called before the final hook."""
        if self._deferred is not None and not self._stopped:
            self._emit(heartbeat=False)
        self._stopped = True
        for handle in (self._deferred, self._heartbeat):
            if handle is not None:
                handle.cancel()
        self._deferred = self._heartbeat = None

    def _emit_deferred(self) -> None:
        self._deferred = None
        if not self._stopped:
            self._emit(heartbeat=False)

    def _emit(self, *, heartbeat: bool) -> None:
        # Output can be handled in the same loop pass as a due deferred emission, before it
        # runs: whichever emits first takes the slot, the other must not emit again.
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self.last_emit = self.loop.time()
        self._arm_heartbeat()
        self.emit_callback(self.snapshot(heartbeat=heartbeat))

    def _arm_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._heartbeat = self.loop.call_later(self.heartbeat, self._beat)

    def _beat(self) -> None:
        self._heartbeat = None
        if not self._stopped:
            self._emit(heartbeat=True)
