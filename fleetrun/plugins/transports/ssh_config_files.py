"""ssh_config files read as ssh reads them, ``Include`` directives and all.

paramiko's reader takes ``Include`` for an unknown keyword and goes on, so a host written
in an included file (``Include ~/.ssh/config.d/*``, as OrbStack, Colima and many a
company's set-up write it) was not found: fleetrun connected to the alias itself, on
port 22, as the wrong user. Here each included file is read in place of its directive,
as ssh does, before paramiko parses the whole. As in ssh, the blocks of a file included
from inside a ``Host`` or ``Match`` block apply only where that block matches too (they
are written as ``Match`` lines with both conditions), and the lines after an ``Include``
belong to the block it was written in.

What was read is kept, with what it was read from, and read again only when one of
those files (or what an Include's pattern matches) has changed: every connection, and
every host of ``fleetrun hosts``, looks its host up in it.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import paramiko

from fleetrun.core.paths import HomeDirectoryError, expand_home
from fleetrun.plugins.transports.ssh_config_lookup import SshConfigLookup

#: ssh's own limit (READCONF_MAX_DEPTH).
MAX_INCLUDE_DEPTH = 16

_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)")


class SshConfigError(Exception):
    """An ssh_config file that cannot be read; the message says which and why."""


class ConfigFile(NamedTuple):
    """An ssh_config file to read. An Include's relative path is looked for in ``directory``
    (``~/.ssh`` for a user's files, ``/etc/ssh`` for the system's). ``guarded``: refused
    when another user may write it, as ssh refuses the user's own ``~/.ssh/config``; every
    file an Include names is guarded too. Such a file could make fleetrun run any command
    (a ``ProxyCommand``, ``Match exec``) as the user it runs as."""

    path: Path
    directory: Path
    guarded: bool = False


def _certificates_as_identities(text: str) -> str:
    """``text`` with each CertificateFile line made an IdentityFile line, and the IdentityFile
    lines left out: paramiko then gathers them across blocks as ssh does, with the same
    ``%`` tokens and ``~`` expanded."""
    lines = []
    for line in text.splitlines():
        match = _KEYWORD.fullmatch(line)
        keyword = match.group(1).lower() if match else ""
        if keyword != "identityfile":
            lines.append(f"IdentityFile {match.group(2)}" if match and keyword == "certificatefile" else line)
    return "\n".join(lines)


def read_ssh_config(files: list[ConfigFile]) -> SshConfigLookup:
    """The host lookup of ``files``, read in order (a value found first wins, as in ssh);
    the same object again while none of the files has changed, so that what is made from
    it can be kept too. A file that does not exist is left out, as ssh leaves it out."""
    key = tuple(files)
    with _cache_lock:
        kept = _cache.get(key)
    if kept is not None and kept.still_current():
        return kept.lookup
    read = _Reading()
    text = "\n".join(read.with_includes(each.path, each.directory, guarded=each.guarded, depth=0) for each in files)
    try:
        lookup = SshConfigLookup.from_text(text)
        if "certificatefile" in text.lower():  # else nothing to gather: no second reading
            lookup.certificates = SshConfigLookup.from_text(_certificates_as_identities(text))
    except paramiko.ssh_exception.ConfigParseError as exc:
        raise SshConfigError(str(exc)) from None
    # A file changed in the last moments could change again within its clock's tick, its
    # size and inode the same: such a reading is not kept (git's "racy" files).
    if not any(_changed_lately(state) for state in read.seen.values()):
        with _cache_lock:
            _cache[key] = _Kept(read.seen, lookup)
    return lookup


@dataclass
class _Kept:
    seen: dict[str, object]  # each file read (its state) and each Include pattern (its matches)
    lookup: SshConfigLookup

    def still_current(self) -> bool:
        return all(_state_now(what) == state for what, state in self.seen.items())


_cache: dict[tuple[ConfigFile, ...], _Kept] = {}
_cache_lock = threading.Lock()


def _state_now(what: str) -> object:
    kind, _, name = what.partition(":")
    return _file_state(Path(name)) if kind == "file" else sorted(glob.glob(name))


def _changed_lately(state: object) -> bool:
    return isinstance(state, tuple) and time.time_ns() - state[0] < _SETTLED_NS


#: How old a file's last change must be for a reading of it to be kept.
_SETTLED_NS = 2_000_000_000


def _file_state(path: Path) -> object:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_mode, info.st_uid)


@dataclass
class _Reading:
    seen: dict[str, object] = field(default_factory=dict)

    def with_includes(self, path: Path, directory: Path, *, guarded: bool, depth: int, condition: str = "") -> str:
        """The text of ``path`` with its Include directives replaced by what they include.

        ``condition``: the criteria (as a ``Match`` line writes them) of the block the file
        is included from; the file's own blocks apply only where those match too, as in ssh.
        Lines after an Include belong to the block they are written in again."""
        self.seen[f"file:{path}"] = state = _file_state(path)
        if guarded and isinstance(state, tuple):
            mode, owner = state[3], state[4]
            if owner not in (0, os.getuid()) or mode & 0o022:
                raise SshConfigError(
                    f"{path} may be written by another user (mode {stat.S_IMODE(mode):o}, owner uid {owner}): "
                    "ssh refuses to read it, and so does fleetrun; make it the user's own and chmod go-w it"
                )
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            return ""
        except OSError as exc:
            raise SshConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        lines: list[str] = []
        criteria = condition  # those of the block being read
        for line in text.splitlines():
            match = _KEYWORD.fullmatch(line)
            keyword = match.group(1).lower() if match else ""
            if keyword in ("host", "match"):
                assert match is not None
                own = _criteria_of(keyword, match.group(2))
                criteria = _together(condition, own)
                if condition or (keyword == "match" and own != match.group(2).strip()):
                    line = f"Match {criteria or 'all'}"
            if keyword in _PATH_LISTS:
                assert match is not None
                line = f"{match.group(1)} {_path_list(path, match.group(2), line)}"
            if keyword != "include":
                lines.append(line)
                continue
            assert match is not None
            if depth >= MAX_INCLUDE_DEPTH:
                raise SshConfigError(f"{path}: Include directives nested more than {MAX_INCLUDE_DEPTH} deep")
            for included in self._included(path, directory, match.group(2), line):
                inner = self.with_includes(included, directory, guarded=True, depth=depth + 1, condition=criteria)
                lines.append(inner)
                if any(_opens_block(each) for each in inner.splitlines()):
                    lines.append(f"Match {criteria or 'all'}")  # the block the Include is in, again
        return "\n".join(lines)

    def _included(self, path: Path, directory: Path, arguments: str, line: str) -> list[Path]:
        try:
            patterns = shlex.split(arguments, comments=True)
        except ValueError as exc:
            raise SshConfigError(f"{path}: {line.strip()!r}: {exc}") from None
        found = []
        for pattern in patterns:
            try:
                anchored = expand_home(pattern) if pattern.startswith("~") else Path(pattern)
            except HomeDirectoryError as exc:
                raise SshConfigError(f"{path}: Include {exc}") from None
            absolute = str(anchored if anchored.is_absolute() else directory / anchored)
            matches = sorted(glob.glob(absolute))
            self.seen[f"glob:{absolute}"] = matches
            found += [Path(each) for each in matches]
        return found


#: Keywords whose value is a list of paths, each quoted where it holds a space.
_PATH_LISTS = ("userknownhostsfile", "globalknownhostsfile")


def _path_list(path: Path, arguments: str, line: str) -> str:
    """A list of paths written so that paramiko keeps it as written (it unquotes a value
    that is one quoted path, `"/a b/known_hosts"`) and :func:`paths_of` reads each path back."""
    try:
        return " ".join(shlex.quote(each) for each in shlex.split(arguments, comments=True))
    except ValueError as exc:
        raise SshConfigError(f"{path}: {line.strip()!r}: {exc}") from None


def paths_of(value: str) -> list[str]:
    """The paths of a UserKnownHostsFile or GlobalKnownHostsFile value, as ssh splits it."""
    return shlex.split(value)


def _criteria_of(keyword: str, arguments: str) -> str:
    """A Host or Match line's condition, as Match criteria ("" for every host)."""
    if keyword == "host":  # Host matches the name as given, which Match calls originalhost
        return "originalhost " + ",".join(arguments.split())
    words = arguments.split()
    if words and words[-1].lower() == "all" and all(w.lstrip("!").lower() in ("canonical", "final") for w in words[:-1]):
        # `Match final all`, as RHEL and Fedora write their system-wide block: `all` adds
        # nothing to `final`, and paramiko refuses the two together.
        return " ".join(words[:-1])
    return arguments.strip()


def _together(first: str, second: str) -> str:
    return " ".join(part for part in (first, second) if part)


def _opens_block(line: str) -> bool:
    match = _KEYWORD.fullmatch(line)
    return match is not None and match.group(1).lower() in ("host", "match")
