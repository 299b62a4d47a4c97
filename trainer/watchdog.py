"""python -m trainer.watchdog PID SECONDS OUT MESSAGE: end process PID unless it closes our stdin.

TensorFlow waits for every worker of a cluster holding the GIL and with SIGTERM taken over
by its preemption notifier: no thread of the trainer runs until that wait ends, and a
signal does not end it. This separate process, stdlib only, gives up for it: it kills the
trainer, marks OUT/status.json failed and prints the trainer's error line.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from .status import LOG_DATE_FORMAT, utc_now, write_json_atomic


def main(argv: list[str]) -> int:
    pid, seconds, out, message = int(argv[0]), float(argv[1]), Path(argv[2]), argv[3]
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    if ready:  # closed (end of file): the wait is over, or the trainer has ended
        return 0
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    _mark_failed(out / "status.json", message)
    with open(out / "train.log", "a") as log:
        log.write(f"{time.strftime(LOG_DATE_FORMAT)} ERROR {message}\n")
    print(f"trainer: error: {message}", file=sys.stderr, flush=True)
    return 0


def _mark_failed(path: Path, message: str) -> None:
    """status.json as the trainer's Heartbeat.finish would leave it."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        status = {}
    status.update(state="failed", error=message, eta_seconds=None, updated_at=utc_now())
    write_json_atomic(path, status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
