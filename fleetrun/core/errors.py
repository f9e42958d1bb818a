"""Errors that fleetrun reports to its users.

Every :class:`FleetrunError` carries a message written for the person who made the
mistake; front ends print it on one line, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class FleetrunError(Exception):
    """A problem the user can fix: bad input, unknown names, unusable configuration."""


class ConfigFileError(FleetrunError):
    """A configuration file is malformed. The message names the file, line, and what in it."""

    #: Shown instead of a path when the text did not come from a file.
    unnamed = "<config>"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        host: str | None = None,
        rule: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.host = host
        self.rule = rule
        self.field = field
        self.detail = message
        where = path or self.unnamed
        if line is not None:
            where = f"{where}:{line}"
        parts = []
        if host is not None:
            parts.append(f"host {host!r}")
        if rule is not None:
            parts.append(f"rule {rule}")
        if field is not None:
            parts.append(f"field {field!r}")
        subject = (", ".join(parts) + ": ") if parts else ""
        super().__init__(f"{where}: {subject}{message}")

    @classmethod
    def read_text(cls, path: Path) -> str:
        """The text of the configuration file at ``path``; this error if it cannot be read
        or is not UTF-8 (naming the line and column of the first byte that is not)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise cls(f"cannot read the file: {exc.strerror or exc}", path=str(path)) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise cls(
                f"the file is not UTF-8: column {column} has the byte 0x{data[exc.start]:02X}", path=str(path), line=line
            ) from None


class InventoryError(ConfigFileError):
    """The hosts file is malformed. The message names the file, line, host and field."""

    unnamed = "<hosts>"


class PolicyError(ConfigFileError):
    """The policy file is malformed. The message names the file, line, rule and field."""

    unnamed = "<policy>"


class PolicyDenied(FleetrunError):
    """The policy does not allow a command; the message says which rule decided."""

    def __init__(self, decision: object) -> None:
        self.decision = decision
        super().__init__(str(getattr(decision, "explanation", decision)))


class UnknownHostError(FleetrunError):
    """A task named a host that the inventory does not have."""


class HostBusyError(FleetrunError):
    """A host already has as many tasks waiting for their turn as its ``max_queued`` allows."""


class UnknownTaskError(FleetrunError):
    """A task id that the store does not know."""


class PluginError(FleetrunError):
    """A plugin could not be loaded or does not match the hook specifications."""

    def __init__(self, message: str, *, problem: str | None = None) -> None:
        super().__init__(message)
        #: What is wrong, in words that do not name the plugin (the message does).
        self.problem = problem or message
