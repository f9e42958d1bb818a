"""Characters a terminal acts on instead of showing, and text made safe to show.

One set serves two ends: a command may not contain them (apart from tab and newline), and
what fleetrun itself prints about a task (text that came from commands and servers: a
latest line, an error, a cancel reason) shows them escaped.
"""

from __future__ import annotations

import re

#: C0 and C1 controls, DEL, and bidirectional overrides (text that displays differently
#: from what it is), as a regex character class body.
CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"

_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``).

    Printed as is, such text could move the cursor, retitle the window or hide text. A
    command's output itself is printed as it is, as ``cat`` would.
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL.sub(escape, str(text))


# A lone surrogate is not a character: no encoder takes it. Python makes one (U+DC80 to
# U+DCFF) of each byte of a command line or file name that is not UTF-8; JSON's \\udXXX
# escapes make any of them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str, what: str) -> str | None:
    """Why ``text`` cannot be run and recorded as text, or None: it holds a lone surrogate."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"{what} is not UTF-8: it has the byte 0x{code - 0xDC00:02X} at position {found.start()}"
    return f"{what} has U+{code:04X} at position {found.start()}, which is not a character (a lone surrogate)"


def argument_problem(text: str, what: str) -> str | None:
    """Why ``text`` cannot be handed to the system (an argument, a path, an environment
    value: none can hold a NUL) and recorded as text, or None."""
    if "\x00" in text:
        return f"{what} contains a NUL character"
    return text_problem(text, what)


def encodable(text: str) -> str:
    """``text`` with each lone surrogate written as an escape (``\\xe9`` for a byte that
    was not UTF-8), so that it can be stored, logged and sent."""
    if text.isascii():
        return text

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, text)


def cut_character_at_end(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin a UTF-8 character whose other bytes are
    not there (a read of output still being written, or of a piece, can end inside one).
    0 when ``data`` ends with a whole character, or with bytes that are not UTF-8."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte < 0xC0:
            continue  # a continuation byte: its lead is further back
        if 0xC2 <= byte <= 0xF4:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if back < needed else 0
        return 0
    return 0


def cut_character_at_start(data: bytes) -> int:
    """How many bytes at the start of ``data`` are the rest of a UTF-8 character whose lead
    byte is before it (at most 3: a longer run is not UTF-8, and is left as it is)."""
    count = 0
    while count < min(3, len(data)) and 0x80 <= data[count] < 0xC0:
        count += 1
    return count
