"""python -m trainer: flags in, files out; errors become exit codes here and only here."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter out of the logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import data, options
from .errors import (
    EXIT_FAILED,
    EXIT_IO,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    Interrupted,
    UsageError,
)
from .status import Heartbeat
from .stop import StopSignal

log = logging.getLogger("trainer")


def _setup_logging(out: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    to_file = logging.FileHandler(out / "train.log")  # appends: a resumed run keeps its past
    to_stderr = logging.StreamHandler(sys.stderr)
    for handler in (to_file, to_stderr):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _fail(message: str) -> None:
    print(f"trainer: error: {message}", file=sys.stderr)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python, or TensorFlow's wrapped form of it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc)


def main(argv: list[str] | None = None) -> int:
    stop = StopSignal().install()
    try:
        opts = options.parse(argv)
        out = options.prepare_out(opts)
        labelled = data.find_labelled(opts.data, opts.extract_dir)
        test_items = data.find_unlabelled(opts.test, opts.extract_dir) if opts.test else None
    except UsageError as exc:
        _fail(str(exc))
        return exc.exit_code
    except OSError as exc:  # unreadable folders, a full disk while unzipping
        _fail(f"{exc.filename or 'data'}: {exc.strerror or exc}; check the path and free space")
        return EXIT_IO if _disk_full(exc) else EXIT_USAGE
    _setup_logging(out)
    log.info("python -m trainer %s", " ".join(sys.argv[1:] if argv is None else argv))
    hb = Heartbeat(out / "status.json", model=opts.model, epochs=opts.total_epochs).start()
    try:
        from . import train  # TensorFlow is imported only from here on

        done = train.finished_metrics(out, opts)
        if done is not None:
            log.info("this run already finished (val_accuracy %.4f); nothing to do",
                     done["val_accuracy"])
        else:
            done = train.run(opts, out, labelled, test_items, hb, stop)
    except Interrupted as exc:
        log.warning("%s", exc)
        hb.finish("interrupted", message=str(exc))
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint stands
        hb.finish("interrupted", message="stopped by a second Ctrl-C")
        return EXIT_SIGINT
    except UsageError as exc:
        hb.finish("failed", error=str(exc))
        _fail(str(exc))
        return exc.exit_code
    except Exception as exc:
        if _disk_full(exc):
            message = (f"no space left on the device writing {out}; free disk space, "
                       "then rerun with --resume")
            log.error("%s", message)
            hb.finish("failed", error=message)
            _fail(message)
            return EXIT_IO
        log.exception("training failed")
        hb.finish("failed", error=f"{type(exc).__name__}: {exc}")
        _fail(f"{type(exc).__name__}: {exc} (traceback in {out / 'train.log'})")
        return EXIT_FAILED
    hb.finish("done", metrics={k: done[k] for k in ("val_accuracy", "val_loss")},
              best_epoch=done["best_epoch"], epochs_run=done["epochs_run"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
