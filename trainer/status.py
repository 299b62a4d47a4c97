"""status.json: a heartbeat rewritten atomically every few seconds, from a background thread."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HEARTBEAT_SECONDS = 2.0  # how often status.json is rewritten while the run lives
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # train.log's timestamps (the trainer's and its watchdog's)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_text_atomic(path: Path, text: str) -> None:
    """Write so readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


class Heartbeat:
    """Holds the run's live status and rewrites status.json from a daemon thread.

    A thread (not a Keras callback) keeps the heartbeat alive through long batches,
    validation, image decoding and checkpoint saves.
    """

    def __init__(self, path: Path, **fields) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._status = {
            "state": "running",
            "phase": "starting",
            "epoch": 0,
            "epochs": 0,
            "step": 0,
            "steps": 0,
            "metrics": {},
            "eta_seconds": None,
            "pid": os.getpid(),
            "started_at": utc_now(),
            **fields,
        }
        self._epoch_seconds: list[float] = []
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.write()
        self._thread.start()
        return self

    def update(self, **fields) -> None:
        with self._lock:
            self._status.update(fields)

    def epoch_done(self, seconds: float) -> None:
        with self._lock:
            self._epoch_seconds.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            status = dict(self._status)
            status["updated_at"] = utc_now()
            status["elapsed_seconds"] = round(time.monotonic() - self._started, 1)
            if status["state"] == "running":
                status["eta_seconds"] = self._eta(status)
            return status

    def _eta(self, s: dict) -> float | None:
        """Seconds left if every remaining epoch takes as long as the average one so far."""
        if not self._epoch_seconds or not s.get("epochs"):
            return None
        per_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
        done_in_epoch = s["step"] / s["steps"] if s.get("steps") else 0.0
        remaining = max(0.0, s["epochs"] - s["epoch"] + 1 - done_in_epoch)
        if s["phase"] not in ("training", "fine-tuning"):
            remaining = max(0.0, s["epochs"] - s["epoch"])
        return round(remaining * per_epoch, 1)

    def write(self) -> None:
        write_json_atomic(self.path, self.snapshot())

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # A full disk must not kill the run from this thread; the next write may work.
            with contextlib.suppress(OSError):
                self.write()

    def finish(self, state: str, **fields) -> None:
        """Stop the thread and write the final status (state: done, failed, interrupted)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.update(state=state, eta_seconds=0 if state == "done" else None, **fields)
        with contextlib.suppress(OSError):  # a full disk: the exit status still tells
            self.write()
