"""One `up`, `down` or results hand-over at a time per project: two of them never race.

Held across network calls (a launch, a terminate), unlike the short state-file lock; a
second command waits for the first, bounded, and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from . import state
from .errors import DlboxError
from .humanize import Say

LOCK_FILE = "box.lock"
BOX_LOCK_TIMEOUT_S = 3600  # an `up` that builds the box's Python can take half an hour
BOX_LOCK_POLL_S = 0.5


@contextlib.contextmanager
def held(project_dir: Path, say: Say | None = None,
         timeout_s: float = BOX_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the project's box lock; wait (bounded) while another dlbox command holds it."""
    with _held(state.ensure_dir(project_dir) / LOCK_FILE, "this project's box", say, timeout_s):
        yield


@contextlib.contextmanager
def run_held(project_dir: Path, run_id: str, say: Say | None = None,
             timeout_s: float = BOX_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold run_id's lock: one dlbox at a time copies its checkpoint or carries it on after
    its box was lost (a `train` and an `attach` may follow one run)."""
    with _held(state.ensure_dir(project_dir) / f"run-{run_id}.lock", f"run {run_id}", say,
               timeout_s):
        yield


@contextlib.contextmanager
def _held(path: Path, what: str, say: Say | None, timeout_s: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and say is not None:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    say(f"waiting for another dlbox command on {what} (pid {holder})...")
                waited = True
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise DlboxError(f"another dlbox command (pid {holder}) has held {what} for "
                                     f"over {timeout_s:.0f} s; wait for it or end it, then run "
                                     "the command again") from None
                time.sleep(BOX_LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of whoever waits
        yield
    finally:
        os.close(fd)  # releases the lock
