"""The trainer's errors and the exit codes they map to (converted once, in __main__)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IO = 74  # sysexits EX_IOERR: the disk is full or unwritable
EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: SIGTERM, checkpointed; rerun with --resume
EXIT_SIGINT = 130


class TrainerError(Exception):
    """Root of every error the trainer raises on purpose."""

    exit_code = EXIT_FAILED


class UsageError(TrainerError, ValueError):
    """Bad flags or bad data: the message names the problem and the fix."""

    exit_code = EXIT_USAGE


class DataError(UsageError):
    """The dataset is missing, empty, unreadable or holds no labelled image."""


class Interrupted(TrainerError):
    """A signal asked the run to stop; a checkpoint was written first."""

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; rerun with --resume to continue from the last checkpoint")
        self.signum = signum
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_INTERRUPTED
