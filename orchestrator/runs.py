"""Runs: start the trainer detached on the box, pull its results back, cancel it; run records."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from . import (
    boxfiles,
    boxlock,
    codeship,
    events,
    kaggle,
    records,
    registry,
    report,
    signals,
    state,
    sync,
)
from .atomic import write_atomic
from .boxkind import Box
from .errors import DISK_FULL_FIX, DlboxError, UsageError
from .humanize import Say, clean
from .machine import Machine
from .render import render

RUNS_DIR = "runs"
EXIT_RESUMABLE = 75  # the trainer's "interrupted, resumable" (EX_TEMPFAIL)
EXIT_PEER_LOST = 69  # the trainer's "another worker of the cluster died": resumable too
EXIT_KILLED = 137  # a run that ended with no exit status (SIGKILL, a power-off) is recorded so
EXIT_UNKNOWN = 1  # a run whose exit_code on the box is not valid: recorded as failed
LOST = "lost"  # the box ended before its results were pulled (`down --yes`)
RUN_FILE = "run.json"
STATUS_POLL_S = 1.0  # the trainer rewrites status.json every 2 s
CANCEL_TIMEOUT_S = 300  # SIGTERM -> checkpoint written -> exit 75; a big model saves slowly
RESULT_FILES = ("model.keras", "history.csv", "metrics.json", "train.log", "status.json",
                "val_predictions.csv", "submission.csv", "misclassified.jpg", "stdout.log")
# The most a pull takes of one result file (a VGG16 model with its optimizer is ~0.2 GB),
# and the space it leaves free on this machine's disk: a box must not be able to fill it.
MAX_RESULT_BYTES = 8 << 30
DISK_RESERVE_BYTES = 256 << 20
# Trainer flags that only print (help): as a run they would "succeed" with no model.
PRINT_ONLY_FLAGS = ("-h", "--help")
# Trainer flags dlbox sets itself: given through `train`, they would send results elsewhere.
OWNED_FLAGS = ("--data", "--test", "--out", "--resume", "--extract-dir")
LISTING_END = "dlbox-listing-end"  # the last line of a complete listing of results
SNAPSHOT_PREFIX = ".dlbox-pull-"  # in the run's folder on the box: a pull's private copies
SNAPSHOT_NAME = re.compile(r"\.dlbox-pull-[A-Za-z0-9]+")
# One line of a snapshot's listing: size, SHA-256, name (checked against RESULT_FILES).
LISTED = re.compile(r"(?P<size>\d{1,20}) (?P<digest>[0-9a-f]{64}) (?P<name>.+)")
# A snapshot this old was left by a pull cut off before its cleanup (no pull takes this long).
STALE_SNAPSHOT_MIN = 60
PARTIAL_DIR = "partial"  # under .dlbox/: downloads until verified
STALE_PARTIAL_S = 24 * 3600  # a part file this old (or whose pull died) is swept by the next
# start_script: until the detached run.sh leads its own process group (an exec of setsid
# away; seconds only on a starved machine)
SESSION_WAIT_TRIES, SESSION_WAIT_POLL_S = 200, 0.05
HOLD_LOCK_TIMEOUT_S = 30  # a run's start waits this long for an `up`/`down` to let the box go
MAX_ID_TRIES = 20  # run ids taken on a box shared with other projects, before giving up
EXTRACT_DIR = "extracted"  # under the box's workdir: zips unpacked once, shared by runs


@dataclass(frozen=True)
class Run:
    """What runs/<id>/run.json records."""

    run_id: str
    model: str
    box: str
    remote_dir: str
    args: list[str]
    started_at: str
    status: str = "running"  # running, done, failed, interrupted, lost
    exit_code: int | None = None
    val_accuracy: float | None = None
    finished_at: str | None = None
    usd_per_hour: float | None = None  # the box's price, for the cost column of `dlbox runs`
    # As given to `dlbox train`, to ship them again to a box that takes the run over.
    data: str | None = None
    test: str | None = None
    trainer_args: tuple[str, ...] = ()
    segment_started_at: str | None = None  # when the current box took the run over
    # One per box lost under the run (see Interruption), oldest first.
    interruptions: tuple[dict[str, Any], ...] = ()
    # Every node's worker (see launch.Worker), the chief (box, remote_dir above) first: one
    # on a single box; () in a record of an older dlbox.
    nodes: tuple[dict[str, Any], ...] = ()
    rented: bool = False  # its box is rented by the hour (its cost is unknown if unpriced)

    @property
    def seconds(self) -> float | None:
        """How long the run took (None while it has not finished)."""
        if self.finished_at is None:
            return None
        return _seconds(self.started_at, self.finished_at)

    @property
    def cost_usd(self) -> float | None:
        """What its boxes cost during the run (None on machines nobody rents by the hour);
        for a run waiting for `dlbox attach`, what its lost boxes cost."""
        earlier = [i.get("cost_usd") for i in self.interruptions]
        now = None
        if self.finished_at is None and not earlier:
            return None
        if self.usd_per_hour and self.finished_at is not None:
            now = self.usd_per_hour * _seconds(self.segment_started_at or self.started_at,
                                               self.finished_at) / 3600
        known = [c for c in (*earlier, now) if c is not None]
        return sum(known) if known else None

    @property
    def boxes(self) -> tuple[str, ...]:
        """Every box the run ran on, in order."""
        return (*(i["box"] for i in self.interruptions), self.box)


@dataclass(frozen=True)
class Interruption:
    """A box lost under a run: when, at which epoch, why (as AWS says), and what it cost."""

    at: str  # when dlbox noticed
    epoch: int | None  # the epoch in progress
    box: str
    instance: str | None
    instance_type: str | None
    zone: str | None
    spot: bool
    usd_per_hour: float | None
    reason: str
    warned: bool  # an interruption notice came first (the trainer checkpointed mid-epoch)
    cost_usd: float | None  # what the box cost while it had the run
    checkpoint_epochs: int | None  # epochs finished in the checkpoint the run resumes from
    # Training done after the point the resume starts from (the checkpoint's saved step) up
    # to where the trainer got, so done again: in seconds, and in epochs.
    work_lost_s: float | None
    work_lost_epochs: float | None
    downtime_s: float | None = None  # from the loss to the run going on (None: not resumed)
    up_flags: dict[str, Any] | None = None  # how to make a box like it (boxes.UpFlags)


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def reserve_run_id(project_dir: Path, model: str) -> str:
    """A new run id whose runs/<id>/ this call created (two `train` in one second differ)."""
    (project_dir / RUNS_DIR).mkdir(exist_ok=True)
    base = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{model}"
    for n in range(1, 1000):
        run_id = base if n == 1 else f"{base}-{n}"
        try:
            (project_dir / RUNS_DIR / run_id).mkdir()
            return run_id
        except FileExistsError:
            continue
    raise DlboxError(f"could not reserve a run folder under {RUNS_DIR}/; clean it up")


def reserve_command(parent: str, remote: str) -> str:
    """A command that makes remote (not -p: it must be new) and prints reserved, or taken."""
    p, r = shlex.quote(parent), shlex.quote(remote)
    return (f"mkdir -p -- {p} || exit 1; if mkdir -- {r} 2>/dev/null; then echo reserved; "
            f"elif [ -e {r} ]; then echo taken; else mkdir -- {r}; fi")


def reserve_on_box(project_dir: Path, machine: Machine, workdir: str,
                    model: str) -> tuple[str, str]:
    """(run id, its folder on the box), both folders made by this call: another project or
    laptop sharing the box may hold an id this project has never used."""
    parent = f"{workdir}/{RUNS_DIR}"
    tried: list[str] = []  # reserved here until the end, so that the next id differs
    reserved = None
    try:
        for _ in range(MAX_ID_TRIES):
            run_id = reserve_run_id(project_dir, model)
            tried.append(run_id)
            remote = f"{parent}/{run_id}"
            done = machine.run(reserve_command(parent, remote))
            answer = done.stdout.strip()
            if answer == "reserved":
                reserved = run_id
                return run_id, remote
            if answer != "taken":
                error = _last_line(done.stderr) or f"exit status {done.exit_code}"
                fix = DISK_FULL_FIX if "No space left" in error else "check its permissions"
                raise DlboxError(f"could not make the run's folder {remote} on the box ({error}); "
                                 f"{fix}, then run the command again")
        raise DlboxError(f"{MAX_ID_TRIES} run ids in a row were taken in {parent} on the box; "
                         "clean it up, then run the command again")
    finally:
        for run_id in tried:
            if run_id != reserved:
                with contextlib.suppress(OSError):
                    (project_dir / RUNS_DIR / run_id).rmdir()


def save(project_dir: Path, run: Run) -> None:
    directory = project_dir / RUNS_DIR / run.run_id
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / RUN_FILE, json.dumps(asdict(run), indent=2) + "\n")


def note(project_dir: Path, run_id: str, kind: str, node: int | None = None,
         **details: Any) -> None:
    """An event in the run's log, runs/<id>/events.jsonl (see events.py). A log that cannot
    be written (a full disk) is said and the run goes on: the record and results come first."""
    try:
        events.append(project_dir / RUNS_DIR / run_id, kind, node, **details)
    except OSError as exc:
        _warn(f"could not add to run {run_id}'s event log ({exc.strerror or exc})")


def events_of(project_dir: Path, run_id: str) -> list[events.Event]:
    """The run's event log, oldest first ([] for a run recorded before there was one)."""
    return events.read(project_dir / RUNS_DIR / run_id)


