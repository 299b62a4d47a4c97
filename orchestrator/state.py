"""The project's local state in .dlbox/state.json, always written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UsageError

STATE_DIR = ".dlbox"
STATE_FILE = "state.json"
STATE_VERSION = 1
KNOWN_HOSTS_FILE = "known_hosts"  # pinned host keys of this project's boxes, under .dlbox/


@dataclass(frozen=True)
class Box:
    """The project's box. An EC2 box is recorded before run_instances returns."""

    kind: str  # "ec2"
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


@dataclass(frozen=True)
class LocalBox:
    """This machine as the box: runs live under workdir, the trainer runs with python."""

    kind: str  # "local"
    name: str
    workdir: str
    python: str


@dataclass(frozen=True)
class SshBox:
    """A machine the user already has, reached over SSH (its host key pinned at `up`)."""

    kind: str  # "ssh"
    name: str  # user@host:port
    host: str
    port: int
    user: str
    key_path: str
    workdir: str  # absolute, on the box
    python: str  # on the box, with TensorFlow


KINDS = {"local": LocalBox, "ssh": SshBox, "ec2": Box}
AnyBox = Box | LocalBox | SshBox


def state_dir(project_dir: Path) -> Path:
    return project_dir / STATE_DIR


def load_box(project_dir: Path) -> AnyBox | None:
    path = state_dir(project_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text()).get("box")
        if not data:
            return None
        cls = KINDS[data.get("kind", "ec2")]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise UsageError(f"{path} is damaged ({exc}); `dlbox down --all` finds the project's "
                         "boxes by their tags, then delete the file") from exc


def save_box(project_dir: Path, box: AnyBox | None) -> None:
    """Replace the state file in one rename: a crash leaves the old or the new one."""
    directory = state_dir(project_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": STATE_VERSION, "box": asdict(box) if box else None},
                              indent=2) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the instance id must survive a power cut, not only a Ctrl-C
    os.replace(tmp, path)
