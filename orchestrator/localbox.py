"""The local box: this machine, with runs under .dlbox/local-box and datasets used in place."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import environment, registry, state
from .boxes import Box, DownFlags, Say, Unwatched, UpFlags, registry_in
from .localmachine import LocalMachine
from .machine import Machine
from .sshtarget import SshTarget

LOCAL_WORKDIR = "local-box"


@dataclass(frozen=True)
class LocalBox(Unwatched):
    """This machine as the box: runs live under workdir, the trainer runs with python."""

    name: str
    workdir: str
    python: str
    kind: str = "local"

    DESCRIPTION: ClassVar[str] = "the local box"
    INTERRUPTED_UP: ClassVar[str] = "nothing was changed: run `dlbox up --local` again"
    UP_FLAGS: ClassVar[frozenset[str]] = frozenset({"local", "python"})
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset()
    hourly_usd: ClassVar[None] = None

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> LocalBox:
        """Use this machine as the box; check its Python can train."""
        asked = flags.python or (existing.python if existing else None) or sys.executable
        interpreter, versions = environment.check_python(LocalMachine(), asked)
        workdir = state.ensure_dir(project_dir).resolve() / LOCAL_WORKDIR
        workdir.mkdir(exist_ok=True)
        box = cls(name="local", workdir=str(workdir), python=interpreter)
        state.put(project_dir, box)
        say(f"local box ready: {interpreter} ({versions}); runs in {workdir}")
        return box

    @property
    def label(self) -> str:
        return "the local box"

    def machine(self, project_dir: Path) -> Machine:
        return LocalMachine()

    def ssh_target(self, project_dir: Path) -> SshTarget | None:
        return None

    def runs_registry(self) -> str:
        return registry_in(self.workdir)

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        return [("box", "local (this machine)"), ("python", self.python), ("runs in", self.workdir)]

    def ends_runs(self, flags: DownFlags) -> bool:
        return True  # their folder goes

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """Stop runs still going (`down` asked first), remove the box's folder (dlbox's own,
        under .dlbox/; results were pulled into runs/ first) and forget the box."""
        stopped = registry.stop_live_runs(LocalMachine(), self.runs_registry())
        if stopped:
            say(f"stopped run(s) {', '.join(stopped)}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        state.remove(project_dir, self.name)
        say(f"local box removed ({self.workdir})")
