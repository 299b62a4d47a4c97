"""Following a run: its phases, finished epochs and the trainer's warnings as they happen.

One command per poll brings status, history, new log lines and the exit status.
"""

from __future__ import annotations

import base64
import math
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from . import boxfiles, events, runs, spotwatch
from .boxkind import Gone
from .errors import BoxLost, CommandTimedOut, DlboxError, LostContact
from .humanize import Say, clean
from .machine import Machine
from .runs import STATUS_POLL_S, Run, folder_gone

START_TIMEOUT_S = 120  # until the trainer's first status.json
POLL_TIMEOUT_S = 60  # one poll; a box silent for longer is lost contact
LOG_CHUNK_BYTES = 1 << 20  # of train.log per poll, at most
POLLED_MAX_BYTES = 8 << 20  # of each polled file, at most (its reader checks it more closely)
MAX_WARNINGS_SHOWN = 20  # per follow; the rest are in `dlbox logs`
# The trainer rewrites status.json every 2 s while it lives (a thread of its own): this much
# silence while its processes are there means it hangs (or its box's clock jumped).
HEARTBEAT_LOST_S = 600
# A box its owner may take back (EC2) is asked about after this much silence in a poll.
ANSWER_WAIT_S = 5
LAST_WORDS_BYTES = 4096  # the end of stdout.log read for a failed run's one-line error
# The spot watcher's notice, and the trainer's checkpoint commit point (copied off the box
# each time it changes).
POLLED = ("status.json", "history.csv", "exit_code", spotwatch.NOTICE_FILE,
          "checkpoints/state.json")
PEER_CHECK_S = 3  # how often the other nodes of a cluster run are asked about their workers
LOSS_CHECK_S = 10  # how often the box's owner is asked whether the box is still there
NOTICE_COPY_TRIES = 5  # polls that may copy the checkpoint of a trainer stopped by a notice
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>WARNING|ERROR|CRITICAL) (?P<message>.*)$")
LIVES = ("running", "ended", "gone", "starting")  # runs.LIFE's words


@dataclass(frozen=True)
class Snapshot:
    """What one poll saw of a run on the box (None: the file is not there). Every file is
    read through its checked reader; one that is not valid is in problems, as if absent."""

    status: dict | None
    history: list[dict] | None  # None: absent or not valid
    exit_code: int | None
    log: bytes  # train.log from the offset asked for
    notice: dict | None = None  # an interruption notice the box got (spotwatch.sh)
    checkpoint: bytes | None = None  # the trainer's checkpoints/state.json
    life: str = "running"  # runs.LIFE: whether the run's processes are there
    heartbeat_age_s: float | None = None  # since status.json was last written, by the box's clock
    problems: tuple[boxfiles.BadBoxFile, ...] = ()


def poll_command(remote_dir: str, log_offset: int) -> str:
    """A command printing the run's life and heartbeat age, each polled file, then train.log
    from log_offset, one base64 line each ("-" for a missing file): one round trip,
    binary-safe and bounded, however the files change."""
    files = " ".join(POLLED)
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 3; {runs.LIFE} "
            'age=-; if [ -e status.json ]; then '
            'age=$(( $(date +%s) - $(stat -c %Y status.json 2>/dev/null || date +%s) )); fi; '
            'echo "$life $age"; '
            f'for f in {files}; do if [ -e "$f" ]; then head -c {POLLED_MAX_BYTES + 1} "$f" '
            "| base64 -w0; else printf -; fi; "
            f"echo; done; tail -c +{log_offset + 1} train.log 2>/dev/null | "
            f"head -c {LOG_CHUNK_BYTES} | base64 -w0; echo")


def _checked(reader, raw: bytes | None, name: str, run: Run, problems: list):
    """reader(raw), or None with the problem kept (None for a file that is not there)."""
    if raw is None:
        return None
    try:
        return reader(raw, f"run {run.run_id}'s {name}")
    except boxfiles.BadBoxFile as exc:
        problems.append(exc)
        return None


class Silent(LostContact):
    """A poll the box did not answer in time (it may still be there)."""


