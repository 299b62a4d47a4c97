"""Runs: start the trainer detached on the box, stream its status, pull the results back."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from . import kaggle, report, state, sync
from .errors import DlboxError, UsageError
from .machines import LocalMachine, Machine, content_hash
from .render import render

RUNS_DIR = "runs"
RUN_FILE = "run.json"
STATUS_POLL_S = 1.0  # the trainer rewrites status.json every 2 s
CANCEL_TIMEOUT_S = 300  # SIGTERM -> checkpoint written -> exit 75; a big model saves slowly
START_TIMEOUT_S = 120  # until the trainer's first status.json
RESULT_FILES = ("model.keras", "history.csv", "metrics.json", "train.log", "status.json",
                "val_predictions.csv", "submission.csv", "misclassified.jpg", "stdout.log")
Say = Callable[[str], None]


@dataclass(frozen=True)
class Run:
    """What runs/<id>/run.json records."""

    run_id: str
    model: str
    box: str
    remote_dir: str
    args: list[str]
    started_at: str
    status: str = "running"  # running, done, failed, interrupted, detached
    exit_code: int | None = None
    val_accuracy: float | None = None
    finished_at: str | None = None
    usd_per_hour: float | None = None  # the box's price, for the cost column of `dlbox runs`

    @property
    def seconds(self) -> float | None:
        """How long the run took (None while it has not finished)."""
        if self.finished_at is None:
            return None
        return (datetime.fromisoformat(self.finished_at)
                - datetime.fromisoformat(self.started_at)).total_seconds()

    @property
    def cost_usd(self) -> float | None:
        """What the box cost during the run (None on machines nobody rents by the hour)."""
        seconds = self.seconds
        if not self.usd_per_hour or seconds is None:
            return None
        return self.usd_per_hour * seconds / 3600


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(model: str) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{model}"


def save(project_dir: Path, run: Run) -> None:
    directory = project_dir / RUNS_DIR / run.run_id
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(run), indent=2) + "\n")
    os.replace(tmp, directory / RUN_FILE)


def load(project_dir: Path, run_id: str) -> Run:
    path = project_dir / RUNS_DIR / run_id / RUN_FILE
    if not path.exists():
        raise UsageError(f"no run {run_id!r} in {RUNS_DIR}/; `ls {RUNS_DIR}` lists the runs")
    return Run(**json.loads(path.read_text()))


def all_runs(project_dir: Path) -> list[Run]:
    """Every run recorded under runs/, oldest first."""
    found = []
    for path in sorted((project_dir / RUNS_DIR).glob(f"*/{RUN_FILE}")):
        try:
            found.append(Run(**json.loads(path.read_text())))
        except (ValueError, TypeError):
            continue  # a damaged record is skipped, not fatal for the listing
    return sorted(found, key=lambda r: r.started_at)


def resolve(project_dir: Path, run_id: str | None) -> Run:
    """The run named, or the latest one."""
    if run_id is not None:
        return load(project_dir, run_id)
    runs = all_runs(project_dir)
    if not runs:
        raise UsageError("no runs yet in this project; `dlbox train` starts one")
    return runs[-1]


def read_log(run: Run, machine: Machine, offset: int) -> bytes:
    """train.log from byte offset on (one command, however long the log)."""
    done = machine.run(f"tail -c +{offset + 1} {shlex.quote(run.remote_dir)}/train.log 2>/dev/null")
    return done.stdout.encode()


def cancel(run: Run, machine: Machine, say: Say, sleep=time.sleep) -> int:
    """SIGTERM the trainer (it checkpoints and exits 75); wait for it; return its exit status."""
    status = _read_json(machine.read(f"{run.remote_dir}/status.json")) or {}
    if machine.read(f"{run.remote_dir}/exit_code") is not None or not status.get("pid"):
        raise UsageError(f"run {run.run_id} is not running")
    sent = machine.run(f"kill -TERM {int(status['pid'])}")
    if sent.exit_code != 0:
        raise DlboxError(f"could not signal run {run.run_id}: {sent.stderr.strip()}")
    say(f"asked run {run.run_id} to stop; waiting for its checkpoint...")
    deadline = time.monotonic() + CANCEL_TIMEOUT_S
    while (code := machine.read(f"{run.remote_dir}/exit_code")) is None:
        if time.monotonic() > deadline:
            raise DlboxError(f"run {run.run_id} still running {CANCEL_TIMEOUT_S} s after SIGTERM")
        sleep(STATUS_POLL_S)
    return int(code.strip() or 1)


def trainer_dir() -> Path:
    """The `trainer` package of this install: what every run ships to its box."""
    import trainer

    return Path(trainer.__file__).resolve().parent


def ship_code(machine: Machine, workdir: str) -> str:
    """Put this install's trainer on the box under its content hash (once); return its dir."""
    package = trainer_dir()
    code = f"{workdir}/code/{content_hash(list(package.glob('*.py')), package)}"
    if machine.read(f"{code}/.complete") is None:
        staging = f"{code}.tmp"
        machine.run(f"rm -rf {shlex.quote(staging)}")
        machine.upload_tree(package, staging)
        machine.run(f"rm -rf {shlex.quote(staging)}/trainer/__pycache__ {shlex.quote(code)} && "
                    f"mv {shlex.quote(staging)} {shlex.quote(code)}")
        machine.write(f"{code}/.complete", b"")
    return code


