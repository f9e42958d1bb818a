"""The command policy: which commands may run on which hosts, and why.

A policy file is YAML::

    rules:
      - allow: [uname *, df *]       # programs and argument patterns, one string each
        hosts: ["*"]                 # host names (globs), tag:NAME, or * (the default)
      - allow: systemctl status *
        hosts: [tag:web]
      - deny: systemctl status secret-*
      - allow: apt-get update
        sudo: true                   # also when run through sudo/doas
        hosts: [web1]
      - allow_raw_shell: true        # constructs the reader cannot judge are allowed here
        hosts: [local]

A pattern is the program and one pattern per argument; a trailing ``*`` takes any further
arguments, and the pattern ``*`` alone takes any command. Commands are read with
:mod:`fleetrun.core.shell`; every simple command of a chain must
be allowed. For each, the matching rule with the most specific command pattern wins
(more literal words, then more words), then the one with the most specific host
(name, then name glob, then tag, then any), then the last in the file. No match: deny.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from fleetrun.core import paths
from fleetrun.core.errors import PolicyError
from fleetrun.core.inventory import TAG_RE, Host
from fleetrun.core.shell import (
    SAFE_ASSIGNMENTS, SAFE_EXPANSIONS, SimpleCommand, Word, assignment_problem, parse_command, pattern_problem,
)
from fleetrun.core.policy_warnings import rule_warning
from fleetrun.core.yaml_nodes import YamlReadError, compose, is_extension_key, mapping_entries, node_value, scalar_text

BUILTIN_SOURCE = "<built-in read-only policy>"
_GLOB_CHARS = set("*?[")
_RULE_KEYS = ("allow", "deny", "allow_raw_shell", "hosts", "sudo", "comment")

#: What the MCP server allows when no policy file exists: looking, never changing.
READ_ONLY_COMMANDS = (
    "uname *", "uptime *", "hostname", "hostname -f", "hostname -s", "hostname -i", "hostname -I", "hostname -A",
    "whoami", "id *", "date", "date -u", "date -R", "date +*", "date -u +*", "df *", "free *", "ps *", "nproc *",
    "lscpu *", "who *", "w *", "pwd", "echo *", "true", "cat /proc/loadavg", "cat /proc/meminfo", "cat /proc/cpuinfo",
)  # fmt: skip

def how_to_write_a_policy() -> str:
    """What a denial by the built-in policy tells the user to do."""
    return (
        "fleetrun is using its built-in read-only policy; to allow more, write a policy file "
        f"(policy.example.yaml shows every field) at {paths.config_dir() / 'policy.yaml'}, which a running "
        "`fleetrun serve` takes up at its next request, or pass one with --policy or FLEETRUN_POLICY"
    )


@dataclass(frozen=True)
class Rule:
    """One pattern of one rule entry. ``index`` counts entries from 1, as written in the file."""

    source: str
    index: int
    line: int | None
    action: str  # "allow", "deny" or "raw_shell"
    pattern: str | None
    hosts: tuple[str, ...] = ()
    sudo: bool = False

    @property
    def text(self) -> str:
        if self.action == "raw_shell":
            text = "allow_raw_shell: true"
        else:
            text = f"{self.action}: {self.pattern}"
        if self.hosts:
            text += f" (hosts: {', '.join(self.hosts)})"
        if self.sudo:
            text += " (sudo: true)"
        return text

    def describe(self) -> str:
        line = f", line {self.line}" if self.line is not None else ""
        return f"rule {self.index} of {self.source}{line}: {self.text}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "index": self.index, "line": self.line, "text": self.text}

    # -- matching --------------------------------------------------------------------------

    def host_rank(self, host: Host) -> int | None:
        """How specifically this rule names the host (higher: more), or None if it does not."""
        if not self.hosts:
            return 0
        best: int | None = None
        for selector in self.hosts:
            if selector == "*":
                rank = 0
            elif selector.startswith("tag:"):
                rank = 1 if selector[4:] in host.tags else None
            elif _GLOB_CHARS & set(selector):
                rank = 2 if fnmatch.fnmatchcase(host.name, selector) else None
            else:
                rank = 3 if selector == host.name else None
            if rank is not None and (best is None or rank > best):
                best = rank
        return best

    @functools.cached_property
    def words(self) -> tuple[str, ...]:
        """The pattern as shell words, split once (decisions run on every request)."""
        assert self.pattern is not None
        return tuple(shlex.split(self.pattern))

    def command_rank(self, command: SimpleCommand) -> tuple[int, int] | None:
        """(literal words, words) of the pattern if it matches ``command``, else None."""
        if command.privileged and not self.sudo and self.action == "allow":
            return None
        words = self.words
        if words == ("*",):
            return 0, 0  # any command at all: the least specific pattern there is
        program, arg_patterns = words[0], list(words[1:])
        any_rest = bool(arg_patterns) and arg_patterns[-1] == "*"
        if any_rest:
            arg_patterns = arg_patterns[:-1]
        if ("/" in command.program) != ("/" in program) or not fnmatch.fnmatchcase(command.program, program):
            return None
        args = command.args
        if len(args) < len(arg_patterns) or (not any_rest and len(args) != len(arg_patterns)):
            return None
        for arg, pattern in zip(args, arg_patterns):
            if not _word_matches(arg, pattern):
                return None
        literal = sum(1 for w in words if not (_GLOB_CHARS & set(w)))
        return literal, len(words) - (1 if any_rest else 0)


def _word_matches(word: Word, pattern: str) -> bool:
    if not word.known:
        return False  # it may become several words or anything: only a trailing * takes it
    if pattern == word.value:
        return True
    if not (_GLOB_CHARS & set(pattern)):
        return False
    if ".." in word.value.split("/") and ".." not in pattern.split("/"):
        return False  # /var/log/* must not reach /var/log/../../etc/shadow
    return fnmatch.fnmatchcase(word.value, pattern)


@dataclass(frozen=True)
class Verdict:
    """The decision on one simple command of the line."""

    command: str
    allowed: bool
    rule: Rule | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "allowed": self.allowed, "rule": self.rule.to_dict() if self.rule else None, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    """Whether a command may run on a host, the rule that decided, and why."""

    allowed: bool
    host: str
    command: str
    source: str
    rule: Rule | None
    reason: str
    verdicts: tuple[Verdict, ...] = ()

    @property
    def rule_text(self) -> str:
        return self.rule.describe() if self.rule else f"the default of {self.source}: deny"

    @property
    def explanation(self) -> str:
        """One paragraph for the user: the decision, the rule, and what to do about a denial."""
        verb = "allowed" if self.allowed else "denied"
        text = f"{verb} on host {self.host!r}: {self.reason} [{self.rule_text}]"
        if not self.allowed and self.source == BUILTIN_SOURCE:
            text += f". {how_to_write_a_policy()}"
        return text

    @property
    def summary(self) -> str:
        """A short line for task records and logs."""
        return f"{'allowed' if self.allowed else 'denied'} by {self.rule_text}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "host": self.host,
            "command": self.command,
            "policy": self.source,
            "rule": self.rule.to_dict() if self.rule else None,
            "reason": self.reason,
            "commands": [v.to_dict() for v in self.verdicts],
        }


@dataclass(frozen=True)
class Policy:
    """Ordered rules from one source; the default is deny."""

    rules: tuple[Rule, ...]
    source: str = BUILTIN_SOURCE

    @property
    def warnings(self) -> list[str]:
        """Rules that let any command through a program that runs what its arguments say
        (``allow: awk *``): each names its rule, says why, and what to write instead."""
        found = (rule_warning(rule) for rule in self.rules)
        return [warning for warning in found if warning is not None]

    def decide(
        self,
        host: Host,
        command: str,
        *,
        foreign_shell: str | None = None,
        environment: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Decision:
        """The decision on ``command`` for ``host``.

        What is around the command counts too: ``foreign_shell``, the shell that reads
        commands on the host when it is not of the sh family (see ``Transport.foreign_shell``);
        ``environment`` and ``cwd``, the variables and working directory the request sets
        (the host's own are configuration). The policy cannot judge what such a shell makes
        of a command, what ``PATH`` or ``LD_PRELOAD`` make of it (as it cannot for the same
        settings written inline), nor what ``make test`` runs in a directory of the
        requester's choosing.
        """
        parsed = parse_command(command)
        around: list[str] = []
        if foreign_shell is not None:
            around.append(f"host {host.name!r} runs commands with {foreign_shell}, which does not read them as sh does")
        unsafe = sorted(name for name in (environment or {}) if not SAFE_ASSIGNMENTS.fullmatch(name))
        if unsafe:
            around.append(f"the request sets {unsafe[0]}, which can change what a command does")
        # The locale-like variables are judged by their values, as when a command sets them: a
        # locale decides how the shell reads the command itself. The host's others are configuration.
        for setter, variables in (("the request", environment or {}), (f"host {host.name!r}'s env:", host.env)):
            problems = (assignment_problem(name, value) for name, value in sorted(variables.items())
                        if SAFE_ASSIGNMENTS.fullmatch(name))
            problem = next((problem for problem in problems if problem is not None), None)
            if problem is not None:
                around.append(f"{setter} sets {problem}")
        if cwd is not None and cwd != host.cwd:
            around.append(f"the request sets the working directory ({cwd}), which can change what a command does")
        # What a variable holds reaches whoever reads the output (echo $X, or id $X's error).
        exposed = [name for name in parsed.variables if not SAFE_EXPANSIONS.fullmatch(name) and name not in host.env]

        def deny(rule: Rule | None, reason: str, verdicts: Iterable[Verdict] = ()) -> Decision:
            return Decision(False, host.name, command, self.source, rule, reason, tuple(verdicts))

        unjudged = [*around, *parsed.problems, *(f"the expansion of ${name}" for name in exposed)]
        raw = self._best(host, (r for r in self.rules if r.action == "raw_shell"), None) if unjudged else None
        if unjudged and raw is None:
            if around:
                why = f"{around[0]}, so the policy cannot judge the command"
            elif parsed.problems:
                why = f"the command contains {parsed.problems[0]}, which the policy cannot judge"
            else:
                why = (
                    f"the command expands ${exposed[0]}, a variable that can hold a secret (only the shell's own, "
                    "such as HOME, USER and PATH, and those the host's env: sets are expanded without raw shell)"
                )
            return deny(None, f"{why}, and no rule allows raw shell on this host")
        if not parsed.commands and not parsed.problems:
            return deny(None, "there is no command in it")
        verdicts: list[Verdict] = []
        for simple in parsed.commands:
            rule = self._best(host, (r for r in self.rules if r.action != "raw_shell"), simple)
            if rule is None:
                verdicts.append(Verdict(simple.text, False, None, f"{_shown(simple)} matches no rule"))
            elif rule.action == "deny":
                verdicts.append(Verdict(simple.text, False, rule, f"{_shown(simple)} is denied"))
            else:
                verdicts.append(Verdict(simple.text, True, rule, f"{_shown(simple)} is allowed"))
        if unjudged:
            verdicts.append(Verdict(command, True, raw, f"raw shell ({unjudged[0]}) is allowed"))
        denied = [v for v in verdicts if not v.allowed]
        if denied:
            first = denied[0]
            return deny(first.rule, first.reason, verdicts)
        first = verdicts[0]
        reason = first.reason if len(verdicts) == 1 else f"all {len(verdicts)} commands are allowed"
        return Decision(True, host.name, command, self.source, first.rule, reason, tuple(verdicts))

    @staticmethod
    def _best(host: Host, rules: Iterable[Rule], command: SimpleCommand | None) -> Rule | None:
        best: tuple[tuple[int, ...], Rule] | None = None
        for position, rule in enumerate(rules):
            host_rank = rule.host_rank(host)
            if host_rank is None:
                continue
            command_rank = rule.command_rank(command) if command is not None else (0, 0)
            if command_rank is None:
                continue
            key = (*command_rank, host_rank, position)
            if best is None or key > best[0]:
                best = (key, rule)
        return best[1] if best else None


def _shown(command: SimpleCommand) -> str:
    text = repr(command.text)
    if command.wrappers:
        text += f" (run through {' and '.join(command.wrappers)})"
    return text


# -- loading ---------------------------------------------------------------------------------


def read_only_policy() -> Policy:
    """The built-in policy: a few commands that look at a host and change nothing."""
    return Policy(
        rules=tuple(Rule(BUILTIN_SOURCE, 1, None, "allow", pattern) for pattern in READ_ONLY_COMMANDS),
        source=BUILTIN_SOURCE,
    )


def find_policy_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``explicit``, then ``$FLEETRUN_POLICY``, then ``policy.yaml`` in the config dir."""
    return paths.find_config_file(
        explicit, flag="--policy", env=paths.POLICY_ENV, name="policy.yaml",
        not_found=lambda path, origin, problem: PolicyError(f"policy file {problem} (given by {origin})", path=path),
    )


def load_policy(explicit: str | os.PathLike[str] | None = None) -> Policy | None:
    """The configured policy, or None when there is none (the caller picks a fallback)."""
    path = find_policy_file(explicit)
    if path is None:
        return None
    text = PolicyError.read_text(path)
    return parse_policy(text, source=str(path))


def parse_policy(text: str, *, source: str = "<string>") -> Policy:
    """Parse and check policy text; raise :class:`PolicyError` naming file, line, rule and field."""

    def fail(node: yaml.Node | None, message: str, **where: Any) -> PolicyError:
        return PolicyError(message, path=source, line=node.start_mark.line + 1 if node is not None else None, **where)

    try:
        root = compose(text)
    except YamlReadError as exc:
        raise PolicyError(exc.message, path=source, line=exc.line) from None
    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "the policy must be a mapping with a 'rules:' list")
    top = mapping_entries(root, fail)
    for key, (key_node, _) in top.items():
        if key != "rules" and not is_extension_key(key):
            raise fail(key_node, f"unknown top-level key {key!r} (allowed: rules, and x-NAME for anchors)")
    if "rules" not in top:
        raise fail(root, "missing the 'rules:' list")
    if not isinstance(top["rules"][1], yaml.SequenceNode):
        raise fail(top["rules"][1], "'rules' must be a list of rules (each starting with '- ')")
    rules: list[Rule] = []
    for index, entry in enumerate(top["rules"][1].value, start=1):
        rules.extend(_parse_rule(entry, index, source, fail))
    return Policy(rules=tuple(rules), source=source)


