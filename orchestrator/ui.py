"""How the run lifecycle speaks to the person at the keyboard, without knowing the terminal:
the CLI gives it lines, questions and live bars; tests and benchmarks give it plain print."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .humanize import Say

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) of an upload
OnStatus = Callable[[dict], None]  # every status.json a follow reads, for a live bar


@contextlib.contextmanager
def _no_bar() -> Iterator[Any]:
    yield None


def _refuse(question: str, yes: bool, refusal: str) -> None:
    if not yes:
        raise UsageError(refusal)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class Ui:
    """What the lifecycle may do to be heard."""

    say: Say = print  # a line of what happens
    warn: Say = lambda line: _err(f"dlbox: warning: {line}")
    err: Say = _err  # a line from the box for stderr (a run's last words)
    fail: Say = lambda line: _err(f"dlbox: error: {line}")
    # (question, yes, refusal): returns to go on; UsageError(refusal) if not at a terminal
    confirm: Callable[[str, bool, str], None] = _refuse
    transfer: Callable[[], ContextManager[Progress | None]] = _no_bar  # around an upload
    # around a follow: (say for its lines, on_status or None)
    status: Callable[[], ContextManager[tuple[Say, OnStatus | None]]] = \
        lambda: contextlib.nullcontext((print, None))