def ship_data(machine: Machine, workdir: str, local: Path, say: Say,
              progress: Callable[[int, int], None] | None = None) -> str:
    """The dataset on the box, synced into its cache there (only what differs is sent)."""
    if isinstance(machine, LocalMachine):
        return str(local)  # already here
    result = sync.sync(machine, local, workdir, progress)
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
    return path.resolve()


def start(project_dir: Path, box: state.AnyBox, machine: Machine, model: str,
          data: str, test: str | None, trainer_args: list[str], say: Say,
          progress: Callable[[int, int], None] | None = None,
          pip_args: tuple[str, ...] = ()) -> Run:
    """Ship code and data, start `python -m trainer` detached on the box; return the run."""
    local_data, local_test = _local_dataset(data, "--data"), _local_dataset(test, "--test")
    run_id = new_run_id(model)
    remote = f"{box.workdir}/{RUNS_DIR}/{run_id}"
    code = ship_code(machine, box.workdir)
    downloaded: list[str] = []  # the Kaggle zip, fetched at most once per run

    def on_box(spec: str, local: Path | None) -> str:
        if local is not None:
            return ship_data(machine, box.workdir, local, say, progress)
        if not downloaded:
            downloaded.append(kaggle.fetch(machine, box.workdir, box.python, say, pip_args))
        return downloaded[0]

    args = [model, "--data", on_box(data, local_data), "--out", remote, "--resume"]
    if test is not None:
        args += ["--test", on_box(test, local_test)]
    args += trainer_args
    script = render("run.sh.j2", run_id=run_id, out=remote, code_dir=code, python=box.python,
                    args=args)
    machine.write(f"{remote}/run.sh", script.encode(), 0o755)
    run = Run(run_id=run_id, model=model, box=box.name, remote_dir=remote, args=args,
              started_at=_now(), usd_per_hour=getattr(box, "usd_per_hour", None))
    save(project_dir, run)
    # setsid + nohup: the run outlives dlbox, Ctrl-C, a closed terminal and a dropped SSH link.
    # `&` on the simple command alone: on `cd && ... &` bash backgrounds a subshell that keeps
    # our stdout open, and this call would return only when the run ends.
    started = machine.run(f"cd {shlex.quote(remote)} || exit 1; "
                          "setsid nohup bash run.sh > /dev/null 2>&1 < /dev/null &")
    if started.exit_code != 0:
        raise DlboxError(f"could not start the run on {box.name}: {started.stderr.strip()}")
    say(f"run {run_id} started on the {box.name} box")
    return run


def _read_json(raw: bytes | None) -> dict | None:
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def read_local_json(path: Path) -> dict:
    """A JSON file pulled into runs/, or {} if it is missing or damaged."""
    try:
        return _read_json(path.read_bytes()) or {}
    except OSError:
        return {}


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


