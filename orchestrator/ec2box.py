"""An EC2 box: `up` (provision or reuse), `status`, `down` (terminate, verified)."""

from __future__ import annotations

import getpass
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import keys, myip, netwait, state
from .config import Config
from .errors import DlboxError
from .render import render

Say = Callable[[str], None]

RUNNING_TIMEOUT_S = 600  # pending -> running; a GPU instance usually takes 15-60 s
TERMINATE_TIMEOUT_S = 600
GROUP_DELETE_ATTEMPTS = 8  # a terminated instance's network interface lingers for a while
GROUP_DELETE_FIRST_DELAY_S = 2.0
BOX_STATE_DIR_ON_BOX = "/var/lib/dlbox"
SSH_CONFIG_FILE = "ssh_config"
SSH_HOST_ALIAS = "dlbox"


@dataclass(frozen=True)
class Status:
    """What `dlbox status` shows, read from AWS."""

    box: state.Box
    state: str
    public_ip: str | None
    uptime_seconds: float
    cost_usd: float | None
    lifetime_ends_at: datetime | None


def _clients(region: str, profile: str | None):
    from infra import aws  # boto3 is imported only when a command needs AWS

    sess = aws.session(region, profile)
    return aws.client(sess, "ec2"), aws.client(sess, "ssm")


def project_name(project_dir: Path) -> str:
    """The folder's name plus a hash of its path: two checkouts never share AWS resources."""
    path = project_dir.resolve()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.name)[:32]
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def user_data(cfg: Config) -> str:
    """The cloud-init script: installs the watchdog timer."""
    watchdog = render(
        "watchdog.sh.j2", state_dir=BOX_STATE_DIR_ON_BOX, idle_seconds=cfg.idle_minutes * 60,
        max_lifetime_seconds=cfg.max_lifetime_minutes * 60, ssh_port=cfg.ssh_port,
        poweroff_command="systemctl poweroff",
    )
    return render("user_data.sh.j2", state_dir=BOX_STATE_DIR_ON_BOX, watchdog=watchdog.rstrip())


def write_ssh_config(project_dir: Path, box: state.Box) -> Path:
    """.dlbox/ssh_config with a `dlbox` alias: `ssh -F .dlbox/ssh_config dlbox` (and VS Code)."""
    d = state.state_dir(project_dir).resolve()
    path = d / SSH_CONFIG_FILE
    path.write_text(
        f"Host {SSH_HOST_ALIAS}\n"
        f"    HostName {box.host}\n"
        f"    User {box.ssh_user}\n"
        f"    Port {box.ssh_port}\n"
        f'    IdentityFile "{box.key_path}"\n'
        "    IdentitiesOnly yes\n"
        f'    UserKnownHostsFile "{d / state.KNOWN_HOSTS_FILE}"\n'
        # Keyed by instance, not by IP: a recycled address is not mistaken for the old box.
        f"    HostKeyAlias {box.instance_id}\n"
        # The first connection pins the box's key in .dlbox/known_hosts; a change is refused.
        "    StrictHostKeyChecking accept-new\n"
        "    ServerAliveInterval 30\n"
    )
    return path


def up(project_dir: Path, cfg: Config, say: Say, prices=None) -> state.Box:
    """Reuse the project's box if it lives, else launch one; return it once SSH answers."""
    box = state.load_box(project_dir)
    if isinstance(box, state.LocalBox):
        raise DlboxError("this project's box is the local one; run `dlbox down` first")
    if box is not None and box.region != cfg.region:
        raise DlboxError(f"this project's box is in {box.region}; run `dlbox down` first to "
                         f"start one in {cfg.region}")
    if box is not None:
        ec2, _ = _clients(box.region, box.profile)
        live = _live_instance(ec2, box)
        if live is not None:
            from infra import network

            say(f"reusing box {box.name} ({live.instance_id}, {live.state})")
            # Your address may have changed since the box was launched: open SSH to today's.
            network.ensure_security_group(ec2, f"dlbox-{project_name(project_dir)}",
                                          cfg.ssh_cidr or myip.public_cidr(), box.ssh_port,
                                          _tags(project_dir))
            return _wait_ready(project_dir, ec2, replace(box, instance_id=live.instance_id), cfg,
                               say, launched_now=False)
        say(f"box {box.name} is gone; launching a new one")
        _cleanup(project_dir, ec2, box)
    return _launch(project_dir, cfg, say, prices)


