"""The SSH box: a machine the user already has, its host key pinned at `up`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import config, environment, registry, sshtarget, state, workdir
from .boxkind import Box, DownFlags, Say, Unwatched, registry_in
from .errors import UsageError
from .kinds import UpFlags
from .machine import Machine
from .nodes import cluster
from .sshmachine import SshMachine, own_address
from .sshtarget import SshTarget

# user@host[:port]; neither may start with "-" (it would reach ssh as an option).
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}"
                       r"[A-Za-z0-9])?)*")
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
    node: int = 0
    nodes: int = 1
    address: str | None = None  # where the other nodes of its cluster reach it

    INTERRUPTED_UP: ClassVar[str] = ("the box is as you had it, its key pinned if the login "
                                     "got that far: run `dlbox up --ssh ...` again")
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset({"purge"})
    hourly_usd: ClassVar[None] = None
    shared_workdir: ClassVar[bool] = True  # ~/dlbox is every project's on that machine

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> SshBox:
        """Pin each machine's host key, make dlbox's folder there, check its Python can
        train; several --ssh make a cluster, node 0 first."""
        specs = flags.ssh or ()
        keys = flags.key or ()
        for spec in specs:
            _target(spec)
        if not keys:
            raise UsageError("--ssh needs --key PATH (the private key that logs you in)")
        if len(keys) not in (1, len(specs)):
            raise UsageError(f"{len(keys)} --key for {len(specs)} --ssh: give one key for "
                             "every host, or one per --ssh in the same order")
        if flags.nodes is not None and flags.nodes != len(specs):
            raise UsageError(f"--nodes {flags.nodes} with {len(specs)} --ssh: a cluster of SSH "
                             "boxes has one node per --ssh; drop --nodes")
        given = flags.node_address or ()
        if given and len(given) != len(specs):
            raise UsageError(f"{len(given)} --node-address for {len(specs)} --ssh: give one per "
                             "--ssh in the same order, or none (each node's own address)")
        for address in given:
            _check_address(address)
        targets = [_parse(spec, keys[i if len(keys) > 1 else 0]) for i, spec in enumerate(specs)]
        names = [f"{user}@{host}:{port}" for host, port, user, _ in targets]
        if len(set(names)) != len(names):
            raise UsageError("the same --ssh is given twice; each node is another machine "
                             "(or another port)")
        if existing is not None and existing.nodes != len(names):
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first to "
                             f"use {', '.join(names)}")
        if existing is not None and existing.name != names[0]:
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first to "
                             f"use {names[0]}")
        if existing is not None and existing.nodes > 1:
            had = [b.name for b in cluster(project_dir, existing)]
            if had != names:
                raise UsageError(f"this project's cluster is {', '.join(had)}; `dlbox down` "
                                 f"first to use {', '.join(names)}")
        cfg = config.load(project_dir)
        made = []
        for node, (host, port, user, key_path) in enumerate(targets):
            made.append(_prepare(cls, project_dir, cfg, flags, host, port, user, key_path, node,
                                 len(targets), say, given[node] if given else None))
        for box in made:  # recorded together: a cluster is whole or not recorded
            state.put(project_dir, box)
        sshtarget.write_config(state.state_dir(project_dir), made[0].ssh_target(project_dir))
        return made[0]

    @property
    def label(self) -> str:
        return f"the SSH box {self.name}" if self.nodes == 1 else \
            f"node {self.node} ({self.name})"

    def ssh_target(self, project_dir: Path) -> SshTarget:
        return SshTarget(self.host, self.port, self.user, self.key_path,
                         state.known_hosts(project_dir))

    def machine(self, project_dir: Path) -> Machine:
        return SshMachine(self.ssh_target(project_dir))

    def runs_registry(self) -> str:
        return registry_in(self.workdir)

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        what = f"ssh {self.name}" + (f" (node {self.node} of {self.nodes}, reached by the "
                                     f"others at {self.address})" if self.nodes > 1 else "")
        return [("box", what), ("python", self.python), ("runs in", self.workdir),
                ("login", "`dlbox ssh` or `ssh -F .dlbox/ssh_config dlbox`")]

    def ends_runs(self, flags: DownFlags) -> bool:
        return flags.purge  # without --purge the machine and its runs stay as they are

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """Forget the box (its host key stays pinned); --purge also deletes dlbox's folder there."""
        if flags.purge:
            from . import runs

            mine = {r.run_id for r in runs.all_runs(project_dir, lambda _: None)
                    if r.box == self.name or any(n.get("box") == self.name for n in r.nodes)}
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


def _check_address(address: str) -> None:
    """An IP address (v4 or v6) or a host name: what a worker's TF_CONFIG may name."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(address):
        raise UsageError(f"--node-address {address!r}: expected an IP address or a host name")


def _target(spec: str) -> re.Match:
    match = SSH_TARGET.match(spec or "")
    if not match or not 1 <= int(match["port"] or 22) <= 65535:
        raise UsageError(f"--ssh {spec}: expected USER@HOST or USER@HOST:PORT")
    return match


def _parse(spec: str, key: str) -> tuple[str, int, str, Path]:
    """(host, port, user, key path) of one --ssh and its --key."""
    match = _target(spec)
    key_path = Path(key).expanduser().resolve()
    if not key_path.is_file():
        raise UsageError(f"--key {key}: no such file")
    return match["host"], int(match["port"] or 22), match["user"], key_path


def _prepare(cls, project_dir: Path, cfg, flags: UpFlags, host: str, port: int, user: str,
             key_path: Path, node: int, nodes: int, say: Say,
             address: str | None = None) -> SshBox:
    """One machine ready to train: its host key pinned, dlbox's folder, a Python with
    TensorFlow, and (in a cluster) the address the other nodes reach it on: the one given,
    else the one its sshd sees for dlbox's login."""
    name = f"{user}@{host}:{port}"
    target = SshTarget(host, port, user, str(key_path), state.known_hosts(project_dir))
    sshtarget.check_paths(target.key_path, target.known_hosts)
    machine = SshMachine(target, pin_new_host=True)
    try:
        folder = workdir.prepare(machine, flags.workdir or cfg.box_workdir, name)
        python, versions = environment.ready_python(
            machine, folder, flags.python or cfg.python, say, cfg.box_requirements,
            cfg.pip_args)
        if nodes > 1 and address is None:
            address = own_address(machine, name)
    finally:
        machine.close()
    say(f"ssh box {name} ready ({versions}); runs in {folder}; host key pinned in "
        f"{target.known_hosts}" + (f"; node {node} of {nodes}, reached by the others at "
                                   f"{address}" if nodes > 1 else "; `dlbox ssh` logs in"))
    return cls(name=name, host=host, port=port, user=user, key_path=str(key_path),
               workdir=folder, python=python, node=node, nodes=nodes, address=address)

