"""The EC2 box: a GPU instance dlbox launched (see ec2up.py), its status from AWS, its end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from . import hostkeys, registry, state
from .boxkind import Box, DownFlags, Gone, Say
from .ec2aws import (
    RUNS_REGISTRY_ON_BOX,
    TERMINATE_TIMEOUT_S,
    clients,
    cost_so_far,
    describe_for_ending,
    end_all,
    end_project,
    every_instance,
    forget,
    project_instances,
)
from .errors import DlboxError, UsageError
from .humanize import duration
from .kinds import UpFlags
from .machine import Machine
from .nodes import of_kind
from .sshmachine import SshMachine
from .sshtarget import SshTarget
from .ui import Ui

START_TIMEOUT_S = 600  # a stopped box started again to hand over its results
STOPPED_STATES = ("stopping", "stopped")  # a run there is lost; the box can start again


@dataclass(frozen=True)
class Ec2Box:
    """The project's EC2 instance. Recorded before run_instances is called, so it is never lost."""

    name: str
    region: str
    profile: str | None
    key_name: str  # dlbox's own key pair and group: `down` deletes both
    key_path: str
    security_group_id: str
    ssh_user: str
    ssh_port: int
    idle_minutes: int
    max_lifetime_minutes: int
    instance_id: str | None = None  # None while the launch request is in flight
    instance_type: str | None = None
    zone: str | None = None
    spot: bool = False
    host: str | None = None
    usd_per_hour: float | None = None
    workdir: str | None = None  # dlbox's folder on the box, once logged in
    python: str | None = None  # an interpreter with TensorFlow on the box
    kind: str = "ec2"
    node: int = 0
    nodes: int = 1
    address: str | None = None  # where the other nodes of its cluster reach it
    placement_group: str | None = None  # a cluster's: the cluster placement group of its zone
    # Every choice of the `up` that made it (config.Config: dlbox.toml's and the flags'):
    # replacements and `up` again take them, not today's dlbox.toml or IP. None: an older record.
    settings: dict[str, Any] | None = None

    rented: ClassVar[bool] = True
    shared_workdir: ClassVar[bool] = False  # one project's
    INTERRUPTED_UP: ClassVar[str] = ("a box launched before the interrupt is recorded in "
                                     ".dlbox/state.json: `dlbox up` keeps waiting for it, "
                                     "`dlbox down` terminates it")
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset({"profile"})

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> Ec2Box:
        from . import ec2up

        return ec2up.up(cls, project_dir, flags, existing, say)

    @property
    def label(self) -> str:
        return (f"the EC2 box {self.name} ({self.instance_id or 'launch in flight'})"
                + (f", node {self.node} of {self.nodes}" if self.nodes > 1 else ""))

    @property
    def hourly_usd(self) -> float | None:
        return self.usd_per_hour

    def ssh_target(self, project_dir: Path) -> SshTarget:
        if self.host is None:
            raise UsageError(f"{self.label} has no address yet; `dlbox up` waits for it")
        return SshTarget(self.host, self.ssh_port, self.ssh_user, self.key_path,
                         state.known_hosts(project_dir))

    def machine(self, project_dir: Path) -> Machine:
        if self.python is None or self.workdir is None:
            raise UsageError(f"{self.label} is not ready to train yet; `dlbox up` finishes "
                             "preparing it")
        return SshMachine(self.ssh_target(project_dir))

    def runs_registry(self) -> str:
        return RUNS_REGISTRY_ON_BOX

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        from infra import instances
        from infra.prices import cost

        ec2 = clients(self.region, self.profile)
        inst = instances.describe(ec2, self.instance_id) if self.instance_id else None
        state_now = "launch in flight" if self.instance_id is None else (
            inst.state if inst else "gone")
        uptime = 0.0
        if inst is not None and inst.state != "terminated":
            uptime = (datetime.now(timezone.utc) - inst.launch_time).total_seconds()
        spent = cost(self.usd_per_hour, uptime)
        rows = [
            ("box", self.name + (f" (node {self.node} of {self.nodes}, reached by the others "
                                 f"at {self.address or '?'})" if self.nodes > 1 else "")),
            ("instance", self.instance_id or "launch in flight"),
            ("type", f"{self.instance_type or '?'} ({'spot' if self.spot else 'on-demand'}) "
                     f"in {self.zone or '?'}" + (f", placement group {self.placement_group}"
                                                 if self.placement_group else "")),
            ("state", state_now),
            ("address", f"{inst.public_ip}:{self.ssh_port}" if inst and inst.public_ip else "-"),
            ("uptime", duration(uptime)),
            ("cost so far", f"${spent:.2f} at ${self.usd_per_hour:.3f}/h" if spent is not None
             else "unknown"),
            ("watchdog", self._watchdog_line(project_dir, inst)),
        ]
        if state_now in ("stopping", "stopped"):
            rows.append(("note", "the box is stopped, its disk kept (the watchdog stops a box "
                                 "holding unpulled results): `dlbox pull RUN` starts it and "
                                 "pulls, `dlbox down` pulls and terminates it"))
        elif state_now in ("shutting-down", "terminated", "gone"):
            rows.append(("note", "the box has ended (the watchdog or AWS ended it); "
                                 "`dlbox down` cleans up"))
        return rows

    def _watchdog_line(self, project_dir: Path, inst) -> str:
        """The watchdog as the box reports it; never "on" unless the box says so."""
        from . import watchdog

        if not (self.idle_minutes or self.max_lifetime_minutes):
            return "off (the box runs until `dlbox down`)"
        if inst is None or inst.state != "running" or self.workdir is None:
            return f"unknown (the box is {inst.state if inst else 'gone'})"
        machine = self.machine(project_dir)
        try:
            return watchdog.check(machine).line()
        except DlboxError as exc:
            return f"unknown: could not ask the box ({exc})"
        finally:
            machine.close()

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """Terminate the box and every other instance of the project (verified), delete the
        key pair, group and placement group once nothing uses them, forget the box.

        A node of a cluster while other nodes are recorded: only its own instance; the last
        node recorded ends what is left of the project, then the shared resources go."""
        ec2 = clients(self.region, flags.profile or self.profile)
        last = self.nodes == 1 or not any(b.kind == self.kind and b.name != self.name
                                           for b in of_kind(project_dir, Ec2Box))
        ended = end_project(project_dir, ec2, say, [self.instance_id] if self.instance_id else [],
                            self.name, whole_project=last)
        if not ended:
            say(f"nothing of box {self.name} was running")
        try:
            forget(project_dir, ec2, self)
        except Exception as exc:
            raise DlboxError(f"{', '.join(i.instance_id for i in ended) or self.name} terminated "
                             f"(verified), but cleaning up after it failed ({exc}); run `dlbox "
                             "down` again to delete its key pair and groups") from exc
        for inst in ended:
            spent = cost_so_far(inst, self.usd_per_hour)
            say(f"{inst.instance_id} terminated; " + (
                f"it cost about ${spent:.2f}" if spent is not None else
                f"its cost is unknown (dlbox has no price for {inst.instance_type})"))


    def ends_runs(self, flags: DownFlags) -> bool:
        return True  # terminated, disk and all

    def wake(self, project_dir: Path, say: Say) -> Ec2Box:
        """Started again if the watchdog stopped it (an on-demand box holding unpulled results
        stops instead of terminating); its pinned host key follows it to its new address."""
        from infra import instances

        from . import netwait

        if self.instance_id is None:
            return self
        ec2 = clients(self.region, self.profile)
        inst = instances.describe(ec2, self.instance_id)
        if inst is None or inst.state not in ("stopping", "stopped"):
            return self
        say(f"{self.label} was stopped to keep results nobody pulled; starting it...")
        inst = instances.start(ec2, self.instance_id, START_TIMEOUT_S)
        box = replace(self, host=inst.public_ip)
        if self.host is not None and box.host != self.host:
            hostkeys.moved(Path(state.known_hosts(project_dir)),
                           self.ssh_target(project_dir).known_hosts_name,
                           box.ssh_target(project_dir).known_hosts_name)
        state.put(project_dir, box)
        try:
            netwait.wait_for_ssh(box.host, box.ssh_port)
        except DlboxError as exc:  # the group still opens SSH to the address of the last `up`
            raise DlboxError(f"{exc}; if your own address changed since `dlbox up`, run "
                             "`dlbox up` (it opens SSH to your address now) and try again") from exc
        return box

    @property
    def interruptible(self) -> bool:
        return self.spot

    @property
    def replaceable(self) -> bool:
        return True

    def gone(self, project_dir: Path) -> Gone | None:
        """Why EC2 says the instance can no longer run the run, or None while it can. Reclaimed
        when EC2 ended it itself (Server.SpotInstanceTermination, a failed host), not when
        someone did (Client.UserInitiatedShutdown: `dlbox down`, the console; Client.Instance-
        InitiatedShutdown: its watchdog at the maximum lifetime)."""
        from infra import instances

        if self.instance_id is None:
            return None
        inst = instances.describe(clients(self.region, self.profile), self.instance_id)
        if inst is None:
            return Gone(f"EC2 no longer knows {self.instance_id}", reclaimed=False)
        if inst.state not in ("shutting-down", "terminated", *STOPPED_STATES):
            return None
        why = inst.state_reason or "no reason given"
        return Gone(f"EC2 says {self.instance_id} is {inst.state} ({why})",
                    reclaimed=why.startswith("Server."),
                    at=inst.state_changed_at.timestamp() if inst.state_changed_at else None,
                    stopped=inst.state in STOPPED_STATES)

    def retire(self, project_dir: Path, say: Say) -> None:
        """Terminated, verified; a stopped one is kept as it is (its disk costs pennies and
        may hold other runs' results): replacement() starts it again."""
        from infra import instances

        if self.instance_id is not None:
            ec2 = clients(self.region, self.profile)
            if self._stopped(ec2):
                say(f"{self.instance_id} is stopped: kept, with its disk")
                return
            instances.terminate(ec2, [self.instance_id], TERMINATE_TIMEOUT_S)
            say(f"{self.instance_id} terminated (verified)")

    def _stopped(self, ec2) -> bool:
        from infra import instances

        inst = instances.describe(ec2, self.instance_id) if self.instance_id else None
        return inst is not None and inst.state in STOPPED_STATES

    def up_flags(self, project_dir: Path) -> UpFlags:
        """`up`'s flags for a box like this one: the same region, account, market (spot, with
        spot_fallback), key, user and watchdog limits, and what else the `up` that made it was
        given (its recorded settings: SSH's CIDR, types, disk, AMI...)."""
        own_key = Path(self.key_path).parent != state.state_dir(project_dir) / "keys"
        made = self.settings or {}
        types = made.get("instance_types")
        return UpFlags.of(region=self.region, profile=self.profile,
                          spot=True if self.spot else None, idle_minutes=self.idle_minutes,
                          max_lifetime_minutes=self.max_lifetime_minutes, ssh_user=self.ssh_user,
                          ssh_key=self.key_path if own_key else None,
                          nodes=self.nodes if self.nodes > 1 else None,
                          ssh_cidr=made.get("ssh_cidr"), ami=made.get("ami"),
                          disk_gb=made.get("disk_gb"),
                          instance_type=tuple(types) if isinstance(types, list | tuple) else None)

    def replacement(self, project_dir: Path, say: Say) -> Ec2Box:
        """A stopped box started again (its disk, and what it holds, kept); else terminate
        this instance (verified) and launch another like it (see up_flags), recorded before
        it is waited on, as `up` does. A node of a cluster: the new one keeps its index,
        type, zone and placement group (a new cluster if no node is left)."""
        from infra import instances
        from infra.errors import CapacityError

        from . import ec2up

        ec2 = clients(self.region, self.profile)
        if self._stopped(ec2):
            try:
                return self.wake(project_dir, say)
            except CapacityError as exc:  # no room to start it now: a new one elsewhere
                say(f"{self.instance_id} cannot start now ({exc}); replacing it")
                instances.terminate(ec2, [self.instance_id], TERMINATE_TIMEOUT_S)
        self.retire(project_dir, say)
        if self.nodes > 1:
            return ec2up.replace_node(project_dir, self, say)
        return ec2up.up(type(self), project_dir, self.up_flags(project_dir), self, say)

    def watcher(self) -> str | None:
        """A spot box's two-minute warning becomes a checkpoint (see spotwatch.py)."""
        from . import spotwatch

        return spotwatch.script() if self.interruptible else None

    def loss_fields(self) -> dict[str, str | None]:
        return {"instance": self.instance_id, "instance_type": self.instance_type,
                "zone": self.zone}

    @classmethod
    def down_unrecorded(cls, project_dir: Path, region: str | None, profile: str | None,
                        yes: bool, ui: Ui) -> bool:
        """No box recorded: still end this project's EC2 instances, found by their tag."""
        from infra.errors import CredentialsError

        from . import config, runs

        cfg = config.load(project_dir, region=region, profile=profile)
        try:
            ec2 = clients(cfg.region, cfg.profile)
        except CredentialsError:  # no AWS here: nothing of this project can be running there
            return False
        waiting = [r.run_id for r in runs.all_runs(project_dir, ui.warn) if r.status == "running"]
        found = project_instances(ec2, project_dir)
        if found and waiting and not yes:
            ids = ", ".join(i.instance_id for i in found)
            raise UsageError(f"{ids} of this project is not recorded, and run(s) "
                             f"{', '.join(waiting)} may have results there: `dlbox up` records it "
                             "again (then `dlbox down` pulls them), `dlbox down --yes` ends it "
                             "without them")
        ended = end_project(project_dir, ec2, ui.say, [])
        if not ended:
            return False
        ui.say(f"{len(ended)} instance(s) of this project that .dlbox/state.json did not "
               "record: terminated (verified)")
        return True

    @classmethod
    def down_every_project(cls, project_dir: Path, region: str | None, profile: str | None,
                           yes: bool, ui: Ui) -> bool:
        """Every dlbox instance in the region, of every project: listed, asked, ended."""
        from . import config

        cfg = config.load(project_dir, region=region, profile=profile)
        ec2, found = every_instance(cfg.region, cfg.profile)
        if not found:
            ui.say(f"no dlbox instance is running in {cfg.region}")
            return True
        ui.say(f"dlbox instances in {cfg.region}, of every project:")
        for line in describe_for_ending(ec2, found):
            ui.say(f"  {line}")
        ui.confirm(f"Terminate these {len(found)} instance(s)?", yes,
                   f"{len(found)} instance(s) of every project would be terminated; `dlbox down "
                   "--all --yes` ends them (plain `dlbox down` ends only this project's)")
        end_all(ec2, found, cfg.region, ui.say)
        return True

    def hold_results(self, project_dir: Path) -> None:
        """On-demand: a power-off (the watchdog's) stops the box, its disk kept, instead of
        terminating it. Spot boxes cannot stop: their watchdog waits for the pull instead."""
        from infra import instances

        if not self.spot and self.instance_id:
            instances.set_shutdown_behaviour(clients(self.region, self.profile), self.instance_id,
                                             instances.SHUTDOWN_STOPS)

    def release_results(self, project_dir: Path, machine: Machine, run_id: str) -> None:
        """Once no run holds results, a power-off terminates the box again (the bill ends)."""
        from infra import instances

        held = registry.release(machine, RUNS_REGISTRY_ON_BOX, run_id)
        if not held and not self.spot and self.instance_id:
            instances.set_shutdown_behaviour(clients(self.region, self.profile), self.instance_id,
                                             instances.SHUTDOWN_TERMINATES)
