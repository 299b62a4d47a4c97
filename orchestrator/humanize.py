"""What dlbox tells people: the type of its line printer, and figures as people read them."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

Say = Callable[[str], None]  # prints one line for the user


def duration(seconds: float) -> str:
    """"42 min" or "3 h 05 min"."""
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


# Bidirectional overrides and isolates: they reorder what a terminal shows ("Trojan Source").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _shown(char: str, keep: str) -> str:
    if char in keep:
        return char
    if char == "\t":
        return " "
    # C0, DEL and C1 controls; lone surrogates (undecodable bytes) no terminal can print
    if char in _BIDI or unicodedata.category(char) in ("Cc", "Cs"):
        return char.encode("unicode_escape").decode("ascii")
    return char


def clean(text: str, keep: str = "") -> str:
    """text safe for a terminal: every control character (escape sequences, carriage
    returns, newlines unless kept) shown as its escape, e.g. \\x1b, never obeyed."""
    if text.isprintable():
        return text
    return "".join(_shown(c, keep) for c in text)


def clean_lines(text: str) -> str:
    """clean, keeping line breaks: for logs shown as they are."""
    return clean(text, keep="\n")