def poll(machine: Machine, run: Run, log_offset: int = 0,
         timeout_s: float = POLL_TIMEOUT_S) -> Snapshot:
    try:
        done = machine.run(poll_command(run.remote_dir, log_offset), timeout=timeout_s)
    except CommandTimedOut as exc:
        raise Silent(f"the box did not answer for {timeout_s:.0f} s") from exc
    lines = done.stdout.split("\n")
    if done.exit_code == 3:
        raise folder_gone(run)
    try:
        life, age = lines[0].split(" ")
        if done.exit_code != 0 or len(lines) < len(POLLED) + 2 or life not in LIVES:
            raise ValueError("cut short")
        raw = [None if line == "-" else base64.b64decode(line, validate=True)
               for line in lines[1:len(POLLED) + 1]]
        log = base64.b64decode(lines[len(POLLED) + 1], validate=True)
        heartbeat_age_s = None if age == "-" else float(int(age))
    except ValueError:  # binascii.Error is one
        error = last_line(done.stderr.encode()) or "its answer was cut short or garbled"
        raise DlboxError(f"could not read run {run.run_id}'s progress on the box ({error}); "
                         f"`dlbox attach {run.run_id}` tries again") from None
    status, history, exit_code, notice, checkpoint = raw
    problems: list[boxfiles.BadBoxFile] = []
    return Snapshot(status=_checked(boxfiles.status, status, "status.json", run, problems),
                    history=_checked(boxfiles.history, history, "history.csv", run, problems),
                    exit_code=_checked(boxfiles.exit_code, exit_code, "exit_code", run, problems),
                    log=log, notice=_checked(boxfiles.notice, notice, spotwatch.NOTICE_FILE, run,
                                             problems),
                    checkpoint=checkpoint, life=life, heartbeat_age_s=heartbeat_age_s,
                    problems=tuple(problems))


def read_log(machine: Machine, run: Run, offset: int) -> tuple[bytes, bool]:
    """(train.log from offset, whether the run has ended) in one round trip. A run whose
    processes are gone has ended, with or without an exit status."""
    snapshot = poll(machine, run, offset)
    return snapshot.log, snapshot.exit_code is not None or snapshot.life in ("ended", "gone")


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
    eta = status.get("eta_seconds")
    return BarView(label=clean(label), step=int(status.get("step") or 0) if steps else 0,
                   steps=steps, metrics=metrics,
                   eta_seconds=eta if eta is not None and math.isfinite(eta) else None)


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
           peers: Callable[[], None] | None = None,
           on_event: Callable[..., None] | None = None) -> int:
    """Print each phase, each finished epoch and each warning until the run ends; return its
    exit status. A failed run's last words (the trainer's one-line error) go to err; on_status
    gets every status.json read (for a live bar); on_checkpoint runs each time the trainer
    commits a checkpoint (and again at the next poll if it returns False or raises
    CommandTimedOut: the box's owner is asked about it first). gone() says why
    the box is gone (or None): asked when the box stops answering and every LOSS_CHECK_S;
    if its owner cannot be asked, the box counts as there. A lost box, or an interruption
    notice on it, raises BoxLost once the trainer has stopped and its last checkpoint is
    copied (or cannot be). shown: epochs already shown (a run resumed elsewhere). peers()
    raises when another node of a cluster run has failed (asked every PEER_CHECK_S).
    on_event(kind, **details) gets each finished epoch and an interruption notice (for the
    run's event log)."""
    phase, epochs_shown, epoch, history = None, shown, None, []
    warnings = _Warnings(say)
    started = checked = peers_checked = time.monotonic()
    committed, notice, last_seen, progress, last_status = None, None, None, None, None
    copy_tries = 0  # of the last checkpoint, once the trainer stopped on a notice
    asking = _Asking(gone, say)
    told: set[str] = set()  # box files said to be not valid (once each)
    # A box its owner may take back is asked about whenever it is silent this long: one that
    # vanished without a word blocks a poll until the keepalive gives up (a minute).
    answer_s = ANSWER_WAIT_S if gone is not None else POLL_TIMEOUT_S
    silent_since = None

    def lost(why: Gone) -> BoxLost:
        return BoxLost(why.reason, epoch, warned=notice is not None, last_seen=last_seen,
                       progress=progress, reclaimed=why.reclaimed, ended_at=why.at)

    while True:
        try:
            snap = poll(machine, run, warnings.offset, answer_s)
            silent_since = None
        except DlboxError as exc:
            why = asking()
            if why is None and notice is not None:  # it answered the notice, then went
                why = Gone("EC2 interruption notice, then the box stopped answering",
                           reclaimed=True)
            if why is not None:
                raise lost(why) from exc
            silent_since = silent_since or time.monotonic() - answer_s
            if isinstance(exc, Silent) and time.monotonic() - silent_since < POLL_TIMEOUT_S:
                checked = time.monotonic()
                continue  # still there, by its owner: wait for it, within the bound
            raise
        for problem in snap.problems:
            if problem.what not in told:
                told.add(problem.what)
                then = ("counting the run as failed" if problem.what.endswith("exit_code")
                        else "ignoring it")
                say(f"warning: {problem}; {then}")
        warnings.feed(snap.log)
        status = snap.status or {}
        if status != last_status:  # the trainer's heartbeat (every 2 s): it was alive then
            last_seen, last_status = time.time(), status
        epoch = status.get("epoch", epoch)
        progress = _progress(status, progress)
        history = snap.history if snap.history is not None else history
        if history:  # the heartbeat (every 2 s) may lag behind a short epoch's end
            progress = max(progress or 0.0, float(len(history)))
        if on_status is not None:
            on_status(status)
        for row in history[epochs_shown:]:  # before the phase line: the epochs came first
            say(_epoch_line(row, status.get("epochs") or len(history)))
            if on_event is not None:
                on_event(events.EPOCH, epoch=row["epoch"], phase=row["phase"],
                         val_accuracy=row["val_accuracy"], seconds=row["seconds"])
        epochs_shown = max(epochs_shown, len(history))
        if status.get("phase") not in (None, phase, "training", "fine-tuning"):
            say(f"{status['phase']}...")
        phase = status.get("phase", phase)
        if snap.notice is not None and notice is None:
            notice = snap.notice
            if on_event is not None:
                on_event(events.NOTICE, action=notice.get("action"), time=notice.get("time"))
        if snap.checkpoint is not None and snap.checkpoint != committed and on_checkpoint:
            try:
                if on_checkpoint():
                    committed = snap.checkpoint
            except CommandTimedOut as exc:  # silent while copying: gone, or only slow?
                if (why := asking()) is not None:
                    raise lost(why) from exc
                checked = time.monotonic()
        code = snap.exit_code
        if code is None and snap.life == "gone" and (why := asking()) is not None:
            raise lost(why)  # its processes went with the box
        if code is None and snap.life in ("ended", "gone"):  # no exit status to go by
            if snap.life == "gone":
                (err or say)(f"run {run.run_id} ended without an exit status: its processes "
                             "on the box are gone (killed, the box restarted, or its disk is "
                             "full)")
            code = runs.EXIT_KILLED if snap.life == "gone" else runs.EXIT_UNKNOWN
        if code is not None:
            if snap.log and len(snap.log) == LOG_CHUNK_BYTES:
                continue  # more of the log to show first
            if notice is not None and code != 0:  # checkpointed on the warning
                copy_tries += 1
                if (snap.checkpoint is not None and snap.checkpoint != committed
                        and on_checkpoint and copy_tries < NOTICE_COPY_TRIES):
                    sleep(STATUS_POLL_S)
                    continue  # the box answers for two minutes: copy its checkpoint first
                raise lost(Gone(spotwatch.reason(notice), reclaimed=True))
            if code != 0 and snap.life != "gone":
                error = last_words(machine, run) or status.get("error")
                if error:
                    (err or say)(error)
            return code
        if (snap.life == "running" and snap.heartbeat_age_s is not None
                and snap.heartbeat_age_s > HEARTBEAT_LOST_S):
            raise DlboxError(f"run {run.run_id} has not written its heartbeat (status.json) for "
                             f"{snap.heartbeat_age_s:.0f} s though its processes are there: it "
                             f"seems to hang; `dlbox logs {run.run_id}` shows its log, `dlbox "
                             f"cancel {run.run_id}` stops it")
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


