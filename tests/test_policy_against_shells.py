"""The policy's reader against real shells: what a shell runs is what the reader judged.

Two generators. The first builds lines from the forms that decide what runs (wrappers and
their option values, find, ps, trap, printf, wait) with words the shell fills in at run
time: ``$_`` (the last word of the command before, which the line sets), ``$1`` and
``"$@"`` (arguments given to the shell), ``$PWD`` (after ``cd`` into a directory whose name
has blanks), a tilde, globs, braces. The second strings together tokens (quotes, escapes,
operators, redirections, keywords, words of each shell's own syntax) where the shells'
readings part: ``&>``, ``&!``, ``name:``, ``1=x``.

Each line the policy allows under ``allow: '*'`` runs in bash, dash, zsh, ksh, mksh, yash,
posh and busybox's ash with every program on PATH replaced by a shim that records its
arguments, then runs the real program. Every program that ran must be one the reader saw,
and each, written out with the words it really got, must be allowed too (``find . -delete``
is not).
"""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetrun.core.inventory import Host
from fleetrun.core.policy import parse_policy, read_only_policy
from fleetrun.core.shell import parse_command

#: Each shell of the sh family the reader speaks for, as a command line; busybox's is ash (Alpine's sh).
SHELLS = {"bash": ["bash"], "dash": ["dash"], "zsh": ["zsh"], "ksh": ["ksh"], "mksh": ["mksh"], "yash": ["yash"],
          "posh": ["posh"], "ash": ["busybox", "sh"]}
PROGRAMS = ["find", "nice", "env", "timeout", "xargs", "stdbuf", "ionice", "setsid", "nohup", "touch", "ps", "id", "true",
            "ls", "cat", "sh", "uname", "uptime", "whoami", "df", "free", "nproc", "lscpu", "who", "w", "pwd", "echo", "rm"]
POLICY = parse_policy("rules:\n  - allow: '*'\n    sudo: true\n", source="allow-all.yaml")
READ_ONLY = read_only_policy()
HOST = Host(name="h", transport="local")

PAYLOAD_WORDS = ["touch", "pwn", "-exec", ";", "5", "-n", "-u", "X", ".", "-maxdepth", "0", "{}", "KILL", "EXIT", "-delete",
                 "-fprint", "-I", "-o", "L", "1", "-s", "--", "id", "-c", "sh", "-p", "e", "-v", "ww"]
HEADS = ["find", "find .", "find . -maxdepth 0", "nice -n", "nice", "env -u", "env", "timeout -s", "timeout", "timeout 5",
         "xargs -I", "xargs", "stdbuf -o", "ionice -c", "setsid", "nohup", "command", "trap", "trap --", "ps -p", "ps",
         "ps -o args -p", "printf", "wait", "cd", "env -i", "nice -n 5", "sh -c 'find . $1' x", "set --", "nohup nice -n",
         "timeout -k", "xargs -n", "command exec", "builtin command", "find . -name", "env a.b=x", "sh -s", "bash"]
WORDS_DECIDED_LATER = ["$_", '"$_"', "$PWD", '"$PWD"', "$1", '"$1"', "$@", '"$@"', "$*", "*", "{a,b}", "$OLDPWD", "${_}",
                       "x$_", "$IFS", '"${@}"', "$!", '"$!"', "$$", "./$_", "-$_", "~", "~/x", '"$HOME"', "$HOME/x", '"$PWD"/y', "~+",
                       "~$_"]
TAILS = ["", "true", "id", "touch pwn2", ". -maxdepth 0", "1 true", "-print", '; find "$@"', "; env -u $@",
         "&>/dev/null touch pwn3", "&>>/dev/null nice touch pwn4"]


def generated_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        payload = " ".join(rng.choice(PAYLOAD_WORDS) for _ in range(rng.randint(1, 6)))
        parts = [f"echo {shlex.quote(payload)} >/dev/null"]
        for _ in range(rng.randint(1, 2)):
            parts.append(" ".join(filter(None, [rng.choice(HEADS), rng.choice(WORDS_DECIDED_LATER), rng.choice(TAILS)])))
        line = rng.choice(["; ", " && ", "\n"]).join(parts)
        if rng.random() < 0.2:
            line = f"cd {shlex.quote('in ' + payload)} 2>/dev/null; {line}"
        if rng.random() < 0.15:
            line = f"echo {shlex.quote(payload)} | {rng.choice(['xargs find', 'xargs nice -n', 'xargs env', 'xargs timeout'])}"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    """A directory of programs that append their name and arguments to $SHIM_LOG, then run the real one."""
    directory = tmp_path_factory.mktemp("shims")
    for name in PROGRAMS:
        real = shutil.which(name)
        if real is None:
            continue  # a line that names it fails to find it, and runs nothing of it
        shim = directory / name
        # One write per record, so that programs running at once do not mix theirs.
        shim.write_text(
            "#!/bin/sh\n"
            f"record={name}; separator=$(printf '\\037')\n"
            'for word in "$@"; do record="$record$separator$word"; done\n'
            "printf '%s\\036' \"$record\" >> \"$SHIM_LOG\"\n"
            f'exec {real} "$@"\n'
        )
        shim.chmod(0o755)
    return directory


