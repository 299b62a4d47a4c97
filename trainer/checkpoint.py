"""Crash-safe checkpoints: model files first, then state.json as the single commit point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UsageError
from .status import write_json_atomic

STATE_FILE = "state.json"
STATE_VERSION = 1
# Options that must match for --resume to continue a run's checkpoints.
RESUME_KEYS = ("model", "data", "img_size", "val_split", "limit", "batch_size", "epochs",
               "fine_tune_epochs", "learning_rate", "weights")


class Checkpoints:
    """checkpoints/: the latest model (with optimizer state), the best one, and state.json.

    A SIGKILL at any moment leaves either the previous state.json or the new one, and
    every model file a state.json names was complete before that state.json was written.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict | None:
        path = self.dir / STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"{path} was written by another trainer version; choose another "
                             "--out (or delete that folder)")
        return state

    def load_for_resume(self, options: dict) -> dict | None:
        """The saved state, if the run was started with the same options; else UsageError."""
        state = self.load()
        if state is None:
            return None
        changed = [k for k in RESUME_KEYS if state["options"].get(k) != options.get(k)]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {state['options'].get(k)}" for k in changed)
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

    def commit(self, state: dict) -> None:
        """Write state.json, then drop model files it no longer names."""
        state = {**state, "version": STATE_VERSION}
        write_json_atomic(self.dir / STATE_FILE, state)
        keep = {state.get("last"), state.get("best")}
        for f in self.dir.glob("*.keras"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
