"""Frozen dataclasses that cross the infra boundary (raw boto3 dicts never leave infra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

TAG_BOX = "dlbox:box"
TAG_PROJECT = "dlbox:project"
TAG_OWNER = "dlbox:owner"
# Instances not yet terminated: they hold their security group, key pair and placement group.
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


@dataclass(frozen=True)
class Image:
    """A resolved AMI."""

    image_id: str
    name: str
    root_device_name: str
    source: str  # how it was found: "ssm:PATH", "name:PATTERN" or "id"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything run_instances needs, minus the type, zone and market being tried."""

    box: str  # the box's name, also its Name tag
    project: str
    owner: str
    image: Image
    instance_types: tuple[str, ...]
    spot: bool
    spot_fallback: bool  # on-demand when spot has no capacity anywhere
    key_name: str
    security_group_id: str
    disk_gb: int
    user_data: str
    iam_instance_profile: str | None = None
    # A cluster's instances join the cluster placement group of their zone, named
    # placement_group_in(placement_group, zone); None: no placement group (a single box).
    placement_group: str | None = None

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_BOX: self.box, TAG_PROJECT: self.project, TAG_OWNER: self.owner,
                "Name": self.box}


@dataclass(frozen=True)
class Attempt:
    """One try at launching: what was asked and what AWS answered."""

    instance_type: str
    zone: str
    market: str  # "spot" or "on-demand"
    outcome: str  # "launched" or the AWS error code


@dataclass(frozen=True)
class Instance:
    """What dlbox needs to know about one EC2 instance."""

    instance_id: str
    instance_type: str
    state: str  # pending, running, stopping, stopped, shutting-down, terminated
    zone: str
    spot: bool
    launch_time: datetime
    public_ip: str | None
    image_id: str
    tags: dict[str, str] = field(default_factory=dict)
    key_name: str | None = None
    security_group_ids: tuple[str, ...] = ()
    state_reason: str | None = None  # why it left running, in EC2's words
    state_changed_at: datetime | None = None  # when, if EC2 says ("User initiated (...)")
    placement_group: str | None = None  # the placement group it was launched in, if any

    @property
    def box(self) -> str | None:
        return self.tags.get(TAG_BOX)

    @property
    def project(self) -> str | None:
        return self.tags.get(TAG_PROJECT)


@dataclass(frozen=True)
class Launched:
    """A launch that succeeded, with every attempt it took."""

    instance: Instance
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True)
class LaunchedCluster:
    """A cluster launch that succeeded: its instances in node order (one type, one zone),
    with every attempt it took."""

    instances: tuple[Instance, ...]
    attempts: tuple[Attempt, ...]


def placement_group_in(base: str, zone: str) -> str:
    """The name of a cluster's placement group in zone (a cluster placement group lies in
    one zone: a cluster moved to another zone gets that zone's group)."""
    return f"{base}-{zone}"
