"""Text from elsewhere made safe to print: one line per result, and no raw control characters on a terminal.

A model can generate anything its tokenizer decodes: newlines inside a reply, and terminal control
characters (ESC sequences, backspace, BEL, carriage return). ``escape_line`` turns a text into exactly one
line, reversibly (``unescape_line``); ``for_terminal`` keeps newlines and tabs and shows every other control
character as a visible escape. Both replace character by character, never looking at neighbours, so text
streamed in pieces comes out the same as the whole text: a piece boundary cannot carry a sequence through.
``shown`` is for what other peers say about themselves (a server's public name, version, an error it relays):
one line, control characters visible, and no longer than a reader can use. Knows nothing about the CLI,
tokenizers or where the text goes (a renderer that interprets markup escapes it there).
"""

from __future__ import annotations

_CONTROLS = [*range(0x00, 0x20), *range(0x7F, 0xA0)]  # C0, DEL and C1
_LINE_SEPARATORS = [0x2028, 0x2029]  # not control characters, but str.splitlines() and some editors break there


def _visible(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_LINE_ESCAPES = {code: _visible(code) for code in _CONTROLS + _LINE_SEPARATORS} | {
    ord("\\"): "\\\\",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
_TERMINAL_ESCAPES = {code: _visible(code) for code in _CONTROLS if chr(code) not in "\n\t"}


def escape_line(text: str) -> str:
    """``text`` as one line: backslash, newline, carriage return and tab as ``\\\\ \\n \\r \\t``, other control
    characters (and U+2028, U+2029) as ``\\xHH`` (``\\uHHHH``). These are Python's string escapes, so
    ``unescape_line`` gives the text back exactly."""
    return text.translate(_LINE_ESCAPES)


def unescape_line(line: str) -> str:
    """The text that ``escape_line`` turned into ``line``."""
    # non-ASCII characters become escapes too, so that the codec reads every character the same way
    return line.encode("ascii", "backslashreplace").decode("unicode_escape")


def for_terminal(text: str) -> str:
    """``text`` with newlines and tabs kept and every other control character shown as ``\\xHH`` (for reading;
    a backslash the model wrote stays as it is, so this is not reversible)."""
    return text.translate(_TERMINAL_ESCAPES)


SHOWN_CHARACTERS = 200  # the most of one string another peer sent that is shown (an error message: ERROR_CHARACTERS)
ERROR_CHARACTERS = 1000


def shown(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` that another peer sent, as one line (``escape_line``), cut to ``limit`` characters with "…"."""
    line = escape_line(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"
