"""The debug log for bug reports: with `dlbox --verbose` (or DLBOX_DEBUG=1), every remote
command, transfer and AWS call goes to .dlbox/debug.log with its duration and outcome.

Off by default, and then nearly free: nothing is imported or opened until enable(). What is
logged is names, commands and outcomes, never a file's content or a command's input (where
Kaggle credentials travel); a value registered with secret() is masked wherever it shows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV = "DLBOX_DEBUG"  # 1: on, as --verbose
LOG_FILE = "debug.log"  # under .dlbox/
MAX_LINE_CHARS = 4000  # a command longer than this (a rendered script) is cut
MASK = "***"

_logger = None  # a logging.Logger once enabled
_secrets: set[str] = set()


def wanted(flag: bool) -> bool:
    """Whether the user asked for the log (--verbose, or DLBOX_DEBUG set to 1)."""
    return flag or os.environ.get(ENV, "") not in ("", "0")


def enable(state_dir: Path) -> Path:
    """Start logging to state_dir/debug.log (appended; only the user may read it)."""
    global _logger
    import logging

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOG_FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(message)s"))
    handler.addFilter(_mask)
    logger = logging.getLogger("dlbox")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    _logger = logger
    argv = sys.argv[1:]
    if "ssh" in argv:  # what follows is the user's own command for the box: not ours to keep
        argv = [*argv[: argv.index("ssh") + 1], "..."]
    log("command", " ".join(argv))
    return path


def disable() -> None:
    """Stop logging (tests; a long-lived process)."""
    global _logger
    if _logger is not None:
        for handler in _logger.handlers:
            handler.close()
        _logger.handlers[:] = []
    _logger = None


def secret(value: str | None) -> None:
    """A value never to be written (a Kaggle key, a token): masked in every line."""
    if value and len(value) >= 4:  # shorter ones would mask ordinary words
        _secrets.add(value)


def _mask(record) -> bool:
    text = record.getMessage()
    for value in tuple(_secrets):  # a thread may register one meanwhile
        text = text.replace(value, MASK)
    record.msg, record.args = text, None
    return True


def log(kind: str, what: str, outcome: str = "", seconds: float | None = None) -> None:
    """One line: the kind of operation, what it was, how long it took, how it ended."""
    if _logger is None:
        return
    what = " ".join(what.split())  # one line, whatever the command holds
    if len(what) > MAX_LINE_CHARS:
        what = what[:MAX_LINE_CHARS] + f"... ({len(what)} chars)"
    took = f" {seconds:.3f}s" if seconds is not None else ""
    _logger.debug("%s%s %s%s", kind, took, what, f" -> {outcome}" if outcome else "")


@dataclass
class Entry:
    """What a timed operation ended with; the caller may say more than "ok"."""

    outcome: str = "ok"


@contextlib.contextmanager
def timed(kind: str, what: str) -> Iterator[Entry]:
    """Log the operation in the with block, its duration and outcome (an error's type and
    words when it raises)."""
    entry = Entry()
    if _logger is None:
        yield entry
        return
    start = time.monotonic()
    try:
        yield entry
    except BaseException as exc:
        entry.outcome = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        log(kind, what, entry.outcome, time.monotonic() - start)


def watch_aws(session) -> None:
    """Log every AWS call a boto3 session makes: service, operation, duration, HTTP status
    or error code (never the parameters: they may carry user data or keys' material)."""
    if _logger is None:
        return

    def before(context, model, **_) -> None:
        context["dlbox_started"] = time.monotonic()

    def after(context, model, http_response, parsed, **_) -> None:
        took = time.monotonic() - context.get("dlbox_started", time.monotonic())
        error = (parsed or {}).get("Error", {}).get("Code") if isinstance(parsed, dict) else None
        status = getattr(http_response, "status_code", "?")
        log("aws", f"{model.service_model.service_name}.{model.name}",
            f"HTTP {status}" + (f" {error}" if error else ""), took)

    session.events.register("before-call", before)
    session.events.register("after-call", after)


def traced(describe):
    """A Machine method logged as "<machine> <method> <describe(*args)>", with its outcome:
    a command's exit status, the bytes read. describe never shows content (a write's data,
    a command's stdin)."""
    import functools

    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            if _logger is None:
                return method(self, *args, **kwargs)
            with timed(f"{self.debug_name} {method.__name__}", describe(*args)) as entry:
                result = method(self, *args, **kwargs)
                exit_code = getattr(result, "exit_code", None)
                if exit_code is not None:
                    entry.outcome = f"exit {exit_code}"
                elif isinstance(result, bytes):
                    entry.outcome = f"{len(result)} bytes"
                elif result is None and method.__name__ == "read":
                    entry.outcome = "not there"
                return result

        return inner

    return wrap


def command(command: str, *_) -> str:
    return command


def path(path, *_) -> str:
    return str(path)


def written(path: str, data: bytes, *_) -> str:
    return f"{path} ({len(data)} bytes)"


def uploaded(root, names, remote_dir, *_) -> str:
    return f"{len(names)} file(s) from {root} to {remote_dir}"


def fetched(path: str, local, *_) -> str:
    return f"{path} to {local}"


def tree(local, remote_dir: str, *_) -> str:
    return f"{local} to {remote_dir}"
