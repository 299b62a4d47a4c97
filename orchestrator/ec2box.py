"""The EC2 box: a GPU instance dlbox launched (see ec2up.py), its status from AWS, its end."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

from . import hostkeys, sshtarget, state
from .boxes import Box, DownFlags, Say, UpFlags
from .errors import DlboxError, UsageError
from .humanize import duration
from .machine import Machine
from .sshmachine import SshMachine
from .sshtarget import SshTarget

TERMINATE_TIMEOUT_S = 600
BOX_STATE_DIR_ON_BOX = "/var/lib/dlbox"  # made by the user data; the watchdog's state
RUNS_REGISTRY_ON_BOX = f"{BOX_STATE_DIR_ON_BOX}/active"  # runs announce themselves here
EC2_UP_FLAGS = frozenset({"region", "profile", "instance_type", "spot", "disk_gb", "idle_minutes",
                          "max_lifetime_minutes", "ssh_cidr", "ssh_user", "ssh_key", "ami",
                          "python", "workdir"})


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

    DESCRIPTION: ClassVar[str] = "EC2 boxes"
    INTERRUPTED_UP: ClassVar[str] = ("a box launched before the interrupt is recorded in "
                                     ".dlbox/state.json: `dlbox up` keeps waiting for it, "
                                     "`dlbox down` terminates it")
    UP_FLAGS: ClassVar[frozenset[str]] = EC2_UP_FLAGS
    DOWN_FLAGS: ClassVar[frozenset[str]] = frozenset({"profile"})

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> Ec2Box:
        from . import ec2up

        return ec2up.up(project_dir, flags, existing, say)

    @property
    def label(self) -> str:
        return f"the EC2 box {self.name} ({self.instance_id or 'launch in flight'})"

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
            ("box", self.name),
            ("instance", self.instance_id or "launch in flight"),
            ("type", f"{self.instance_type or '?'} ({'spot' if self.spot else 'on-demand'}) "
                     f"in {self.zone or '?'}"),
            ("state", state_now),
            ("address", f"{inst.public_ip}:{self.ssh_port}" if inst and inst.public_ip else "-"),
            ("uptime", duration(uptime)),
            ("cost so far", f"${spent:.2f} at ${self.usd_per_hour:.3f}/h" if spent is not None
             else "unknown"),
            ("watchdog", self._watchdog_line(inst)),
        ]
        if state_now in ("shutting-down", "terminated", "gone", "stopped"):
            rows.append(("note", "the box has stopped (the watchdog or AWS ended it); "
                                 "`dlbox down` cleans up"))
        return rows

    def _watchdog_line(self, inst) -> str:
        parts = []
        if self.idle_minutes:
            parts.append(f"powers off after {self.idle_minutes} idle minutes")
        if self.max_lifetime_minutes and inst is not None:
            ends = inst.launch_time + timedelta(minutes=self.max_lifetime_minutes)
            left = (ends - datetime.now(timezone.utc)).total_seconds()
            parts.append(f"at the latest at {ends:%Y-%m-%d %H:%M} UTC (in {duration(max(0.0, left))})")
        return "; ".join(parts) or "off (the box runs until `dlbox down`)"

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """Terminate the instance (verified), delete the key pair and group dlbox made, forget it."""
        from infra import instances
        from infra.prices import cost

        ec2 = clients(self.region, flags.profile or self.profile)
        ids = [self.instance_id] if self.instance_id else []
        ids += [i.instance_id for i in instances.find(ec2, box=self.name) if i.instance_id not in ids]
        launched = [found for i in ids if (found := instances.describe(ec2, i)) is not None]
        say("terminating " + ", ".join(ids) + "..." if ids else f"box {self.name} never launched")
        instances.terminate(ec2, ids, TERMINATE_TIMEOUT_S)
        still = [i.instance_id for i in instances.find(ec2, box=self.name) if i.state != "terminated"]
        if still:
            raise DlboxError(f"{', '.join(still)} still running; run `dlbox down` again")
        for inst in launched:
            say(f"{inst.instance_id} terminated")
        try:
            forget(project_dir, ec2, self)
        except Exception as exc:
            raise DlboxError(f"{', '.join(ids) or self.name} terminated (verified), but cleaning "
                             f"up after it failed ({exc}); run `dlbox down` again to delete its "
                             "key pair and group") from exc
        if launched:
            seconds = (datetime.now(timezone.utc) - launched[0].launch_time).total_seconds()
            total = cost(self.usd_per_hour, seconds)
            if total is not None:
                say(f"box terminated; it cost about ${total:.2f}")


def clients(region: str, profile: str | None):
    """An EC2 client; no credentials or an unknown region fail here, before any network call."""
    from infra import aws  # boto3 is imported only when a command needs AWS

    return aws.client(aws.session(region, profile), "ec2")


def ssm_client(region: str, profile: str | None):
    from infra import aws

    return aws.client(aws.session(region, profile), "ssm")


def project_name(project_dir: Path) -> str:
    """The folder's name plus a hash of its path: two checkouts never share AWS resources."""
    path = project_dir.resolve()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.name)[:32]
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def forget(project_dir: Path, ec2, box: Ec2Box) -> None:
    """Delete the box's group and key pair (both dlbox's own), its pinned keys and its record."""
    from infra import network

    network.delete_security_group(ec2, box.security_group_id)
    network.delete_key_pair(ec2, box.key_name)
    if box.host:  # its address may go to another box tomorrow
        target = box.ssh_target(project_dir)
        hostkeys.forget(Path(target.known_hosts), {target.known_hosts_name})
    state.remove(project_dir, box.name)
    sshtarget.remove_config(state.state_dir(project_dir))


def down_all(region: str, profile: str | None, say: Say) -> int:
    """Terminate every dlbox-tagged instance in the region, even with .dlbox/ gone."""
    from infra import instances, network

    ec2 = clients(region, profile)
    found = instances.find(ec2)
    for inst in found:
        say(f"terminating {inst.instance_id} ({inst.box}, {inst.instance_type}, {inst.state})")
    instances.terminate(ec2, [i.instance_id for i in found], TERMINATE_TIMEOUT_S)
    for group_id in network.tagged_security_groups(ec2):
        network.delete_security_group(ec2, group_id)
    for key_name in network.tagged_key_pairs(ec2):
        network.delete_key_pair(ec2, key_name)
    say(f"{len(found)} dlbox instance(s) terminated in {region}")
    return len(found)