def recorder(project_dir: Path, run_id: str) -> Callable[..., None]:
    """on_event for follow: each event into the run's log; an epoch or a notice logged
    already in the run's current stretch (by an earlier follow, or another dlbox following
    it now) only once."""

    def on_event(kind: str, node: int | None = None, **details: Any) -> None:
        found = events_of(project_dir, run_id)  # read again: another dlbox may follow it
        if kind == events.EPOCH and \
                (details.get("phase"), details.get("epoch")) in events.epochs_seen(found):
            return
        if kind == events.NOTICE and events.has(found, events.NOTICE):
            return
        note(project_dir, run_id, kind, node, **details)

    return on_event


def _decode(path: Path) -> Run:
    """The run a run.json records; ValueError naming what is wrong with it."""
    return records.build(Run, json.loads(path.read_text()))


def load(project_dir: Path, run_id: str) -> Run:
    path = project_dir / RUNS_DIR / run_id / RUN_FILE
    if "/" in run_id or not path.exists():
        raise UsageError(f"no run {run_id!r} in {RUNS_DIR}/; `dlbox runs` lists them")
    try:
        return _decode(path)
    except ValueError as exc:  # json's errors, UnicodeDecodeError and records' are ValueErrors
        raise UsageError(f"{path} is damaged ({exc}); restore it, or move its folder away "
                         "(its results, if pulled, are beside it)") from exc


