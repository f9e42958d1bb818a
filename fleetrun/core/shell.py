"""A conservative reader of POSIX shell command lines, for the policy.

It splits a command line into the simple commands the shell would run and, for each,
the program and its arguments after quote removal, so that a policy judges
``'r'm -rf /`` as ``rm`` and sees every command of ``a; b && c | d``. It does not try
to understand everything a shell can do: whatever it cannot judge with certainty is
reported as a *problem* (command substitution, control structures, redirection into or
from a file, a wrapper's own file such as ``time -o FILE``, …), and the policy denies it
unless raw shell is allowed for the host.

Words whose final value depends on the shell at run time (parameter expansion, globs,
brace expansion, ``~``) are kept but marked *unknown*: such a word can only be matched
by a pattern that accepts anything, and never stands as the program name. The names of
the variables a line expands are reported as well: what they hold reaches the output.

Wrappers are looked through: ``sudo``/``doas`` (marked privileged), ``env``, ``nice``,
``nohup``, ``timeout``, ``time``, ``command``, ``builtin``, ``exec``, ``stdbuf``, ``ionice``,
``setsid``, ``xargs`` (its input becomes unknown arguments), zsh's precommand modifiers, and
what runs shell code: ``sh -c``-style shells, ``eval`` and ``trap`` (their code is read
recursively).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

#: Variables a command may be given inline without a policy rule saying so.
SAFE_ASSIGNMENTS = re.compile(r"(LC_[A-Z]+|LANG|LANGUAGE|TZ|COLUMNS|LINES|TERM|NO_COLOR)")
#: The variables that choose the character set a shell reads the rest of a command in.
_CHARACTER_SET_VARIABLES = frozenset({"LC_ALL", "LC_CTYPE", "LANG"})
#: zsh keeps these as numbers, evaluating what is assigned as arithmetic (which runs the
#: command substitutions of an array subscript: ``COLUMNS='path[$(cmd)]'``).
_NUMBER_VARIABLES = frozenset({"COLUMNS", "LINES"})
#: Locales this reader reads as the shell does: C and UTF-8 ones. In BIG5, GBK, GB18030
#: or Shift_JIS a backslash or a backtick can be the second byte of a character, so bash
#: and ksh read ``中\$(cmd)`` (UTF-8 bytes) as a character and a command substitution.
_READABLE_LOCALE = re.compile(r"|C|POSIX|[A-Za-z]+(?:_[A-Za-z0-9]+)?\.(?i:utf-?8)(?:@[A-Za-z0-9_-]+)?")
#: Variables a command may expand without a policy rule saying so: the shell's own and
#: those of a login, which hold no secrets. Any other may (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY):
#: ``echo $NAME``, or ``id $NAME`` through its error message, would hand it to whoever
#: reads the output.
SAFE_EXPANSIONS = re.compile(
    r"LC_[A-Z]+|LANG|LANGUAGE|TZ|COLUMNS|LINES|TERM|NO_COLOR|HOME|USER|LOGNAME|SHELL|PATH|PWD|OLDPWD"
    r"|HOSTNAME|HOSTTYPE|OSTYPE|MACHTYPE|TMPDIR|MAIL|SHLVL|UID|EUID|PPID|IFS|RANDOM|LINENO|SECONDS|_"
    r"|BASH_VERSION|ZSH_VERSION|KSH_VERSION|SSH_CONNECTION|SSH_CLIENT|SSH_TTY"
    r"|XDG_CONFIG_HOME|XDG_DATA_HOME|XDG_CACHE_HOME|XDG_STATE_HOME|XDG_RUNTIME_DIR"
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: What $ expands: a name or a special parameter; inside ${ }, also the length of a name (${#NAME}).
_PARAMETER = re.compile(rf"{_NAME.pattern}|[0-9@*#?$!-]")
_BRACED_PARAMETER = re.compile(rf"#?{_NAME.pattern}|[0-9@*#?$!-]")
#: What a shell takes for NAME in NAME=value: zsh also assigns positional parameters
#: (`1=x touch f` runs touch there).
_ASSIGNED_NAME = re.compile(r"(?:\.?[A-Za-z_][A-Za-z0-9_.]*|[0-9]+)\+?")
#: Characters that end a word that is not quoted (and start the next one).
_ENDS_WORD = " \t\n;&|()<>"
_WORD_END = re.compile(f"[{re.escape(_ENDS_WORD)}]")
_DESCRIPTOR_VARIABLE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
#: A label to ksh93 at the start of a command (a name, dots allowed, then a colon).
_KSH_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:")
_RESERVED = {"if", "then", "else", "elif", "fi", "do", "done", "case", "esac", "while", "until", "for", "in",
             "function", "select", "{", "}", "!", "[[", "]]", "coproc", "repeat", "foreach"}  # fmt: skip
#: Shells that read a command line as POSIX sh does (the names of their programs): this
#: reader speaks for them, and reads their ``-c`` scripts too. Others (fish, csh, tcsh,
#: nushell) read the same text otherwise: fish turns ``\x2e`` into ``.``.
SH_FAMILY = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "ksh93", "mksh", "lksh", "pdksh", "yash", "posh"})
#: Where a wrapper or shell named by path is trusted to be the real one.
_SYSTEM_DIRS = ("/bin/", "/usr/bin/", "/sbin/", "/usr/sbin/", "/usr/local/bin/")
_HARMLESS_TARGETS = frozenset({"/dev/null"})
_MAX_DEPTH = 4
_MAX_WRAPPERS = 16
#: No line written for a person has more; judging each against every rule takes time.
_MAX_COMMANDS = 1000


@dataclass(frozen=True)
class Word:
    """One word after quote removal; ``known`` is False when the shell decides its value at run time."""

    value: str
    known: bool = True
    #: For a word decided at run time: its expansions are all inside double quotes and none
    #: is ``"$@"``, so the shell keeps it one word (``"$HOME"``, not ``$HOME``, ``*`` or ``"$@"``).
    one_word: bool = False
    #: Written as NAME=value with the name unquoted, which the shell reads as an assignment
    #: where one may stand (``'TZ=x' uname`` runs a program named ``TZ=x``).
    assigns: bool = False

    def __str__(self) -> str:
        return self.value

    @property
    def may_split(self) -> bool:
        """Whether the shell could make several words of it, or none."""
        return not self.known and not self.one_word


@dataclass(frozen=True)
class SimpleCommand:
    """A program with its arguments, as the policy judges it."""

    program: str
    args: tuple[Word, ...]
    #: Looked through to get here, outermost first (e.g. ("sudo", "env")).
    wrappers: tuple[str, ...] = ()
    #: Run through sudo/doas: only rules that allow privileged commands match.
    privileged: bool = False
    #: Variables set for this command (NAME=value prefixes, env NAME=value).
    assignments: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        return " ".join([self.program, *(w.value for w in self.args)])


@dataclass
class ParsedCommand:
    """Every simple command of a command line, and what could not be judged."""

    commands: list[SimpleCommand] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Names of the variables the line expands ($NAME, ${NAME}, ${#NAME}), in order, once each.
    variables: list[str] = field(default_factory=list)

    @property
    def judgeable(self) -> bool:
        return not self.problems

    def add_variables(self, names: list[str]) -> None:
        self.variables.extend(name for name in names if name not in self.variables)


class _Unjudgeable(Exception):
    pass


def parse_command(line: str) -> ParsedCommand:
    """Split ``line`` into simple commands; never raises on any input."""
    result = ParsedCommand()
    try:
        _parse_into(line, result, depth=0)
    except Exception as exc:  # noqa: BLE001 - a reader bug must deny, not crash
        result.problems.append(f"a construct the reader failed on ({type(exc).__name__})")
    return result


def _parse_into(line: str, result: ParsedCommand, depth: int) -> None:
    if depth > _MAX_DEPTH:
        result.problems.append("shells nested too deeply inside each other")
        return
    lexer = _Lexer(line)
    try:
        lexer.read()
    except _Unjudgeable as exc:
        # The commands before the construct are still judged; the rest is raw shell.
        result.problems.append(str(exc))
    result.add_variables(lexer.variables)
    for tokens in lexer.complete:
        if len(result.commands) >= _MAX_COMMANDS:
            result.problems.append(f"more than {_MAX_COMMANDS} commands in one line")
            return
        if tokens:
            _judge_segment(tokens, result, depth)


def reads_like_sh(shell: str | None) -> bool:
    """Whether the shell at path ``shell`` reads command lines as this reader does."""
    return shell is not None and shell.rsplit("/", 1)[-1] in SH_FAMILY


def pattern_problem(pattern: str, words: list[str]) -> str | None:
    """Why a policy pattern (``words``: its shell words) can match no command line, or None.

    The reader hands the policy one program and its arguments, after taking away what is
    around them (operators, redirections, variable settings, wrappers, ``sh -c``); a pattern
    written with any of those describes a command the policy is never asked about.
    """
    if words == ["*"]:
        return None
    lexer = _Lexer(pattern)
    try:
        lexer.read()
    except _Unjudgeable as exc:
        return f"it contains {exc} (quote a character to match it literally)"
    if lexer.operators:
        return (f"it contains the operator {lexer.operators[0]!r}: each command of a line is judged "
                "on its own, so write a pattern for each (or quote the character to match it literally)")
    tokens = lexer.complete[0] if lexer.complete else []
    redirect = next((t for t in tokens if t.kind == _REDIRECT), None)
    if redirect is not None:
        return (f"it contains the redirection {redirect.value}{redirect.raw}, which is not part of the "
                "command a pattern matches (quote the character to match it literally)")
    if tokens and _assignment(tokens[0]) is not None:
        return (f"it starts with the variable setting {tokens[0].raw}, which is not part of the command "
                "a pattern matches: start the pattern with the program")
    if words[0] == "eval" and len(words) > 1:
        return "the policy reads the code eval runs and judges each of its commands on its own: write a pattern for each"
    any_rest = len(words) > 1 and words[-1] == "*"
    literal = words[:-1] if any_rest else words
    judged = ParsedCommand()
    _judge_words([Word(w) for w in literal], (), (), False, judged, depth=0)
    if judged.problems and any_rest and literal[0].rsplit("/", 1)[-1] in SH_FAMILY:
        # `bash *`: the words the * stands for can name a script file, which is not input.
        judged = ParsedCommand()
        _judge_words([*(Word(w) for w in literal), Word("FILE")], (), (), False, judged, depth=0)
    if judged.problems:
        return f"a command with {judged.problems[0]} is allowed only by allow_raw_shell: true"
    if len(judged.commands) != 1:
        return (f"the policy reads the script of {words[0]} -c and judges each of its commands on its own: "
                "write a pattern for each")
    inner = judged.commands[0]
    if inner.wrappers:
        shown = [inner.program, *(a.value if a.known else "*" for a in inner.args)]
        if any_rest and shown[-1] != "*":
            shown.append("*")
        sudo = " with sudo: true" if inner.privileged else ""
        return (f"the policy looks through {' and '.join(inner.wrappers)} and judges the command it runs: "
                f"write {' '.join(shown)!r}{sudo}")
    return None


# -- lexing ------------------------------------------------------------------------------

_OPERATOR = "op"
_WORD = "word"
_REDIRECT = "redirect"


@dataclass
class _Token:
    kind: str
    value: str
    known: bool = True
    #: Words: the text as written (quotes kept), to tell NAME=value from 'NAME=value'.
    #: Redirections: the target word's value.
    raw: str = ""
    #: Words decided at run time: see Word.one_word.
    one_word: bool = False


class _Lexer:
    """Turns a command line into segments (lists of word and redirection tokens)."""

    def __init__(self, text: str) -> None:
        self.text = _join_continued_lines(text)
        self.pos = 0
        # The end of the stretch of text that _scan_rest looked at last, and its last ].
        self._rest_end = 0
        self._last_bracket = -1
        #: Names of the variables expanded so far.
        self.variables: list[str] = []
        #: Segments ended by an operator (or the end of the text), in order.
        self.complete: list[list[_Token]] = []
        self.current: list[_Token] = []
        self.operators: list[str] = []

    def read(self) -> None:
        """Fill :attr:`complete`; on a construct it cannot judge, raise with what it has so far."""
        while True:
            token = self._next()
            if token is None:
                break
            if token.kind == _OPERATOR:
                self.operators.append(token.value)
                if self.current:
                    self.complete.append(self.current)
                    self.current = []
                elif token.value not in ("\n", ";"):
                    raise _Unjudgeable(f"'{token.value}' with no command before it")
                continue
            self.current.append(token)
        if self.current:
            self.complete.append(self.current)
            self.current = []

    def _peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def _next(self) -> _Token | None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t":
                self.pos += 1
            elif char == "#":
                while self.pos < len(text) and text[self.pos] != "\n":
                    self.pos += 1
            else:
                break
        if self.pos >= len(text):
            return None
        char = text[self.pos]
        if char == "\n":
            self.pos += 1
            return _Token(_OPERATOR, "\n")
        for operator in ("&&", "||", ";;", "|&", "&!", "&|", ";", "|", "&"):
            if text.startswith(operator, self.pos):
                if operator == ";;":
                    raise _Unjudgeable("a case statement (;;)")
                if operator == "&" and self._peek(1) == ">":
                    break  # &> is a redirection
                self.pos += len(operator)
                # zsh's &! and &| (in the background, disowned) end a command as & does:
                # `true &!rm x` runs rm there, where sh looks for a program named !rm.
                return _Token(_OPERATOR, "&" if operator in ("&!", "&|") else operator)
        if char in "()":
            raise _Unjudgeable("a subshell or grouping with ( )")
        redirect = self._redirection()
        if redirect is not None:
            return redirect
        return self._word()

    def _redirection(self) -> _Token | None:
        match = re.compile(r"(\d*)(<<<|<<-|<<|<>|<&|>&|>>|>\||&>>|&>|<|>)").match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        operator = match.group(2)
        if len(match.group(1)) > 1:
            # bash opens descriptor 22 for 22>&2; dash, zsh and ksh pass 22 as an argument.
            raise _Unjudgeable(f"a descriptor number of more than one digit ({match.group(0)}…)")
        if operator in ("<<", "<<-"):
            raise _Unjudgeable("a here-document (<<)")
        if self._peek() == "(":
            raise _Unjudgeable(f"process substitution ({operator}( … ))")
        target = self._next()
        if target is None or target.kind != _WORD:
            raise _Unjudgeable(f"redirection '{operator}' without a target")
        if operator in (">&", "<&") and target.raw.startswith("-") and target.raw != "-":
            # bash ends the redirection at the -: `>&-''` closes, then gives an empty word.
            raise _Unjudgeable(f"'{operator}-' followed by more ({operator}{target.raw}: bash reads the rest as a word)")
        return _Token(_REDIRECT, operator, known=target.known, raw=target.value)

    def _word(self) -> _Token:
        text = self.text
        value: list[str] = []
        known = True
        splits = False  # an expansion, glob or brace outside double quotes, or "$@"
        equals_seen = False  # bash expands ~ after = or : in an argument such as X=~ or X=a:~
        raw_start = self.pos
        while self.pos < len(text):
            char = text[self.pos]
            if char in _ENDS_WORD:
                if char in "<>" and self._peek(1) == "(":
                    raise _Unjudgeable(f"process substitution ({char}( … ))")
                if char in "<>" and _DESCRIPTOR_VARIABLE.fullmatch(text, raw_start, self.pos):
                    # bash, zsh and ksh open a descriptor and keep its number in NAME: {PATH}>/dev/null
                    raise _Unjudgeable(f"a descriptor number stored in a variable ({text[raw_start:self.pos]}{char}…)")
                break
            if char == "\\":
                following = self._peek(1)
                self.pos += 2
                if following == "":
                    raise _Unjudgeable("a trailing backslash")
                value.append(following)
            elif char == "'":
                end = text.find("'", self.pos + 1)
                if end < 0:
                    raise _Unjudgeable("an unterminated single quote")
                value.append(text[self.pos + 1 : end])
                self.pos = end + 1
            elif char == '"':
                piece, piece_known, piece_splits = self._double_quoted()
                value.append(piece)
                known = known and piece_known
                splits = splits or piece_splits
            elif char in "`$":
                known = False
                splits = True
                value.append(self._expansion())
            else:
                # Globs, brace expansion, ~ and zsh's =program are decided by the shell.
                if char in "*?{}" or (char == "[" and self._bracket_closes()):
                    known, splits = False, True
                elif known and ((char in "~=" and not any(value) and (char == "~" or self._rest_of_word() != "="))
                                or (char == "~" and equals_seen and text[self.pos - 1] in "=:")):
                    known = False
                equals_seen = equals_seen or char == "="
                value.append(char)
                self.pos += 1
        return _Token(_WORD, "".join(value), known=known, raw=text[raw_start : self.pos], one_word=not splits)

    def _rest_of_word(self) -> str:
        """The text from here to the next character that ends a word (quotes not minded)."""
        self._scan_rest()
        return self.text[self.pos : self._rest_end]

    def _bracket_closes(self) -> bool:
        """Whether a ``]`` follows in the rest of the word (then ``[`` starts a glob)."""
        self._scan_rest()
        return self._last_bracket > self.pos

    def _scan_rest(self) -> None:
        # Once per stretch without an end of word: a line of 128 KiB of [ would otherwise
        # take minutes to read.
        if self.pos >= self._rest_end:
            found = _WORD_END.search(self.text, self.pos)
            self._rest_end = found.start() if found else len(self.text)
            self._last_bracket = self.text.rfind("]", self.pos, self._rest_end)

    def _double_quoted(self) -> tuple[str, bool, bool]:
        """The value inside double quotes; whether it is known; whether it can be several
        words (``"$@"`` is one word for each positional parameter)."""
        text = self.text
        self.pos += 1
        value: list[str] = []
        known, splits = True, False
        while True:
            if self.pos >= len(text):
                raise _Unjudgeable("an unterminated double quote")
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(value), known, splits
            if char == "\\" and self._peek(1) in ('"', "\\", "$", "`"):
                value.append(self._peek(1))
                self.pos += 2
            elif char in "`$":
                known = False
                expansion = self._expansion()
                splits = splits or expansion in ("$@", "${@}")
                value.append(expansion)
            else:
                value.append(char)
                self.pos += 1

    def _expansion(self) -> str:
        """Consume a $-expansion (quoted or not); refuse the ones that run commands."""
        text = self.text
        if text[self.pos] == "`":
            raise _Unjudgeable("command substitution with backticks")
        following = self._peek(1)
        if following == "(":
            raise _Unjudgeable("command substitution $( … )" if self._peek(2) != "(" else "arithmetic expansion $(( … ))")
        if following in ("'", '"'):
            raise _Unjudgeable(f"ANSI-C or locale quoting (${following}…{following})")
        if following == "[":
            raise _Unjudgeable("arithmetic expansion $[ … ] (bash)")
        if following in _ZSH_EXPANSION_FLAGS:
            raise _Unjudgeable(f"the expansion ${following}… (zsh)")
        if following == "{":
            end = text.find("}", self.pos + 2)
            if end < 0:
                raise _Unjudgeable("an unterminated ${")
            inner = text[self.pos + 2 : end]
            if any(c in inner for c in "$`(") or not _BRACED_PARAMETER.fullmatch(inner):
                raise _Unjudgeable(f"parameter expansion with operators (${{{inner}}})")
            self._expanded(inner.lstrip("#"))
            self.pos = end + 1
            return f"${{{inner}}}"
        match = _PARAMETER.match(text, self.pos + 1)
        if match is None:
            self.pos += 1
            return "$"
        if text.startswith("[", match.end()):
            # zsh reads $NAME[…] as an element of NAME, and evaluates the subscript as arithmetic:
            # a variable named there is evaluated in turn (`$HOME[_]` runs what $_ holds).
            raise _Unjudgeable(f"an array subscript (${match.group(0)}[…], zsh evaluates it as arithmetic)")
        self._expanded(match.group(0))
        self.pos = match.end()
        return "$" + match.group(0)

    def _expanded(self, parameter: str) -> None:
        if _NAME.fullmatch(parameter) and parameter not in self.variables:
            self.variables.append(parameter)


#: What follows ``$`` in zsh's forms of expanding a variable ($=NAME, $~NAME, $^NAME, $+NAME).
_ZSH_EXPANSION_FLAGS = frozenset("=~^+")


def _join_continued_lines(text: str) -> str:
    """``text`` with its line continuations (backslash, newline) taken out, as the shell does first.

    The shell joins them before it reads anything else, except inside single quotes and
    comments: ``"$\\<newline>(id)"`` is a command substitution. A quote that the shell
    would end elsewhere (inside ``$( … )``) can only follow a construct the reader refuses,
    so what it reads after that does not matter.
    """
    if "\\\n" not in text:
        return text
    out: list[str] = []
    index, length = 0, len(text)
    word_start = True
    while index < length:
        char = text[index]
        if char == "\\":
            if text.startswith("\n", index + 1):
                index += 2
                continue
            out.append(text[index : index + 2])
            index += 2
        elif char == "'":
            end = text.find("'", index + 1)
            end = length if end < 0 else end + 1
            out.append(text[index:end])
            index = end
        elif char == '"':
            out.append(char)
            index += 1
            while index < length and text[index] != '"':
                if text.startswith("\\\n", index):
                    index += 2
                    continue
                step = 2 if text[index] == "\\" else 1
                out.append(text[index : index + step])
                index += step
            out.append(text[index : index + 1])
            index += 1
        elif char == "#" and word_start:
            end = text.find("\n", index)
            end = length if end < 0 else end
            out.append(text[index:end])
            index = end
        else:
            out.append(char)
            index += 1
        word_start = char in _ENDS_WORD
    return "".join(out)


# -- judging one simple command ------------------------------------------------------------


def _judge_segment(tokens: list[_Token], result: ParsedCommand, depth: int) -> None:
    words: list[_Token] = []
    both_outputs: _Token | None = None  # a &> or &>> before this word
    for token in tokens:
        if token.kind == _REDIRECT:
            problem = _redirection_problem(token)
            if problem:
                result.problems.append(problem)
                return
            if token.value.startswith("&>"):
                both_outputs = token
        else:
            if both_outputs is not None:
                # bash reads `echo hi &>/dev/null rm x` as one command; sh (dash) reads `echo hi &`
                # and then `>/dev/null rm x`, which runs rm.
                result.problems.append(
                    f"words after {both_outputs.value}{both_outputs.raw} (sh runs them as a command of their own, "
                    f"bash as arguments): write {both_outputs.value[1:]}{both_outputs.raw} 2>&1"
                )
                return
            words.append(token)
    if not words:
        if tokens:
            # sh runs nothing for `>/dev/null` alone; zsh runs cat ($NULLCMD), unseen by any rule.
            result.problems.append("a redirection with no command (zsh runs cat for it)")
        return
    _judge_words(
        [Word(t.value, t.known, t.one_word, "=" in t.raw and _assignment(t) is not None) for t in words],
        (), (), False, result, depth,
    )


def assignment_problem(name: str, value: str | None, shown: str | None = None) -> str | None:
    """Why setting variable ``name`` to ``value`` (None: a value decided at run time) leaves
    what runs unjudgeable, or None; ``shown`` is how the problem names the setting."""
    shown = shown or name
    if not SAFE_ASSIGNMENTS.fullmatch(name) or value is None:
        return f"an environment setting that can change what a command does ({shown}=…)"
    if name in _CHARACTER_SET_VARIABLES and not _READABLE_LOCALE.fullmatch(value):
        return (f"a locale other than C or UTF-8 ({shown}={value}; in BIG5, GBK or Shift_JIS, bash and ksh "
                "read some backslashes as part of a character)")
    if name.startswith(("LC_", "LANG")) and "/" in value:
        return f"a locale named by a path ({shown}={value}: its files could be anyone's)"
    if name in _NUMBER_VARIABLES and not re.fullmatch(r"[0-9]*", value):
        return f"{shown}={value} (zsh evaluates a value of {name} as arithmetic: write a number)"
    if _SUBSCRIPT_WITH_EXPANSION.search(value):
        return f"{shown}={value} (where bash or zsh evaluate {name} as arithmetic, {_RUNS_SUBSCRIPTS})"
    return None


def _assignment(token: _Token) -> tuple[str, str] | None:
    """The variable and value a word sets, if a shell reads it as an assignment. An append
    (bash, zsh and ksh read ``PS4+='$(cmd)'`` as one) keeps its ``+`` in the name, and a
    ksh93 compound or ``.sh`` variable (``.sh.value=5``) its dots: no safe variable has either."""
    name, sep, value = token.raw.partition("=")
    if sep and _ASSIGNED_NAME.fullmatch(name):
        return name, token.value.partition("=")[2]
    return None


def _redirection_problem(token: _Token) -> str | None:
    operator, target = token.value, token.raw
    operator = operator.lstrip("0123456789")
    if operator in (">&", "<&") and (re.fullmatch(r"\d+|-", target)):
        return None  # duplicating or closing a descriptor
    if target.startswith(("/dev/tcp/", "/dev/udp/")):
        return f"a network redirection ({target})"
    if operator == "<<<":
        return None
    if token.known and target in _HARMLESS_TARGETS:
        return None
    if operator == "<":
        # A rule judges the files a command is given as arguments; one it reads through
        # stdin would be a file no rule was asked about (xargs echo < ~/.ssh/id_rsa).
        return f"input redirection from a file ({operator} {target})"
    return f"output redirection to a file ({operator} {target})"


def _judge_words(
    words: list[Word],
    assignments: tuple[tuple[str, str], ...],
    wrappers: tuple[str, ...],
    privileged: bool,
    result: ParsedCommand,
    depth: int,
    reads_assignments: bool = True,
) -> None:
    if len(wrappers) > _MAX_WRAPPERS:
        result.problems.append("wrappers nested too deeply inside each other")
        return
    # The assignments before the program (``reads_assignments``: at the start of a command,
    # or after a keyword that allows them, see _KEYWORDS_BEFORE_ASSIGNMENTS).
    taken: list[tuple[str, str]] = []
    for word in words:
        if not (reads_assignments and word.assigns):
            break
        variable, _, value = word.value.partition("=")
        problem = assignment_problem(variable, value if word.known else None)
        if problem is not None:
            result.problems.append(problem)
            return
        taken.append((variable, value))
    if taken:
        words, assignments = words[len(taken):], assignments + tuple(taken)
        if not words:
            return  # only safe assignments: nothing runs
    program = words[0]
    if not program.known:
        result.problems.append(f"a program name decided at run time ({program.value})")
        return
    if not program.value:
        result.problems.append("an empty program name ('')")
        return
    if program.value in _RESERVED:
        result.problems.append(f"shell syntax ({program.value} …)")
        return
    if _KSH_LABEL.fullmatch(program.value):
        # ksh93 takes `name:` before a command for a label: `x: rm -rf ~` runs rm.
        result.problems.append(f"{program.value} where the program goes (ksh93 takes it for a label, and runs what follows)")
        return
    name = program.value
    args = words[1:]
    base = name.rsplit("/", 1)[-1]
    # ./sudo or /tmp/x/sh are whatever someone put there: judged as themselves.
    system = base == name or name[: -len(base)] in _SYSTEM_DIRS
    unwrap = _WRAPPERS.get(base) if system else None
    code_reader = _shell_script if system and base in SH_FAMILY else _SHELL_CODE_READERS.get(name)
    try:
        inner = unwrap(args) if unwrap is not None else None
        script = code_reader(args) if code_reader is not None else None
    except _Unjudgeable as exc:
        result.problems.append(f"{base}: {exc}")
        return
    if inner is not None:
        inner_words, extra_assignments, makes_privileged = inner
        if not inner_words:
            result.commands.append(SimpleCommand(name, tuple(args), wrappers, privileged, assignments))
            return
        for key, value in extra_assignments:
            problem = assignment_problem(key, value, f"{base} {key}")
            if problem is not None:
                result.problems.append(problem)
                return
        _judge_words(
            inner_words, assignments + tuple(extra_assignments), wrappers + (base,),
            privileged or makes_privileged, result, depth, reads_assignments=name in _KEYWORDS_BEFORE_ASSIGNMENTS,
        )
        return
    if script is not None:
        if not script.known:
            result.problems.append(f"{base} -c with a script decided at run time" if base in SH_FAMILY
                                   else f"{base} with code decided at run time")
            return
        nested = ParsedCommand()
        _parse_into(script.value, nested, depth + 1)
        result.problems.extend(nested.problems)
        result.add_variables(nested.variables)
        result.commands.extend(
            SimpleCommand(c.program, c.args, wrappers + (base,) + c.wrappers, privileged or c.privileged,
                          assignments + c.assignments)
            for c in nested.commands
        )
        return
    check = _OPTION_CHECKS.get(base)
    problem = check(args) if check is not None else None
    if problem is not None:
        result.problems.append(problem)
        return
    result.commands.append(SimpleCommand(name, tuple(args), wrappers, privileged, assignments))


# Shell options that take the next word as their value (-o errexit, bash's -O extglob).
_SHELL_OPTIONS_WITH_VALUE = frozenset({"-o", "+o", "-O", "+O"})
#: bash runs this file before the script when the shell is interactive (-i).
_SHELL_STARTUP_FILE_OPTIONS = frozenset({"--rcfile", "--init-file"})
#: Letters a shell takes when it starts, besides set's: a script (-c), interactive, login,
#: commands from stdin, restricted, and bash's -O (a shopt name, which is not judged).
_SHELL_START_LETTERS = frozenset("cilsrO")


def _shell_script(args: list[Word]) -> Word | None:
    """The script of ``sh -c SCRIPT``, else None. As sh reads its arguments: options come
    first, ``-c`` among them (alone or in a group such as ``-ec``), and may follow it
    (``sh -c -e SCRIPT``); the script is the first word after them, or after ``--``.
    A word decided at run time among them is returned as the script: it could be one. A
    shell given neither -c nor a file (or given -s) reads its commands from its input,
    which no rule sees: refused."""
    takes_script = False
    reads_input = False  # -s: commands from the input, whatever follows
    values_due = 0  # option values still to come (-o errexit)
    index = 0
    while index < len(args):
        word = args[index]
        if not word.known:
            return Word(word.value, False)
        value = word.value
        index += 1
        if values_due:
            values_due -= 1
            continue
        if value == "--":
            break
        if value.split("=", 1)[0] in _SHELL_STARTUP_FILE_OPTIONS:
            named = value if "=" in value or index >= len(args) else f"{value} {args[index].value}"
            raise _Unjudgeable(f"{named} (a file the shell runs before the command)")
        if value in _SHELL_OPTIONS_WITH_VALUE:
            values_due = 1
        elif value.startswith("--"):
            if value in ("--version", "--help"):
                return None  # it prints and exits
            continue  # bash's long flags (--login, --norc, --posix)
        elif len(value) > 1 and value[0] in "-+":
            takes_script = takes_script or (value[0] == "-" and "c" in value)
            reads_input = reads_input or (value[0] == "-" and "s" in value)
            values_due = value.count("o") + value.count("O")  # -eo pipefail: each o takes a word
        else:
            index -= 1
            break
        names = args[index : index + values_due]
        # A name decided at run time is returned as the script when the loop gets to it.
        if all(name.known for name in names):
            problem = _option_problem(word, names, _SHELL_START_LETTERS)
            if problem is not None:
                raise _Unjudgeable(problem)
    if not takes_script:
        if reads_input or index >= len(args) or (args[index].known and args[index].value == "-"):
            # `echo 'rm -rf ~' | sh`, `sh <<< CODE`: the code comes from a pipe or a here-string.
            raise _Unjudgeable("commands read from its input (a pipe or a here-string), which the policy cannot see: "
                               "give them with -c '…'")
        return None
    return args[index] if index < len(args) else Word("", True)


# -- the shell's own commands that run shell code or set its variables --------------------


def _eval_code(args: list[Word]) -> Word | None:
    """What ``eval`` runs: its arguments joined with spaces, read again as a command line."""
    if args and args[0].known and args[0].value == "--":
        args = args[1:]  # bash, zsh and ksh: the end of eval's options (dash runs a program named --)
    if not args:
        return None
    return Word(" ".join(word.value for word in args), all(word.known for word in args))


def _trap_action(args: list[Word]) -> Word | None:
    """What ``trap ACTION CONDITION…`` runs when a condition occurs; None when it sets no
    action (``trap``, ``trap -p``, ``trap -l``, ``trap - INT``, ``trap '' INT``, ``trap INT``,
    and ``trap 2 15``, which resets)."""
    operands = args[1:] if args and args[0].value == "--" else args
    if len(operands) == 1 and not _stays_one_word(operands[0]):
        return operands[0]  # `trap $_` with $_ = "CODE EXIT" sets an action
    if len(operands) < 2:
        return None
    action = operands[0]
    if action.known and (action.value in ("", "-", "-p", "-l", "-P") or action.value.isdigit()):
        return None
    return action


#: The shell's own commands that run a string as shell code: it is read like ``sh -c``'s script.
_SHELL_CODE_READERS = {"eval": _eval_code, "trap": _trap_action}

#: They set variables from what they read or compute: PATH or IFS set so changes what later commands do.
#: zsh loads zformat, zparseopts, zregexparse and zstyle (whose -e values are code) when first used;
#: its getln takes what pushln or print -z put on the buffer stack.
_SET_VARIABLES = frozenset(
    {"read", "mapfile", "readarray", "getopts", "let", "vared", "getln", "zformat", "zparseopts", "zregexparse",
     "zstyle"}
)
#: The option letter with which these set a variable (printf -v NAME, zsh's print -v, wait -p NAME).
_SET_VARIABLE_OPTION = {"printf": "v", "print": "v", "wait": "p"}
#: They set variables given as NAME=value, as an assignment before a command does.
_DECLARATIONS = frozenset({"export", "readonly", "declare", "typeset", "local", "integer", "float", "private"})
#: bash and zsh evaluate the subscript of an array element named to these (``test -v
#: 'a[$(id)]'``, ``printf -v``, ``read``, ``declare``), and run the substitutions in it.
_TAKE_VARIABLE_NAMES = frozenset({"test", "[", "unset", *_SET_VARIABLE_OPTION}) | _SET_VARIABLES | _DECLARATIONS
_SUBSCRIPT_WITH_EXPANSION = re.compile(r"\[[^\]]*[$`]")
_SETS_VARIABLES = "it sets shell variables, which can change what later commands do"
_CHANGES_NAMES = "it changes which program or directory a name means"
_RUNS_SUBSCRIPTS = "bash and zsh run what an array subscript expands"

#: zsh evaluates the number these take as arithmetic (``exit TZ`` evaluates what TZ holds).
_ARITHMETIC_OPERAND_COMMANDS = frozenset({"shift", "exit", "bye", "return", "logout", "break", "continue"})
#: A number as bash and zsh write one; anything else where they evaluate arithmetic could
#: name a variable, whose value is evaluated in turn (``'a[$(cmd)]'`` runs cmd).
_NUMBER = re.compile(r"[-+]?(?:0[xX][0-9A-Fa-f]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
#: A word that expands only what the shell sets to a number: $?, $#, $$, $!.
_NUMERIC_SPECIALS = re.compile(r"(?:\$\{?[?#$!]\}?|[0-9])+")
#: Of those, the ones that are never empty: $! is, until a job has run in the background,
#: and an empty word that is not quoted vanishes (`nice -n $! 1 true` runs true, not 1).
_NEVER_EMPTY_SPECIALS = re.compile(r"(?:\$\{?[?#$]\}?|[0-9])+")
#: A variable name whose subscript, if any, is a number or all elements: bash and zsh
#: evaluate any other subscript of a name they are given (``test -v 'a[_]'``).
_PLAIN_VARIABLE_NAME = re.compile(r"[^\[]*(?:\[(?:[0-9]*|[@*])\])?")
#: One printf conversion: flags, width, precision, letter. %s, %b, %q and %c take text;
#: the others take a number, which zsh evaluates as arithmetic.
_CONVERSION = re.compile(r"%[-+ #0]*(\*|[0-9]*)(?:\.(\*|[0-9]*))?([a-zA-Z%])")
#: What a word is taken as: a number, a variable name, or either once the shell splits it.
_NUMBER_SLOT, _NAME_SLOT, _SPLIT_SLOT = "number", "name", "split"
#: test's binary operators: after a word that holds -v or -t, one of these makes the three
#: words a comparison, so the word after it is not evaluated.
_TEST_BINARY_OPERATORS = frozenset(
    {"=", "==", "!=", "<", ">", "=~", "-eq", "-ne", "-lt", "-le", "-gt", "-ge", "-nt", "-ot", "-ef", "-a", "-o"}
)
#: Options of the declarations that export, protect, print or scope a variable. Any other
#: changes how its later values are read: after ``declare -i TZ`` (or ``integer``, or
#: ``declare -i _``, which the shell sets), ``TZ='a[$(cmd)]'`` runs cmd; after ``declare -n
#: TZ=SECRET``, ``$TZ`` is SECRET.
_PLAIN_DECLARATION_LETTERS = frozenset("xrgp")
_TYPED_DECLARATIONS = frozenset({"integer", "float"})


def _stays_one_word(word: Word) -> bool:
    """Whether the shell makes exactly one word of ``word``, as the reader counts it."""
    return word.known or word.one_word or _NEVER_EMPTY_SPECIALS.fullmatch(word.value) is not None


def _could_be_options(word: Word) -> bool:
    """Whether a word decided at run time could hold options: ``$_`` holds whatever the last
    command's last argument was (``-delete``), and ``$PWD`` unquoted splits at a directory
    name's blanks. Only the numbers the shell sets ($?, $!, …) cannot."""
    return not word.known and not _NUMERIC_SPECIALS.fullmatch(word.value)


def _printf_slots(form: Word, count: int) -> list[str | None]:
    """What printf FORMAT takes each of ``count`` arguments as: a number, or text (None)."""
    if not form.known:
        return [_NUMBER_SLOT] * count
    slots: list[str | None] = []
    index = form.value.find("%")
    while index >= 0:
        match = _CONVERSION.match(form.value, index)
        if match is None or (match.group(3) == "%" and match.group(0) != "%%"):
            return [_NUMBER_SLOT] * count  # bash's %(…)T, zsh's %1$d: take every argument as a number
        width, precision, letter = match.groups()
        if letter != "%":
            slots += [_NUMBER_SLOT] * [width, precision].count("*")
            slots.append(None if letter in "sbqc" else _NUMBER_SLOT)
        index = form.value.find("%", match.end())
    if not slots:
        return [None] * count  # printf prints the format once and takes no argument
    return [slots[position % len(slots)] for position in range(count)]


def _format_and_arguments(name: str, args: list[Word]) -> tuple[Word, list[Word]] | None:
    """printf's FORMAT and arguments, or zsh's ``print -f FORMAT``'s; None without a format."""
    operands = args
    if name == "print":
        options = _options(args)
        with_format = next((option for option in options if "f" in option[1:]), None)
        if with_format is None:
            return None
        attached = with_format.partition("f")[2]
        operands = [Word(attached), *args[len(options):]] if attached else args[len(options):]
    if operands and operands[0].value == "--":
        operands = operands[1:]
    return (operands[0], operands[1:]) if operands else None


def _evaluated_words(name: str, args: list[Word]) -> list[tuple[Word, str]]:
    """The words of ``args`` that bash or zsh could evaluate as arithmetic (a number slot)
    or as a variable name, whose subscript is arithmetic (a name slot)."""
    if name in _ARITHMETIC_OPERAND_COMMANDS:
        return [(word, _NUMBER_SLOT) for word in args]
    if name == "unset":
        return [(word, _NAME_SLOT) for word in args if not (word.known and word.value.startswith("-"))]
    if name in ("test", "["):
        if name == "[" and args and args[-1].value == "]" and args[-1].known:
            args = args[:-1]
        slots = []
        for previous, word in zip([Word("")] + args, args):
            could_be_operator = not previous.known and not _NUMERIC_SPECIALS.fullmatch(previous.value)
            if previous.known and previous.value == "-v":
                slots.append((word, _NAME_SLOT))
            elif (previous.known and previous.value == "-t") or (
                could_be_operator and not (word.known and word.value in _TEST_BINARY_OPERATORS)
            ):
                # An unknown word could hold -v or -t (then a binary operator after it wins).
                slots.append((word, _NUMBER_SLOT))
            elif word.may_split:
                slots.append((word, _SPLIT_SLOT))  # it could hold "-v NAME" whole
        return slots
    if name in ("printf", "print"):
        found = _format_and_arguments(name, args)
        if found is None:
            return []
        form, arguments = found
        if form.may_split:  # "$@" could be a format and its numbers
            return [(form, _SPLIT_SLOT), *((word, _NUMBER_SLOT) for word in arguments)]
        slots = _printf_slots(form, len(arguments))
        if _NUMBER_SLOT in slots:
            # A word that splits moves the ones after it into other slots.
            slots = [(slot or _SPLIT_SLOT) if word.may_split else slot for word, slot in zip(arguments, slots)]
        return [(word, slot) for word, slot in zip(arguments, slots) if slot is not None]
    return []


def _evaluated_word_problem(name: str, args: list[Word]) -> str | None:
    for word, slot in _evaluated_words(name, args):
        if word.known:
            plain = (_PLAIN_VARIABLE_NAME if slot == _NAME_SLOT else _NUMBER).fullmatch(word.value)
        else:
            plain = slot != _NAME_SLOT and _NUMERIC_SPECIALS.fullmatch(word.value)
        if plain:
            continue
        if slot == _SPLIT_SLOT:
            why = 'it can make several words (unquoted, or as "$@"), one of which bash or zsh evaluate'
            advice = "write the words out" if "@" in word.value else "quote it"
        elif slot == _NUMBER_SLOT:
            why, advice = "bash or zsh evaluate it as arithmetic, and a variable it names in turn", "write a number"
        else:
            why, advice = "bash or zsh evaluate a subscript of the name as arithmetic", "write the name"
        return f"{name} {word.value} ({why}, where {_RUNS_SUBSCRIPTS}: {advice})"
    return None


def _declaration_problem(name: str, args: list[Word]) -> str | None:
    for word in args:
        if name in _TYPED_DECLARATIONS or (
            len(word.value) > 1 and word.value[0] in "-+" and not set(word.value[1:]) <= _PLAIN_DECLARATION_LETTERS
        ):
            shown = name if name in _TYPED_DECLARATIONS else f"{name} {word.value}"
            return f"{shown} (it changes how a variable's later values are read, or which variable a name means)"
        variable, assigns, value = word.value.partition("=")
        if not word.known:
            return assignment_problem(variable, None, f"{name} {variable}")
        if not _PLAIN_VARIABLE_NAME.fullmatch(variable):
            return f"{name} {variable} ({_RUNS_SUBSCRIPTS}, and evaluate what a subscript names as arithmetic)"
        if assigns:
            problem = assignment_problem(variable, value, f"{name} {variable}")
            if problem is not None:
                return problem
    return None


def _builtin_problem(name: str, args: list[Word]) -> str | None:
    for word in args:
        if _SUBSCRIPT_WITH_EXPANSION.search(word.value):
            return f"{name} {word.value} ({_RUNS_SUBSCRIPTS})"
    problem = _evaluated_word_problem(name, args)
    if problem is not None:
        return problem
    if name in _SET_VARIABLES:
        return f"{name} ({_SETS_VARIABLES})"
    letter = _SET_VARIABLE_OPTION.get(name)
    if letter is not None:
        for word in args:
            if _could_be_options(word):
                return f"{name} {word.value} (a word decided at run time could be -{letter} NAME: {_SETS_VARIABLES})"
            if word.value == "--" or not word.value.startswith("-"):
                break
            if letter in word.value[1:]:
                return f"{name} {word.value} ({_SETS_VARIABLES})"
    if name in _DECLARATIONS:
        return _declaration_problem(name, args)
    return None


def _alias_problem(args: list[Word]) -> str | None:
    for word in args:
        if "=" in word.value or not word.known:
            return f"alias {word.value.split('=', 1)[0]}=… (an alias changes what later commands mean)"
    return None


def _options(args: list[Word]) -> list[str]:
    """The leading option words (``-x``, ``+x``), up to the first operand or ``--``."""
    options = []
    for word in args:
        if word.value == "--" or len(word.value) < 2 or word.value[0] not in "-+":
            break
        options.append(word.value)
    return options


def _hash_problem(args: list[Word]) -> str | None:
    # bash's `hash -p FILE NAME` and zsh's `hash NAME=FILE` make NAME run FILE; zsh's
    # `hash -d NAME=DIR` makes ~NAME mean DIR.
    if any("p" in option[1:] for option in _options(args)) or any("=" in word.value or not word.known for word in args):
        return f"hash with a path ({_CHANGES_NAMES})"
    return None


def _autoload_problem(args: list[Word]) -> str | None:
    # zsh's `autoload DIR/NAME` makes NAME run the function in that file.
    if any("/" in word.value or not word.known for word in args):
        return f"autoload with a path ({_CHANGES_NAMES})"
    return None


#: bash's compgen expands its -W word list as code (command substitutions run), runs -C's
#: command and -F's function, and (5.3) sets -V's variable. Its options that take a value.
_COMPGEN_CODE_LETTERS = frozenset("WCFV")
_COMPGEN_VALUE_LETTERS = frozenset("oAGWXPSCFV")


def _compgen_problem(args: list[Word]) -> str | None:
    words = iter(args)
    for word in words:
        if not word.known:
            return f"compgen {word.value} (an option decided at run time)"
        if word.value == "--" or len(word.value) < 2 or not word.value.startswith("-"):
            return None
        for index, letter in enumerate(word.value[1:], start=1):
            if letter in _COMPGEN_CODE_LETTERS:
                return f"compgen -{letter} (it runs code: a word list's command substitutions, a command or a function)"
            if letter in _COMPGEN_VALUE_LETTERS:
                if index == len(word.value) - 1:
                    next(words, None)  # the value is the next word
                break
    return None


#: Options of set that change nothing in how later commands are read, as bash and zsh name
#: them; any other can (bash's -k, zsh's -o extendedglob, which makes ^ a glob).
_PLAIN_SET_LETTERS = frozenset("abefhmnuvxBCEFHPT")
_PLAIN_SET_NAMES = frozenset(
    {"allexport", "braceexpand", "emacs", "errexit", "errtrace", "functrace", "hashall", "histexpand", "history",
     "ignoreeof", "monitor", "noclobber", "noexec", "noglob", "nolog", "notify", "nounset", "onecmd", "physical",
     "pipefail", "posix", "privileged", "verbose", "vi", "xtrace"}
)
_CHANGES_READING = "it changes how the shell reads later commands"


#: What bash's and ksh's -k (``-o keyword``) does: ``uname PATH=DIR`` then runs DIR/uname.
_KEYWORD_OPTION = "NAME=value words anywhere on a command line become its environment"


def _option_problem(option: Word, names: list[Word], also: frozenset[str] = frozenset()) -> str | None:
    """The problem if the option word ``option`` of set or of a shell starting (``-e``,
    ``+k``, ``-eo`` with the option names it takes) changes how later commands are read;
    None for the plain options, the letters ``also``, and the keyword option turned off."""
    value = option.value
    turns_off = value[:1] == "+"
    letters = _PLAIN_SET_LETTERS | also | {"k"} if turns_off else _PLAIN_SET_LETTERS | also
    plain_names = _PLAIN_SET_NAMES | {"keyword"} if turns_off else _PLAIN_SET_NAMES
    checked = names if "o" in value[1:] else []  # -O takes a shopt name
    if option.known and set(value[1:]) - {"o"} <= letters and all(n.known and n.value in plain_names for n in checked):
        return None
    keyword = ("k" in value[1:] and not turns_off) or any(name.value == "keyword" for name in checked)
    shown = " ".join(word.value for word in (option, *names))
    return f"{shown} ({_KEYWORD_OPTION if keyword else _CHANGES_READING})"


def _set_problem(args: list[Word]) -> str | None:
    index = 0
    while index < len(args):
        word = args[index]
        index += 1
        if word.known and (word.value == "--" or len(word.value) < 2 or word.value[0] not in "-+"):
            return None  # positional parameters follow
        names = args[index : index + word.value.count("o")]  # set -o errexit -o pipefail
        index += len(names)
        problem = _option_problem(word, names)
        if problem is not None:
            return f"set {problem}"
    return None


def _shopt_problem(args: list[Word]) -> str | None:
    # shopt -o names set's options.
    options = "".join(word.value[1:] for word in args if word.value.startswith("-"))
    names = [word for word in args if not word.value.startswith("-")]
    if any(not word.known for word in args) or (
        "o" in options and any(name.value not in _PLAIN_SET_NAMES for name in names)
    ):
        shown = " ".join(word.value for word in args)
        return f"shopt {shown} ({_KEYWORD_OPTION if 'keyword' in shown else _CHANGES_READING})"
    return None


#: Options of fc that only list the history (-l, with -n and -r); any other runs from it.
_FC_LISTING = re.compile(r"-[lnr]*l[lnr]*")


def _history_problem(name: str, args: list[Word]) -> str | None:
    # bash's fc (and ksh's hist) run commands of the shell's history, which `history -s`
    # fills with any text: the policy sees none of it.
    options = [word.value for word in args if word.value.startswith("-") and not word.value[1:].isdigit()]
    if options and all(_FC_LISTING.fullmatch(option) for option in options) and all(word.known for word in args):
        return None
    return f"{name} (it runs commands from the shell's history, which the policy cannot see)"


def _zsh_options_problem(name: str, args: list[Word]) -> str | None:
    # zsh's setopt, unsetopt and emulate (whose -c runs code) change how later commands are
    # read: with extendedglob, `ls ^x` lists every file but x.
    if not args:
        return None
    runs_code = name == "emulate" and any(word.value.startswith(("-", "+")) and "c" in word.value for word in args)
    why = "it runs code under other shell options, which the policy cannot judge" if runs_code else _CHANGES_READING
    return f"{name} {' '.join(word.value for word in args)} ({why})"


def _zmodload_problem(args: list[Word]) -> str | None:
    # A module adds the shell's own commands: zsh/system's sysread sets variables,
    # zsh/zpty runs a command line, zsh/mapfile writes files through an assignment.
    modules = [word.value for word in args if not word.value.startswith("-") or not word.known]
    if modules:
        return f"zmodload {' '.join(modules)} (it adds commands to the shell that set variables, write files or run code)"
    return None


# ps options that take a value, attached or as the next word: their values are not options.
# Only real ones belong here: a letter taken for one wrongly would hide the word after it.
_PS_DASH_WITH_VALUE = frozenset("CGgOopqstUu")
_PS_BSD_WITH_VALUE = frozenset("OopqtUk")
_PS_LONG_WITH_VALUE = frozenset(
    {"--Group", "--group", "--pid", "--ppid", "--quick-pid", "--sid", "--tty", "--User", "--user", "--format",
     "--sort", "--cols", "--columns", "--width", "--rows", "--lines", "--help"}
)


#: One word that starts with a directory, not with an action of find's (-exec): a tilde
#: prefix (~, ~/logs, ~user, ~+), or "$HOME", "$PWD", "$OLDPWD" quoted.
_DIRECTORY_START = re.compile(r"~|\$(?:\{(?:HOME|PWD|OLDPWD)\}|(?:HOME|PWD|OLDPWD)(?![A-Za-z0-9_]))")
#: $HOME unquoted, with a plain path after it: the account's home, which no command can
#: change ($PWD can: `cd` into a directory named `x -delete`, and it splits there).
_HOME_PATH = re.compile(r"\$(?:\{HOME\}|HOME(?![A-Za-z0-9_]))[^$`*?\[{~\\'\"]*")


def _find_problem(args: list[Word]) -> str | None:
    for word in args:
        if _could_be_options(word) and not (
            (word.one_word and _DIRECTORY_START.match(word.value)) or _HOME_PATH.fullmatch(word.value)
        ):
            return (f"find {word.value} (a word decided at run time could be an action such as -exec or -delete: "
                    "write it out, or quote a directory's variable, \"$HOME\")")
        if word.value in ("-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0", "-fprintf", "-fls"):
            return f"find {word.value} (it runs commands or writes files)"
    return None


def _ps_problem(args: list[Word]) -> str | None:
    option = _ps_environment_option(args)
    if option is None:
        return None
    why = "it shows" if option.known else "an option decided at run time could show"
    return f"ps {option.value} ({why} processes' environments, where secrets are kept)"


#: What a rule for a program would not expect to allow: options of find and ps, and the
#: shell's own commands that set variables, aliases or what a name runs, run its history,
#: or change how it reads later commands. Each check returns the problem (the command is
#: then judged only under raw shell), or None.
_OPTION_CHECKS = {
    "find": _find_problem, "ps": _ps_problem, "alias": _alias_problem, "hash": _hash_problem, "set": _set_problem,
    "autoload": _autoload_problem, "compgen": _compgen_problem,
    "shopt": _shopt_problem, "zmodload": _zmodload_problem,
    **{name: functools.partial(_zsh_options_problem, name) for name in ("setopt", "unsetopt", "emulate")},
    "fc": functools.partial(_history_problem, "fc"), "hist": functools.partial(_history_problem, "hist"),
    **{name: functools.partial(_builtin_problem, name) for name in _TAKE_VARIABLE_NAMES},
    **{name: functools.partial(_evaluated_word_problem, name) for name in _ARITHMETIC_OPERAND_COMMANDS},
}


def _ps_environment_option(args: list[Word]) -> Word | None:
    """The option that makes ``ps`` print processes' environments, if one is given: the
    BSD-style ``e`` of procps (``ps eww``, ``ps auxe``) and of the BSDs, macOS's ``-E``. A
    word decided at run time counts as one, since it could be."""
    value_due = False  # the next word is an option's value (ps -p 1)
    for word in args:
        if value_due and _stays_one_word(word):
            value_due = False  # whatever it holds, one word after -p is a process id (ps -p "$PID")
            continue
        if not word.known:
            return word  # unquoted, it could even be several words
        value = word.value
        if value_due:
            value_due = False
            continue
        if value.startswith("--"):
            value_due = "=" not in value and value in _PS_LONG_WITH_VALUE
            continue
        dashed = value.startswith("-")
        letters = value[1:] if dashed else value
        for position, letter in enumerate(letters):
            if letter == ("E" if dashed else "e"):
                return word
            if letter in (_PS_DASH_WITH_VALUE if dashed else _PS_BSD_WITH_VALUE):
                value_due = position == len(letters) - 1  # else the rest of the word is the value
                break
    return None


# -- wrappers: each returns (inner words, assignments, privileged) or None ------------------


def _skip_options(
    args: list[Word], with_value: set[str], flags: set[str], values: dict[str, list[Word]] | None = None
) -> list[Word]:
    """Drop leading options; those in ``with_value`` take the next word. Unknown ones: refuse.

    ``values``, when given, collects each value-taking option's values under the option's name.
    """
    index = 0

    def keep(option: str, value: Word) -> None:
        if values is not None:
            values.setdefault(option, []).append(value)

    while index < len(args):
        word = args[index]
        if not word.known:
            raise _Unjudgeable(f"an option decided at run time ({word.value})")
        text = word.value
        if text == "--":
            return args[index + 1 :]
        if not text.startswith("-") or text == "-":
            return args[index:]
        option = text.split("=", 1)[0]
        if option in with_value and "=" not in text:
            if index + 1 < len(args):
                value = args[index + 1]
                if not _stays_one_word(value):
                    # `nice -n $_ true` with $_ = "5 rm -rf ~" runs rm, not true.
                    advice = ": quote it" if value.value.startswith("$") else ""
                    raise _Unjudgeable(f"{option} {value.value} (a value the shell may split into more words{advice})")
                keep(option, value)
            index += 2
            continue
        if option in with_value:
            keep(option, Word(text.split("=", 1)[1]))
            index += 1
            continue
        if option in flags:
            index += 1
            continue
        # Combined short options (-n5, -oL) of a value-taking option.
        short = text[:2]
        if short in with_value:
            keep(short, Word(text[2:]))
            index += 1
            continue
        raise _Unjudgeable(f"an option it does not know ({text})")
    return []


def _sudo(args: list[Word]):  # type: ignore[no-untyped-def]
    for word in args:
        if not word.value.startswith("-") or word.value == "--":
            break
        if word.value in ("-s", "--shell", "-i", "--login", "-e", "--edit", "-l", "--list", "-v", "--validate"):
            raise _Unjudgeable(f"a shell, login, editor or listing through sudo ({word.value})")
    values: dict[str, list[Word]] = {}
    rest = _skip_options(
        args,
        with_value={"-u", "--user", "-g", "--group", "-C", "--close-from", "-h", "--host", "-p", "--prompt",
                    "-r", "--role", "-t", "--type", "-U", "--other-user", "-D", "--chdir", "-T", "--command-timeout"},
        flags={"-n", "--non-interactive", "-H", "--set-home", "-k", "--reset-timestamp", "-P", "--preserve-groups",
               "-S", "--stdin", "-b", "--background", "-A", "--askpass", "-B", "--bell", "-E", "--preserve-env",
               "-K", "-N", "--no-update"},
        values=values,
    )
    _refuse(values, ("-D", "--chdir"), _CHOSEN_DIRECTORY)
    env = _leading_assignments(rest)
    return rest, env, True


def _env(args: list[Word]):  # type: ignore[no-untyped-def]
    if any(w.value in ("-S", "--split-string") or w.value.startswith("--split-string") for w in args):
        raise _Unjudgeable("-S (it splits a string into a command)")
    values: dict[str, list[Word]] = {}
    rest = _skip_options(
        args, with_value={"-u", "--unset", "-C", "--chdir"},
        flags={"-i", "--ignore-environment", "-0", "--null", "-v", "--debug"}, values=values,
    )
    _refuse(values, ("-C", "--chdir"), _CHOSEN_DIRECTORY)
    env = _leading_assignments(rest)
    return rest, env, False


def _leading_assignments(rest: list[Word]) -> list[tuple[str, str]]:
    """Take the NAME=VALUE words that env and sudo set before their command off ``rest``.

    Any word with a ``=`` is one to them, whatever precedes it: ``env a.b=x true`` runs true."""
    env: list[tuple[str, str]] = []
    while rest and "=" in rest[0].value:
        if not rest[0].known:
            raise _Unjudgeable("an assignment decided at run time")
        key, _, value = rest.pop(0).value.partition("=")
        env.append((key, value))
    return env


def _simple_wrapper(with_value: set[str], flags: set[str], positional: int = 0):  # type: ignore[no-untyped-def]
    def unwrap(args: list[Word]):  # type: ignore[no-untyped-def]
        rest = _skip_options(args, with_value=with_value, flags=flags)
        if len(rest) < positional:
            return [], [], False
        for word in rest[:positional]:
            if not word.known:
                raise _Unjudgeable(f"an argument decided at run time ({word.value})")
        return rest[positional:], [], False

    return unwrap


_exec_words = _simple_wrapper(set(), {"-c", "-l"})


def _exec(args: list[Word]):  # type: ignore[no-untyped-def]
    for word in args:
        if not word.value.startswith("-") or word.value == "--":
            break
        if not word.value.startswith("--") and "a" in word.value[1:]:
            # busybox ash (Alpine's sh) runs NAME itself: `exec -a rm echo -rf ~` runs rm.
            raise _Unjudgeable(f"{word.value} NAME (busybox ash runs NAME instead of the command)")
    return _exec_words(args)


def _time(args: list[Word]):  # type: ignore[no-untyped-def]
    values: dict[str, list[Word]] = {}
    rest = _skip_options(
        args, with_value={"-f", "--format", "-o", "--output"},
        flags={"-p", "-v", "--verbose", "-a", "--append", "-q", "--quiet", "--portability"}, values=values,
    )
    _refuse(values, ("-o", "--output"), "writes its report to a file", harmless=_HARMLESS_TARGETS)
    return rest, [], False


def _xargs(args: list[Word]):  # type: ignore[no-untyped-def]
    values: dict[str, list[Word]] = {}
    rest = _skip_options(
        args,
        with_value={"-I", "-i", "-n", "--max-args", "-P", "--max-procs", "-d", "--delimiter", "-L", "--max-lines",
                    "-s", "--max-chars", "-E", "-e", "--eof", "-a", "--arg-file"},
        flags={"-0", "--null", "-r", "--no-run-if-empty", "-t", "--verbose", "-x", "--exit", "-p", "--interactive"},
        values=values,
    )
    # Like input redirection: the file would reach the command without a rule seeing its name.
    _refuse(values, ("-a", "--arg-file"), "reads the arguments from a file", harmless=_HARMLESS_TARGETS)
    if not rest:
        rest = [Word("echo")]
    # What xargs reads becomes more arguments, decided at run time.
    return [*rest, Word("<arguments from input>", known=False)], [], False


# Like a working directory a request sets: `make test` runs what the Makefile there says,
# and no rule would see the directory. `cd DIR && make test` is judged (cd needs a rule).
_CHOSEN_DIRECTORY = "a working directory chosen so is not judged; write cd DIR && COMMAND"


def _refuse(
    values: dict[str, list[Word]], options: tuple[str, ...], what: str, *, harmless: frozenset[str] = frozenset()
) -> None:
    """Refuse a wrapper's option value (a file, a directory) that no rule would see, unless it is ``harmless``."""
    for option in options:
        for target in values.get(option, []):
            if not (target.known and target.value in harmless):
                raise _Unjudgeable(f"{option} {target.value} ({what})")


#: Keywords after which NAME=value is still an assignment: bash, zsh and ksh run `time
#: PATH=DIR uname` as DIR/uname, and zsh `nocorrect PATH=DIR uname` (written bare, not as
#: /usr/bin/time). After a program (nohup, nice, command, exec, env's own aside) the word
#: is the program to run: `nohup TZ=x uname` runs a program named TZ=x.
_KEYWORDS_BEFORE_ASSIGNMENTS = frozenset({"time", "nocorrect"})

_WRAPPERS = {
    "sudo": _sudo,
    "doas": lambda args: (_skip_options(args, {"-u", "-C"}, {"-n"}), [], True),
    "env": _env,
    "nice": _simple_wrapper({"-n", "--adjustment"}, set()),
    "nohup": _simple_wrapper(set(), set()),
    "time": _time,
    "timeout": _simple_wrapper({"-s", "--signal", "-k", "--kill-after"}, {"--preserve-status", "--foreground", "-v", "--verbose"}, positional=1),
    "command": _simple_wrapper(set(), {"-p", "-v", "-V"}),
    "exec": _exec,
    "stdbuf": _simple_wrapper({"-i", "--input", "-o", "--output", "-e", "--error"}, set()),
    "ionice": _simple_wrapper({"-c", "--class", "-n", "--classdata"}, {"-t", "--ignore"}),
    "setsid": _simple_wrapper(set(), {"-c", "--ctty", "-f", "--fork", "-w", "--wait"}),
    "xargs": _xargs,
    # The shell's own: bash's and zsh's builtin, zsh's precommand modifiers.
    "builtin": _simple_wrapper(set(), set()),
    "noglob": _simple_wrapper(set(), set()),
    "nocorrect": _simple_wrapper(set(), set()),
    "-": _simple_wrapper(set(), set()),
}
