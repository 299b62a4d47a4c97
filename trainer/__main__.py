"""python -m trainer: flags in, files out; errors become exit codes here and only here.

Every failure ends stderr with one line, `trainer: error: <problem>; <fix>`. Tracebacks go
to train.log only (or, before --out is known, to a file that line names).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter out of the logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import cluster as clusters
from . import data, options
from .errors import (
    EXIT_FAILED,
    EXIT_IO,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    Interrupted,
    TrainerError,
    UsageError,
)
from .status import LOG_DATE_FORMAT, Heartbeat
from .stop import StopSignal

log = logging.getLogger("trainer")
log.addHandler(logging.NullHandler())  # before _setup_logging: nothing, not logging's lastResort

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_ONLY = "file_only"  # a record's extra flag: train.log only (stderr gets the error line)
ERROR_LINE_CHARS = 400  # TensorFlow's messages run to pages; the error line stays readable


class _NoTraceback(logging.Formatter):
    """Formats a record without its traceback or stack: those are for train.log only."""

    def format(self, record: logging.LogRecord) -> str:
        # A copy: the file handler formats the same record and caches its exc_text on it.
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                       "stack_info": None})
        return super().format(plain)


def _setup_logging(out: Path) -> None:
    to_file = logging.FileHandler(out / "train.log")  # appends: a resumed run keeps its past
    to_file.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(_NoTraceback(LOG_FORMAT, LOG_DATE_FORMAT))
    to_stderr.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    for handler in (to_file, to_stderr):
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # Python prints these tracebacks to stderr itself; log them instead (stderr drops them).
    threading.excepthook = lambda a: log.error(
        "thread %s failed", a.thread.name if a.thread else "?",
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    # File only: these come at exit too, after the error line that must stay stderr's last.
    sys.unraisablehook = lambda u: log.warning(
        "%s: %s", u.err_msg or "exception ignored", u.object,
        exc_info=(u.exc_type, u.exc_value, u.exc_traceback), extra={FILE_ONLY: True})


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_LINE_CHARS else line[: ERROR_LINE_CHARS - 1] + "…"


def _fail(message: str, level: int = logging.ERROR) -> None:
    """The error line on stderr (the last line it gets), and the message in train.log."""
    log.log(level, "%s", message, extra={FILE_ONLY: True})
    print(f"trainer: error: {_one_line(message)}", file=sys.stderr, flush=True)


def _internal_error(exc: BaseException, log_file: Path) -> str:
    return (f"internal error, {type(exc).__name__}: {exc}; please report it with the traceback "
            f"in {log_file}")


def _crash_before_logging(exc: BaseException) -> int:
    """An unexpected error before train.log was opened: its traceback to a file, not stderr."""
    where = Path(tempfile.gettempdir()) / f"trainer-{os.getpid()}.log"
    stamp = time.strftime(LOG_DATE_FORMAT)
    try:
        with open(where, "a") as f:
            f.write(f"{stamp} ERROR unexpected error\n{''.join(traceback.format_exception(exc))}")
    except OSError:
        where = Path("(unwritable)")
    _fail(_internal_error(exc, where))
    return EXIT_FAILED


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python, or TensorFlow's wrapped form of it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc)


def _ended(hb: Heartbeat, state: str, message: str, code: int) -> int:
    """status.json's last word (failed: the error; interrupted: why) and stderr's line."""
    if state == "failed":
        hb.finish(state, error=message)
        _fail(message)
    else:
        hb.finish(state, message=message)
        _fail(message, logging.WARNING)
    return code


def _crashed(hb: Heartbeat, exc: Exception, out: Path, what: str) -> int:
    """A bug: its traceback to train.log only, status.json failed, stderr's line names the log."""
    log.exception(what, extra={FILE_ONLY: True})  # stderr: the error line
    hb.finish("failed", error=f"{type(exc).__name__}: {exc}")
    _fail(_internal_error(exc, out / "train.log"))
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """python -m trainer ARGV; returns the exit code (errors.py)."""
    try:
        return _main(argv)
    except Exception as exc:  # failing while reporting a failure: still one line, no traceback
        logs = [Path(h.baseFilename) for h in log.handlers if isinstance(h, logging.FileHandler)]
        if not logs:
            return _crash_before_logging(exc)
        log.error("unexpected error", exc_info=exc, extra={FILE_ONLY: True})
        _fail(_internal_error(exc, logs[0]))
        return EXIT_FAILED


def _main(argv: list[str] | None) -> int:
    stop = StopSignal().install()
    try:
        opts = options.parse(argv)
        cluster = clusters.from_env()
        out = options.prepare_out(opts)
    except UsageError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("stopped by Ctrl-C before training started; rerun to start again")
        return EXIT_SIGINT
    except Exception as exc:
        return _crash_before_logging(exc)
    _setup_logging(out)
    # File only: a user error found next (the data) stays stderr's one line.
    log.info("python -m trainer %s", " ".join(sys.argv[1:] if argv is None else argv),
             extra={FILE_ONLY: True})
    # Beating before the data is found: unzipping Kaggle's 25,000 images takes a while, and
    # dlbox counts a run without a status.json for minutes as one that never started.
    hb = Heartbeat(out / "status.json", model=opts.model, epochs=opts.total_epochs,
                   node=cluster.index, nodes=cluster.workers).start()
    try:
        labelled = data.find_labelled(opts.data, opts.extract_dir)
        test_items = data.find_unlabelled(opts.test, opts.extract_dir) if opts.test else None
    except UsageError as exc:
        return _ended(hb, "failed", str(exc), exc.exit_code)
    except OSError as exc:  # unreadable folders, a full disk while unzipping
        return _ended(hb, "failed", f"{exc.filename or 'data'}: {exc.strerror or exc}; check the "
                      "path and free space", EXIT_IO if _disk_full(exc) else EXIT_USAGE)
    except KeyboardInterrupt:  # a second Ctrl-C while reading or unzipping the data
        return _ended(hb, "interrupted", "stopped by Ctrl-C before training started; rerun to "
                      "start again", EXIT_SIGINT)
    except Exception as exc:
        return _crashed(hb, exc, out, "finding the data failed")
    try:
        stop.check()  # a `dlbox cancel` while the data was unpacked
        from . import train  # TensorFlow is imported only from here on

        done = train.finished_metrics(out, opts, cluster)
        if done is not None:
            log.info("this run already finished (val_accuracy %.4f); nothing to do",
                     done["val_accuracy"])
        else:
            done = train.run(opts, out, labelled, test_items, hb, stop, cluster)
    except Interrupted as exc:
        return _ended(hb, "interrupted", str(exc), exc.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint stands
        return _ended(hb, "interrupted", "stopped by a second Ctrl-C; rerun with --resume to "
                      "continue from the last checkpoint", EXIT_SIGINT)
    except TrainerError as exc:  # usage, data, a lost or failed worker, a diverged loss
        return _ended(hb, "failed", str(exc), exc.exit_code)
    except Exception as exc:
        if _disk_full(exc):
            return _ended(hb, "failed", f"no space left on the device writing {out}; free disk "
                          "space, then rerun with --resume", EXIT_IO)
        return _crashed(hb, exc, out, "training failed")
    # weights_sha256: equal on every worker of a cluster (absent when --resume found it done).
    hb.finish("done", metrics={k: done[k] for k in ("val_accuracy", "val_loss")},
              best_epoch=done["best_epoch"], epochs_run=done["epochs_run"],
              weights_sha256=done.get("weights_sha256"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
