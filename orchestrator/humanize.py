"""Figures as people read them."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """"42 min" or "3 h 05 min"."""
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
