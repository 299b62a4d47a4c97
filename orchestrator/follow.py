"""Following a run: its phases, finished epochs and the trainer's warnings as they happen.

One command per poll brings status, history, new log lines and the exit status.
"""

from __future__ import annotations

import base64
import csv
import io
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from . import spotwatch
from .boxes import Gone
from .errors import BoxLost, CommandTimedOut, DlboxError, LostContact
from .humanize import Say
from .machine import Machine
from .runs import STATUS_POLL_S, Run, folder_gone, read_json

START_TIMEOUT_S = 120  # until the trainer's first status.json
POLL_TIMEOUT_S = 60  # one poll; a box silent for longer is lost contact
LOG_CHUNK_BYTES = 1 << 20  # of train.log per poll, at most
MAX_WARNINGS_SHOWN = 20  # per follow; the rest are in `dlbox logs`
# The spot watcher's notice, and the trainer's checkpoint commit point (copied off the box
# each time it changes).
POLLED = ("status.json", "history.csv", "exit_code", spotwatch.NOTICE_FILE,
          "checkpoints/state.json")
PEER_CHECK_S = 3  # how often the other nodes of a cluster run are asked about their workers
LOSS_CHECK_S = 10  # how often the box's owner is asked whether the box is still there
NOTICE_COPY_TRIES = 5  # polls that may copy the checkpoint of a trainer stopped by a notice
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>WARNING|ERROR|CRITICAL) (?P<message>.*)$")


@dataclass(frozen=True)
class Snapshot:
    """What one poll saw of a run on the box (None: the file is not there)."""

    status: dict | None
    history: list[dict]
    exit_code: int | None
    log: bytes  # train.log from the offset asked for
    notice: dict | None = None  # an interruption notice the box got (spotwatch.sh)
    checkpoint: bytes | None = None  # the trainer's checkpoints/state.json


def poll_command(remote_dir: str, log_offset: int) -> str:
    """A command printing each polled file, then train.log from log_offset, one base64 line
    each ("-" for a missing file): one round trip, binary-safe, however the files change."""
    files = " ".join(POLLED)
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 3; "
            f'for f in {files}; do if [ -e "$f" ]; then base64 -w0 < "$f"; else printf -; fi; '
            f"echo; done; tail -c +{log_offset + 1} train.log 2>/dev/null | "
            f"head -c {LOG_CHUNK_BYTES} | base64 -w0; echo")


def poll(machine: Machine, run: Run, log_offset: int = 0) -> Snapshot:
    try:
        done = machine.run(poll_command(run.remote_dir, log_offset), timeout=POLL_TIMEOUT_S)
    except CommandTimedOut as exc:
        raise LostContact(f"the box did not answer for {POLL_TIMEOUT_S} s") from exc
    lines = done.stdout.split("\n")
    if done.exit_code != 0 or len(lines) < len(POLLED) + 1:
        raise folder_gone(run)
    raw = [None if line == "-" else base64.b64decode(line) for line in lines[:len(POLLED)]]
    status, history, exit_code, notice, checkpoint = raw
    return Snapshot(status=read_json(status), history=_history(history),
                    exit_code=int(exit_code.strip() or 1) if exit_code is not None else None,
                    log=base64.b64decode(lines[len(POLLED)]), notice=read_json(notice),
                    checkpoint=checkpoint)


def read_log(machine: Machine, run: Run, offset: int) -> tuple[bytes, bool]:
    """(train.log from offset, whether the run has ended) in one round trip."""
    snapshot = poll(machine, run, offset)
    return snapshot.log, snapshot.exit_code is not None


def _history(raw: bytes | None) -> list[dict]:
    if not raw:
        return []
    return list(csv.DictReader(io.StringIO(raw.decode(errors="replace"))))


@dataclass(frozen=True)
class BarView:
    """What a live progress bar shows of the trainer's status.json."""

    label: str  # "training epoch 3/20", "caching images"...
    step: int
    steps: int | None  # None: no count to show (evaluating, starting)
    metrics: str  # "loss 0.4123 acc 0.8012" while an epoch runs
    eta_seconds: float | None  # the whole run's, by the trainer's estimate