#: A host name, or a glob of host names: the characters of a name, and the glob's own.
_NAME_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def _selector_can_match(selector: str) -> bool:
    if selector.startswith("tag:"):
        return TAG_RE.fullmatch(selector[4:]) is not None
    return _NAME_GLOB_RE.fullmatch(selector) is not None  # "*" included


def _texts(node: yaml.Node) -> list[str] | None:
    """A scalar or a list of them, each as written (host ``1`` and command ``true`` are
    text, as in the hosts file); None when any item is null, a list or a mapping."""
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    texts = [scalar_text(item) for item in items]
    return None if None in texts else texts  # type: ignore[return-value]


def _parse_rule(entry: yaml.Node, index: int, source: str, fail: Any) -> list[Rule]:
    if not isinstance(entry, yaml.MappingNode):
        message = "a rule must be a mapping (allow:, deny: or allow_raw_shell:, with hosts: and sudo:)"
        if isinstance(entry, yaml.ScalarNode):
            verb, _, rest = str(entry.value).partition(" ")
            if verb in ("allow", "deny") and rest.strip():
                message += f"; a colon is missing: write {verb}: {rest.strip()}"
        raise fail(entry, message, rule=index)
    fields: dict[str, tuple[yaml.Node, Any]] = {}
    for key, (key_node, value_node) in mapping_entries(entry, lambda node, message: fail(node, message, rule=index)).items():
        if key not in _RULE_KEYS:
            raise fail(key_node, f"unknown field (allowed: {', '.join(_RULE_KEYS)})", rule=index, field=key)
        fields[key] = (value_node, node_value(value_node, lambda node, message, key=key: fail(node, message, rule=index, field=key)))
    actions = [k for k in ("allow", "deny", "allow_raw_shell") if k in fields]
    if len(actions) != 1:
        raise fail(entry, "a rule needs exactly one of allow:, deny: or allow_raw_shell:", rule=index)
    action = actions[0]
    node, value = fields[action]
    hosts: tuple[str, ...] = ()
    if "hosts" in fields:
        hosts_node, _ = fields["hosts"]
        hosts_value = _texts(hosts_node)
        if not hosts_value or not all(hosts_value):
            raise fail(hosts_node, "expected a list of host names, globs, tag:NAME or *", rule=index, field="hosts")
        for selector in hosts_value:
            if not _selector_can_match(selector):
                raise fail(
                    hosts_node, f"{selector!r} can match no host: use a host name, a glob of one (web*), tag:NAME or *",
                    rule=index, field="hosts",
                )
        hosts = tuple(hosts_value)
    sudo = False
    if "sudo" in fields:
        sudo_node, sudo = fields["sudo"]
        if not isinstance(sudo, bool):
            raise fail(sudo_node, f"expected true or false, got {sudo!r}", rule=index, field="sudo")
    line = entry.start_mark.line + 1
    if action == "allow_raw_shell":
        if value is not True:
            raise fail(node, "allow_raw_shell takes true (leave the rule out to deny raw shell)", rule=index, field=action)
        return [Rule(source, index, line, "raw_shell", None, hosts, sudo)]
    patterns = _texts(node)
    if not patterns or not all(p.strip() for p in patterns):
        raise fail(node, "expected a command pattern or a list of them, e.g. 'systemctl status *'", rule=index, field=action)
    for pattern in patterns:
        try:
            words = shlex.split(pattern)
        except ValueError as exc:
            raise fail(node, f"cannot read pattern {pattern!r}: {exc}", rule=index, field=action) from None
        problem = pattern_problem(pattern, words)
        if problem is not None:
            raise fail(node, f"pattern {pattern!r} can never match: {problem}", rule=index, field=action)
    return [Rule(source, index, line, action, pattern.strip(), hosts, sudo) for pattern in patterns]
