"""When a local command needs no shell: run it directly, one process fewer.

``/bin/sh -c 'sleep 1'`` costs two processes (the shell forks the program and waits for
it). A command made only of plain words, whose first word is not something only the
shell knows (a builtin, a keyword, an assignment), means exactly "run this program with
these arguments": the shell would search ``PATH`` for it and exec it with the same
arguments. Running it directly gives the same result for a fraction of the cost, which is
what GNU make has long done for its recipe lines.

What the shell would add is added here too: ``PWD`` naming the working directory (the
shell exports it). When the direct start fails (no such program, not executable, a
script without ``#!``), the command goes to the shell after all, so the error message and
exit status are the shell's own.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

#: The shell used when a host names none; the only one the direct path stands in for.
DEFAULT_SHELL = "/bin/sh"

# Plain words: no quoting, expansion, globbing, redirection, operator, comment or tilde.
_PLAIN_COMMAND = re.compile(r"[A-Za-z0-9_@%+=:,./-]+(?:[ \t]+[A-Za-z0-9_@%+=:,./-]+)*")

#: Names the shell resolves itself (dash and bash builtins, POSIX special builtins, keywords):
#: a command starting with one of them always goes to the shell.
SHELL_WORDS = frozenset(
    """
    . : [ [[ ]] ! { } alias bg bind break builtin caller case cd chdir command compgen complete
    compopt continue coproc declare dirs disown do done echo elif else enable esac eval exec
    exit export false fc fg fi for function getopts hash help history if in jobs kill let
    local logout mapfile popd printf pushd pwd read readarray readonly return select set shift
    shopt source suspend test then time times trap true type typeset ulimit umask unalias unset
    until wait while
    """.split()
)


def direct_argv(command: str, shell: str) -> list[str] | None:
    """The argv to start ``command`` with, without a shell, or None when it needs the shell."""
    if shell != DEFAULT_SHELL:
        return None  # a shell the host chose may mean more (functions, rc files): leave it the words
    text = command.strip(" \t")
    if not _PLAIN_COMMAND.fullmatch(text):
        return None
    argv = text.split()
    if "=" in argv[0] or argv[0] in SHELL_WORDS:
        return None
    return argv


def direct_environment(env: Mapping[str, str] | None, cwd: str | None) -> tuple[bool, Mapping[str, str] | None]:
    """Whether the direct path can stand in for the shell with ``env`` (None: this process's
    environment) in ``cwd``, and the environment to give the program (None: inherit)."""
    effective = os.environ if env is None else env
    if "PATH" not in effective or any(name.startswith("BASH_FUNC_") for name in effective):
        return False, None  # the shell's default PATH, or functions exported from bash
    directory = cwd or os.getcwd()
    pwd = effective.get("PWD")
    if pwd and os.path.isabs(pwd) and (pwd == directory or _same_directory(pwd, directory)):
        return True, env
    fixed = dict(effective)
    # The shell keeps an inherited PWD that names its directory, and sets the physical path otherwise.
    fixed["PWD"] = os.path.realpath(directory)
    return True, fixed


def _same_directory(a: str, b: str) -> bool:
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
