"""Looking a host up in ssh_config as ssh does (``ssh -G`` is the reference): which blocks
apply, and the values they give, tokens expanded.

paramiko's reader parses the files (:mod:`.ssh_config_files` hands it their text, Include
directives followed); :class:`SshConfigLookup` makes its lookups decide as ssh decides.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import pwd
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import paramiko

from fleetrun.core.secrets import command_environment


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
            options["hostname"] = _host_so_far(self, hostname, options).lower()
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
        environment = key in _ENVIRONMENT_OF
        if (allowed is None and not environment) or not ("%" in value or "${" in value or value.startswith("~")):
            return value
        if key == "identityfile" and value.startswith("~"):
            value = os.path.expanduser(value)  # first, as ssh does: a token's value is not read again
        hostname = target_hostname if key == "hostname" else str(config.get("hostname", target_hostname))
        port, user = str(config.get("port", 22)), str(config.get("user", _local_user()))
        tokens: dict[str, Callable[[], str]] = {
            "%": lambda: "%", "h": lambda: hostname, "n": lambda: target_hostname, "p": lambda: port,
            "r": lambda: user, "u": _local_user, "d": lambda: os.path.expanduser("~"), "i": lambda: str(os.getuid()),
            "L": lambda: socket.gethostname().split(".")[0], "l": socket.gethostname,
            "k": lambda: str(config.get("hostkeyalias", target_hostname)),
            "C": lambda: hashlib.sha1(f"{socket.gethostname()}{hostname}{port}{user}".encode()).hexdigest(),  # noqa: S324 - ssh's %C
        }

        def expand(m: re.Match[str]) -> str:
            token, variable = m.group(1), m.group(2)
            if token is not None:
                return tokens[token]() if token in (allowed or "") else m.group(0)
            # ${NAME}: an environment variable, as ssh expands them (one not set is left as written)
            return os.environ.get(variable, m.group(0)) if environment else m.group(0)

        # One pass, as ssh's percent_dollar_expand: what a token or a variable gives is not read again.
        return re.sub(r"%(.)|\$\{(\w+)\}", expand, value)

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
#: The keywords whose ``${NAME}`` is an environment variable (CertificateFile is read as
#: IdentityFile): ssh_config(5)'s, and the other known_hosts files.
_ENVIRONMENT_OF = frozenset({
    "identityfile", "identityagent", "userknownhostsfile", "globalknownhostsfile", "revokedhostkeys", "controlpath",
})


@functools.cache
def _local_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _host_so_far(lookup: SshConfigLookup, target: str, options: Mapping[str, object]) -> str:
    # What ssh's `Match host` compares: the HostName set so far, its tokens expanded, else the name.
    written = options.get("hostname")
    return target if written is None else lookup._tokenize(options, target, "hostname", str(written))  # noqa: SLF001


def matches_pattern_list(patterns: str, name: str) -> bool:
    """Whether ``name`` matches the ssh pattern list ``patterns`` (comma-separated; ``*``,
    ``?``, and ``!`` for a negation that wins), as a ``Host`` line matches."""
    return bool(paramiko.SSHConfig._pattern_matches(None, patterns, name))  # noqa: SLF001 - paramiko's; it uses no instance


def _succeeds(command: str) -> bool:
    """Whether ``command`` exits 0, run as ssh runs a ``Match exec`` command: by the user's
    shell, its output to /dev/null; its input is /dev/null too, and like every command
    fleetrun runs on this machine it gets none of the variables secrets come from. paramiko
    ran it through invoke: by bash, with every variable, and reading fleetrun's own stdin
    while it ran (the MCP stdio server's requests arrive there)."""
    done = subprocess.run(
        by_user_shell(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=command_environment({}), check=False
    )
    return done.returncode == 0


def by_user_shell(command: str) -> list[str]:
    """The argv that runs ``command`` as ssh runs ssh_config's commands (``Match exec``,
    ``ProxyCommand``): by the user's shell, ``$SHELL -c COMMAND``, else /bin/sh."""
    return [os.environ.get("SHELL") or "/bin/sh", "-c", command]


#: Match criteria decided here (see :class:`SshConfigLookup`), each for a command of
#: fleetrun: ``exec`` as ssh runs it; ``tagged`` against ssh_config's ``Tag`` so far;
#: ``sessiontype`` is ``exec``; ``command`` is none (one connection carries every task's
#: command); fleetrun is no OpenSSH ``version``.
_DECIDED_HERE: dict[str, Callable[[SshConfigLookup, str, str, Mapping[str, object]], bool]] = {
    "host": lambda lookup, param, target, options: matches_pattern_list(param.lower(), _host_so_far(lookup, target, options).lower()),
    "originalhost": lambda lookup, param, target, options: matches_pattern_list(param.lower(), target.lower()),
    "exec": lambda lookup, param, target, options: _succeeds(lookup._tokenize(options, target, "match-exec", param)),  # noqa: SLF001
    "tagged": lambda lookup, param, target, options: matches_pattern_list(param, str(options.get("tag", ""))),
    "localnetwork": lambda lookup, param, target, options: _in_networks(param),
    "sessiontype": lambda lookup, param, target, options: matches_pattern_list(param, "exec"),
    "command": lambda lookup, param, target, options: matches_pattern_list(param, ""),
    "version": lambda lookup, param, target, options: False,
}