SOUP = ["touch", "pwn", "true", "id", "echo", "x", "-n", "5", "nice", "env", "find", ".", "-exec", "{}", "\\;", ";", "&&",
        "||", "|", "&", "\n", "'", '"', "\\", "$_", "$1", "$@", "`", "}", "{", "(", "=", "A=1", "#", "\\\n", "<<<", ">",
        "<", "2>&1", ">/dev/null", "!", "time", "command", "exec", "cd", "-", "--", "~", "*", "?", "[", "]", "[[", "case",
        "if", "fi", "alias", "a=b", "xargs", "timeout", "sh", "-c", "eval", "trap", "EXIT", "IFS=", "set", "$IFS", "\t",
        " ", "nohup", "builtin", "a.b=x", "&>", "&>>", ">&", "|&", "&|", "&!", ">|", "<>", ">>", "2>", "<&-", "&>/dev/null",
        "=", ":", "-e", "$'", "\\'", "''", '""', "x:", "a.b:", "eval --", "1=", "noglob", "nocorrect", "'touch pwn'",
        "t'ouch'", "to\\uch", "${_}", "$0", "-delete", "ps", "e"]


#: Words of what the built-in read-only policy allows, and of what it must not. Every path is
#: relative, in the line's own directory, and date and hostname are left out: as root, a
#: mistake of the reader's would otherwise remove a file of this machine, or set its clock or name.
READ_ONLY_SOUP = ["uname", "-a", "uptime", "-p", "whoami", "id", "-u", "df", "-h", "free", "-m", "ps", "aux", "e", "eww", "-E",
                  "-o", "args", "-p", "$$", "nproc", "lscpu", "who", "w", "pwd", "-P", "echo", "true", "cat", "/proc/loadavg",
                  "secret.txt", "touch", "rm", "x", ";", "&&", "||", "|", "&", "\n", "&>/dev/null", "2>&1", ">/dev/null",
                  "'", '"', "\\", "$_", "$1", "$@", "*", "~", "{a,b}", "A=1", "LC_ALL=C", "#", "--", "$PWD", '"$PWD"', "$IFS",
                  "x:", "&!", "eval", "trap", "EXIT", "time", "command", "exec", "nohup", "env", "nice", "-n", "5", "sh", "-c",
                  "2>/dev/null", "<&-", ">&-", "$?", "$!", "ps -p $$ -o args", "'touch x'"]


def soup_lines(seed: int, count: int, tokens: list[str] = SOUP) -> list[str]:
    rng = random.Random(seed)
    lines = ("".join(rng.choice(tokens) + rng.choice([" ", "", " "]) for _ in range(rng.randint(2, 12))) for _ in range(count))
    return [line for line in lines if not line.lstrip().startswith("-")]  # `sh -c -x` takes it for options


def programs_the_reader_saw(line: str) -> set[str]:
    names = set()
    for command in parse_command(line).commands:
        names.add(command.program.rsplit("/", 1)[-1])
        names.update(wrapper.rsplit("/", 1)[-1] for wrapper in command.wrappers)
    return names


@pytest.mark.parametrize("generator", ["forms", "soup", "read-only"])
@pytest.mark.parametrize("shell", SHELLS)
def test_every_program_a_shell_runs_is_one_the_policy_judged(shell, generator, shims, tmp_path):
    program = shutil.which(SHELLS[shell][0])
    if program is None:
        pytest.skip(f"{SHELLS[shell][0]} is not installed")
    policy = READ_ONLY if generator == "read-only" else POLICY
    lines = {
        "forms": lambda: generated_lines(seed=2026, count=3000),
        "soup": lambda: soup_lines(seed=2026, count=2500),
        "read-only": lambda: soup_lines(seed=2026, count=2500, tokens=READ_ONLY_SOUP),
    }[generator]()
    allowed = [line for line in lines if policy.decide(HOST, line).allowed]
    assert len(allowed) > 100  # the generator still makes lines worth running
    wrong = []
    for number, line in enumerate(allowed):
        run_in = tmp_path / str(number)
        (run_in / "in x").mkdir(parents=True)  # somewhere for `cd 'in …'` to fail or go
        log = tmp_path / f"{number}.log"
        try:
            subprocess.run(
                [program, *SHELLS[shell][1:], "-c", line, "x", "-delete", "touch"], cwd=run_in, capture_output=True, timeout=10,
                env={"PATH": str(shims), "SHIM_LOG": str(log), "HOME": str(run_in), "LC_ALL": "C"},
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            pass
        ran = [record.split("\x1f") for record in (log.read_text() if log.exists() else "").split("\x1e") if record]
        seen = programs_the_reader_saw(line)
        if seen & {".", "source"}:
            continue  # a file the line sources runs what it holds (README: allowed wherever a rule allows it)
        hidden = {argv[0] for argv in ran} - seen
        if hidden:
            wrong.append(f"{line!r} ran {sorted(hidden)}, which the reader did not see")
        for argv in ran:
            decision = policy.decide(HOST, shlex.join(argv))
            if not decision.allowed:
                wrong.append(f"{line!r} ran {shlex.join(argv)!r}: {decision.explanation}")
    assert wrong == []
