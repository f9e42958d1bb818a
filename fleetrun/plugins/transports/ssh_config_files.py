"""ssh_config files read as ssh reads them, ``Include`` directives and all.

paramiko's reader takes ``Include`` for an unknown keyword and goes on, so a host written
in an included file (``Include ~/.ssh/config.d/*``, as OrbStack, Colima and many a
company's set-up write it) was not found: fleetrun connected to the alias itself, on
port 22, as the wrong user. Here each included file is read in place of its directive,
as ssh does, before paramiko parses the whole.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import paramiko

from fleetrun.core.paths import HomeDirectoryError, expand_home

#: ssh's own limit (READCONF_MAX_DEPTH).
MAX_INCLUDE_DEPTH = 16

_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)")


class SshConfigError(Exception):
    """An ssh_config file that cannot be read; the message says which and why."""


def read_ssh_config(files: list[tuple[Path, Path]]) -> paramiko.SSHConfig:
    """The host lookup of ``files``, read in order (a value found first wins, as in ssh).
    Each is ``(file, directory)``: an included file written as a relative path is looked
    for in ``directory`` (``~/.ssh`` for a user's files, ``/etc/ssh`` for the system's).
    A file that does not exist is left out, as ssh leaves it out."""
    text = "\n".join(_with_includes(path, directory, depth=0) for path, directory in files)
    try:
        return paramiko.SSHConfig.from_text(text)
    except paramiko.ssh_exception.ConfigParseError as exc:
        raise SshConfigError(str(exc)) from None


def _with_includes(path: Path, directory: Path, *, depth: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return ""
    except OSError as exc:
        raise SshConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines: list[str] = []
    block: str | None = None  # the Host or Match line the lines being read belong to
    for line in text.splitlines():
        match = _KEYWORD.fullmatch(line)
        keyword = match.group(1).lower() if match else ""
        if keyword in ("host", "match"):
            block = line
        if keyword != "include":
            lines.append(line)
            continue
        assert match is not None
        if depth >= MAX_INCLUDE_DEPTH:
            raise SshConfigError(f"{path}: Include directives nested more than {MAX_INCLUDE_DEPTH} deep")
        try:
            patterns = shlex.split(match.group(2), comments=True)
        except ValueError as exc:
            raise SshConfigError(f"{path}: {line.strip()!r}: {exc}") from None
        for pattern in patterns:
            try:
                anchored = expand_home(pattern) if pattern.startswith("~") else Path(pattern)
            except HomeDirectoryError as exc:
                raise SshConfigError(f"{path}: Include {exc}") from None
            for included in sorted(glob.glob(str(anchored if anchored.is_absolute() else directory / anchored))):
                inner = _with_includes(Path(included), directory, depth=depth + 1)
                lines.append(inner)
                # Its own Host blocks end the one the Include was written in: the lines after
                # the directive belong to that one again. (ssh also applies an included file
                # only where the enclosing block matches; inside a Host or Match block this
                # reading applies its Host blocks wherever they match.)
                if block is not None and any(
                    (m := _KEYWORD.fullmatch(each)) and m.group(1).lower() in ("host", "match") for each in inner.splitlines()
                ):
                    lines.append(block)
    return "\n".join(lines)
