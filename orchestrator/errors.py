"""The orchestrator's error root; the CLI turns these into one-line messages and exit codes."""

from __future__ import annotations

# What to do about a full disk on the box, wherever dlbox meets one.
DISK_FULL_FIX = "free some space there, or give an EC2 box a bigger disk (disk_gb in dlbox.toml)"


class DlboxError(Exception):
    """Root of every error dlbox raises on purpose."""

    exit_code = 1


class UsageError(DlboxError, ValueError):
    """Bad input from the user: the message says what to do."""

    exit_code = 2


class CommandTimedOut(DlboxError, TimeoutError):
    """A command on the box ran (or stayed silent) longer than its bound."""


class LostContact(DlboxError, ConnectionError):
    """The box stopped answering (network, SSH): what runs there goes on."""

    def __init__(self, reason: str,
                 fix: str = "check the box is up (`dlbox status`), then run the command again"):
        super().__init__(f"{reason}; {fix}")
        self.reason = reason  # what happened, for callers that know a better fix


class BoxLost(DlboxError):
    """The box a run was on is gone (reclaimed, terminated, stopped): the run goes on elsewhere
    from its checkpoint, or waits for `dlbox attach`."""

    def __init__(self, reason: str, epoch: int | None = None, warned: bool = False,
                 last_seen: float | None = None, progress: float | None = None,
                 reclaimed: bool = True, ended_at: float | None = None, stopped: bool = False):
        super().__init__(reason)
        self.reason, self.epoch, self.warned = reason, epoch, warned
        # Taken back by its owner (spot, a failed host): dlbox carries on elsewhere. Else
        # someone ended it on purpose (`dlbox down`, the console, its watchdog): not undone.
        self.reclaimed = reclaimed
        self.ended_at = ended_at  # time.time() when the box ended, if its owner says
        self.stopped = stopped  # stopped, not ended: it can start again, its disk kept
        self.last_seen = last_seen  # time.time() of the trainer's last sign of life seen
        self.progress = progress  # epochs done then, with the fraction of the one going on


class RunInterrupted(DlboxError):
    """A run stopped with its box and did not go on elsewhere: `dlbox attach` resumes it."""

    exit_code = 75  # EX_TEMPFAIL, as the trainer's own "interrupted, resumable"


class Interrupted(DlboxError):
    """Ctrl-C (or SIGTERM) cut a step short: the message says what it leaves and what to do."""

    exit_code = 130  # as shells expect of Ctrl-C


class NeverUsable(DlboxError):
    """A box just launched never became usable; it was terminated (verified)."""