def _live_instance(ec2, box: state.Box):
    """The box's instance if it is pending or running: by id, else by its tags."""
    from infra import instances

    found = instances.describe(ec2, box.instance_id) if box.instance_id else None
    if found is None:
        tagged = instances.find(ec2, box=box.name)
        found = tagged[0] if tagged else None
    if found is not None and found.state in ("pending", "running"):
        return found
    return None


def _tags(project_dir: Path) -> dict[str, str]:
    from infra.models import TAG_OWNER, TAG_PROJECT

    return {TAG_PROJECT: project_name(project_dir), TAG_OWNER: getpass.getuser()}


def _launch(project_dir: Path, cfg: Config, say: Say, prices) -> state.Box:
    from infra import ami, instances, network
    from infra.errors import InfraError
    from infra.models import LaunchSpec
    from infra.prices import AwsPrices

    ec2, ssm = _clients(cfg.region, cfg.profile)
    project = project_name(project_dir)
    owner = getpass.getuser()
    name = f"dlbox-{project}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    cidr = cfg.ssh_cidr or myip.public_cidr()
    image = ami.resolve(ec2, ssm, cfg.ami)
    say(f"AMI {image.image_id} ({image.name or image.source})")
    if cfg.ssh_key:
        key_path, public_key = keys.own(cfg.ssh_key)
    else:
        key_path, public_key = keys.ensure(state.state_dir(project_dir) / "keys")
    tags = _tags(project_dir)
    key_name = f"dlbox-{project}-{keys.fingerprint(public_key)}"
    network.ensure_key_pair(ec2, key_name, public_key, tags)
    try:
        group_id, _ = network.ensure_security_group(ec2, f"dlbox-{project}", cidr, cfg.ssh_port, tags)
    except InfraError:
        network.delete_key_pair(ec2, key_name)
        raise
    say(f"SSH open to {cidr} only (security group {group_id})")
    box = state.Box(
        kind="ec2", name=name, region=cfg.region, profile=cfg.profile, key_name=key_name,
        key_path=str(key_path.resolve()), security_group_id=group_id,
        ssh_user=cfg.ssh_user, ssh_port=cfg.ssh_port,
        idle_minutes=cfg.idle_minutes, max_lifetime_minutes=cfg.max_lifetime_minutes,
    )
    state.save_box(project_dir, box)  # before launching: `down` can find the box by its tag
    spec = LaunchSpec(
        box=name, project=project, owner=owner, image=image, instance_types=cfg.instance_types,
        spot=cfg.spot, spot_fallback=cfg.spot_fallback, key_name=key_name,
        security_group_id=group_id, disk_gb=cfg.disk_gb, user_data=user_data(cfg),
        iam_instance_profile=cfg.iam_instance_profile,
    )

    def record(instance_id: str) -> None:
        state.save_box(project_dir, replace(box, instance_id=instance_id))

    try:
        launched = instances.launch(ec2, spec, on_launched=record)
    except InfraError:
        _cleanup(project_dir, ec2, box)  # nothing runs: remove the key and group we made
        raise
    for attempt in launched.attempts[:-1]:
        say(f"no {attempt.market} {attempt.instance_type} in {attempt.zone} "
            f"({attempt.outcome}); trying the next")
    inst = launched.instance
    usd = (prices or AwsPrices(ec2)).hourly(inst.instance_type, inst.zone, inst.spot)
    box = replace(box, instance_id=inst.instance_id, instance_type=inst.instance_type,
                  zone=inst.zone, spot=inst.spot, usd_per_hour=usd)
    state.save_box(project_dir, box)
    market = "spot" if inst.spot else "on-demand"
    price = f"${usd:.3f}/h" if usd is not None else "price unknown"
    say(f"launched {inst.instance_id}: {market} {inst.instance_type} in {inst.zone}, {price}")
    return _wait_ready(project_dir, ec2, box, cfg, say, launched_now=True)


