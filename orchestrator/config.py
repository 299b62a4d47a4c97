"""dlbox.toml: defaults, the file, then flags, merged into one validated frozen Config."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import environment
from .errors import UsageError
from .kinds import MAX_NODES
from .machine import printable
from .render import render

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILE = "dlbox.toml"
INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
MAX_DISK_GB = 16_384
MAX_LOGIN_TIMEOUT_S = 3600
MAX_RECOVERIES = 100
# The watchdog's limits: a week idle, a month alive (a typo of 10**10 must not reach EC2).
MAX_IDLE_MINUTES = 7 * 24 * 60
MAX_LIFETIME_MINUTES = 31 * 24 * 60
TYPE_WORDS = {int: "a whole number", bool: "true or false", list: "a list", str: "a string"}


@dataclass(frozen=True)
class Config:
    """Everything `up` needs; the defaults are dlbox's built-in choices."""

    region: str = "us-east-1"
    profile: str | None = None
    instance_types: tuple[str, ...] = ("g4dn.xlarge", "g5.xlarge")
    # Instances in the cluster (one training worker each), all of one type in one zone, in a
    # cluster placement group; 1: a single box.
    nodes: int = 1
    spot: bool = False
    spot_fallback: bool = True
    disk_gb: int = 100
    idle_minutes: int = 30
    max_lifetime_minutes: int = 720
    ssh_user: str = "ubuntu"
    ssh_port: int = 22
    ssh_cidr: str | None = None
    ssh_key: str | None = None  # your own private key (its .pub beside it) instead of dlbox's
    python: str | None = None  # an interpreter on the box with TensorFlow (skips the set-up)
    box_requirements: tuple[str, ...] | None = None  # what the box's venv gets [TF for the GPU]
    pip_args: tuple[str, ...] = ()  # extra pip flags on the box, e.g. a package mirror
    box_workdir: str = "~/dlbox"  # dlbox's folder on SSH and EC2 boxes
    # How long `up` keeps logging in to a booting EC2 box: its sshd answers before cloud-init
    # is done and may drop the first handshakes.
    login_timeout_seconds: int = 60
    # A run whose EC2 box is lost (spot reclaimed, terminated) resumes on a new box this many
    # times at most; 0: never (`dlbox attach RUN` resumes it by hand).
    max_recoveries: int = 3
    ami: str | None = None
    iam_instance_profile: str | None = None


KEYS = {f.name for f in fields(Config)}


def _check(cfg: Config, where: str) -> Config:
    def bad(key: str, why: str) -> UsageError:
        return UsageError(f"{where}: {key} {why}")

    if not REGION.match(cfg.region):
        raise bad("region", f"{cfg.region!r} is not a region name like us-east-1")
    if not cfg.instance_types or not all(INSTANCE_TYPE.match(t) for t in cfg.instance_types):
        raise bad("instance_types", f"must list instance types like \"g4dn.xlarge\" (got "
                  f"{list(cfg.instance_types)})")
    if not 1 <= cfg.nodes <= MAX_NODES:
        raise bad("nodes", f"must be 1..{MAX_NODES} (got {cfg.nodes})")
    if not 8 <= cfg.disk_gb <= MAX_DISK_GB:
        raise bad("disk_gb", f"must be 8..{MAX_DISK_GB} (got {cfg.disk_gb})")
    for key, most in (("idle_minutes", MAX_IDLE_MINUTES),
                      ("max_lifetime_minutes", MAX_LIFETIME_MINUTES)):
        if not 0 <= getattr(cfg, key) <= most:
            raise bad(key, f"must be 0 (off) to {most} (got {getattr(cfg, key)})")
    if not 1 <= cfg.login_timeout_seconds <= MAX_LOGIN_TIMEOUT_S:
        raise bad("login_timeout_seconds", f"must be 1..{MAX_LOGIN_TIMEOUT_S} (got "
                  f"{cfg.login_timeout_seconds})")
    if not 0 <= cfg.max_recoveries <= MAX_RECOVERIES:
        raise bad("max_recoveries", f"must be 0..{MAX_RECOVERIES} (got {cfg.max_recoveries})")
    if not 1 <= cfg.ssh_port <= 65535:
        raise bad("ssh_port", f"must be 1..65535 (got {cfg.ssh_port})")
    if not re.match(r"^[a-z_][a-z0-9_-]*$", cfg.ssh_user):
        raise bad("ssh_user", f"{cfg.ssh_user!r} is not a user name")
    # Paths that reach the box: checked here, before anything is launched.
    environment.check_plain(cfg.box_workdir, cfg.box_workdir)
    if cfg.python is not None and printable(cfg.python) != cfg.python:
        raise bad("python", f"{printable(cfg.python)!r} has a control character or a byte that "
                  "is not UTF-8; name a plainer path")
    return cfg


def _coerce(key: str, value, where: str):
    """The file's value as the field's type, or a UsageError naming the key."""
    default = getattr(Config(), key)
    expected = {"instance_types": list, "box_requirements": list, "pip_args": list, "spot": bool,
                "spot_fallback": bool}.get(key)
    if expected is None:
        expected = int if isinstance(default, int) and not isinstance(default, bool) else str
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise UsageError(f"{where}: {key} must be {TYPE_WORDS[expected]} (got {value!r})")
    if expected is list:
        if not all(isinstance(t, str) for t in value):
            raise UsageError(f"{where}: {key} must be a list of strings")
        return tuple(value)
    if expected is str and value == "":
        return None
    return value


def recorded(data: dict, where: str) -> Config:
    """The configuration a box was made with, as its record keeps it (see Ec2Box.settings)."""
    from . import records

    try:
        cfg = records.build(Config, data)
    except ValueError as exc:
        raise UsageError(f"{where}: the settings the box was made with are damaged ({exc}); "
                         "restore it, or `dlbox down` and `dlbox up` again") from exc
    return _check(cfg, where)


def with_flags(cfg: Config, **flags) -> Config:
    """cfg with the flags that were given (not None) over it, checked."""
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in flags.items() if v is not None}
    return _check(replace(cfg, **given), "command line")


def load(project_dir: Path, **flags) -> Config:
    """Defaults, then dlbox.toml if present, then the flags that were given (not None)."""
    cfg = Config()
    path = project_dir / CONFIG_FILE
    if path.exists():
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"{where}: cannot read it ({exc.strerror})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{where}: not valid TOML ({exc}); fix it or run `dlbox init --force`") \
                from exc
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}; valid keys: "
                             + ", ".join(sorted(KEYS)))
        cfg = _check(replace(cfg, **{k: _coerce(k, v, where) for k, v in data.items()}), where)
    return with_flags(cfg, **flags)


def write_default(project_dir: Path, force: bool = False) -> Path:
    """Write a commented dlbox.toml with the built-in defaults."""
    path = project_dir / CONFIG_FILE
    if path.exists() and not force:
        raise UsageError(f"{path} exists; edit it, or pass --force to overwrite it")
    d = Config()
    path.write_text(render(
        "dlbox.toml.j2", region=d.region, instance_types=list(d.instance_types), spot=d.spot,
        spot_fallback=d.spot_fallback, disk_gb=d.disk_gb, idle_minutes=d.idle_minutes,
        max_lifetime_minutes=d.max_lifetime_minutes, ssh_user=d.ssh_user, ssh_port=d.ssh_port,
    ))
    return path