def _warn(line: str) -> None:
    print(f"dlbox: warning: {line}", file=sys.stderr)


def all_runs(project_dir: Path, warn: Say = _warn) -> list[Run]:
    """Every run recorded under runs/, oldest first; a damaged record is skipped with a warning."""
    found = []
    for path in sorted((project_dir / RUNS_DIR).glob(f"*/{RUN_FILE}")):
        try:
            found.append(_decode(path))
        except (ValueError, OSError) as exc:  # not fatal for the listing
            warn(f"skipped {path}: it is damaged ({exc}); restore it, or move its folder away")
    return sorted(found, key=lambda r: r.started_at)


def resolve(project_dir: Path, run_id: str | None) -> Run:
    """The run named, or the latest one."""
    if run_id is not None:
        return load(project_dir, run_id)
    runs = all_runs(project_dir)
    if not runs:
        raise UsageError("no runs yet in this project; `dlbox train` starts one")
    return runs[-1]


def adopt(project_dir: Path, box: Box, machine: Machine, run_id: str) -> Run | None:
    """A run the box holds that this project has no readable record of (runs/ deleted, its
    run.json damaged), recorded again from its folder there, so that its results can be
    pulled; a damaged record is kept beside it. None: the box has no folder for it."""
    match = boxfiles.RUN_ID.fullmatch(run_id)
    if match is None:
        return None
    parent = f"{box.workdir}/{RUNS_DIR}"
    # runs/<id>, or runs/<id>.N where a replacement box shared the lost one's disk: the last
    found = machine.run(f"cd {shlex.quote(parent)} 2>/dev/null || exit 0; "
                        f"ls -1d -- {run_id} {run_id}.* 2>/dev/null | sort -t. -k2,2n | tail -n 1")
    folder = found.stdout.strip()
    if found.exit_code != 0 or folder not in (run_id, *(f"{run_id}.{n}" for n in range(2, 100))):
        return None
    record = project_dir / RUNS_DIR / run_id / RUN_FILE
    if record.exists():
        os.replace(record, record.with_name(f"{RUN_FILE}.damaged-{int(time.time())}"))
    started = datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    run = Run(run_id=run_id, model=run_id[16:].split("-")[0], box=box.name,
              remote_dir=f"{parent}/{folder}", args=[],
              started_at=started.isoformat(timespec="seconds"), usd_per_hour=box.hourly_usd,
              rented=box.rented)
    save(project_dir, run)
    return run


