"""How names and IPQS-provided strings are shown to people: :func:`shown`.

Whoever can drop a file into an inbox chooses its name, and IPQS chooses its messages;
either may hold control characters. On a terminal those are commands (set the title,
clear the screen, move the cursor, start a new line that looks like ours), so every name,
path or IPQS string that reaches a terminal or a console-format log goes through
:func:`shown` first. JSON output and JSON logs keep the exact string (JSON escapes it), and
records keep the exact name.

The form is Python's: a backslash is ``\\\\``; tab, newline and carriage return are ``\\t``,
``\\n`` and ``\\r``; any other C0 control and DEL is ``\\xNN``; a byte that is not UTF-8
(a name read with ``surrogateescape``) is ``\\xNN`` too; C1 controls, lone surrogates,
line and paragraph separators and the bidirectional overrides that can reorder what a
reader sees are ``\\uNNNN``. So ``evil<ESC>]0;x<BEL>.csv`` is shown as
``evil\\x1b]0;x\\x07.csv``, and different names are always shown differently.
"""

from __future__ import annotations

import os

# Bidirectional formatting characters: they reorder the text around them ("Trojan Source").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                  "\u2066\u2067\u2068\u2069")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str | None:
    """The escape for one character, or None when it is shown as itself."""
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if 0x80 <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or code in (0x2028, 0x2029) \
            or char in _BIDI:
        return f"\\u{code:04x}"
    return None


def shown(value: object) -> str:
    """``value`` (a name, path, bytes or IPQS string) as text that is safe on a terminal.

    Unambiguous: a backslash is doubled, so ``\\x1b`` in the output always means the ESC
    character (or byte) and never the four characters of a name.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")
    elif isinstance(value, os.PathLike):
        text = os.fspath(value)
        text = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
    else:
        text = str(value)
    return "".join("\\\\" if c == "\\" else (_escape(c) or c) for c in text)


def terminal_safe(text: str) -> str:
    """The last guard before a terminal: escape every control character in composed text,
    keeping its line breaks (and its backslashes, which :func:`shown` already doubled in
    the names it holds). Writers for people (the commands' console, the console log
    renderer) pass every line through it, so a name that reached a message without
    :func:`shown` is still shown escaped, in the same form, never as a control sequence.
    """
    if text.isprintable():
        return text
    return "\n".join("".join(c if c == "\t" else _escape(c) or c for c in line)
                     for line in text.split("\n"))
