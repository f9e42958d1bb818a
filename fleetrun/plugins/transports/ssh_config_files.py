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

import functools
import glob
import hashlib
import ipaddress
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import paramiko

from fleetrun.core.paths import HomeDirectoryError, expand_home
from fleetrun.core.secrets import command_environment

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


class SshConfigLookup(paramiko.SSHConfig):
    """paramiko's host lookup, made to decide as ssh decides (``ssh -G``), and every
    ``CertificateFile`` that applies to a host, in order, as ssh takes them all (paramiko
    keeps the first value of that keyword).

    Where paramiko decided otherwise:

    * it read the files twice, always, so that a block that did not match at first matched
      on values set after it (``Match user bob`` above a ``User bob``); ssh reads them
      again only for ``Match final`` (where ``final`` and ``canonical`` then hold), and
      then matches ``Host`` lines and ``Match host`` against the name it will connect to
      (the ``HostName`` found, lowercased);
    * ``Match host`` and ``originalhost`` ignore case, and ``host`` sees the ``HostName``
      set so far with its ``%h`` expanded (paramiko compared case, and the unexpanded value);
    * ``Match exec`` runs by the user's shell, as in ssh, without the variables secrets
      come from (paramiko ran it by bash, with every variable);
    * the ``Match`` criteria of newer ssh (9.4 and later: ``tagged``, ``localnetwork``,
      ``sessiontype``, ``command``, ``version``) are decided for ``ssh HOST COMMAND``;
      paramiko took each for a match, so that a ``Match tagged work`` block (its ``User``,
      its ``IdentityFile``) applied to every host;
    * the name to connect to is lowercased, as ssh lowercases it;
    * of ``ProxyJump`` and ``ProxyCommand``, the one found first is kept, as in ssh;
    * ``%`` tokens are expanded in the keywords ssh expands them in, in one pass (``%%`` is
      a ``%``), with ssh's values: paramiko expanded a few, in some keywords (none in
      ``UserKnownHostsFile``: ``~/.ssh/known_hosts.d/%k`` was a file of that name), one
      after another, and ``%l`` by asking DNS.

    Where ssh_config canonicalizes host names (``CanonicalizeHostname``), paramiko's own
    passes are kept.
    """

    certificates: SshConfigLookup | None = None  # the same files, CertificateFile read as IdentityFile
    #: The pass being made in this thread (lookups of one reading run in many threads).
    _pass = threading.local()

    def certificate_files(self, host: str) -> list[str]:
        return list(self.certificates.lookup(host).get("identityfile", [])) if self.certificates else []

    def lookup(self, hostname: str) -> paramiko.SSHConfigDict:
        if self._canonicalizes:
            options = super().lookup(hostname)
        else:
            options = self._lookup(hostname=hostname)  # noqa: SLF001 - paramiko's one pass, unexpanded
            # The name to connect to, first: the other keywords' %h is it.
            options["hostname"] = _host_so_far(hostname, options).lower()
            if self._final_pass_wanted:
                self._pass.original = hostname
                try:
                    options = self._lookup(hostname=options["hostname"], options=options)  # noqa: SLF001
                finally:
                    del self._pass.original
            options = self._expand_variables(options, hostname)  # noqa: SLF001 - %n is the name asked for
        options["hostname"] = options["hostname"].lower()
        if "proxyjump" in options and "proxycommand" in options:
            # ssh takes the one written first (a ProxyJump none gives way to a ProxyCommand);
            # paramiko kept both, and the connection went through the ProxyJump.
            written = list(options)
            jump_first = written.index("proxyjump") < written.index("proxycommand")
            del options["proxycommand" if jump_first and options["proxyjump"].lower() != "none" else "proxyjump"]
        return options

    @functools.cached_property
    def _final_pass_wanted(self) -> bool:
        return any(m["type"].lower() == "final" for context in self._blocks() for m in context.get("matches", []))

    @functools.cached_property
    def _canonicalizes(self) -> bool:
        return any("canonicalizehostname" in context["config"] for context in self._blocks())

    def _blocks(self) -> list[dict[str, Any]]:
        return self._config  # noqa: SLF001 - paramiko's parsed blocks

    def _tokenize(self, config, target_hostname, key, value):  # type: ignore[no-untyped-def]
        allowed = _TOKENS_OF.get(key)
        if allowed is None or ("%" not in value and not value.startswith("~")):
            return value
        hostname = target_hostname if key == "hostname" else str(config.get("hostname", target_hostname))
        port, user = str(config.get("port", 22)), str(config.get("user", _local_user()))
        tokens: dict[str, Callable[[], str]] = {
            "%": lambda: "%", "h": lambda: hostname, "n": lambda: target_hostname, "p": lambda: port,
            "r": lambda: user, "u": _local_user, "d": lambda: os.path.expanduser("~"), "i": lambda: str(os.getuid()),
            "L": lambda: socket.gethostname().split(".")[0], "l": socket.gethostname,
            "k": lambda: str(config.get("hostkeyalias", target_hostname)),
            "C": lambda: hashlib.sha1(f"{socket.gethostname()}{hostname}{port}{user}".encode()).hexdigest(),  # noqa: S324 - ssh's %C
        }
        expanded = re.sub(r"%(.)", lambda m: tokens[m.group(1)]() if m.group(1) in allowed else m.group(0), value)
        if key == "identityfile" and expanded.startswith("~"):
            expanded = os.path.expanduser(expanded)
        return expanded

    def _does_match(self, match_list, target_hostname, canonical, final, options):  # type: ignore[no-untyped-def]
        original = getattr(self._pass, "original", None)
        if original is not None:  # ssh's second pass: `Match canonical` and `final` hold
            canonical = final = True
        for candidate in match_list:
            decide = _DECIDED_HERE.get(candidate["type"].lower())
            if decide is not None and self._should_fail(decide(self, candidate["param"], original or target_hostname, options), candidate):
                return False
        rest = [c for c in match_list if c["type"].lower() not in _DECIDED_HERE]
        return super()._does_match(rest, target_hostname, canonical, final, options) if rest else match_list