def follow(run: Run, machine: Machine, say: Say, sleep=time.sleep, err: Say | None = None,
           on_status: Callable[[dict], None] | None = None) -> int:
    """Print each phase and each finished epoch until the run ends; return its exit status.

    A failed run's last words (the trainer's one-line error) go to err; on_status gets
    every status.json read (for a live bar).
    """
    remote = run.remote_dir
    phase, epochs_shown = None, 0
    started = time.monotonic()
    while True:
        status = _read_json(machine.read(f"{remote}/status.json")) or {}
        if on_status is not None:
            on_status(status)
        rows = _history(machine.read(f"{remote}/history.csv"))
        for row in rows[epochs_shown:]:  # before the phase line: the epochs came first
            say(_epoch_line(row, status.get("epochs") or len(rows)))
        epochs_shown = max(epochs_shown, len(rows))
        if status.get("phase") not in (None, phase, "training", "fine-tuning"):
            say(f"{status['phase']}...")
        phase = status.get("phase", phase)
        exit_code = machine.read(f"{remote}/exit_code")
        if exit_code is not None:
            code = int(exit_code.strip() or 1)
            if code != 0:
                error = _last_line(machine.read(f"{remote}/stdout.log")) or status.get("error")
                if error:
                    (err or say)(error)
            return code
        if not status and time.monotonic() - started > START_TIMEOUT_S:
            raise DlboxError(f"run {run.run_id} did not start within {START_TIMEOUT_S} s; "
                             f"see {remote}/stdout.log on the box")
        sleep(STATUS_POLL_S)


def _history(raw: bytes | None) -> list[dict]:
    return list(csv.DictReader(io.StringIO(raw.decode()))) if raw else []


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"{row['phase']} epoch {row['epoch']}/{epochs}: loss {float(row['loss']):.4f} "
            f"acc {float(row['accuracy']):.4f} val_loss {float(row['val_loss']):.4f} "
            f"val_acc {float(row['val_accuracy']):.4f} ({float(row['seconds']):.0f} s, "
            f"{float(row['images_per_second']):.0f} img/s)")


def _last_line(raw: bytes | None) -> str | None:
    lines = raw.decode(errors="replace").strip().splitlines() if raw else []
    return lines[-1] if lines else None


def pull(project_dir: Path, run: Run, machine: Machine) -> Path:
    """Copy the results into runs/<id>/, each checked against the box's SHA-256."""
    local = project_dir / RUNS_DIR / run.run_id
    local.mkdir(parents=True, exist_ok=True)
    listing = machine.run(f"cd {shlex.quote(run.remote_dir)} && sha256sum -- "
                          + " ".join(RESULT_FILES) + " 2>/dev/null")
    remote_sums = {name: digest for digest, name in
                   (line.split(maxsplit=1) for line in listing.stdout.splitlines())}
    if not remote_sums:
        raise DlboxError(f"no results for run {run.run_id} in {run.remote_dir} on the box")
    for name, digest in remote_sums.items():
        tmp = local / f".{name}.part"
        machine.fetch(f"{run.remote_dir}/{name}", tmp)
        if _sha256(tmp) != digest:
            tmp.unlink()
            raise DlboxError(f"copy of {name} does not match the box's; run `dlbox pull "
                             f"{run.run_id}`")
        os.replace(tmp, local / name)
    return local


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finish(project_dir: Path, run: Run, machine: Machine, code: int) -> Run:
    """Pull the results and record how the run ended."""
    local = pull(project_dir, run, machine)
    metrics = read_local_json(local / "metrics.json")
    status = {0: "done", 75: "interrupted", 130: "interrupted"}.get(code, "failed")
    run = replace(run, status=status, exit_code=code, val_accuracy=metrics.get("val_accuracy"),
                  finished_at=_now())
    save(project_dir, run)
    cost = f"${run.cost_usd:.2f}" if run.cost_usd is not None else "nothing (own machine)"
    report.write(local, run, box=run.box, duration=f"{run.seconds / 60:.1f} min", cost=cost)
    return run