def _log_in(project_dir: Path, ec2, box: state.Box, cfg: Config, say: Say) -> state.Box:
    """First SSH login: pin the host key (checked against the console's fingerprints when
    the console shows them), make dlbox's folder, check the Python that will train."""
    from infra import instances

    from .boxes import ready_python
    from .machines import SshMachine, console_fingerprints

    expected = console_fingerprints(instances.console_output(ec2, box.instance_id))
    machine = SshMachine(box.host, box.ssh_port, box.ssh_user, box.key_path,
                         state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE, pin_new_host=True,
                         expected_fingerprints=expected or None)
    try:
        made = machine.run(f"mkdir -p {cfg.box_workdir} && cd {cfg.box_workdir} && pwd")
        if made.exit_code != 0:
            raise DlboxError(f"cannot create {cfg.box_workdir} on the box: {made.stderr.strip()}")
        box = replace(box, workdir=made.stdout.strip())
        python, versions = ready_python(machine, box.workdir, cfg.python or box.python, say,
                                        cfg.box_requirements, cfg.pip_args)
        say(f"box Python: {versions}")
        box = replace(box, python=python)
    finally:
        machine.close()
    say("host key " + ("checked against the console output and " if expected else "")
        + f"pinned in .dlbox/{state.KNOWN_HOSTS_FILE}")
    state.save_box(project_dir, box)
    return box


def _wait_ready(project_dir: Path, ec2, box: state.Box, cfg: Config, say: Say,
                launched_now: bool) -> state.Box:
    """Wait for running and an SSH banner; a box launched now that never gets there is
    terminated (a reused one may be busy training: it is left alone)."""
    from infra import instances
    from infra.errors import WaitTimeout

    try:
        inst = instances.wait_running(ec2, box.instance_id, RUNNING_TIMEOUT_S)
        if not inst.public_ip:
            raise DlboxError(f"{inst.instance_id} has no public IP; the default subnet must "
                             "assign public addresses")
        box = replace(box, host=inst.public_ip)
        state.save_box(project_dir, box)
        banner = netwait.wait_for_ssh(inst.public_ip, box.ssh_port)
        box = _log_in(project_dir, ec2, box, cfg, say)
    except (WaitTimeout, DlboxError) as exc:
        if not launched_now:
            raise
        say(f"{box.instance_id} did not become reachable ({exc}); terminating it")
        down(project_dir, say)
        raise
    write_ssh_config(project_dir, box)
    say(f"box {box.name} is up at {box.host}:{box.ssh_port} ({banner}); "
        f"`dlbox ssh` or `ssh -F .dlbox/ssh_config {SSH_HOST_ALIAS}`")
    return box


def status(project_dir: Path) -> Status | None:
    """The project's box as AWS sees it now, or None if there is none."""
    from infra import instances
    from infra.prices import cost

    box = state.load_box(project_dir)
    if box is None:
        return None
    ec2, _ = _clients(box.region, box.profile)
    inst = instances.describe(ec2, box.instance_id) if box.instance_id else None
    if inst is None:
        return Status(box, "unknown" if box.instance_id is None else "gone", None, 0.0, None, None)
    uptime = (datetime.now(timezone.utc) - inst.launch_time).total_seconds()
    if inst.state == "terminated":
        uptime = 0.0
    ends = None
    if box.max_lifetime_minutes:
        ends = inst.launch_time + timedelta(minutes=box.max_lifetime_minutes)
    return Status(box, inst.state, inst.public_ip, uptime, cost(box.usd_per_hour, uptime), ends)


