"""The local box: this machine, with runs under .dlbox/local-box and datasets used in place."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import environment, registry, state
from .boxkind import Box, DownFlags, Say, Unwatched, registry_in
from .errors import UsageError
from .kinds import UpFlags
from .localmachine import LocalMachine
from .machine import Machine
from .sshtarget import SshTarget

LOCAL_WORKDIR = "local-box"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LocalBox(Unwatched):
    """This machine as the box: runs live under workdir, the trainer runs with python."""

    name: str
    workdir: str
    python: str
    kind: str = "local"
    node: int = 0
    nodes: int = 1
    address: str | None = None  # the nodes of a local cluster reach each other on loopback

    INTERRUPTED_UP: ClassVar[str] = "nothing was changed: run `dlbox up --local` again"
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset()
    hourly_usd: ClassVar[None] = None

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> LocalBox:
        """Use this machine as the box (or as every node of a cluster, each with its own
        folder); check its Python can train."""
        nodes = flags.nodes or (existing.nodes if existing else 1)
        if existing is not None and existing.nodes != nodes:
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first to "
                             f"make one of {nodes} node(s)")
        asked = flags.python or (existing.python if existing else None) or sys.executable
        interpreter, versions = environment.check_python(LocalMachine(), asked)
        base = state.ensure_dir(project_dir).resolve()
        made = []
        for node in range(nodes):
            workdir = base / (LOCAL_WORKDIR if node == 0 else f"{LOCAL_WORKDIR}-{node}")
            workdir.mkdir(exist_ok=True)
            made.append(cls(name="local" if node == 0 else f"local-{node}", workdir=str(workdir),
                            python=interpreter, node=node, nodes=nodes,
                            address=LOOPBACK if nodes > 1 else None))
        for box in made:
            state.put(project_dir, box)
        where = made[0].workdir if nodes == 1 else f"{base}/{LOCAL_WORKDIR}-*"
        say(f"local box ready: {interpreter} ({versions}); runs in {where}"
            + (f"; {nodes} nodes (one worker each) on this machine" if nodes > 1 else ""))
        return made[0]

    @property
    def label(self) -> str:
        return "the local box" if self.nodes == 1 else f"local node {self.node}"

    def machine(self, project_dir: Path) -> Machine:
        return LocalMachine()

    def ssh_target(self, project_dir: Path) -> SshTarget | None:
        return None

    def runs_registry(self) -> str:
        return registry_in(self.workdir)

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        what = "local (this machine)" if self.nodes == 1 else \
            f"local node {self.node} of {self.nodes} (this machine)"
        return [("box", what), ("python", self.python), ("runs in", self.workdir)]

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