def bar_view(status: dict) -> BarView | None:
    """The bar for a status.json, or None when there is nothing live to show."""
    if not status or status.get("state", "running") != "running":
        return None
    phase = status.get("phase") or "starting"
    counted = phase in ("training", "fine-tuning", "caching", "predicting")
    steps = (status.get("steps") or None) if counted else None  # others keep stale counts
    metrics = ""
    if phase in ("training", "fine-tuning"):
        label = f"{phase} epoch {status.get('epoch', 0)}/{status.get('epochs', 0)}"
        if status.get("stage") == "validate":
            label += " (validating)"
        live = status.get("metrics") or {}
        metrics = " ".join(f"{short} {live[key]:.4f}" for key, short in
                           (("loss", "loss"), ("accuracy", "acc")) if key in live)
    else:
        label = {"caching": "caching images", "predicting": "predicting test images"}.get(phase,
                                                                                          phase)
    return BarView(label=label, step=int(status.get("step") or 0) if steps else 0, steps=steps,
                   metrics=metrics, eta_seconds=status.get("eta_seconds"))


class _Warnings:
    """The trainer's warnings from new bytes of train.log, complete lines only."""

    def __init__(self, say: Say) -> None:
        self.say, self.offset, self.shown, self._partial = say, 0, 0, b""

    def feed(self, chunk: bytes) -> None:
        self.offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            match = LOG_LINE.match(line.decode(errors="replace"))
            if match is None or match["level"] != "WARNING":
                continue  # errors come once, as the run's last words
            self.shown += 1
            if self.shown <= MAX_WARNINGS_SHOWN:
                self.say(f"warning: {match['message']}")
            elif self.shown == MAX_WARNINGS_SHOWN + 1:
                self.say("warning: more warnings in the run's log (`dlbox logs`)")