def down(project_dir: Path, say: Say, profile: str | None = None) -> float | None:
    """Terminate the project's box (verified), delete what dlbox made; return the cost.

    profile overrides the one recorded at `up` (say it was renamed since)."""
    from infra import instances
    from infra.prices import cost

    box = state.load_box(project_dir)
    if isinstance(box, state.LocalBox):
        raise DlboxError("this project's box is the local one")
    if box is None:
        say("no box is up in this project")
        return None
    ec2, _ = _clients(box.region, profile or box.profile)
    ids = [box.instance_id] if box.instance_id else []
    ids += [i.instance_id for i in instances.find(ec2, box=box.name) if i.instance_id not in ids]
    launched = [instances.describe(ec2, i) for i in ids]
    say("terminating " + ", ".join(ids) + "..." if ids else f"box {box.name} never launched")
    instances.terminate(ec2, ids, TERMINATE_TIMEOUT_S)
    still = [i.instance_id for i in instances.find(ec2, box=box.name) if i.state != "terminated"]
    if still:
        raise DlboxError(f"{', '.join(still)} still running; run `dlbox down` again")
    for inst in launched:
        if inst is not None:
            say(f"{inst.instance_id} terminated")
    total = None
    if launched and launched[0] is not None:
        seconds = (datetime.now(timezone.utc) - launched[0].launch_time).total_seconds()
        total = cost(box.usd_per_hour, seconds)
    _cleanup(project_dir, ec2, box)
    return total


def _cleanup(project_dir: Path, ec2, box: state.Box) -> None:
    """Delete the project's group and key pair (both dlbox's own), then forget the box."""
    from infra import network

    _delete_group(ec2, box.security_group_id)
    network.delete_key_pair(ec2, box.key_name)
    _forget_host_keys(project_dir, box)
    state.save_box(project_dir, None)
    (state.state_dir(project_dir) / SSH_CONFIG_FILE).unlink(missing_ok=True)


def _forget_host_keys(project_dir: Path, box: state.Box) -> None:
    """Drop the box's pinned keys: its address may go to another box tomorrow."""
    path = state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE
    if not path.exists() or not box.host:
        return
    names = {box.instance_id, box.host, f"[{box.host}]:{box.ssh_port}"}
    kept = [line for line in path.read_text().splitlines()
            if not set(line.split(" ", 1)[0].split(",")) & names]
    path.write_text("".join(f"{line}\n" for line in kept))


def _delete_group(ec2, group_id: str) -> None:
    """Delete the group, retrying while the terminated instance's interface detaches."""
    from infra import network
    from infra.errors import InfraError

    delay = GROUP_DELETE_FIRST_DELAY_S
    for attempt in range(GROUP_DELETE_ATTEMPTS):
        try:
            network.delete_security_group(ec2, group_id)
            return
        except InfraError as exc:
            if "DependencyViolation" not in str(exc) or attempt == GROUP_DELETE_ATTEMPTS - 1:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay *= 2


def down_all(region: str, profile: str | None, say: Say) -> int:
    """Terminate every dlbox-tagged instance in the region, even with .dlbox/ gone."""
    from infra import instances, network

    ec2, _ = _clients(region, profile)
    found = instances.find(ec2)
    for inst in found:
        say(f"terminating {inst.instance_id} ({inst.box}, {inst.instance_type}, {inst.state})")
    instances.terminate(ec2, [i.instance_id for i in found], TERMINATE_TIMEOUT_S)
    for group_id in network.tagged_security_groups(ec2):
        _delete_group(ec2, group_id)
    for key_name in network.tagged_key_pairs(ec2):
        network.delete_key_pair(ec2, key_name)
    say(f"{len(found)} dlbox instance(s) terminated in {region}")
    return len(found)
