"""What dlbox tells people: the type of its line printer, and figures as people read them."""

from __future__ import annotations

from collections.abc import Callable

Say = Callable[[str], None]  # prints one line for the user


def duration(seconds: float) -> str:
    """"42 min" or "3 h 05 min"."""
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