def last_words(machine: Machine, run: Run) -> str | None:
    """The trainer's one-line error, the last line of its stdout.log (bounded)."""
    try:
        return last_line(machine.read(f"{run.remote_dir}/stdout.log", LAST_WORDS_BYTES,
                                      tail=True))
    except DlboxError:
        return None


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
    now = progress_of(status)
    return before if now is None else now


def progress_of(status: dict) -> float | None:
    """Epochs trained by a (checked) status.json, with the fraction of the one going on;
    None outside training."""
    if status.get("phase") not in ("training", "fine-tuning") or not status.get("epoch"):
        return None
    steps, step = status.get("steps") or 0, status.get("step") or 0
    return status["epoch"] - 1 + (min(step, steps) / steps if steps else 0.0)


def _epoch_line(row: dict, epochs: int) -> str:
    """A history row (boxfiles.history's) as the line shown when its epoch ends."""
    return (f"{row['phase']} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} "
            f"acc {row['accuracy']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_acc {row['val_accuracy']:.4f} ({row['seconds']:.0f} s, "
            f"{row['images_per_second']:.0f} img/s)")


def last_line(raw: bytes | None) -> str | None:
    """The last non-blank line of a file read off the box (its last words), or None."""
    lines = raw.decode(errors="replace").strip().splitlines() if raw else []
    return lines[-1] if lines else None