def follow(run: Run, machine: Machine, say: Say, sleep=time.sleep, err: Say | None = None,
           on_status: Callable[[dict], None] | None = None,
           on_checkpoint: Callable[[], bool] | None = None,
           gone: Callable[[], Gone | None] | None = None, shown: int = 0,
           peers: Callable[[], None] | None = None) -> int:
    """Print each phase, each finished epoch and each warning until the run ends; return its
    exit status. A failed run's last words (the trainer's one-line error) go to err; on_status
    gets every status.json read (for a live bar); on_checkpoint runs each time the trainer
    commits a checkpoint (and again at the next poll if it returns False). gone() says why
    the box is gone (or None): asked when the box stops answering and every LOSS_CHECK_S;
    if its owner cannot be asked, the box counts as there. A lost box, or an interruption
    notice on it, raises BoxLost once the trainer has stopped and its last checkpoint is
    copied (or cannot be). shown: epochs already shown (a run resumed elsewhere). peers()
    raises when another node of a cluster run has failed (asked every PEER_CHECK_S)."""
    phase, epochs_shown, epoch = None, shown, None
    warnings = _Warnings(say)
    started = checked = peers_checked = time.monotonic()
    committed, notice, last_seen, progress, last_status = None, None, None, None, None
    copy_tries = 0  # of the last checkpoint, once the trainer stopped on a notice
    asking = _Asking(gone, say)

    def lost(why: Gone) -> BoxLost:
        return BoxLost(why.reason, epoch, warned=notice is not None, last_seen=last_seen,
                       progress=progress, reclaimed=why.reclaimed, ended_at=why.at)

    while True:
        try:
            snap = poll(machine, run, warnings.offset)
        except DlboxError as exc:
            why = asking()
            if why is None and notice is not None:  # it answered the notice, then went
                why = Gone("EC2 interruption notice, then the box stopped answering",
                           reclaimed=True)
            if why is not None:
                raise lost(why) from exc
            raise
        warnings.feed(snap.log)
        status = snap.status or {}
        if status != last_status:  # the trainer's heartbeat (every 2 s): it was alive then
            last_seen, last_status = time.time(), status
        epoch = status.get("epoch", epoch)
        progress = _progress(status, progress)
        if snap.history:  # the heartbeat (every 2 s) may lag behind a short epoch's end
            progress = max(progress or 0.0, float(len(snap.history)))
        if on_status is not None:
            on_status(status)
        for row in snap.history[epochs_shown:]:  # before the phase line: the epochs came first
            say(_epoch_line(row, status.get("epochs") or len(snap.history)))
        epochs_shown = max(epochs_shown, len(snap.history))
        if status.get("phase") not in (None, phase, "training", "fine-tuning"):
            say(f"{status['phase']}...")
        phase = status.get("phase", phase)
        if isinstance(snap.notice, dict) and notice is None:
            notice = snap.notice
        if (snap.checkpoint is not None and snap.checkpoint != committed and on_checkpoint
                and on_checkpoint()):
            committed = snap.checkpoint
        if snap.exit_code is not None:
            if snap.log and len(snap.log) == LOG_CHUNK_BYTES:
                continue  # more of the log to show first
            if notice is not None and snap.exit_code != 0:  # checkpointed on the warning
                copy_tries += 1
                if (snap.checkpoint is not None and snap.checkpoint != committed
                        and on_checkpoint and copy_tries < NOTICE_COPY_TRIES):
                    sleep(STATUS_POLL_S)
                    continue  # the box answers for two minutes: copy its checkpoint first
                raise lost(Gone(f"EC2 interruption notice: {notice.get('action', '?')} at "
                                f"{notice.get('time', '?')}", reclaimed=True))
            if snap.exit_code != 0:
                error = last_line(machine.read(f"{run.remote_dir}/stdout.log")) \
                    or status.get("error")
                if error:
                    (err or say)(error)
            return snap.exit_code
        if peers is not None and time.monotonic() - peers_checked >= PEER_CHECK_S:
            peers_checked = time.monotonic()
            peers()
        if time.monotonic() - checked >= LOSS_CHECK_S:
            checked = time.monotonic()
            why = asking()
            if why is not None:
                raise lost(why)
        if not status and time.monotonic() - started > START_TIMEOUT_S:
            raise DlboxError(f"run {run.run_id} did not start within {START_TIMEOUT_S} s; "
                             f"see {run.remote_dir}/stdout.log on the box")
        sleep(STATUS_POLL_S)


class _Asking:
    """gone(), if given; an owner that cannot be asked (an expired token, throttling) is
    said once and the box counts as there: SSH still tells whether the run goes on."""

    def __init__(self, gone: Callable[[], Gone | None] | None, say: Say) -> None:
        self.gone, self.say, self.failed = gone, say, False

    def __call__(self) -> Gone | None:
        if self.gone is None:
            return None
        try:
            return self.gone()
        except (DlboxError, InfraError) as exc:
            if not self.failed:
                self.say(f"warning: could not ask whether the box is still there ({exc}); "
                         "going on")
            self.failed = True
            return None


def _progress(status: dict, before: float | None) -> float | None:
    """Epochs trained so far by a status.json, with the fraction of the one going on."""
    if status.get("phase") not in ("training", "fine-tuning") or not status.get("epoch"):
        return before
    steps, step = status.get("steps") or 0, status.get("step") or 0
    return status["epoch"] - 1 + (min(step, steps) / steps if steps else 0.0)


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"{row['phase']} epoch {row['epoch']}/{epochs}: loss {float(row['loss']):.4f} "
            f"acc {float(row['accuracy']):.4f} val_loss {float(row['val_loss']):.4f} "
            f"val_acc {float(row['val_accuracy']):.4f} ({float(row['seconds']):.0f} s, "
            f"{float(row['images_per_second']):.0f} img/s)")


def last_line(raw: bytes | None) -> str | None:
    """The last non-blank line of a file read off the box (its last words), or None."""
    lines = raw.decode(errors="replace").strip().splitlines() if raw else []
    return lines[-1] if lines else None