def cancel_command(remote_dir: str) -> str:
    """SIGTERM the trainer of the run in remote_dir, found in the run's own process group (run.sh
    leads it), never by a pid the box wrote elsewhere. Prints "signalled", or the run's LIFE
    word when it is not running, or "no-trainer" while run.sh has not started it yet."""
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 3; {LIFE} "
            '[ $life = running ] || { echo $life; exit 0; }; '
            # -ww: the whole command line, whatever COLUMNS the box's environment sets
            'trainers=$(ps -ww -e -o pid=,pgid=,args= | awk -v g="$pid" '
            "'$2 == g && / -m trainer( |$)/ {print $1}'); "
            '[ -n "$trainers" ] || { echo no-trainer; exit 0; }; '
            "kill -TERM $trainers 2>/dev/null; echo signalled")


def cancel(run: Run, machine: Machine, say: Say, sleep=time.sleep,
           on_signalled: Callable[[], None] = lambda: None) -> int:
    """SIGTERM the trainer (it checkpoints and exits 75); wait for it; return its exit status
    (EXIT_KILLED if its processes end without one). on_signalled: called once the signal
    is sent (before the trainer can have ended of it)."""
    done = machine.run(cancel_command(run.remote_dir))
    answer = done.stdout.strip()
    if done.exit_code == 3:
        raise folder_gone(run)
    if answer == "ended":
        raise UsageError(f"run {run.run_id} is not running; `dlbox pull {run.run_id}` fetches "
                         "its results")
    if answer == "gone":
        raise UsageError(f"run {run.run_id} is not running: it ended without an exit status "
                         f"(killed, or its box restarted); `dlbox attach {run.run_id}` pulls what "
                         "it left")
    if answer in ("starting", "no-trainer"):
        raise UsageError(f"run {run.run_id} has not started its trainer yet; run `dlbox cancel "
                         f"{run.run_id}` again in a few seconds")
    if answer != "signalled":
        raise DlboxError(f"could not signal run {run.run_id}: {_last_line(done.stderr) or answer}; "
                         f"run `dlbox cancel {run.run_id}` again")
    on_signalled()
    say(f"asked run {run.run_id} to stop; waiting for its checkpoint...")
    deadline = time.monotonic() + CANCEL_TIMEOUT_S
    while True:
        code, _ = exit_status(machine, run)
        if code is not None:
            return code
        if time.monotonic() > deadline:
            raise DlboxError(f"run {run.run_id} still running {CANCEL_TIMEOUT_S} s after SIGTERM; "
                             f"`dlbox logs {run.run_id}` shows why")
        sleep(STATUS_POLL_S)


def exit_status(machine: Machine, run: Run, warn: Say | None = None) -> tuple[int | None, str]:
    """(the run's exit status, its LIFE word) as the box says them: None while it runs;
    EXIT_KILLED for a run whose processes ended without one; EXIT_UNKNOWN, said to warn, for
    an exit_code that is not valid."""
    done = machine.run(f"cd {shlex.quote(run.remote_dir)} 2>/dev/null || exit 3; {LIFE} "
                       'echo $life; [ $life != ended ] || head -c 64 exit_code')
    if done.exit_code == 3:
        raise folder_gone(run)
    life, _, code = done.stdout.partition("\n")
    if life == "gone":
        return EXIT_KILLED, life
    if life != "ended":
        return None, life
    try:
        return boxfiles.exit_code(code.encode(), f"run {run.run_id}'s exit_code"), life
    except boxfiles.BadBoxFile as exc:
        if warn is not None:
            warn(f"{exc}; counting the run as failed")
        return EXIT_UNKNOWN, life


def ship_data(machine: Machine, workdir: str, local: Path, say: Say,
              progress: Callable[[int, int], None] | None = None) -> str:
    """The dataset on the box, synced into its cache there (only what differs is sent)."""
    if machine.same_filesystem:
        return str(local)  # used in place
    result = sync.sync(machine, local, workdir, progress)
    for line in result.warnings():  # files not sent (links out of the dataset...), named
        say(line)
    if result.sent_files:
        say(f"{local.name}: sent {result.sent_files} of {result.files} files "
            f"({result.sent_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s, verified")
    else:
        say(f"{local.name}: already on the box ({result.files} files, verified)")
    return result.remote_path


def _local_dataset(spec: str | None, flag: str) -> Path | None:
    """The local file or folder a --data/--test names (None for kaggle or no flag)."""
    if spec is None or spec == kaggle.SOURCE:
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"{flag} {spec}: no such file or folder (or `{flag} kaggle` to "
                         "download the competition's data on the box)")
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device would be read without end
        raise UsageError(f"{flag} {spec}: not a folder or a regular file (a zip); give the "
                         "Kaggle train/ folder or its zip")
    return path.resolve()


