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
