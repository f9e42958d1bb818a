"""The command policy: the shell reader, rule choice, decisions, and bypass attempts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetrun.core.errors import PolicyDenied, PolicyError
from fleetrun.core.inventory import Host, parse_inventory
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.policy import BUILTIN_SOURCE, load_policy, parse_policy, read_only_policy
from fleetrun.core.shell import parse_command, pattern_problem

from conftest import REPO, run_cli

WEB1 = Host(name="web1", transport="local", tags=("web", "prod"))
OTHER = Host(name="db1", transport="local", tags=("db",))
READ_ONLY = read_only_policy()


def commands(line: str) -> list[tuple[str, list[str]]]:
    return [(c.program, [a.value for a in c.args]) for c in parse_command(line).commands]


# -- the reader ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("uname -a", [("uname", ["-a"])]),
        ("'u'n\"a\"m\\e -a", [("uname", ["-a"])]),
        ("a; b && c || d | e & f\ng", [(x, []) for x in "abcdefg"]),
        ("echo 'a b' \"c d\" e\\ f", [("echo", ["a b", "c d", "e f"])]),
        ("ls 2>/dev/null >/dev/null 2>&1", [("ls", [])]),
        ("LC_ALL=C df -h", [("df", ["-h"])]),
        ("sudo -u root -- systemctl status nginx", [("systemctl", ["status", "nginx"])]),
        ("timeout -s KILL 5 nice -n 3 uname", [("uname", [])]),
        ("sh -c 'uname; id' && bash -lc \"whoami\"", [("uname", []), ("id", []), ("whoami", [])]),
        # sh reads options after -c too, and the script after `--`
        ("sh -c -- 'rm -rf /'", [("rm", ["-rf", "/"])]), ("sh -c -e 'id -u'", [("id", ["-u"])]),
        ("bash -o errexit -eo pipefail -O extglob --norc -c 'uname' name arg", [("uname", [])]),
        ("sh -- -c 'id'", [("sh", ["--", "-c", "id"])]),  # a script file named -c
        ("uname # a comment; rm -rf /", [("uname", [])]),
        ("uname \\\n  -a", [("uname", ["-a"])]),
        ("[ -d /tmp ] && ls", [("[", ["-d", "/tmp", "]"]), ("ls", [])]),
        ("grep -c x <<< 'x y'", [("grep", ["-c", "x"])]),
        ("wc -l < /dev/null", [("wc", ["-l"])]),
        ("time -f %e -o /dev/null -p uname", [("uname", [])]),
        ("echo x | xargs -a /dev/null -0 echo", [("echo", ["x"]), ("echo", ["<arguments from input>"])]),
    ],
)
def test_the_reader_finds_every_simple_command(line, expected):
    parsed = parse_command(line)
    assert parsed.problems == []
    assert commands(line) == expected


def test_wrappers_and_unknown_words_are_recorded():
    sudo = parse_command("sudo LC_ALL=C apt-get update").commands[0]
    assert (sudo.program, sudo.wrappers, sudo.privileged, sudo.assignments) == ("apt-get", ("sudo",), True, (("LC_ALL", "C"),))
    xargs = parse_command("xargs -0 rm -f").commands[0]
    assert (xargs.program, [a.known for a in xargs.args]) == ("rm", [True, False])
    glob = parse_command("ls *.log ~ $HOME \"$X\" '$Y'").commands[0]
    assert [(a.value, a.known) for a in glob.args] == [("*.log", False), ("~", False), ("$HOME", False), ("$X", False), ("$Y", True)]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("echo $(id)", "command substitution $( … )"),
        ("echo `id`", "command substitution with backticks"),
        ("echo $((1+2))", "arithmetic expansion"),
        ("diff <(ls a) <(ls b)", "process substitution"),
        ("cat <<EOF\nx\nEOF", "here-document"),
        ("ls > out.txt", "output redirection to a file (> out.txt)"),
        ("if true; then ls; fi", "shell syntax (if …)"),
        ("(ls)", "subshell"),
        ("FOO=1 ls", "an environment setting that can change what a command does (FOO=…)"),
        ("$CMD -x", "a program name decided at run time"),
        ("echo 'unterminated", "unterminated single quote"),
        ("find . -exec rm {} +", "find -exec (it runs commands or writes files)"),
        ("echo ${X:-$(id)}", "parameter expansion with operators"),
        ("exec 3<>/dev/tcp/127.0.0.1/80", "network redirection"),
        ("sudo -s", "a shell, login, editor or listing through sudo (-s)"),
        ("env -S 'rm -rf /'", "env: -S (it splits a string into a command)"),
        ("wc -l < ~/.ssh/id_rsa", "input redirection from a file (< ~/.ssh/id_rsa)"),
        ("time -f %e -o ~/.bashrc true", "time: -o ~/.bashrc (writes its report to a file)"),
        ("time --output=/etc/passwd true", "time: --output /etc/passwd (writes its report to a file)"),
        ("xargs -a/etc/shadow echo", "xargs: -a /etc/shadow (reads the arguments from a file)"),
        ('"" -a', "an empty program name ('')"),  # found by the property test below
        ("sudo '' x", "an empty program name ('')"),
        ("ps eww", "ps eww (it shows processes' environments, where secrets are kept)"),
        ("env -C /tmp/evil make test", "env: -C /tmp/evil (a working directory chosen so is not judged; write cd DIR && COMMAND)"),
        ("sudo --chdir=/srv make test", "sudo: --chdir /srv (a working directory chosen so is not judged"),
        ("bash --rcfile /tmp/x -i -c id", "bash: --rcfile /tmp/x (a file the shell runs before the command)"),
        ("ps $OPTS", "ps $OPTS (an option decided at run time could show processes' environments"),
        ("ps -p $PIDS", "ps $PIDS (an option decided at run time could show"),  # unquoted, `1 e` is two words
        ("sh -o $OPT -c id", "sh -c with a script decided at run time"),
    ],
)
def test_constructs_that_cannot_be_judged_are_named(line, problem):
    parsed = parse_command(line)
    assert not parsed.judgeable
    assert problem in parsed.problems[0]


# -- rule choice -------------------------------------------------------------------------------

CHOICE = """
rules:
  - allow: systemctl status *
    hosts: [tag:web]
  - deny: systemctl status secret
  - allow: systemctl status secret
    hosts: [db1]
  - allow: ls *
  - deny: ls *
    hosts: [web*]
  - allow: ls *
    hosts: [web1]
  - allow: apt-get update
    sudo: true
  - allow: uptime
  - deny: uptime