def check_trainer_args(trainer_args: list[str]) -> None:
    """Refuse a flag dlbox sets, also abbreviated (argparse takes --ou for --out)."""
    for arg in trainer_args:
        flag = arg.split("=", 1)[0]
        if flag in PRINT_ONLY_FLAGS or (len(flag) >= 3 and "--help".startswith(flag)):
            raise UsageError(f"{flag} asks the trainer for its help, which is no run; "
                             "`python -m trainer --help` prints it (or see README.md)")
        if not flag.startswith("--") or len(flag) < 3:
            continue
        owned = next((f for f in OWNED_FLAGS if f.startswith(flag)), None)
        if owned is not None:
            named = owned if flag == owned else f"{flag} means {owned} to the trainer, which"
            raise UsageError(f"{named} is set by dlbox (results go to runs/<id>/, data through "
                             f"--data/--test of `dlbox train`); drop {flag} from the trainer flags")


@dataclass(frozen=True)
class Shipped:
    """What a run needs on its box: the trainer's code and the datasets, as paths there."""

    code: str
    data: str
    test: str | None


def check_datasets(data: str, test: str | None) -> None:
    """UsageError, before anything is shipped or launched, for a --data/--test that is gone."""
    _local_dataset(data, "--data"), _local_dataset(test, "--test")


def ship(box: Box, machine: Machine, data: str, test: str | None, say: Say,
         progress: Callable[[int, int], None] | None = None,
         pip_args: tuple[str, ...] = ()) -> Shipped:
    """Ship the trainer and sync the datasets (only what differs is sent)."""
    local_data, local_test = _local_dataset(data, "--data"), _local_dataset(test, "--test")
    code = codeship.ship(machine, box.workdir)
    downloaded: list[str] = []  # the Kaggle zip, fetched at most once per run

    def on_box(local: Path | None) -> str:
        if local is not None:
            return ship_data(machine, box.workdir, local, say, progress)
        if not downloaded:
            downloaded.append(kaggle.fetch(machine, box.workdir, box.python, say, pip_args))
        return downloaded[0]

    data_on_box = on_box(local_data)
    return Shipped(code, data_on_box, on_box(local_test) if test is not None else None)


def reserve_folder(machine: Machine, workdir: str, run_id: str) -> str:
    """A new folder on the box for run_id taken over from a lost box: runs/<id>, or
    runs/<id>.N when that name is taken (a box that shares the old one's disk)."""
    parent = f"{workdir}/{RUNS_DIR}"
    for n in range(1, MAX_ID_TRIES + 1):
        remote = f"{parent}/{run_id}" + (f".{n}" if n > 1 else "")
        done = machine.run(reserve_command(parent, remote))
        if done.stdout.strip() == "reserved":
            return remote
        if done.stdout.strip() != "taken":
            error = _last_line(done.stderr) or f"exit status {done.exit_code}"
            raise DlboxError(f"could not make the run's folder {remote} on the box ({error})")
    raise DlboxError(f"{MAX_ID_TRIES} folders for run {run_id} are taken in {parent} on the box; "
                     "clean it up, then run the command again")


def trainer_args(box: Box, run: Run, shipped: Shipped, remote_dir: str) -> list[str]:
    """The trainer's command line on box for run, writing into remote_dir. --resume is always
    passed: the same command continues from a checkpoint in --out, if there is one."""
    args = [run.model, "--data", shipped.data, "--out", remote_dir, "--resume",
            "--extract-dir", f"{box.workdir}/{EXTRACT_DIR}"]
    if shipped.test is not None:
        args += ["--test", shipped.test]
    return args + list(run.trainer_args)


def write_script(box: Box, machine: Machine, run_id: str, remote_dir: str, code: str,
                 args: list[str], env: dict[str, str] | None = None) -> None:
    """run.sh (and the box kind's watcher, if it has one) into the run's folder on the box."""
    from . import spotwatch

    watcher = box.watcher()
    script = render("run.sh.j2", run_id=run_id, out=remote_dir, code_dir=code,
                    python=box.python, args=args, registry=box.runs_registry(),
                    spot_watch=watcher is not None, env=env or {})
    machine.write(f"{remote_dir}/run.sh", script.encode(), 0o755)
    if watcher is not None:  # run.sh starts it beside the trainer
        machine.write(f"{remote_dir}/{spotwatch.SCRIPT_FILE}", watcher.encode(), 0o755)


