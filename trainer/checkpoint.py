"""Crash-safe checkpoints: model files first, then state.json as the single commit point."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UsageError
from .status import write_json_atomic

STATE_FILE = "state.json"
STATE_VERSION = 1
# Options that must match for --resume to continue a run's checkpoints.
# What every state.json has had since version 1.
REQUIRED = ("options", "completed", "phase", "phases_done", "last", "best", "best_val_loss",
            "best_epoch", "wait", "history", "finished")
RESUME_KEYS = ("model", "data", "img_size", "val_split", "limit", "batch_size", "epochs",
               "fine_tune_epochs", "learning_rate", "weights")


@dataclass(frozen=True)
class ResumeState:
    """state.json: everything --resume needs to continue a run exactly where it stopped."""

    options: dict  # Options.as_dict() of the run that wrote it
    completed: int = 0  # epochs finished, over all phases
    phase: str | None = None  # the phase the model in `last` belongs to
    phases_done: tuple[str, ...] = ()
    last: str | None = None  # the latest model file in checkpoints/ (with optimizer state)
    best: str | None = None  # the model file with the lowest val_loss so far
    best_val_loss: float | None = None
    best_epoch: int | None = None  # 1-based, like history.csv
    wait: int = 0  # epochs since val_loss last improved (early stopping)
    history: tuple[dict, ...] = ()  # history.csv's rows
    finished: bool = False  # every output written; --resume does nothing
    # A checkpoint taken on a stop request: the epochs of training done then (3.4: 40 % into
    # epoch 4), which --resume redoes from the start of that epoch. None for an epoch's end.
    stopped_at: float | None = None

    def to_json(self) -> dict:
        """state.json's content: these keys and the format version (stopped_at only when
        set: the file stays as version 1 wrote it otherwise)."""
        data = {**asdict(self), "phases_done": list(self.phases_done),
                "history": list(self.history), "version": STATE_VERSION}
        if self.stopped_at is None:
            del data["stopped_at"]
        return data

    @classmethod
    def from_json(cls, raw: dict, path: Path) -> ResumeState:
        # Fields added since version 1 (they have defaults) may be absent from older files.
        missing = [f.name for f in fields(cls) if f.name not in raw and f.name in REQUIRED]
        if missing:
            raise UsageError(f"{path} is damaged (no {', '.join(missing)}); choose another --out "
                             "(or delete that folder)")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        return cls(**{**values, "phases_done": tuple(values["phases_done"]),
                      "history": tuple(values["history"])})


class Checkpoints:
    """checkpoints/: the latest model (with optimizer state), the best one, and state.json.

    A SIGKILL at any moment leaves either the previous state.json or the new one, and
    every model file a state.json names was complete before that state.json was written.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> ResumeState | None:
        path = self.dir / STATE_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise UsageError(f"{path} is damaged ({exc}); choose another --out "
                             "(or delete that folder)") from exc
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise UsageError(f"{path} was written by another trainer version; choose another "
                             "--out (or delete that folder)")
        return ResumeState.from_json(raw, path)

    def load_for_resume(self, options: dict) -> ResumeState | None:
        """The saved state, if the run was started with the same options; else UsageError."""
        state = self.load()
        if state is None:
            return None
        changed = [k for k in RESUME_KEYS if state.options.get(k) != options.get(k)]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {state.options.get(k)}" for k in changed)
            raise UsageError(f"--resume: this run was started with {flags}; pass the same "
                             "values or choose another --out")
        return state

    def path(self, name: str) -> Path:
        return self.dir / name

    def save_model(self, model, name: str) -> str:
        """Save model under name (atomically); return the name for the next state."""
        tmp = self.dir / f"tmp-{os.getpid()}-{name}"  # Keras wants the .keras suffix kept
        model.save(tmp)
        os.replace(tmp, self.dir / name)
        return name

    def commit(self, state: ResumeState) -> None:
        """Write state.json, then drop model files it no longer names."""
        write_json_atomic(self.dir / STATE_FILE, state.to_json())
        keep = {state.last, state.best}
        for f in self.dir.glob("*.keras"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
