"""Where runs happen, behind one small interface: this machine, or one reached over SSH.

A machine runs shell commands, reads small files, writes files, streams folders in and
fetches results out. Commands are data (strings from templates); the machine only carries
them, so run logic is the same on every kind of box.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import DlboxError

COMMAND_TIMEOUT_S = 600
# What one read or fetch takes from a box at most: the box is not trusted to keep files small.
MAX_READ_BYTES = 16 << 20  # a small file read into memory (status, exit code, a log's tail)
MAX_OUTPUT_BYTES = 128 << 20  # a command's stdout or stderr


@dataclass(frozen=True)
class Result:
    """What a command left behind (bytes that are not UTF-8 kept as surrogates, as os.fsdecode)."""

    exit_code: int
    stdout: str
    stderr: str


class TooBig(DlboxError):
    """A file or answer from the box over the bound dlbox takes."""


def too_big(what: str, max_bytes: int) -> TooBig:
    return TooBig(f"{what} on the box is over {max_bytes / 1e6:.0f} MB, more than dlbox takes "
                  "from it; check what wrote it there")


def local_error(exc: OSError, local: Path) -> OSError:
    """An error writing this machine's file, naming it (a full disk is not a lost link)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(local))


def decode(raw: bytes) -> str:
    """Command output as text; file names with odd bytes survive the round trip (os.fsencode)."""
    return raw.decode("utf-8", "surrogateescape")


def printable(name: str) -> str:
    """A file name for a one-line message: odd bytes as \\xNN, a newline as \\n (never a
    second line, never an encoding error on the terminal)."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shell_path(path: str) -> str:
    """path quoted for the box's shell, with a leading ~ still meaning the box user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class Machine(Protocol):
    """The operations a run needs from its box."""

    same_filesystem: bool  # True: the box sees this machine's files (datasets are used in place)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result: ...

    def read(self, path: str, max_bytes: int = MAX_READ_BYTES, tail: bool = False) -> bytes | None:
        """The file's bytes (None: it is not there). A file over max_bytes is an error, or,
        with tail, its last max_bytes."""

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None: ...

    def upload_tree(self, local: Path, remote_dir: str) -> None: ...

    def prepare_upload(self, remote_dir: str) -> None: ...

    def discard_prepared(self) -> None: ...

    def fetch(self, path: str, local: Path, max_bytes: int,
              timeout: float | None = None) -> None:
        """Copy the file to local (which this call creates or truncates); TooBig once more
        than max_bytes arrive. Errors writing local are OSErrors naming local. timeout: the
        silence that is CommandTimedOut (None: the machine's own bound)."""

    def close(self) -> None: ...
