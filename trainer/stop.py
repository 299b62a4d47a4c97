"""SIGTERM/SIGINT become a flag the training loop checks, so it can checkpoint before exiting."""

from __future__ import annotations

import signal

from .errors import Interrupted


class StopSignal:
    """Records the first SIGTERM or SIGINT; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopSignal:
        """Take SIGTERM and SIGINT (again after TensorFlow's cluster took SIGTERM over)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # impatient second Ctrl-C
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for (call where nothing is left to save)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def interrupted(self) -> Interrupted:
        """The error all workers of a cluster raise together: for this signal, or another's."""
        return Interrupted(self.signum or signal.SIGTERM, by_peer=self.signum is None)