# run.pid's number, if it is one above 1 (kill -0 -- -1 would mean every process).
READ_PID = 'pid=$(cat run.pid 2>/dev/null); case "$pid" in ""|*[!0-9]*|0|1) pid= ;; esac;'
# Whether a process of the run's group lives (run.sh leads it: setsid). A zombie does not
# count: an orphan's may wait long for a reaper, and kill -0 counts it.
GROUP_ALIVE = ('ps -e -o pgid=,stat= | awk -v g="$pid" \'$1 == g && $2 !~ /^Z/ {a = 1} '
               'END {exit !a}\'')
# In the run's folder: $life is "running" while the run's process group lives, else "ended"
# (exit_code written), "gone" (killed, the box restarted, a full disk: no exit status) or
# "starting" (no run.pid yet). run.sh writes exit_code before it ends, so files read after
# this agree with it.
LIFE = (f'{READ_PID} if [ -n "$pid" ] && {GROUP_ALIVE}; then life=running; '
        "elif [ -e exit_code ]; then life=ended; elif [ -e run.pid ]; then life=gone; "
        "else life=starting; fi;")

_LEADS_OR_ENDED = ('ps -o pgid=,stat= -p "$pid" | awk -v p="$pid" '
                   "'$1 == p || $2 ~ /^Z/ {f = 1} END {exit !(f || NR == 0)}'")


def start_script(box: Box, machine: Machine, remote_dir: str) -> None:
    """Start the folder's run.sh detached from dlbox. Ctrl-C and SIGTERM wait for this step
    (seconds at most): cut in half, it would leave a run going with no run.pid, which is how
    dlbox tells whether a run lives."""
    # setsid + nohup: the run outlives dlbox, Ctrl-C, a closed terminal and a dropped SSH link.
    # `&` on the simple command alone: on `cd && ... &` bash backgrounds a subshell that keeps
    # our stdout open, and this call would return only when the run ends.
    # $! is run.sh's pid: setsid, not a group leader here, runs it in place (no fork). It
    # leads the run's process group; run.pid beside the results is what dlbox checks and
    # stops a cluster node's worker by, whoever else shares the registry (written whole).
    # run.pid is written once that group exists (setsid has run) or the child has ended
    # (a zombie, or reaped: ps lists nothing): a check in between would find the run "gone".
    with signals.deferred():
        started = machine.run(
            f"cd {shlex.quote(remote_dir)} || exit 1; rm -f exit_code run.pid; "
            "setsid nohup bash run.sh > /dev/null 2>&1 < /dev/null & pid=$!; "
            f"for i in $(seq {SESSION_WAIT_TRIES}); do "
            # it leads its group, or has ended already (a zombie: setsid could not run)
            f"{_LEADS_OR_ENDED} && break; "
            f"sleep {SESSION_WAIT_POLL_S}; done; "
            'echo "$pid" > run.pid.tmp && mv run.pid.tmp run.pid')
    if started.exit_code != 0:
        raise DlboxError(f"could not start the run on {box.label}: {started.stderr.strip()}")


def hold(project_dir: Path, pairs: list[tuple[Box, Machine]], run_id: str, say: Say) -> None:
    """Before a run starts: its results held on each of its boxes (a marker the watchdog and
    `down` read; on EC2, a power-off that stops the box rather than terminating it), so that
    no Ctrl-C or lost link after the start can leave a run's results unprotected. Ctrl-C and
    SIGTERM wait for this step; a failure is said, and the run goes on."""
    try:
        with boxlock.held(project_dir, say, timeout_s=HOLD_LOCK_TIMEOUT_S), signals.deferred():
            for box, machine in pairs:
                registry.mark_unpulled(machine, box.runs_registry(), run_id)
                box.hold_results(project_dir)
    except (DlboxError, InfraError) as exc:
        say(f"warning: could not keep the watchdog from destroying run {run_id}'s unpulled "
            f"results ({exc}); pull them before the box goes idle")


