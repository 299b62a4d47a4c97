"""Runs: start the trainer detached on the box, stream its status, pull the results back."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from . import state
from .errors import DlboxError, UsageError
from .render import render

RUNS_DIR = "runs"
RUN_FILE = "run.json"
STATUS_POLL_S = 1.0  # the trainer rewrites status.json every 2 s
START_TIMEOUT_S = 120  # until the trainer's first status.json
RESULT_FILES = ("model.keras", "history.csv", "metrics.json", "train.log", "status.json",
                "val_predictions.csv", "submission.csv", "stdout.log")
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


def code_dir() -> Path:
    """The folder holding the `trainer` package of this install (what the box runs)."""
    import trainer

    return Path(trainer.__file__).resolve().parent.parent


def start(project_dir: Path, box: state.LocalBox, model: str, data: str, test: str | None,
          trainer_args: list[str], say: Say) -> Run:
    """Start `python -m trainer` detached on the box; return the recorded run."""
    data_path = Path(data).expanduser()
    if not data_path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    run_id = new_run_id(model)
    remote = Path(box.workdir) / RUNS_DIR / run_id
    remote.mkdir(parents=True)
    args = [model, "--data", str(data_path.resolve()), "--out", str(remote), "--resume",
            *(["--test", str(Path(test).expanduser().resolve())] if test else []), *trainer_args]
    script = remote / "run.sh"
    script.write_text(render("run.sh.j2", run_id=run_id, out=str(remote), code_dir=str(code_dir()),
                             python=box.python, args=args))
    run = Run(run_id=run_id, model=model, box=box.name, remote_dir=str(remote), args=args,
              started_at=_now())
    save(project_dir, run)
    # A session of its own: the run outlives dlbox, Ctrl-C and a closed terminal.
    subprocess.Popen(["bash", str(script)], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    say(f"run {run_id} started on the {box.name} box")
    return run


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def follow(run: Run, say: Say, sleep=time.sleep) -> int:
    """Print each phase and each finished epoch until the run ends; return its exit status."""
    remote = Path(run.remote_dir)
    phase, epochs_shown = None, 0
    started = time.monotonic()
    while True:
        status = _read_json(remote / "status.json") or {}
        if status.get("phase") not in (None, phase, "training", "fine-tuning"):
            say(f"{status['phase']}...")
        phase = status.get("phase", phase)
        rows = _history(remote / "history.csv")
        for row in rows[epochs_shown:]:
            say(_epoch_line(row, status.get("epochs") or len(rows)))
        epochs_shown = max(epochs_shown, len(rows))
        exit_file = remote / "exit_code"
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or 1)
            if code != 0:
                error = _last_line(remote / "stdout.log") or status.get("error")
                if error:
                    say(error)
            return code
        if not status and time.monotonic() - started > START_TIMEOUT_S:
            raise DlboxError(f"run {run.run_id} did not start within {START_TIMEOUT_S} s; "
                             f"see {remote / 'stdout.log'}")
        sleep(STATUS_POLL_S)


def _history(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"{row['phase']} epoch {row['epoch']}/{epochs}: loss {float(row['loss']):.4f} "
            f"acc {float(row['accuracy']):.4f} val_loss {float(row['val_loss']):.4f} "
            f"val_acc {float(row['val_accuracy']):.4f} ({float(row['seconds']):.0f} s, "
            f"{float(row['images_per_second']):.0f} img/s)")


def _last_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return None
    return lines[-1] if lines else None


def pull(project_dir: Path, run: Run) -> Path:
    """Copy the results into runs/<id>/ and verify each copy by its SHA-256."""
    local = project_dir / RUNS_DIR / run.run_id
    local.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        source = Path(run.remote_dir) / name
        if not source.exists():
            continue
        tmp = local / f".{name}.part"
        shutil.copyfile(source, tmp)
        if _sha256(tmp) != _sha256(source):
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


def finish(project_dir: Path, run: Run, code: int) -> Run:
    """Pull the results and record how the run ended."""
    local = pull(project_dir, run)
    metrics = _read_json(local / "metrics.json") or {}
    status = {0: "done", 75: "interrupted", 130: "interrupted"}.get(code, "failed")
    run = replace(run, status=status, exit_code=code, val_accuracy=metrics.get("val_accuracy"),
                  finished_at=_now())
    save(project_dir, run)
    return run
