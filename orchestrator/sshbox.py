"""The SSH box: a machine the user already has, its host key pinned at `up`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import config, environment, registry, sshtarget, state, workdir
from .boxes import Box, DownFlags, Say, Unwatched, UpFlags, registry_in
from .errors import UsageError
from .machine import Machine
from .sshmachine import SshMachine
from .sshtarget import SshTarget

# user@host[:port]; neither may start with "-" (it would reach ssh as an option).
SSH_TARGET = re.compile(r"^(?P<user>[A-Za-z0-9_.][^@\s]*)@(?P<host>[A-Za-z0-9_.\[][^:\s]*)"
                        r"(:(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class SshBox(Unwatched):
    """A machine reached over SSH; runs in workdir (absolute, on the box) with python there."""

    name: str  # user@host:port
    host: str
    port: int
    user: str
    key_path: str
    workdir: str
    python: str
    kind: str = "ssh"

    DESCRIPTION: ClassVar[str] = "SSH boxes"
    INTERRUPTED_UP: ClassVar[str] = ("the box is as you had it, its key pinned if the login "
                                     "got that far: run `dlbox up --ssh ...` again")
    UP_FLAGS: ClassVar[frozenset[str]] = frozenset({"ssh", "key", "python", "workdir"})
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset({"purge"})
    hourly_usd: ClassVar[None] = None

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> SshBox:
        """Pin the machine's host key, make dlbox's folder there, check its Python can train."""
        match = SSH_TARGET.match(flags.ssh or "")
        if not match or not 1 <= int(match["port"] or 22) <= 65535:
            raise UsageError(f"--ssh {flags.ssh}: expected USER@HOST or USER@HOST:PORT")
        if flags.key is None:
            raise UsageError("--ssh needs --key PATH (the private key that logs you in)")
        key_path = Path(flags.key).expanduser().resolve()
        if not key_path.is_file():
            raise UsageError(f"--key {flags.key}: no such file")
        host, port, user = match["host"], int(match["port"] or 22), match["user"]
        name = f"{user}@{host}:{port}"
        if existing is not None and existing.name != name:
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first to "
                             f"use {name}")
        cfg = config.load(project_dir)
        target = SshTarget(host, port, user, str(key_path), state.known_hosts(project_dir))
        sshtarget.check_paths(target.key_path, target.known_hosts)
        machine = SshMachine(target, pin_new_host=True)
        try:
            folder = workdir.prepare(machine, flags.workdir or cfg.box_workdir, name)
            python, versions = environment.ready_python(
                machine, folder, flags.python or cfg.python, say, cfg.box_requirements,
                cfg.pip_args)
        finally:
            machine.close()
        box = cls(name=name, host=host, port=port, user=user, key_path=str(key_path),
                  workdir=folder, python=python)
        state.put(project_dir, box)
        sshtarget.write_config(state.state_dir(project_dir), target)
        say(f"ssh box {name} ready ({versions}); runs in {folder}; host key pinned in "
            f"{target.known_hosts}; `dlbox ssh` logs in")
        return box

    @property
    def label(self) -> str:
        return f"the SSH box {self.name}"

    def ssh_target(self, project_dir: Path) -> SshTarget:
        return SshTarget(self.host, self.port, self.user, self.key_path,
                         state.known_hosts(project_dir))

    def machine(self, project_dir: Path) -> Machine:
        return SshMachine(self.ssh_target(project_dir))

    def runs_registry(self) -> str:
        return registry_in(self.workdir)

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        return [("box", f"ssh {self.name}"), ("python", self.python), ("runs in", self.workdir),
                ("login", "`dlbox ssh` or `ssh -F .dlbox/ssh_config dlbox`")]

    def ends_runs(self, flags: DownFlags) -> bool:
        return flags.purge  # without --purge the machine and its runs stay as they are

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """Forget the box (its host key stays pinned); --purge also deletes dlbox's folder there."""
        if flags.purge:
            from . import runs

            mine = {r.run_id for r in runs.all_runs(project_dir, lambda _: None)
                    if r.box == self.name}
            machine = self.machine(project_dir)
            try:
                # The folder may be shared with other projects (the default ~/dlbox is):
                # their runs and results are not this project's to end.
                found = set(registry.live_runs(machine, self.runs_registry()))
                others = sorted((found | set(registry.held_runs(machine, self.runs_registry())))
                                - mine)
                if others:
                    raise UsageError(
                        f"{self.workdir} on {self.name} also holds runs of other projects ("
                        + ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                        + "); `dlbox down` without --purge forgets the box and leaves the folder")
                stopped = registry.stop_live_runs(machine, self.runs_registry(), only=mine)
                kept = workdir.purge(machine, self.workdir)
            finally:
                machine.close()
            if stopped:
                say(f"stopped run(s) {', '.join(stopped)}")
            say(f"removed what dlbox made in {self.workdir} on {self.name}" + (
                f"; kept what it did not make: {', '.join(k if k != '.' else 'the folder' for k in kept)}"
                if kept else ""))
        state.remove(project_dir, self.name)
        sshtarget.remove_config(state.state_dir(project_dir))
        say(f"forgot ssh box {self.name}" + ("" if flags.purge else f" (its {self.workdir} stays)"))