def read_json(raw: bytes | None) -> dict | None:
    """A JSON object, or None for nothing, not JSON, or JSON that is not an object."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def read_local_json(path: Path) -> dict:
    """A JSON file pulled into runs/, or {} if it is missing or damaged."""
    try:
        return read_json(path.read_bytes()) or {}
    except OSError:
        return {}


def folder_gone(run: Run) -> DlboxError:
    """The error for a run whose folder on the box has gone."""
    return DlboxError(f"run {run.run_id}: its folder {run.remote_dir} is gone from the box "
                      "(deleted, or the box was replaced); what was pulled is in runs/")


def snapshot_command(remote_dir: str, snapshot: str) -> str:
    """A command that copies the results present (regular files only, never a link) into the
    run's private folder snapshot, then prints "ended" or "running", one LISTED line per copy
    and LISTING_END.

    The trainer rewrites its files while it runs: copies made in one go agree with their
    sums, whatever it writes meanwhile. Whether it ended is read before copying: "ended"
    means every copy is final. The folder's name comes from dlbox, so a pull cut short
    still knows what to remove.
    """
    copies = " ".join(RESULT_FILES)
    snap = shlex.quote(snapshot)
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 3; "
            f"find . -maxdepth 1 -name '{SNAPSHOT_PREFIX}*' -mmin +{STALE_SNAPSHOT_MIN} "
            "-exec rm -rf {} + 2>/dev/null; "
            "if [ -e exit_code ]; then state=ended; else state=running; fi; "
            f"mkdir -m 700 -- {snap} || exit 1; "
            f'for f in {copies}; do if [ -f "$f" ] && [ ! -L "$f" ]; then '
            # a file that vanished meanwhile is not a failure; a full disk is
            f'cp -P --reflink=auto -- "$f" {snap}/ || [ ! -e "$f" ] || {{ rm -rf {snap}; exit 1; }}; '
            f"fi; done; echo $state; cd {snap} || exit 1; "
            'for f in *; do [ -f "$f" ] || continue; '
            'echo "$(stat -c %s -- "$f") $(sha256sum < "$f" | cut -c1-64) $f"; done; '
            f"echo {LISTING_END}")


@dataclass(frozen=True)
class Listed:
    """A result file in a pull's snapshot on the box, as the box describes it."""

    name: str
    size: int
    digest: str


def _listing(lines: list[str], run: Run, say: Say) -> list[Listed]:
    """The snapshot's files dlbox asked for (RESULT_FILES), each within MAX_RESULT_BYTES;
    any other name (a path, a ../, a name dlbox never asked for) is refused in one line."""
    found: dict[str, Listed] = {}
    for line in lines:
        match = LISTED.fullmatch(line)
        name = match["name"] if match else line
        if match is None or name not in RESULT_FILES:
            say(f"warning: refused '{clean(name[:200])}' from the box's listing of run "
                f"{run.run_id}: not a result file dlbox asked for")
            continue
        size = int(match["size"])
        if size > MAX_RESULT_BYTES:
            raise DlboxError(f"{name} of run {run.run_id} is {size / 1e9:.1f} GB on the box, "
                             f"over the {MAX_RESULT_BYTES / 1e9:.0f} GB dlbox pulls; check "
                             "what wrote it")
        found[name] = Listed(name, size, match["digest"])
    return [found[n] for n in RESULT_FILES if n in found]


def _check_room(local: Path, partial: Path, wanted: list[Listed], run: Run) -> None:
    """Refuse, before copying, a pull that would leave this machine's disk nearly full."""
    need = sum(f.size for f in wanted)
    for folder in {local, partial}:
        free = shutil.disk_usage(folder).free
        if need + DISK_RESERVE_BYTES > free:
            raise DlboxError(f"the results of run {run.run_id} take {need / 1e6:.0f} MB, and "
                             f"{folder} has {free / 1e6:.0f} MB free; free some space, then "
                             f"`dlbox pull {run.run_id}`")