"""


def decide(text: str, host: Host, command: str):
    return parse_policy(text, source="p.yaml").decide(host, command)


def test_the_most_specific_command_pattern_wins_before_the_host():
    decision = decide(CHOICE, WEB1, "systemctl status secret")
    assert not decision.allowed and (decision.rule.index, decision.rule.line) == (2, 5)
    assert decide(CHOICE, WEB1, "systemctl status nginx").rule.index == 1
    # Same command pattern: the rule naming the host beats the one for every host.
    assert decide(CHOICE, OTHER, "systemctl status secret").allowed
    assert decide(CHOICE, OTHER, "systemctl status nginx").rule is None  # not tagged web


def test_a_host_name_beats_a_glob_beats_any_and_the_last_rule_breaks_ties():
    assert decide(CHOICE, WEB1, "ls /").allowed and decide(CHOICE, WEB1, "ls /").rule.index == 6
    web2 = Host(name="web2", tags=("web",))
    assert not decide(CHOICE, web2, "ls /").allowed and decide(CHOICE, web2, "ls /").rule.index == 5
    assert decide(CHOICE, OTHER, "ls /").rule.index == 4
    tie = decide(CHOICE, OTHER, "uptime")
    assert not tie.allowed and tie.rule.index == 9


def test_sudo_needs_a_rule_that_says_so():
    assert decide(CHOICE, OTHER, "sudo apt-get update").allowed
    assert decide(CHOICE, OTHER, "apt-get update").allowed
    assert not decide(CHOICE, OTHER, "sudo ls /").allowed
    assert "run through sudo" in decide(CHOICE, OTHER, "sudo ls /").reason


def test_every_command_of_a_chain_must_be_allowed():
    decision = decide(CHOICE, WEB1, "ls / && systemctl status secret; ls /tmp")
    assert not decision.allowed
    assert [v.allowed for v in decision.verdicts] == [True, False, True]
    assert "'systemctl status secret' is denied" in decision.reason


def test_raw_shell_is_allowed_only_where_a_rule_says_so():
    text = "rules:\n  - allow: ls *\n  - allow_raw_shell: true\n    hosts: [web1]\n"
    assert decide(text, WEB1, "ls $(cat list)").allowed
    assert decide(text, WEB1, "ls $(cat list)").verdicts[-1].rule.index == 2
    denied = decide(text, OTHER, "ls $(cat list)")
    assert not denied.allowed and denied.rule is None
    assert denied.reason == (
        "the command contains command substitution $( … ), which the policy cannot judge, "
        "and no rule allows raw shell on this host"
    )
    # Raw shell does not wave through commands the reader can see.
    assert not decide(text, WEB1, "rm -rf / ; ls $(x)").allowed


def test_path_patterns_do_not_climb_out_with_dotdot():
    text = "rules:\n  - allow: cat /var/log/*\n"
    assert decide(text, WEB1, "cat /var/log/syslog").allowed
    assert not decide(text, WEB1, "cat /var/log/../../etc/shadow").allowed
    assert not decide(text, WEB1, "cat /var/log/x /etc/shadow").allowed


def test_the_star_pattern_allows_any_command():
    text = "rules:\n  - allow: '*'\n  - deny: rm *\n"
    assert decide(text, WEB1, "/usr/local/bin/tool --x").allowed
    assert not decide(text, WEB1, "rm -rf /").allowed


def test_decisions_explain_themselves():
    allowed = READ_ONLY.decide(WEB1, "uname -a")
    assert allowed.explanation == f"allowed on host 'web1': 'uname -a' is allowed [rule 1 of {BUILTIN_SOURCE}: allow: uname *]"
    denied = READ_ONLY.decide(WEB1, "rm -rf /")
    assert denied.explanation.startswith(
        f"denied on host 'web1': 'rm -rf /' matches no rule [the default of {BUILTIN_SOURCE}: deny]. "
        "fleetrun is using its built-in read-only policy; to allow more, write a policy file"
    )
    data = denied.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["rule"] is None and data["commands"][0]["allowed"] is False


# -- the policy file ----------------------------------------------------------------------------


def test_the_example_policy_loads_and_shows_every_field():
    text = (REPO / "policy.example.yaml").read_text()
    policy = parse_policy(text, source="policy.example.yaml")
    assert {r.action for r in policy.rules} == {"allow", "deny", "raw_shell"}
    for field in ("allow:", "deny:", "allow_raw_shell:", "hosts:", "sudo:", "comment:", "tag:", "*"):
        assert field in text
    assert policy.decide(WEB1, "systemctl status nginx").allowed
    assert not policy.decide(WEB1, "systemctl status secret-agent").allowed


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules:\n  - allow: ls\n    host: [a]\n", "p.yaml:3: rule 1, field 'host': unknown field (allowed: allow, deny, allow_raw_shell, hosts, sudo, comment)"),
        ("rules:\n  - allow: ls\n  - hosts: [a]\n", "p.yaml:3: rule 2: a rule needs exactly one of allow:, deny: or allow_raw_shell:"),
        ("rules:\n  - allow: ls\n  - deny rm *\n", "p.yaml:3: rule 2: a rule must be a mapping (allow:, deny: or allow_raw_shell:, with hosts: and sudo:); a colon is missing: write deny: rm *"),
        ("rules:\n  - [ls]\n", "p.yaml:2: rule 1: a rule must be a mapping (allow:, deny: or allow_raw_shell:, with hosts: and sudo:)"),
        ("rules:\n  - allow: ls\n    deny: rm\n", "p.yaml:2: rule 1: a rule needs exactly one of"),
        ("rules:\n  - allow: ls\n    sudo: yes please\n", "p.yaml:3: rule 1, field 'sudo': expected true or false, got 'yes please'"),
        ("rules:\n  - allow: [ls, ~]\n", "p.yaml:2: rule 1, field 'allow': expected a command pattern"),
        ("rules:\n  - allow: [ls, [rm]]\n", "p.yaml:2: rule 1, field 'allow': expected a command pattern"),
        ("rules:\n  - allow: ls\n    hosts: [web1, ~]\n", "p.yaml:3: rule 1, field 'hosts': expected a list of host names"),
        ("rules:\n  - allow: \"echo 'x\"\n", "p.yaml:2: rule 1, field 'allow': cannot read pattern"),
        ("rules:\n  - allow_raw_shell: false\n", "p.yaml:2: rule 1, field 'allow_raw_shell': allow_raw_shell takes true"),
        ("rule:\n  - allow: ls\n", "p.yaml:1: unknown top-level key 'rule' (allowed: rules, and x-NAME for anchors)"),
        ("rules: [\n", "p.yaml:2: invalid YAML"),
        ("rules:\n  allow: ls\n", "p.yaml:2: 'rules' must be a list of rules"),
        ("rules:\n  - allow: ls\n    hosts: ['web 1']\n", "p.yaml:3: rule 1, field 'hosts': 'web 1' can match no host"),
        ("rules:\n  - allow: ls\n    hosts: ['tag:']\n", "p.yaml:3: rule 1, field 'hosts': 'tag:' can match no host"),
        # A key written twice: YAML keeps the last, so the first (an allow, a whole rules list) would vanish unseen.
        ("rules:\n  - allow: ls *\n    allow: rm *\n", "p.yaml:3: rule 1: duplicate key 'allow'"),
        ("rules:\n  - allow: ls\nrules:\n  - allow: rm *\n", "p.yaml:3: duplicate key 'rules'"),
        ("rules:\n  - allow: ls\n    1: x\n", "p.yaml:3: rule 1, field '1': unknown field"),
        ("rules:\n  - allow: ls\n    [a]: x\n", "p.yaml:3: rule 1: a key must be a name, not a list or a mapping"),
        # Before: a control character in the file ended `fleetrun policy show` with a traceback.
        ("rules:\n  - allow: \"ls\x00\"\n", "p.yaml:2: invalid YAML: character 0x0000 is not allowed in YAML"),
        ("rules:\n  - allow: !shell ls\n", "p.yaml:2: rule 1, field 'allow': could not determine a constructor for the tag '!shell'"),
        ("rules:\n  - &r {allow: [ls, *r]}\n", "p.yaml:2: rule 1, field 'allow': a value that contains itself"),
        ("rules:\n  - allow: ls\n    sudo: !!bool x\n", "p.yaml:3: rule 1, field 'sudo': 'x' cannot be read as !!bool"),
        ("common: &c {hosts: [web1]}\nrules:\n  - {<<: *c, allow: ls}\n", "p.yaml:1: unknown top-level key 'common' (allowed: rules, and x-NAME for anchors)"),
        ("x-c: &c {hosts: [web1]}\nrules:\n  - {<<: *c, allow: ls, sudo: 1}\n", "p.yaml:3: rule 1, field 'sudo': expected true or false"),
    ],
)
def test_a_malformed_policy_names_file_line_rule_and_field(text, message):
    with pytest.raises(PolicyError) as error:
        parse_policy(text, source="p.yaml")
    assert str(error.value).startswith(message)


def test_patterns_and_host_names_are_taken_as_written_as_in_the_hosts_file():
    # A host the hosts file calls `1` or `yes`, and the commands `true`, `yes` and `2024`:
    # YAML 1.1 reads them as a number and booleans, which made the policy refuse to load.
    text = "rules:\n  - allow: [true, yes, 2024, 1.50]\n    hosts: [1, yes]\n  - deny: false\n    hosts: 1\n"
    policy = parse_policy(text, source="p.yaml")
    assert [(r.action, r.pattern, r.hosts) for r in policy.rules] == [
        ("allow", "true", ("1", "yes")), ("allow", "yes", ("1", "yes")), ("allow", "2024", ("1", "yes")),
        ("allow", "1.50", ("1", "yes")), ("deny", "false", ("1",)),
    ]
    one, yes, other = (Host(name=name, transport="local") for name in ("1", "yes", "web1"))
    assert [policy.decide(one, command).allowed for command in ("true", "yes", "2024", "1.50", "false")] == [True] * 4 + [False]
    assert policy.decide(yes, "true").allowed and not policy.decide(other, "true").allowed


# Before: each of these loaded, and the rule silently never matched (a deny that denied nothing).
@pytest.mark.parametrize(
    "pattern, why",
    [
        ("sudo apt-get update", "the policy looks through sudo and judges the command it runs: write 'apt-get update' with sudo: true"),
        ("/usr/bin/sudo -u root ls *", "the policy looks through sudo and judges the command it runs: write 'ls *' with sudo: true"),
        ("nice -n 5 tar *", "the policy looks through nice and judges the command it runs: write 'tar *'"),
        ("timeout * uptime", "the policy looks through timeout and judges the command it runs: write 'uptime'"),
        ("xargs rm", "the policy looks through xargs and judges the command it runs: write 'rm *'"),
        ("sh -c uptime", "the policy looks through sh and judges the command it runs: write 'uptime'"),
        ("bash -c *", "the policy reads the script of bash -c and judges each of its commands on its own"),
        ("LC_ALL=C ls *", "it starts with the variable setting LC_ALL=C, which is not part of the command"),
        ("env PATH=/opt/bin make", "a command with an environment setting that can change what a command does (env PATH=…) is allowed only by allow_raw_shell: true"),
        ("find * -exec *", "a command with find -exec (it runs commands or writes files) is allowed only by allow_raw_shell: true"),
        ("sudo -s", "a command with sudo: a shell, login, editor or listing through sudo (-s)"),
        ("uptime; df -h", "it contains the operator ';': each command of a line is judged on its own"),
        ("grep -E a|b *", "it contains the operator '|'"),
        ("ls > /tmp/out", "it contains the redirection >/tmp/out, which is not part of the command a pattern matches"),
        ("echo $(id)", "it contains command substitution $( … )"),
    ],
)
def test_a_pattern_that_can_never_match_is_an_error_saying_what_to_write(pattern, why):
    for action in ("allow", "deny"):
        with pytest.raises(PolicyError) as error:
            parse_policy(f"rules:\n  - {action}: {json.dumps(pattern)}\n", source="p.yaml")
        assert str(error.value).startswith(f"p.yaml:2: rule 1, field '{action}': pattern {pattern!r} can never match: {why}")


@pytest.mark.parametrize(
    "pattern, command",
    [
        ("grep -E 'a|b' *", "grep -E 'a|b' /var/log/syslog"), ("echo '>'", "echo '>'"), ("env", "env"), ("env *", "env -i"),
        ("sudo *", "sudo"), ("find *", "find /var/log -name '*.gz'"), ("python3* *", "python3.11 -V"), ("[ -d * ]", "[ -d /tmp ]"),
    ],
)
def test_patterns_around_wrappers_and_quoted_operators_still_load_and_match(pattern, command):
    policy = parse_policy(f"rules:\n  - allow: {json.dumps(pattern)}\n", source="p.yaml")
    assert policy.decide(WEB1, command).allowed


def test_every_built_in_pattern_can_match():
    assert [rule.pattern for rule in READ_ONLY.rules if pattern_problem(rule.pattern, list(rule.words))] == []


def test_a_rule_can_take_fields_from_an_anchor_through_a_merge_key():
    policy = parse_policy("rules:\n  - &web {allow: 'systemctl status *', hosts: [web*]}\n  - {<<: *web, allow: uptime}\n", source="p.yaml")
    assert [(rule.hosts, rule.line) for rule in policy.rules] == [(("web*",), 2), (("web*",), 3)]


def test_a_policy_file_that_is_not_utf8_is_an_error_naming_its_line_and_column(tmp_path):
    latin1 = tmp_path / "policy.yaml"
    latin1.write_bytes("rules:\n  - allow: echo café\n".encode("latin-1"))
    with pytest.raises(PolicyError) as error:
        load_policy(latin1)
    assert str(error.value) == f"{latin1}:2: the file is not UTF-8: column 20 has the byte 0xE9"


# -- bypass attempts: the built-in read-only policy must deny every one ---------------------------

NO_RULE = "matches no rule"
BYPASSES = [
    # quoting and escapes
    ("'r'm -rf /", NO_RULE), ("r\\m -rf /", NO_RULE), ('"rm" -rf /', NO_RULE), ("\\rm -rf /", NO_RULE),
    ("echo hi ; r''m -rf /", NO_RULE), ("u'n'ame; rm -rf /", NO_RULE),
    # chains and newlines
    ("echo hi; rm -rf /", NO_RULE), ("uname && rm -rf /", NO_RULE), ("uname || rm -rf /", NO_RULE),
    ("uname | sh", "commands read from its input (a pipe or a here-string)"), ("uname & rm -rf /", NO_RULE), ("uname\nrm -rf /", NO_RULE),
    ("uname # harmless\nrm -rf /", NO_RULE), ("uname\r\nrm -rf /", NO_RULE), ("uname |& tee /etc/motd", NO_RULE),
    # substitutions
    ("echo $(rm -rf /)", "command substitution"), ("echo `rm -rf /`", "backticks"), ('echo "$(rm -rf /)"', "command substitution"),
    ("uname $(id)", "command substitution"), ("cat <(rm -rf /)", "process substitution"), ("echo $((1+1))", "arithmetic"),
    ("echo ${X:-$(rm -rf /)}", "parameter expansion with operators"), ("echo $'\\x72m'", "ANSI-C"),
    # redirections
    ("uname > /etc/passwd", "output redirection"), ("echo x >> ~/.bashrc", "output redirection"),
    ("uname 2>/etc/shadow", "output redirection"), ("cat /proc/loadavg > /tmp/x", "output redirection"),
    ("uname >& /tmp/x", "output redirection"), ("uname <<EOF\nx\nEOF", "here-document"),
    ("exec 3<>/dev/tcp/127.0.0.1/80", "network redirection"), ("echo x | tee /etc/passwd", NO_RULE),
    ("xargs echo < /etc/shadow", "input redirection"), ("echo 0</etc/shadow", "input redirection"),
    ("time -o ~/.bashrc true", "time: -o"), ("time -p --output=/etc/passwd uname", "time: --output"),
    ("xargs -a /etc/shadow echo", "xargs: -a"), ("xargs --arg-file=/root/.ssh/id_rsa echo", "xargs: --arg-file"),
    # variables and environment
    ("PATH=/tmp/evil uname", "(PATH=…)"), ("LD_PRELOAD=/tmp/x.so uname", "(LD_PRELOAD=…)"),
    ("IFS=/ uname", "(IFS=…)"), ("a=1; rm -rf /", "(a=…)"), ("env PATH=/tmp uname", "(env PATH=…)"),
    ("env -S 'rm -rf /'", "env: -S (it splits a string into a command)"), ("$SHELL -c uname", "program name decided at run time"),
    ("${SHELL} -c id", "program name decided at run time"), ("{rm,-rf,/}", "program name decided at run time"),
    # wrappers
    ("sudo uname", "run through sudo"), ("sudo -s", "through sudo"), ("sudo -u root rm -rf /", NO_RULE),
    ("doas rm -rf /", NO_RULE), ("sh -c 'rm -rf /'", NO_RULE), ('bash -c "uname; rm -rf /"', NO_RULE),
    ("/bin/sh -c 'rm -rf /'", NO_RULE), ("echo / | xargs rm -rf", NO_RULE), ("nohup rm -rf / &", NO_RULE),
    ("timeout 5 rm -rf /", NO_RULE), ("nice -n 5 rm -rf /", NO_RULE), ("command rm -rf /", NO_RULE),
    ("exec rm -rf /", NO_RULE), ("time rm -rf /", NO_RULE), ("stdbuf -oL rm -rf /", NO_RULE),
    ("find / -delete", "find -delete"), ("ps aux | awk '{system(\"rm -rf /\")}'", NO_RULE),
    ("echo ok && python3 -c 'import os'", NO_RULE), ("/tmp/sh -c uname", NO_RULE),
    # look-alikes and paths
    ("/tmp/evil/uname", NO_RULE), ("./uname", NO_RULE), ("un\u0430me", NO_RULE), ("\uff55\uff4e\uff41\uff4d\uff45", NO_RULE),
    ("uname\u200b", NO_RULE), ("uname\u00a0-a", NO_RULE),
    # allowed programs with arguments they are not allowed
    ("cat /etc/shadow", NO_RULE), ("cat /proc/loadavg /etc/shadow", NO_RULE), ("cat /proc/../etc/shadow", NO_RULE),
    ("date -s '2020-01-01'", NO_RULE), ("hostname evil", NO_RULE),
    # shell syntax
    ("if true; then rm -rf /; fi", "shell syntax"), ("for i in 1; do rm -rf /; done", "shell syntax"),
    ("(rm -rf /)", "subshell"), ("{ rm -rf /; }", "program name decided at run time"), ("! rm -rf /", "shell syntax"),
    # what fish, csh and tcsh read as substitutions and redirections (the login shell reads the command)
    ("echo (rm -rf /)", "subshell"), ("uname >! /etc/motd", "output redirection"), ("uname >>& /tmp/x", "redirection"),
    ("echo hi; and rm -rf /", NO_RULE), ("uname >? /tmp/x", "output redirection"),
    # reading what other processes keep in their environment (tokens, passwords)
    ("ps eww", "processes' environments"), ("ps auxe", "processes' environments"), ("ps -o args -p 1 e", "processes' environments"),
    ("sudo ps -E", "processes' environments"),
    # a working directory no rule sees (`make` there runs what its Makefile says)
    ("env -C /tmp/evil uname", "a working directory chosen so is not judged"), ("env --chdir / id", "a working directory"),
    # a variable of the environment, which can hold a token, printed or put in an error message
    ("echo $GITHUB_TOKEN", "expands $GITHUB_TOKEN"), ('id "${AWS_SECRET_ACCESS_KEY}"', "expands $AWS_SECRET_ACCESS_KEY"),
    ("echo ${#GITHUB_TOKEN}", "expands $GITHUB_TOKEN"), ("sh -c 'uname $API_KEY'", "expands $API_KEY"),
    ("echo $USER\\\n_TOKEN", "expands $USER_TOKEN"), ("echo $[API_KEY]", "arithmetic expansion $["),
    ("echo $=API_KEY", "the expansion $=… (zsh)"), ("echo $~API_KEY", "(zsh)"),
    # a line continuation inside what the shell reads as one construct
    ('echo "$\\\n(rm -rf /)"', "command substitution"), ("echo $\\\n(rm -rf /)", "command substitution"),
    ("PATH\\\n=/tmp/evil uname", "(PATH=…)"), ("echo {PATH}>/dev/null; uname", "a descriptor number stored in a variable"), ("echo \"${\\\nX:-$(id)}\"", "parameter expansion with operators"),
]


def test_the_corpus_is_large_enough():
    assert len(BYPASSES) >= 50
    assert len({line for line, _ in BYPASSES}) == len(BYPASSES)


@pytest.mark.parametrize("line, why", BYPASSES, ids=[repr(line)[:40] for line, _ in BYPASSES])
def test_the_read_only_policy_denies_a_bypass_attempt(line, why):
    decision = READ_ONLY.decide(WEB1, line)
    assert not decision.allowed
    assert decision.rule is None, "the built-in policy denies by its default"
    assert decision.rule_text == f"the default of {BUILTIN_SOURCE}: deny"
    assert why in decision.reason


@pytest.mark.parametrize(
    "line", ["uname -a", "uptime", "df -h; free -m", "ps aux | echo x", "hostname -f", "date +%s", "id -u && whoami",
             "LC_ALL=C df -h /", "uname -a 2>/dev/null", "echo \"$HOME\"", "timeout 5 uptime"]
)
def test_the_read_only_policy_allows_looking_around(line):
    assert READ_ONLY.decide(WEB1, line).allowed, READ_ONLY.decide(WEB1, line).explanation


@pytest.mark.parametrize("line", [
    "sh -c -- 'echo M'", "sh -c -e 'echo M'", "sh -ce -- 'echo M'", "bash -o errexit -c 'echo M'", "sh -eo nounset -c 'echo M'",
    "sh +o errexit -c 'echo M'", "sh -c 'echo M' -- x", "bash --norc -lc 'echo M'", "sh -- -c 'echo M'", "sh -x ./-c",
])
def test_the_reader_takes_the_script_that_sh_runs(line):
    ran = subprocess.run(line, shell=True, capture_output=True, text=True).stdout == "M\n"
    assert (commands(line) == [("echo", ["M"])]) is ran, (line, commands(line))


def test_a_command_expands_only_variables_that_hold_no_secret(make_executor):
    # `echo *` and `id *` let an assistant print the server's GITHUB_TOKEN (id through its error).
    decision = READ_ONLY.decide(WEB1, "id $GITHUB_TOKEN")
    assert decision.reason == (
        "the command expands $GITHUB_TOKEN, a variable that can hold a secret (only the shell's own, such as HOME, "
        "USER and PATH, and those the host's env: sets are expanded without raw shell), and no rule allows raw shell "
        "on this host"
    )
    allowed = ['echo "$HOME" ${USER} $PATH $LANG $LC_ALL $PWD $1 "$@" $# $? $$ $-', "uname $HOSTNAME", "echo ${#PATH}"]
    for line in allowed:
        assert READ_ONLY.decide(WEB1, line).allowed, line
    assert parse_command("echo $A ${B} ${#A} \"$C\" '$D' \\$E $1 $@; sh -c 'echo $F'").variables == ["A", "B", "C", "F"]

    # A variable the host's own env: sets is configuration, not a secret.
    executor = make_executor(hosts_yaml="hosts:\n  app:\n    env: {APP_DIR: /srv/app}\n")
    app = executor.inventory.get("app")
    assert READ_ONLY.decide(app, "echo $APP_DIR").allowed
    assert not READ_ONLY.decide(WEB1, "echo $APP_DIR").allowed

    raw = parse_policy("rules:\n  - allow: echo *\n  - allow_raw_shell: true\n", source="raw.yaml")
    decision = raw.decide(WEB1, "echo $GITHUB_TOKEN")
    assert decision.allowed
    assert [v.reason for v in decision.verdicts] == ["'echo $GITHUB_TOKEN' is allowed", "raw shell (the expansion of $GITHUB_TOKEN) is allowed"]


def test_a_denied_expansion_keeps_the_token_from_the_output_of_a_real_run(make_executor, monkeypatch):
    monkeypatch.setenv("FLEETRUN_TEST_API_TOKEN", "tok-8f2c0e")
    executor = make_executor(policy=READ_ONLY)
    with pytest.raises(PolicyDenied, match=r"expands \$FLEETRUN_TEST_API_TOKEN"):
        executor.submit(TaskRequest(host="local", command="echo $FLEETRUN_TEST_API_TOKEN"))
    with pytest.raises(PolicyDenied, match="command substitution"):
        executor.submit(TaskRequest(host="local", command='echo "$\\\n(echo $FLEETRUN_TEST_API_TOKEN)"'))
    assert executor.list() == []
    task = executor.run(TaskRequest(host="local", command='echo "$HOME"'))
    assert executor.read_output(task.id).data == os.environ["HOME"].encode() + b"\n"


def test_bash_and_zsh_expand_what_the_reader_refuses():
    # Proof that the refused forms are expansions in the shells that read them so.
    env = {**os.environ, "API_KEY": "k1 k2"}
    assert subprocess.run(["bash", "-c", "echo $[1+2]"], capture_output=True, text=True).stdout == "3\n"
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-c", "printf '%s|' $=API_KEY"], capture_output=True, text=True, env=env).stdout == "k1|k2|"
    for shell in ("sh", "bash"):
        printed = subprocess.run([shell, "-c", 'echo "$\\\n(echo ran)" $USER\\\n_X'], capture_output=True, text=True,
                                 env={**env, "USER_X": "ux"}).stdout
        assert printed == "ran ux\n", shell


def test_a_tilde_after_the_equals_sign_of_an_argument_is_decided_by_bash():
    # bash (not in POSIX mode) expands ~ in an argument that looks like an assignment: the
    # hypothesis test below found `show X=~` given bash's home directory.
    line = "printf '%s|' X=~ X=a:~/b Y+=~ a:~ 'X='~ X=\\~"
    printed = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env={**os.environ, "HOME": "/home/h"}).stdout
    assert printed == "X=/home/h|X=a:/home/h/b|Y+=/home/h|a:~|X=~|X=~|"
    args = parse_command(line).commands[0].args
    assert [(a.value, a.known) for a in args] == [
        ("%s|", True), ("X=~", False), ("X=a:~/b", False), ("Y+=~", False), ("a:~", True), ("X=~", True), ("X=~", True)
    ]


def test_a_word_that_ksh_reads_as_a_compound_assignment_is_no_program():
    if shutil.which("ksh") is None:
        pytest.skip("needs ksh (.ci/run installs it)")
    line = ".sh.value=5; echo ${.sh.value}"
    printed = subprocess.run(["ksh", "-c", line], capture_output=True, text=True)
    assert (printed.stdout, printed.stderr) == ("5\n", "")
    assert parse_command(".sh.value=5").problems == ["an environment setting that can change what a command does (.sh.value=…)"]
    assert parse_command("V.x=1 uname").problems == ["an environment setting that can change what a command does (V.x=…)"]


# Pieces of command lines that the reader and sh must read alike, continuations included.
_PIECES = ["show ", " ", "$", "$X", "$USER", "${", "\\\n", "\\", '"', "'", "X", "_TOKEN", "}", "#", "(", ")",
           ";", "\n", "|", "[", "]", "=", "~", "+", "*", "{PATH}", ">&", "1", "2", "eval ", "export "]


@pytest.mark.parametrize("shell", ["sh", "bash", "zsh"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=9))
def test_what_the_policy_allows_is_what_the_shell_runs(tmp_path_factory, shell, pieces):
    """Whatever a policy of `allow: "*"` allows runs as the reader said, and expands no other variable."""
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell} (.ci/run installs it)")
    workdir = tmp_path_factory.mktemp("sh")
    (workdir / "bin").mkdir()
    show = workdir / "bin" / "show"
    show.write_text('#!/bin/sh\nprintf "%s\\0" show "$@" > "$LOGS/$$"\n')
    show.chmod(0o755)
    (workdir / "logs").mkdir()
    line = "show " + "".join(pieces)
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    if not anything.decide(WEB1, line).allowed:
        return
    env = {"PATH": f"{workdir / 'bin'}:/usr/bin:/bin", "LOGS": str(workdir / "logs"), "HOME": str(workdir),
           "USER": "u", "X": "secret-x", "USER_TOKEN": "secret-ut"}
    subprocess.run([shell, "-c", line], env=env, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    runs = [log.read_text().split("\0")[:-1] for log in (workdir / "logs").iterdir()]
    expected = parse_command(line).commands
    for run in runs:
        assert not any("secret" in arg for arg in run), (line, run)
        same = [c for c in expected if c.program == run[0] and [a.value for a in c.args] == run[1:]]
        decided = [c for c in expected if c.program == run[0] and not all(a.known for a in c.args)]
        assert same or decided, (line, run, [c.text for c in expected])
        expected.remove((same or decided)[0])


def test_any_command_is_still_no_raw_shell_however_sh_is_given_its_script():
    # Before, `sh -c -- SCRIPT` was read as the command `--`, which `allow: "*"` allowed,
    # and SCRIPT ran unjudged.
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    for line in ["sh -c -- 'uname > /etc/motd'", "sh -c -e 'uname > /etc/motd'", "bash -o errexit -c 'echo $(id)'"]:
        decision = anything.decide(WEB1, line)
        assert not decision.allowed and "no rule allows raw shell" in decision.reason, (line, decision.reason)


# The shell's own commands that run code or set variables, each with a shell that runs
# the marker through it ({marker}: a file it creates; {bin}: a directory with a uname that does).
SHELL_CODE_THROUGH_BUILTINS = [
    ("eval 'echo $(touch {marker})'", "sh", "command substitution"),
    ("builtin eval 'echo $(touch {marker})'", "bash", "command substitution"),
    ("trap 'echo $(touch {marker})' EXIT", "sh", "command substitution"),
    ("eval \"$HOME\" && touch {marker}", "sh", None),  # eval of a variable: its value is code
    ("alias x='echo $(touch {marker})'\nx", "sh", "alias x=… (an alias changes what later commands mean)"),
    ("test -v 'a[$(touch {marker})]'", "bash", "bash and zsh run what an array subscript expands"),
    ("[ -v 'a[$(touch {marker})]' ]", "bash", "array subscript"),
    ("printf -v 'a[$(touch {marker})]' x", "bash", "array subscript"),
    ("read 'a[$(touch {marker})]' <<< x", "bash", "array subscript"),
    ("declare 'a[$(touch {marker})]=1'", "bash", "array subscript"),
    ("let 'a[$(touch {marker})]=1'", "bash", "array subscript"),
    ("typeset 'a[$(touch {marker})]=1'", "zsh", "array subscript"),
    ("export 'a[$(touch {marker})]=1'", "zsh", "array subscript"),
    ("print -v 'a[$(touch {marker})]' x", "zsh", "array subscript"),
    ("true; - eval 'echo $(touch {marker})'", "zsh", "command substitution"),
    ("noglob eval 'echo $(touch {marker})'", "zsh", "command substitution"),
    ("export PATH={bin}; uname", "sh", "(export PATH=…)"),
    ("declare -x PATH={bin}; uname", "bash", "(declare PATH=…)"),
    ("read PATH <<< {bin}; uname", "bash", "read (it sets shell variables, which can change what later commands do)"),
    ("printf -v PATH %s {bin}; uname", "bash", "printf -v (it sets shell variables"),
    # bash's history: any text that `history -s` stores, fc runs
    ("set -o history\nhistory -s 'echo $(touch {marker})'\nfc -s", "bash", "fc (it runs commands from the shell's history"),
    ("set -o history\nhistory -s 'touch {marker}'\nfc -e :", "bash", "fc (it runs commands from the shell's history"),
    # the keyword option: PATH=DIR after the program name is its environment
    ("set -k; uname PATH={bin}", "bash", "set -k (NAME=value words anywhere on a command line become its environment)"),
    ("set -o keyword\nuname PATH={bin}", "bash", "set -o keyword (NAME=value words"),
    ("bash -k -c 'uname PATH={bin}'", "sh", "bash: -k (NAME=value words"),
    ("ksh -k -c 'uname PATH={bin}'", "sh", "ksh: -k (NAME=value words"),
    ("bash -eo keyword -c 'uname PATH={bin}'", "sh", "bash: -eo keyword (NAME=value words"),
    # a name made to run another program
    ("hash -p {bin}/uname uname; uname", "bash", "hash with a path (it changes which program or directory a name means)"),
    ("hash uname={bin}/uname; uname", "zsh", "hash with a path"),
    # zsh's own: code under other options, a loop, variables set by builtins zsh loads when used
    ("emulate sh -c 'echo $(touch {marker})'", "zsh", "(it runs code under other shell options"),
    ("repeat 1 PATH={bin} uname", "zsh", "shell syntax (repeat …)"),
    ("zformat -f PATH {bin}; uname", "zsh", "zformat (it sets shell variables"),
    ("zstyle -e :x y 'reply=($(touch {marker}))'; zstyle -a :x y r", "zsh", "zstyle ("),
    ("zmodload zsh/datetime; strftime -s PATH {bin} 0; uname", "zsh", "zmodload zsh/datetime (it adds commands to the shell"),
    ("private PATH={bin}; uname", "zsh", "(private PATH=…)"),
    # an append is an assignment in bash, zsh and ksh (dash looks for a program so named)
    ("PS4+='$(touch {marker})'; set -x; true", "bash", "(PS4+=…)"),
    ("PS4+='$(touch {marker})'; set -x; true", "ksh", "(PS4+=…)"),
    # bash's compgen expands its word list as code and runs -C's command
    ("compgen -W '$(touch {marker})' x", "bash", "compgen -W (it runs code"),
    ("compgen -o default -aW '$(touch {marker})' x", "bash", "compgen -W (it runs code"),
    ("compgen -C 'touch {marker}' x", "bash", "compgen -C (it runs code"),
    # zsh: getln takes what pushln put on the buffer stack; autoload DIR/NAME makes NAME run that file
    ("pushln {bin}; getln PATH; uname", "zsh", "getln (it sets shell variables"),
    ("autoload -U {bin}/uname; uname", "zsh", "autoload with a path (it changes which program"),
    # after a keyword, a shell still takes assignments
    ("time PATH={bin} uname", "bash", "(PATH=…)"),
    ("time -p PATH={bin} uname", "bash", "(PATH=…)"),
    ("time PATH={bin} uname", "ksh", "(PATH=…)"),
    ("time PATH={bin} uname", "zsh", "(PATH=…)"),
    ("nocorrect PATH={bin} uname", "zsh", "(PATH=…)"),
]


@pytest.mark.parametrize("form, shell, why", SHELL_CODE_THROUGH_BUILTINS)
def test_any_command_is_still_no_raw_shell_through_the_shells_own_commands(form, shell, why, tmp_path):
    # Under `allow: "*"`, eval ran what sh -c would have had judged, `test -v 'a[$(…)]'` ran
    # the substitution in bash, and `export PATH=DIR` did what `PATH=DIR uname` may not.
    marker, bin_dir = _marker_and_uname(shell, tmp_path)
    line = form.format(marker=marker, bin=bin_dir)
    _assert_the_shell_runs_it_and_any_command_is_no_raw_shell(shell, line, marker, why, {"HOME": f"touch {marker}"})


def _marker_and_uname(shell: str, tmp_path: Path) -> tuple[Path, Path]:
    """Where the marker goes, and a directory whose uname makes it; skips without ``shell``."""
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell} (.ci/run installs it)")
    marker, bin_dir = tmp_path / "ran", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uname").write_text(f"#!/bin/sh\n/usr/bin/touch {marker}\n")
    (bin_dir / "uname").chmod(0o755)
    return marker, bin_dir


def _assert_the_shell_runs_it_and_any_command_is_no_raw_shell(
    shell: str, line: str, marker: Path, why: str | None, env: dict[str, str]
) -> None:
    subprocess.run([shell, "-c", line], env={**os.environ, **env}, cwd=marker.parent, capture_output=True, timeout=30)
    assert marker.exists(), f"{shell} does not run the marker through {line!r}: the test proves nothing"
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    decision = anything.decide(WEB1, line)
    assert not decision.allowed and "no rule allows raw shell" in decision.reason, decision.explanation
    assert why is None or why in decision.reason, decision.reason


@pytest.mark.parametrize(
    "line, shells",
    [
        ("'TZ=x' uname", ["sh", "bash", "zsh", "ksh"]),
        ('"TZ"=x uname', ["sh", "bash", "zsh", "ksh"]),
        ("command TZ=x uname", ["sh", "bash", "zsh", "ksh"]),
        ("exec TZ=x uname", ["sh", "bash", "zsh", "ksh"]),
        ("nohup TZ=x uname", ["sh", "bash"]),
        ("nice TZ=x uname", ["bash"]),
        ("noglob TZ=x uname", ["zsh"]),
        ("/usr/bin/time TZ=x uname", ["bash"]),
    ],
)
def test_name_equals_value_where_no_assignment_stands_is_the_program_the_shell_runs(line, shells, tmp_path):
    # Quoted, or after a program, NAME=value is no assignment: the shell runs a program so
    # named. The reader took it as one and judged `uname`, which `allow: uname *` allowed.
    policy = parse_policy("rules:\n  - allow: uname *\n", source="p.yaml")
    [command] = parse_command(line).commands
    assert (command.program, [a.value for a in command.args], command.assignments) == ("TZ=x", ["uname"], ())
    assert not policy.decide(WEB1, line).allowed
    for shell in shells:
        (tmp_path / shell).mkdir()
        marker, bin_dir = _marker_and_uname(shell, tmp_path / shell)
        (bin_dir / "TZ=x").write_text(f"#!/bin/sh\n/usr/bin/touch {marker}\n")
        (bin_dir / "TZ=x").chmod(0o755)
        subprocess.run([shell, "-c", line], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                       cwd=tmp_path, capture_output=True, timeout=30)
        assert marker.exists(), f"{shell} did not run the program TZ=x for {line!r}"
    # Where an assignment stands, it still is one.
    for assigned in ("TZ=x uname", "time TZ=x uname", "env TZ=x uname"):
        assert policy.decide(WEB1, assigned).allowed, assigned


# Where bash or zsh evaluate a word as arithmetic, a variable named there is evaluated in
# turn, and a command substitution in an array subscript runs. TZ holds one ({payload}),
# as an earlier command could have left it (TZ, LANG or COLUMNS, which a command may set
# without a rule, or $_, the last word of the command before).
ARITHMETIC_IN_BUILTINS = [
    # zsh takes these numbers as arithmetic
    ("exit TZ", "zsh", "exit TZ (bash or zsh evaluate it as arithmetic, and a variable it names in turn"),
    ("shift TZ", "zsh", "shift TZ (bash or zsh evaluate it as arithmetic"),
    ("break TZ", "zsh", "break TZ (bash or zsh evaluate it as arithmetic"),
    ("bye TZ", "zsh", "bye TZ (bash or zsh evaluate it as arithmetic"),
    ('exit "$TZ"', "zsh", "exit $TZ (bash or zsh evaluate it as arithmetic"),
    ("printf '%s: %d' x TZ", "zsh", "printf TZ (bash or zsh evaluate it as arithmetic"),
    ("printf '%.*s' TZ x", "zsh", "printf TZ (bash or zsh evaluate it as arithmetic"),
    ("print -f %d TZ", "zsh", "print TZ (bash or zsh evaluate it as arithmetic"),
    ("test -t TZ", "zsh", "test TZ (bash or zsh evaluate it as arithmetic"),
    ("COLUMNS=TZ", "zsh", "COLUMNS=TZ (zsh evaluates a value of COLUMNS as arithmetic: write a number)"),
    ("echo $HOME[TZ]", "zsh", "an array subscript ($HOME[…], zsh evaluates it as arithmetic)"),
    # and the subscript of a variable name given to these
    ("unset 'path[TZ]'", "zsh", "unset path[TZ] (bash or zsh evaluate a subscript of the name as arithmetic"),
    ("export 'path[TZ]'", "zsh", "export path[TZ] (bash and zsh run what an array subscript expands"),
    ("unset 'DIRSTACK[TZ]'", "bash", "unset DIRSTACK[TZ] (bash or zsh evaluate a subscript of the name"),
    ("test -v 'DIRSTACK[TZ]'", "bash", "test DIRSTACK[TZ] (bash or zsh evaluate a subscript of the name"),
    ("echo '{payload}'; [ -v 'DIRSTACK[_]' ]", "bash", "[ DIRSTACK[_] (bash or zsh evaluate a subscript"),
    ('unset "$TZ"', "bash", "unset $TZ (bash or zsh evaluate a subscript of the name"),
    # an unquoted word can be several: here "-a -v NAME"
    ("echo 'x -a -v {payload}'; test $_", "bash", "test $_ (it can make several words (unquoted, or as \"$@\")"),
    ("set -- -v 'DIRSTACK[TZ]'; test \"$@\"", "bash", "test $@ (it can make several words"),
    ("set -- %d TZ; printf \"$@\"", "zsh", "printf $@ (it can make several words"),
    ('echo -v; test "$_" "$TZ"', "bash", "test $TZ (bash or zsh evaluate it as arithmetic"),
    # a variable made a number or another variable: its values are then evaluated
    ("declare -i _; echo '{payload}'; true", "bash", "declare -i (it changes how a variable's later values are read"),
    ("integer TZ; TZ=TZ", "zsh", "integer (it changes how a variable's later values are read"),
    ("typeset -n TZ=PATH; TZ={bin}; uname", "ksh", "typeset -n (it changes how"),
    ("declare -n TZ=PATH; TZ={bin}; uname", "bash", "declare -n (it changes how"),
    # a value that holds one: refused wherever a command may set it
    ("NO_COLOR='{payload}'; COLUMNS=NO_COLOR", "zsh", "NO_COLOR={payload} (where bash or zsh evaluate NO_COLOR as arithmetic"),
]


@pytest.mark.parametrize("form, shell, why", ARITHMETIC_IN_BUILTINS)
def test_a_word_bash_or_zsh_evaluate_as_arithmetic_needs_raw_shell_unless_it_is_a_number(form, shell, why, tmp_path):
    # Under `allow: "*"`, these ran the substitution: the reader saw a word, the shell a
    # variable to evaluate, and in it an array subscript.
    marker, bin_dir = _marker_and_uname(shell, tmp_path)
    payload = f"{'path' if shell == 'zsh' else 'DIRSTACK'}[$(>{marker})]"  # no space: it splits into words whole
    line = form.format(payload=payload, bin=bin_dir)
    _assert_the_shell_runs_it_and_any_command_is_no_raw_shell(shell, line, marker, why and why.format(payload=payload), {"TZ": payload})


@pytest.mark.parametrize("line", [
    '[ -d "$HOME" ]', '[ "$USER" = root ]', "[ $? -eq 0 ]", '[ -z "$TERM" -o "$TERM" = dumb ]', "test -t 1",
    "test -v HOME", "exit $?", "shift 2", "printf '%s: %5.1f%%\\n' \"$HOME\" 99.5", "printf '%x %e' 0xff -1e5",
    "printf '%s\\n' $PATH", "print -f '%s' \"$HOME\"", "unset -v 'a[@]' b", "export 'path[1]'", "export TZ=UTC",
    "declare -x LC_ALL=C", "declare -p", "COLUMNS=80 ls", "LINES= ls", 'echo "${HOME}[1]"',
])
def test_a_number_a_plain_name_or_a_quoted_operand_is_still_a_command(line):
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    assert anything.decide(WEB1, line).allowed, anything.decide(WEB1, line).explanation


@pytest.mark.parametrize("line", [
    "fc -l", "fc -ln -5", "set -euo pipefail", "set -o errexit -o xtrace", "set +k", "set +o keyword", "set -- -k x",
    "hash", "hash -r", "shopt -s nullglob", "shopt -so pipefail", "set -o", "setopt", "emulate", "zmodload",
    "compgen -c ls", "compgen -A file -X '*.o' src/", "compgen -oW x", "autoload -Uz compinit",
])
def test_the_shells_own_commands_that_list_or_set_plain_options_are_commands(line):
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    assert anything.decide(WEB1, line).allowed, anything.decide(WEB1, line).explanation


@pytest.fixture(scope="module")
def legacy_locales(tmp_path_factory) -> Path:
    """A LOCPATH holding zh_CN.GBK, zh_TW.BIG5 and ja_JP.SJIS, made with localedef."""
    if shutil.which("localedef") is None or not Path("/usr/share/i18n/charmaps/GBK.gz").exists():
        pytest.skip("needs localedef and the locales package (.ci/run installs it)")
    path = tmp_path_factory.mktemp("locales")
    for source, charmap, name in (("zh_CN", "GBK", "zh_CN.GBK"), ("zh_TW", "BIG5", "zh_TW.BIG5"), ("ja_JP", "SHIFT_JIS", "ja_JP.SJIS")):
        subprocess.run(["localedef", "--no-warnings=ascii", "-i", source, "-f", charmap, str(path / name)], check=True, capture_output=True)
    return path


# 中 (E4 B8 AD in UTF-8) ends in AD, which GBK and Big5 take with a backslash after it as
# one character; Á (C3 81) ends in 81, which Shift_JIS takes so. What the reader reads as
# an escaped `;` or `$`, bash and ksh then read as a separator or an expansion.
@pytest.mark.parametrize("shell", ["bash", "ksh"])
@pytest.mark.parametrize("setting, character", [
    ("export LC_ALL=zh_CN.GBK", "中"), ("LANG=zh_TW.BIG5", "中"), ("LC_ALL= LC_CTYPE=ja_JP.SJIS", "Á"),
    ("typeset -x LC_ALL=zh_CN.GBK", "中"),
])
def test_a_locale_whose_characters_may_end_in_a_backslash_needs_raw_shell(shell, setting, character, legacy_locales, tmp_path):
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell} (.ci/run installs it)")
    marker = tmp_path / "ran"
    separator, expansion = f"echo {character}\\;touch {marker}", f'echo "{character}\\$(touch {marker})"'
    assert commands(separator) == [("echo", [f"{character};touch", str(marker)])]
    assert commands(expansion) == [("echo", [f"{character}$(touch {marker})"])]
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    for line in (f"{setting}\n{separator}", f"{setting}\n{expansion}"):
        subprocess.run([shell, "-c", line], env={**os.environ, "LOCPATH": str(legacy_locales)}, cwd=tmp_path, capture_output=True, timeout=30)
        assert marker.exists(), f"{shell} does not run the marker through {line!r}: the test proves nothing"
        marker.unlink()
        decision = anything.decide(WEB1, line)
        assert not decision.allowed and "no rule allows raw shell" in decision.reason, decision.explanation
        assert "a locale other than C or UTF-8 (" in decision.reason, decision.reason
        assert f"{setting.split()[-1]}; in BIG5, GBK or Shift_JIS, bash and ksh read some backslashes" in decision.reason


@pytest.mark.parametrize("line", [
    "LANG=en_US.UTF-8 sort x", "LC_ALL=C ls", "LC_ALL=C.utf8 ls", "export LANG=de_DE.utf8@euro", "LC_ALL= ls",
    "LC_TIME=en_GB date", "export LC_ALL", "env LANG=C.UTF-8 ls", "LANGUAGE=fr ls", "env LC_ALL=POSIX ls",
])
def test_a_c_or_utf8_locale_is_a_plain_setting(line):
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    assert anything.decide(WEB1, line).allowed, anything.decide(WEB1, line).explanation


def test_a_locale_named_by_a_path_needs_raw_shell_and_one_after_time_is_a_setting():
    assert parse_command("LC_MESSAGES=/tmp/x/fr ls").problems == ["a locale named by a path (LC_MESSAGES=/tmp/x/fr: its files could be anyone's)"]
    assert parse_command("LANGUAGE=../../tmp/x ls").problems == ["a locale named by a path (LANGUAGE=../../tmp/x: its files could be anyone's)"]
    assert commands("time LC_ALL=C sort x") == [("sort", ["x"])]
    assert parse_command("time LC_ALL=C sort x").commands[0].assignments == (("LC_ALL", "C"),)


def test_a_legacy_locale_in_the_request_or_the_hosts_env_needs_raw_shell():
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    decision = anything.decide(WEB1, "ls", environment={"LC_ALL": "zh_TW.BIG5"})
    assert not decision.allowed and decision.reason.startswith(
        "the request sets a locale other than C or UTF-8 (LC_ALL=zh_TW.BIG5"), decision.reason
    assert anything.decide(WEB1, "ls", environment={"LC_ALL": "C.UTF-8"}).allowed
    decision = anything.decide(WEB1, "ls", environment={"LC_MESSAGES": "/tmp/x/fr"})
    assert not decision.allowed and decision.reason.startswith("the request sets a locale named by a path (LC_MESSAGES=/tmp/x/fr"), decision.reason
    host = parse_inventory("hosts:\n  old:\n    env: {LANG: ja_JP.SJIS}\n", source="hosts.yaml").get("old")
    decision = anything.decide(host, "ls")
    assert not decision.allowed and decision.reason.startswith(
        "host 'old''s env: sets a locale other than C or UTF-8 (LANG=ja_JP.SJIS"), decision.reason


_EVERY_FILE_BUT_NOTHING = "printf '%s,' ^nothing"


@pytest.mark.parametrize("line", [
    f"setopt extendedglob\n{_EVERY_FILE_BUT_NOTHING}", f"set -o extendedglob\n{_EVERY_FILE_BUT_NOTHING}",
    f"emulate zsh -o extendedglob\n{_EVERY_FILE_BUT_NOTHING}", f'zsh -o extendedglob -c "{_EVERY_FILE_BUT_NOTHING}"',
])
def test_an_option_that_changes_how_zsh_reads_later_commands_needs_raw_shell(line, tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("needs zsh (.ci/run installs it)")
    (tmp_path / "secret.key").touch()
    # The reader says printf is given ^nothing; zsh, with extendedglob, gives it every file but one.
    assert commands(_EVERY_FILE_BUT_NOTHING) == [("printf", ["%s,", "^nothing"])]
    printed = subprocess.run(["zsh", "-c", line], cwd=tmp_path, capture_output=True, text=True).stdout
    assert printed == "secret.key,", printed
    anything = parse_policy('rules:\n  - allow: "*"\n', source="any.yaml")
    decision = anything.decide(WEB1, line)
    assert not decision.allowed and "(it changes how the shell reads later commands)" in decision.reason, decision.reason


@pytest.mark.parametrize("shell", ["bash", "zsh", "ksh"])
def test_a_descriptor_stored_in_a_variable_is_an_assignment(shell):
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell}")
    line = "echo x {PATH}>/dev/null; echo $PATH"
    printed = subprocess.run([shell, "-c", line], capture_output=True, text=True).stdout.split("\n")
    assert printed[0] == "x" and printed[1].isdigit(), printed  # `uname` would now be looked up in ./11
    assert parse_command(line).problems == ["a descriptor number stored in a variable ({PATH}>…)"]
    assert parse_command("echo {PATH} >/dev/null; echo x{a}>/dev/null").problems == []


def test_a_descriptor_of_two_digits_is_not_read_as_either_shell_reads_it():
    # bash opens descriptor 11; dash (Debian's sh), zsh and ksh pass 11 as an argument.
    line = "printf '%s|' a 11>&2"
    printed = {shell: subprocess.run([shell, "-c", line], capture_output=True, text=True)
               for shell in ("bash", "dash", "zsh", "ksh") if shutil.which(shell)}
    assert (printed["bash"].stdout, printed["bash"].stderr) == ("a|", "")
    assert {shell: result.stderr for shell, result in printed.items() if shell != "bash"} == {
        shell: "a|11|" for shell in printed if shell != "bash"}
    assert parse_command(line).problems == ["a descriptor number of more than one digit (11>&…)"]


def test_the_reader_has_limits_on_what_no_person_writes():
    assert len(parse_command("true;" * 1000).commands) == 1000
    assert parse_command("true;" * 1001).problems == ["more than 1000 commands in one line"]
    assert commands("env " * 16 + "uname") == [("uname", [])]
    assert commands("time " + "LC_ALL=C " * 5000 + "uname") == [("uname", [])]
    assert parse_command("env " * 17 + "uname").problems == ["wrappers nested too deeply inside each other"]
    # A line as long as a command may be is read to its end (bench/run.py reader: in linear time).
    assert [a.known for a in parse_command("echo " + "[" * 131000).commands[0].args] == [True]
    assert [a.known for a in parse_command("echo " + "[" * 65000 + "]" + "[" * 65000).commands[0].args] == [False]


def test_the_shells_own_commands_are_judged_by_what_they_run():
    assert commands("eval uname -a") == [("uname", ["-a"])]
    assert commands("trap 'uname; id' EXIT") == [("uname", []), ("id", [])]
    assert commands("builtin echo x && noglob ls") == [("echo", ["x"]), ("ls", [])]
    for harmless in ["trap - INT", "trap '' HUP", "trap -p", "trap 2 15", "alias", "alias ll", "export HOME LC_ALL=C",
                     "printf '%s\\n' -v", "printf -- -v", "test -v HOME", "unset x"]:
        assert parse_command(harmless).problems == [], harmless
    assert parse_command("sleep 1 & wait -n -p PID").problems == ["wait -p (it sets shell variables, which can change what later commands do)"]
    assert READ_ONLY.decide(WEB1, "eval uname -a").allowed
    assert not READ_ONLY.decide(WEB1, "eval rm -rf /").allowed
    assert pattern_problem("eval *", ["eval", "*"]).startswith("the policy reads the code eval runs")


# Each with the env of the process it looks at (on this machine's procps) and without it.
PS_FORMS = [
    ("ps p {pid} e", True), ("ps -o args -p {pid} e", True), ("ps -p {pid} -o args eww", True),
    ("ps --sort=user -o args e -p {pid}", True), ("ps ewwf -p {pid}", True), ("ps -p {pid} auxe", True),
    ("ps -p {pid} -o args", False), ("ps ww -o args -p {pid}", False), ("ps axo user,pid,args", False),
    ("ps -C sleep -o args", False), ("ps opid,user,args p {pid}", False), ("ps -opid,user,args -p {pid}", False),
    ("ps kuser -o args -p {pid}", False), ("ps aux --sort -rss", False), ("ps -ef", False), ("ps -eo pid,user,args", False),
    ("ps -p {pid} -ww -o user,args --no-headers", False),
]


@pytest.mark.parametrize("form, shows_environment", PS_FORMS)
def test_ps_is_denied_exactly_when_it_would_show_environments(form, shows_environment, tmp_path):
    marker = "FLEETRUN_PS_MARKER=" + tmp_path.name
    process = subprocess.Popen(["sleep", "60"], env={**os.environ, "FLEETRUN_PS_MARKER": tmp_path.name})
    try:
        line = form.format(pid=process.pid)
        wide = {**os.environ, "COLUMNS": "100000"}  # not cut at 80 columns, as when stdout is not a terminal
        printed = subprocess.run(line, shell=True, capture_output=True, text=True, check=True, env=wide).stdout
        assert (marker in printed) is shows_environment, f"procps reads {line!r} otherwise than this test says"
        decision = READ_ONLY.decide(WEB1, line)
        assert decision.allowed is not shows_environment, decision.explanation
        if shows_environment:
            assert "it shows processes' environments, where secrets are kept" in decision.explanation
    finally:
        process.kill()
        process.wait()


# Policies that allow any program: what they refuse is what the reader cannot judge.
ALLOW_ALL = parse_policy("rules:\n  - allow: '*'\n", source="p.yaml")
ALLOW_ALL_SUDO = parse_policy("rules:\n  - allow: '*'\n    sudo: true\n", source="p.yaml")


def assert_the_shell_runs_it(shell: str, line: str, cwd: Path, made: str = "pwned", *, exits_0: bool = True) -> None:
    """Run ``line`` in ``shell`` (``ash``: busybox's) and check it made the file ``made`` (and,
    with ``exits_0``, exited 0): the proof that the shell runs what the test says, which the
    reader must see. Skips without the shell."""
    command = ["busybox", "sh"] if shell == "ash" else [shell]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    subprocess.run([*command, "-c", line], cwd=cwd, capture_output=True, timeout=30, check=exits_0)
    assert (cwd / made).exists(), f"{shell} does not run what this test says it does: {line}"


def assert_refused(policy, line: str, problem: str) -> None:
    decision = policy.decide(WEB1, line)
    assert not decision.allowed and problem in decision.explanation, decision.explanation


# Each runs a command its words do not show once bash splits what $_ or $1 holds into
# several words: the last argument of the command before, or an argument of sh -c.
HIDDEN_BY_SPLITTING = [
    ('echo "5 touch pwned-nice" >/dev/null; nice -n $_ true', "pwned-nice", "nice: -n $_ (a value the shell may split"),
    ('echo "X touch pwned-env" >/dev/null; env -u $_ true', "pwned-env", "env: -u $_ (a value the shell may split"),
    ('echo "KILL 5 touch pwned-timeout" >/dev/null; timeout -s $_ 5 true', "pwned-timeout", "timeout: -s $_ (a value"),
    ('echo ". -maxdepth 0 -exec touch pwned-find ;" >/dev/null; find $_', "pwned-find",
     "find $_ (a word decided at run time could be an action such as -exec or -delete"),
    ("sh -c 'find . -maxdepth 0 \"$1\" pwned-fprint' x -fprint", "pwned-fprint", "find $1 (a word decided at run time"),
    ("echo 'touch${IFS}pwned-trap EXIT' >/dev/null; trap $_", "pwned-trap", "trap with code decided at run time"),
    ('echo ". -maxdepth 0 -exec touch pwned-xargs ;" | xargs find', "pwned-xargs",
     "find <arguments from input> (a word decided at run time"),
    # Brace expansion and globs make words too: `find *` in a directory holding a file `-delete`.
    ("find . -maxdepth 0 {-fprint,pwned-brace}", "pwned-brace", "find {-fprint,pwned-brace} (a word decided at run time"),
]


@pytest.mark.parametrize("line, made, problem", HIDDEN_BY_SPLITTING)
def test_a_word_the_shell_may_split_is_not_taken_for_one_harmless_argument(line, made, problem, tmp_path):
    # Before, each was allowed wherever its visible command was (`allow: "*"`, or `find *`
    # with `echo *`), and each ran touch.
    assert_the_shell_runs_it("bash", line, tmp_path, made)
    assert_refused(ALLOW_ALL, line, problem)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('echo "X touch y" >/dev/null; xargs -I $_ echo', "xargs: -I $_ (a value the shell may split"),
        ('echo "-p PATH" >/dev/null; wait $_', "wait $_ (a word decided at run time could be -p NAME"),
        ('sudo -u $USER id', "sudo: -u $USER (a value the shell may split into more words: quote it)"),
        # $! is empty until a job has run in the background, and then vanishes: true runs, not 1.
        ("nice -n $! 1 true", "nice: -n $! (a value the shell may split into more words: quote it)"),
    ],
)
def test_options_that_may_split_are_refused_naming_them(line, problem):
    assert_refused(ALLOW_ALL_SUDO, line, problem)


@pytest.mark.parametrize(
    "line",
    ['sudo -u "$USER" id', 'nice -n "$_" true', "sleep 0 & wait $!", "find . -name '*.log' -print", 'trap "$_"', "nice -n $$ true",
     "ps -o args -p $$", "find ~ -name '*.log'", 'find "$HOME"/logs -type f', 'cd /tmp && find "$PWD" -maxdepth 1', "find ~+",
     "find $HOME -name '*.log'", "find ${HOME}/logs"],
)
def test_a_quoted_or_numeric_expansion_in_those_places_is_still_judged(line):
    decision = ALLOW_ALL_SUDO.decide(WEB1, line)
    assert decision.allowed, decision.explanation


DENY_TOUCH = parse_policy("rules:\n  - allow: '*'\n  - deny: touch *\n", source="p.yaml")


@pytest.mark.parametrize(
    "shell, line, problem",
    [
        # ksh93 skips `name:` before a command as a label.
        ("ksh", "x: touch pwned", "x: where the program goes (ksh93 takes it for a label, and runs what follows)"),
        ("ksh", "time a.b: touch pwned", "a.b: where the program goes (ksh93 takes it for a label"),
        # zsh's &! and &| put the command before them in the background, as & does.
        ("zsh", "true &!touch pwned", "'touch pwned' is denied"),
        ("zsh", "true &|touch pwned", "'touch pwned' is denied"),
        # zsh assigns positional parameters before a command.
        ("zsh", "1=x touch pwned", "an environment setting that can change what a command does (1=…)"),
        # busybox ash (Alpine's sh) runs exec's -a NAME as the program.
        ("ash", "exec -a touch echo pwned", "-a NAME (busybox ash runs NAME instead of the command)"),
        # bash, zsh and ksh take -- as the end of eval's options.
        ("bash", "eval -- touch pwned", "'touch pwned' (run through eval) is denied"),
    ],
)
def test_what_one_shell_runs_where_sh_would_not_is_judged(shell, line, problem, tmp_path):
    # Before, each was judged as a program the deny rule did not name (`x:`, `!touch`, `--`).
    assert_the_shell_runs_it(shell, line, tmp_path, exits_0=False)
    assert_refused(DENY_TOUCH, line, problem)


def test_a_redirection_with_no_command_is_refused():
    # sh runs nothing for it; zsh runs cat ($NULLCMD), a program no rule was asked about.
    assert subprocess.run(["dash", "-c", "echo hi | 2>&1"], capture_output=True, text=True).stdout == ""
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-c", "echo hi | 2>&1"], capture_output=True, text=True).stdout == "hi\n"
    for line in ["echo hi | 2>&1", ">/dev/null", "uptime; 2>/dev/null"]:
        decision = READ_ONLY.decide(WEB1, line)
        assert not decision.allowed and "a redirection with no command (zsh runs cat for it)" in decision.explanation


def test_a_descriptor_closed_with_more_after_its_dash_is_refused():
    # bash ends `2>&-''` at the -, closing stderr, and gives echo an empty argument more
    # than the reader saw (it took '' for part of the target).
    assert subprocess.run(["bash", "-c", "echo a 2>&-'' b"], capture_output=True, text=True).stdout == "a  b\n"
    assert_refused(ALLOW_ALL, "echo a 2>&-'' b", "'>&-' followed by more (>&-'': bash reads the rest as a word)")
    assert ALLOW_ALL.decide(WEB1, "echo a 2>&- b").allowed


def test_words_after_a_redirection_of_both_outputs_are_refused(tmp_path):
    # dash, the sh of Debian and Ubuntu (and so of every local host there), reads
    # `echo hi &>/dev/null touch pwned` as `echo hi &` and `>/dev/null touch pwned`: the
    # built-in read-only policy allowed it as one echo, and touch ran.
    line = "echo hi &>/dev/null touch pwned"
    assert_the_shell_runs_it("dash", line, tmp_path)
    assert_refused(READ_ONLY, line, "words after &>/dev/null (sh runs them as a command of their own, bash as arguments): "
                                    "write >/dev/null 2>&1")
    assert "write >>/dev/null 2>&1" in READ_ONLY.decide(WEB1, "echo hi &>>/dev/null id").explanation
    assert READ_ONLY.decide(WEB1, "uptime &>/dev/null; id").allowed  # nothing after it: the same in both


def test_env_takes_any_word_with_an_equals_sign_for_a_variable_as_env_does(tmp_path):
    # GNU env sets `a.b=x` (not a name the shell would take) and runs touch; the reader took
    # `a.b=x` for the program, so a rule for that "program" would have let touch run.
    line = "env a.b=x touch pwned"
    assert_the_shell_runs_it("sh", line, tmp_path)
    assert_refused(ALLOW_ALL, line, "(env a.b=…)")


@pytest.mark.parametrize("line", ["echo 'touch pwned' | sh", "echo 'touch pwned' | bash -s", "bash <<< 'touch pwned'",
                                  "echo 'touch pwned' | sh -"])
def test_a_shell_reading_its_commands_from_its_input_is_refused(line, tmp_path):
    # Before, a rule allowing the shell (`bash *`, or `allow: "*"`) let any code through its input.
    assert_the_shell_runs_it("bash", line, tmp_path)
    assert_refused(ALLOW_ALL, line, "commands read from its input (a pipe or a here-string), which the policy cannot see: "
                                    "give them with -c")


@pytest.mark.parametrize("line", ["bash x.sh", "sh -e x.sh", "bash --version", "sh -c 'touch x'", "bash -c id"])
def test_a_shell_given_its_commands_or_a_file_is_judged_as_before(line):
    assert ALLOW_ALL.decide(WEB1, line).allowed


def test_a_quoted_expansion_after_ps_p_is_taken_as_its_process_id():
    # Before, `ps -p "$PPID"` was refused as if the expansion could be an option: quoted, it
    # stays one word, and the word after -p is a process id whatever it holds.
    for line in ['ps -o args -p "$PPID"', 'ps --pid "$PPID" -o args', 'ps p "$$" -o args']:
        decision = READ_ONLY.decide(WEB1, line)
        assert decision.allowed, decision.explanation
    for line, shown in [
        ('ps -p "$PPID" e', "ps e (it shows"), ("ps -p $PPID", "ps $PPID (an option decided at run time"),
        ('ps -p "$@"', "ps $@ (an option decided at run time"), ('ps "$PPID"', "ps $PPID (an option decided at run time"),
        ('ps -p "$PPID" "$PPID"', "ps $PPID (an option decided at run time"),
    ]:
        decision = READ_ONLY.decide(WEB1, line)
        assert not decision.allowed and shown in decision.explanation, (line, decision.explanation)


# -- properties -----------------------------------------------------------------------------------

SAFE_LINES = ["uname -a", "uptime", "df -h", "whoami", "echo ok"]
DENIED_SIMPLE = ["rm -rf /", "reboot", "dd if=/dev/zero of=/dev/sda", "chmod 777 /", "curl http://127.0.0.1/x"]
SEPARATORS = ["; ", " && ", " || ", " | ", " & ", "\n", ";"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_the_reader_never_crashes_and_the_policy_always_decides(text):
    parsed = parse_command(text)
    assert parsed.problems or all(c.program for c in parsed.commands) or not parsed.commands
    decision = READ_ONLY.decide(WEB1, text)
    assert decision.allowed in (True, False) and decision.reason


_word = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=300)
@given(st.lists(_word, min_size=1, max_size=6))
def test_quoting_is_read_back_exactly(words):
    from fleetrun.core.shell import _KSH_LABEL, _OPTION_CHECKS, _RESERVED, _SHELL_CODE_READERS, _WRAPPERS, SH_FAMILY

    program = words[0]
    special = (_RESERVED, _WRAPPERS, SH_FAMILY, _OPTION_CHECKS, _SHELL_CODE_READERS)
    # `A:` (shlex leaves it unquoted) is a label to ksh93, and refused as one by design.
    if any(program in names for names in special) or "=" in program or _KSH_LABEL.fullmatch(program):
        return
    parsed = parse_command(shlex.join(words))
    assert parsed.problems == []
    assert [(c.program, [a.value for a in c.args]) for c in parsed.commands] == [(program, words[1:])]
    # shlex leaves =word unquoted, which zsh expands (=ls is the path of ls)
    assert all(a.known or a.value.startswith("=") for a in parsed.commands[0].args)


@settings(max_examples=300)
@given(st.sampled_from(SAFE_LINES), st.sampled_from(SEPARATORS), st.sampled_from(DENIED_SIMPLE), st.booleans())
def test_a_denied_command_anywhere_in_a_chain_denies_the_chain(safe, separator, bad, bad_first):
    line = f"{bad}{separator}{safe}" if bad_first else f"{safe}{separator}{bad}"
    assert READ_ONLY.decide(WEB1, line).allowed is False
    assert READ_ONLY.decide(WEB1, f"{safe}{separator}{safe}").allowed is True


@settings(max_examples=200)
@given(st.sampled_from(DENIED_SIMPLE), st.sampled_from(["sh -c", "bash -c", "sudo", "env", "nohup", "timeout 3", "nice", "xargs"]))
def test_wrapping_a_denied_command_keeps_it_denied(bad, wrapper):
    line = f"{wrapper} {shlex.quote(bad)}" if wrapper.endswith("-c") else f"{wrapper} {bad}"
    assert READ_ONLY.decide(WEB1, line).allowed is False


# -- the executor and the CLI apply it ---------------------------------------------------------------


def test_a_denied_request_runs_nothing_and_is_reported_to_plugins(make_executor, tmp_path):
    from fleetrun.plugins.notifiers.jsonlog import JsonLogNotifier

    log = tmp_path / "audit.jsonl"
    policy = parse_policy("rules:\n  - allow: echo *\n  - deny: rm *\n", source="p.yaml")
    executor = make_executor(plugins=[JsonLogNotifier(log)], policy=policy)
    with pytest.raises(PolicyDenied) as denied:
        executor.submit(TaskRequest(host="local", command="echo hi && rm -rf /tmp/nothing-here", origin="mcp"))
    assert "rule 2 of p.yaml, line 3: deny: rm *" in str(denied.value)
    assert executor.list() == []
    task = executor.run(TaskRequest(host="local", command="echo hi"))
    assert task.policy == "allowed by rule 1 of p.yaml, line 2: allow: echo *"
    assert executor.get(task.id).policy == task.policy
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["event"] == "command.denied" and lines[0]["status"] == "denied"
    assert lines[0]["decision"]["rule"] == {"source": "p.yaml", "index": 2, "line": 3, "text": "deny: rm *"}
    assert lines[0]["origin"] == "mcp"  # who was refused: here, as if the assistant
    assert [line["event"] for line in lines[1:]][0] == "task.created"
    assert (lines[1]["policy"], lines[1]["origin"]) == (task.policy, None)


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs the fish shell (.ci/run installs it)")
def test_a_host_whose_shell_reads_commands_otherwise_than_sh_is_judged_only_under_raw_shell(make_executor, tmp_path):
    # fish makes `..` of \x2e\x2e, where sh (and so the policy) reads x2ex2e: a rule for
    # /var/log/* would have let it read any file.
    fish, command = shutil.which("fish"), "cat /var/log/\\x2e\\x2e/\\x2e\\x2e/etc/hostname"
    hosts = f"hosts:\n  fishy:\n    shell: {fish}\n  plain:\n    shell: /bin/bash\n"
    policy = parse_policy("rules:\n  - allow: cat /var/log/*\n  - allow: printf *\n", source="p.yaml")
    executor = make_executor(hosts_yaml=hosts, policy=policy)
    with pytest.raises(PolicyDenied) as denied:
        executor.submit(TaskRequest(host="fishy", command=command))
    assert str(denied.value) == (
        f"denied on host 'fishy': host 'fishy' runs commands with {fish}, which does not read them as sh does, "
        "so the policy cannot judge the command, and no rule allows raw shell on this host [the default of p.yaml: deny]"
    )
    assert executor.plan(TaskRequest(host="plain", command=command)).decision.allowed  # bash reads it as sh does

    hosts_file, policy_file = tmp_path / "hosts.yaml", tmp_path / "policy.yaml"
    hosts_file.write_text(hosts)
    policy_file.write_text("rules:\n  - allow: cat /var/log/*\n")
    checked = run_cli("--hosts", str(hosts_file), "--policy", str(policy_file), "policy", "check", "fishy", "--", command)
    assert checked.returncode == 126 and f"runs commands with {fish}, which does not read them as sh does" in checked.stdout

    # Where raw shell is allowed, the host's own shell runs what the rules allow.
    raw = parse_policy("rules:\n  - allow: printf *\n  - allow_raw_shell: true\n    hosts: [fishy]\n", source="raw.yaml")
    executor.reconfigure(inventory=executor.inventory, policy=raw)
    task = executor.run(TaskRequest(host="fishy", command="printf '%s\\n' (string upper fish)"))
    assert executor.read_output(task.id).data == b"FISH\n"


def test_an_environment_a_request_sets_is_judged_like_one_written_inline(make_executor, tmp_path):
    # `PATH=/tmp/evil uname` is denied; so is uname with PATH=/tmp/evil given beside it.
    policy = parse_policy("rules:\n  - allow: uname *\n", source="p.yaml")
    executor = make_executor(policy=policy)
    for env in ({"PATH": "/tmp/evil"}, {"LC_ALL": "C", "LD_PRELOAD": "/tmp/x.so"}):
        with pytest.raises(PolicyDenied) as denied:
            executor.submit(TaskRequest(host="local", command="uname", env=env))
        name = next(name for name in env if name != "LC_ALL")
        assert str(denied.value) == (
            f"denied on host 'local': the request sets {name}, which can change what a command does, so the policy "
            "cannot judge the command, and no rule allows raw shell on this host [the default of p.yaml: deny]"
        )
    assert executor.list() == []
    task = executor.run(TaskRequest(host="local", command="uname", env={"LC_ALL": "C", "TZ": "UTC"}))
    assert task.status is TaskStatus.SUCCEEDED

    raw = parse_policy("rules:\n  - allow: uname *\n  - allow_raw_shell: true\n", source="raw.yaml")
    executor.reconfigure(inventory=executor.inventory, policy=raw)
    decision = executor.plan(TaskRequest(host="local", command="uname", env={"PATH": "/usr/bin:/bin"})).decision
    assert decision is not None and decision.allowed
    assert [v.reason for v in decision.verdicts] == [
        "'uname' is allowed", "raw shell (the request sets PATH, which can change what a command does) is allowed",
    ]


def test_a_working_directory_the_request_sets_is_judged_too(make_executor):
    # `make test` runs what the Makefile of its directory says: a directory of the
    # requester's choosing decides what runs. The host's own cwd is configuration.
    policy = parse_policy("rules:\n  - allow: pwd\n", source="p.yaml")
    executor = make_executor(hosts_yaml="hosts:\n  local:\n    cwd: /tmp\n", policy=policy)
    with pytest.raises(PolicyDenied) as denied:
        executor.submit(TaskRequest(host="local", command="pwd", cwd="/etc"))
    assert "the request sets the working directory (/etc), which can change what a command does, so the policy " \
        "cannot judge the command, and no rule allows raw shell on this host" in str(denied.value)
    for cwd in (None, "/tmp"):  # the host's own
        task = executor.run(TaskRequest(host="local", command="pwd", cwd=cwd))
        assert executor.read_output(task.id).data == b"/tmp\n"


def test_cli_policy_check_and_run_name_the_rule(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - allow: echo *\n  - deny: echo secret\n")
    allowed = run_cli("--policy", str(policy), "policy", "check", "local", "--", "echo", "hi")
    assert allowed.returncode == 0
    assert f"allowed on host 'local': 'echo hi' is allowed [rule 1 of {policy}, line 2: allow: echo *]" in allowed.stdout
    audit = tmp_path / "audit.jsonl"
    denied = run_cli("--policy", str(policy), "--json-log", str(audit), "run", "local", "--", "echo", "secret")
    assert denied.returncode == 126 and denied.stdout == ""
    assert f"rule 2 of {policy}, line 3: deny: echo secret" in denied.stderr
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  local: {}\n  other: {}\n")
    assert run_cli("--policy", str(policy), "--hosts", str(hosts), "--json-log", str(audit),
                   "run", "local,other", "--", "echo", "secret").returncode == 126  # a batch
    assert run_cli("--policy", str(policy), "--json-log", str(audit), "run", "local", "--", "echo", "hi").returncode == 0
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["event"], e["origin"]) for e in events if e["event"] in ("command.denied", "task.created")] == [
        ("command.denied", "cli"), ("command.denied", "cli"), ("command.denied", "cli"), ("task.created", "cli"),
    ]
    dry = run_cli("--policy", str(policy), "run", "local", "--dry-run", "--json", "--", "rm", "-rf", "/")
    assert dry.returncode == 126
    assert json.loads(dry.stdout)["policy"]["allowed"] is False
    no_policy = run_cli("policy", "check", "local", "--", "ls")
    assert no_policy.returncode == 1 and "add --builtin" in no_policy.stderr
    builtin = run_cli("policy", "check", "--builtin", "--json", "local", "--", "uname", "-a")
    assert builtin.returncode == 0 and json.loads(builtin.stdout)["allowed"] is True
    env = run_cli("run", "local", "--", "echo", "secret", env={"FLEETRUN_POLICY": str(policy)})
    assert env.returncode == 126
    missing = run_cli("--policy", str(tmp_path / "nope.yaml"), "run", "local", "--", "true")
    assert missing.returncode == 125 and "policy file not found (given by --policy)" in missing.stderr


@pytest.mark.parametrize(
    "pattern, warned",
    [
        ("awk *", True), ("python3 *", True), ("bash *", True), ("sed -n *", True), ("tar -tzf *", True), ("git *", True),
        ("docker exec *", True), ("watch -n 5 *", True), ("apt-get *", True), ("/usr/bin/perl -e *", True),
        ("awk -F: '{print $1}' /etc/passwd", False), ("tar -tzf /backups/*.tar.gz", False), ("git status *", False),
        ("docker ps", False), ("uptime *", False), ("ls *", False), ("sed -n '1,20p' /var/log/*", False), ("*", False),
    ],
)
def test_a_rule_that_lets_any_command_through_a_program_is_warned_about(pattern, warned):
    policy = parse_policy(f"rules:\n  - allow: {json.dumps(pattern)}\n  - deny: {json.dumps(pattern)}\n", source="p.yaml")
    warnings = policy.warnings
    assert len(warnings) == (1 if warned else 0), warnings  # a deny rule is never warned about
    if warned:
        program = shlex.split(pattern)[0].rsplit("/", 1)[-1]
        assert warnings[0].startswith(f"rule 1 of p.yaml, line 2: allow: {pattern}: {program} runs ")
        assert "so this rule lets any command through; allow the forms you mean instead, such as '" in warnings[0]


def test_policy_check_warns_when_the_rule_that_allowed_the_command_lets_any_command_through(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - allow: [uptime *, awk *]\n")
    checked = run_cli("--policy", str(policy), "policy", "check", "local", "--", "awk '{print $1}' /etc/hostname", cwd=tmp_path)
    assert checked.returncode == 0
    assert checked.stderr == (
        f"fleetrun: warning: rule 1 of {policy}, line 2: allow: awk *: awk runs commands through system() and pipes in its "
        "program, so this rule lets any command through; allow the forms you mean instead, such as "
        "'awk -F: '{print $1}' /etc/passwd'\n"
    )
    quiet = run_cli("--policy", str(policy), "policy", "check", "local", "--", "uptime", cwd=tmp_path)
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_the_shipped_policies_warn_about_nothing():
    assert read_only_policy().warnings == []
    assert load_policy(REPO / "policy.example.yaml").warnings == []


def test_cli_policy_show_lists_the_rules_as_written(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - allow: [echo *, ls *]\n  - deny: echo secret\n    hosts: [local]\n")
    shown = run_cli("--policy", str(policy), "policy", "show")
    assert shown.returncode == 0
    assert shown.stdout.splitlines() == [
        f"policy: {policy}",
        "  rule 1, line 2: allow: echo *",
        "  rule 1, line 2: allow: ls *",
        "  rule 2, line 3: deny: echo secret (hosts: local)",
        "  default: deny (a command no rule matches)",
    ]
    as_json = json.loads(run_cli("--policy", str(policy), "policy", "show", "--json").stdout)
    assert as_json["default"] == "deny" and as_json["rules"][2] == {"source": str(policy), "index": 2, "line": 3, "text": "deny: echo secret (hosts: local)"}
    assert as_json["warnings"] == []
    # A rule that lets any command through is shown, then named in a warning.
    policy.write_text("rules:\n  - allow: [uptime *, python3 *]\n")
    shown = run_cli("--policy", str(policy), "policy", "show")
    assert (shown.returncode, shown.stdout.splitlines()[-1]) == (0, (
        f"warning: rule 1 of {policy}, line 2: allow: python3 *: python3 runs the code its arguments hold (-e, -c, a script), "
        "so this rule lets any command through; allow the forms you mean instead, such as 'python3 /opt/tools/report'"
    ))
    assert json.loads(run_cli("--policy", str(policy), "policy", "show", "--json").stdout)["warnings"] == [shown.stdout.splitlines()[-1][9:]]
    builtin = run_cli("policy", "show", "--builtin").stdout.splitlines()
    assert builtin[0] == "policy: <built-in read-only policy>" and "  rule 1: allow: uname *" in builtin
    no_policy = run_cli("policy", "show")
    assert no_policy.returncode == 1 and "add --builtin for the built-in read-only policy" in no_policy.stderr


def test_the_readme_worked_example_is_what_fleetrun_prints(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The command policy", 1)[1].split("\n### ", 1)[0]
    policy_text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    transcript = section.split("```yaml\n", 1)[1].split("```", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    (tmp_path / "policy.yaml").write_text(policy_text)
    (tmp_path / "hosts.yaml").write_text("hosts:\n  web1: {tags: [web]}\n  db1: {tags: [db]}\n")
    sessions = [chunk for chunk in transcript.split("$ fleetrun ")[1:]]
    assert len(sessions) == 4
    for chunk in sessions:
        command_line, *expected = chunk.rstrip("\n").split("\n")
        args = shlex.split(command_line)
        result = run_cli("--hosts", "hosts.yaml", "--policy", "policy.yaml", *args, cwd=tmp_path)
        assert result.stdout.rstrip("\n").split("\n") == expected, command_line
        assert result.returncode == (0 if expected[0].startswith("allowed") else 126)
