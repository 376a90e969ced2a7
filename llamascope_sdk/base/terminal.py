"""Text bound for a terminal, with control characters made visible.

Labels, tokens and generated text come from files and models the user may not control. Printed
raw, an escape sequence in a label (``\\x1b[2J``) clears the screen, recolours it or rewrites the
window title, and bidirectional overrides reorder what is shown. :func:`visible` replaces every
such character by its Python escape (``\\x1b``, ``\\u202e``), so the text reads as it is stored.
The CLI prints through it (``cli.app.say`` and ``cli.app.table``); call it for any other text
that goes to a terminal.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL, line/paragraph separators, and the bidirectional marks,
# embeddings, overrides and isolates (U+061C, U+200E-F, U+202A-E, U+2066-9).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def visible(text: str, *, keep_lines: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\n``, ``\\u202e``).

    ``keep_lines`` keeps newlines and tabs as they are (for generated text shown as paragraphs);
    carriage returns and every other control character are still escaped.
    """
    pattern = _UNSAFE_KEEP_LINES if keep_lines else _UNSAFE
    return pattern.sub(_escape, text)


__all__ = ["visible"]