def _in_networks(networks: str) -> bool:
    """Whether an address of this machine's interfaces is in one of ``networks`` (CIDRs, by commas)."""
    try:
        wanted = [ipaddress.ip_network(each, strict=False) for each in networks.split(",")]
    except ValueError:
        return False  # ssh refuses the line; nothing here is in such a network
    return any(address in network for address in local_addresses() for network in wanted)


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of this machine's interfaces (Linux's /proc; none where it is missing)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    for previous, line in zip(lines, lines[1:]):  # "|-- 10.0.0.5" then "/32 host LOCAL"
        if line.strip() == "/32 host LOCAL":
            found.append(ipaddress.IPv4Address(previous.split()[-1]))
    try:
        found += [ipaddress.IPv6Address(int(line.split()[0], 16)) for line in Path("/proc/net/if_inet6").read_text().splitlines()]
    except (OSError, ValueError, IndexError):
        pass
    return found


#: The ``%`` tokens each keyword takes (ssh_config(5), TOKENS), ``%%`` in each.
_FILE_TOKENS = "%CdhikLlnpru"
_TOKENS_OF = {
    "hostname": "%h", "proxycommand": "%hnpr", "proxyjump": "%hnpr",
    **dict.fromkeys(("identityfile", "identityagent", "userknownhostsfile", "revokedhostkeys", "controlpath", "match-exec"), _FILE_TOKENS),
}


@functools.cache
def _local_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _host_so_far(target: str, options: Mapping[str, object]) -> str:
    # What ssh's `Match host` compares: the HostName set so far, %h expanded, else the name.
    written = options.get("hostname")
    return target if written is None else str(written).replace("%%", "\0").replace("%h", target).replace("\0", "%")


def _matches(lookup: paramiko.SSHConfig, patterns: str, name: str) -> bool:
    return bool(lookup._pattern_matches(patterns, name))  # noqa: SLF001 - paramiko's pattern lists, negations included


def _succeeds(command: str) -> bool:
    """Whether ``command`` exits 0, run as ssh runs a ``Match exec`` command: by the user's
    shell, its output to /dev/null; its input is /dev/null too, and like every command
    fleetrun runs on this machine it gets none of the variables secrets come from. paramiko
    ran it through invoke: by bash, with every variable, and reading fleetrun's own stdin
    while it ran (the MCP stdio server's requests arrive there)."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    done = subprocess.run([shell, "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=command_environment({}), check=False)
    return done.returncode == 0


#: Match criteria decided here (see :class:`SshConfigLookup`), each for a command of
#: fleetrun: ``exec`` as ssh runs it; ``tagged`` against ssh_config's ``Tag`` so far;
#: ``sessiontype`` is ``exec``; ``command`` is none (one connection carries every task's
#: command); fleetrun is no OpenSSH ``version``.
_DECIDED_HERE: dict[str, Callable[[paramiko.SSHConfig, str, str, Mapping[str, object]], bool]] = {
    "host": lambda lookup, param, target, options: _matches(lookup, param.lower(), _host_so_far(target, options).lower()),
    "originalhost": lambda lookup, param, target, options: _matches(lookup, param.lower(), target.lower()),
    "exec": lambda lookup, param, target, options: _succeeds(lookup._tokenize(options, target, "match-exec", param)),  # noqa: SLF001
    "tagged": lambda lookup, param, target, options: _matches(lookup, param, str(options.get("tag", ""))),
    "localnetwork": lambda lookup, param, target, options: _in_networks(param),
    "sessiontype": lambda lookup, param, target, options: _matches(lookup, param, "exec"),
    "command": lambda lookup, param, target, options: _matches(lookup, param, ""),
    "version": lambda lookup, param, target, options: False,
}


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


def with_environment(text: str) -> str:
    """``text`` with each ``${NAME}`` replaced by that environment variable, as ssh expands
    the paths of ssh_config (one that is not set is left as written)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m.group(1), m.group(0)), text)