def pull(project_dir: Path, run: Run, machine: Machine, say: Say = print,
         ended: bool = False) -> Path:
    """Copy the results into runs/<id>/, each checked against the box's SHA-256 and size:
    only the files dlbox asked for, never through a link, none over its bound. A snapshot,
    said so, while the run is still going (ended: the caller knows it ended, e.g. killed)."""
    local = project_dir / RUNS_DIR / run.run_id
    local.mkdir(parents=True, exist_ok=True)
    snapshot = f"{run.remote_dir}/{SNAPSHOT_PREFIX}{secrets.token_hex(8)}"
    try:
        listing = machine.run(snapshot_command(run.remote_dir, snapshot))
        if listing.exit_code == 3:
            raise folder_gone(run)
        lines = listing.stdout.splitlines()
        # Cut short: never take a partial list as all.
        if len(lines) < 2 or lines[-1] != LISTING_END or lines[0] not in ("ended", "running"):
            error = clean(_last_line(listing.stderr))
            fix = DISK_FULL_FIX if "No space left" in error else \
                f"run `dlbox pull {run.run_id}` again"
            raise DlboxError(f"could not copy the results of run {run.run_id} in "
                             f"{run.remote_dir} on the box{f' ({error})' if error else ''}; {fix}")
        wanted = _listing(lines[1:-1], run, say)
        if not wanted:
            raise DlboxError(f"no results for run {run.run_id} in {run.remote_dir} on the box")
        partial = partial_dir(project_dir)
        _check_room(local, partial, wanted, run)
        for f in wanted:
            fetch_verified(machine, f"{snapshot}/{f.name}", local / f.name, f.digest, run.run_id,
                           partial, f.size)
        note(project_dir, run.run_id, events.PULLED, files=len(wanted),
             bytes=sum(f.size for f in wanted), final=lines[0] == "ended" or ended)
    finally:
        with signals.deferred(), contextlib.suppress(DlboxError):  # lost contact: the next
            machine.run(f"rm -rf -- {shlex.quote(snapshot)}")      # pull removes it
    if lines[0] != "ended" and not ended:
        say(f"run {run.run_id} is still going; pulled a snapshot of what it has so far")
    return local


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def partial_dir(project_dir: Path) -> Path:
    """Where downloads grow until verified: never in runs/, where a killed dlbox (SIGKILL runs
    no cleanup) would leave half a file beside the results. Old ones are swept."""
    directory = state.ensure_dir(project_dir) / PARTIAL_DIR
    directory.mkdir(exist_ok=True)
    cutoff = time.time() - STALE_PARTIAL_S
    for part in directory.glob("*.part"):
        pid = part.name.split(".", 1)[0]
        with contextlib.suppress(OSError):
            if not (pid.isdigit() and _alive(int(pid))) or part.stat().st_mtime < cutoff:
                part.unlink()
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fetch_verified(machine: Machine, remote: str, local: Path, digest: str, run_id: str,
                   partial_dir: Path, max_bytes: int = MAX_RESULT_BYTES,
                   timeout: float | None = None) -> None:
    """remote copied to local whole and verified, or not at all (max_bytes at most). local is
    replaced by a rename, so a link there is replaced, never followed. timeout: the silence
    that is CommandTimedOut (None: the machine's own)."""
    # A name of its own: two pulls of one run at once (two terminals) never share a part file.
    fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}.{run_id}.{local.name}.", suffix=".part",
                                dir=partial_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        machine.fetch(remote, tmp, max_bytes, timeout)
        if _sha256(tmp) != digest:
            raise DlboxError(f"copy of {local.name} does not match the box's; run `dlbox pull "
                             f"{run_id}`")
        try:
            os.replace(tmp, local)  # a file in runs/ is always a whole, verified one
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            beside = local.with_name(f".{local.name}.{os.getpid()}.part")  # runs/ on another disk
            shutil.copyfile(tmp, beside)
            os.replace(beside, local)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finish(project_dir: Path, run: Run, machine: Machine, code: int, say: Say = print,
           cancelled: bool = False) -> Run:
    """Pull the results and record how the run ended (warnings go to say); cancelled: it
    ended because `dlbox cancel` stopped it."""
    local = pull(project_dir, run, machine, say, ended=True)
    metrics = boxfiles.pulled_metrics(local, f"run {run.run_id}'s metrics.json",
                                      lambda line: say(f"warning: {line}"))
    status = {0: "done", EXIT_RESUMABLE: "interrupted", EXIT_PEER_LOST: "interrupted",
              130: "interrupted"}.get(code, "failed")
    if status == "done" and not (local / "model.keras").is_file():
        say(f"warning: run {run.run_id} ended well (exit 0) but left no model.keras; it is "
            "recorded as failed")
        status = "failed"
    run = replace(run, status=status, exit_code=code, val_accuracy=metrics.get("val_accuracy"),
                  finished_at=now())
    save(project_dir, run)
    ended(project_dir, run, "cancelled" if cancelled else status)
    report.write(local, run, box=run.box, duration=f"{run.seconds / 60:.1f} min",
                 cost=cost_line(run), metrics=metrics)
    return run


def ended(project_dir: Path, run: Run, how: str) -> None:
    """The run's end in its event log (how: one of events.ENDS), with what it reached;
    once, whoever else saw it end."""
    if not events.has_ended(events_of(project_dir, run.run_id)):
        note(project_dir, run.run_id, how, exit_code=run.exit_code,
             val_accuracy=run.val_accuracy, cost_usd=run.cost_usd)


def cost_line(run: Run) -> str:
    """What the run cost, as the report says it."""
    if run.cost_usd is not None:
        return f"${run.cost_usd:.2f}"
    return "unknown (no price for its instance type)" if run.rented else "nothing (own machine)"
