"""The trainer's errors and the exit codes they map to (converted once, in __main__)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PEER_LOST = 69  # sysexits EX_UNAVAILABLE: another worker of the cluster died; --resume them all
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


class PeerLost(TrainerError):
    """Another worker of the cluster stopped answering; this one cannot go on alone."""

    exit_code = EXIT_PEER_LOST


class PeerFailed(TrainerError):
    """Another worker of the cluster failed before training; every worker stops with its error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(TrainerError):
    """A signal asked the run to stop; a checkpoint was written first."""

    def __init__(self, signum: int, by_peer: bool = False) -> None:
        import signal

        # A worker of a cluster also stops when another one is signalled: all of them exit alike.
        cause = "a stop asked of another worker" if by_peer else signal.Signals(signum).name
        super().__init__(f"stopped by {cause}; rerun with --resume to continue from the last "
                         "checkpoint")
        self.signum = signum
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT and not by_peer else EXIT_INTERRUPTED
