"""What the EC2 kind asks of AWS and of the project's records, beside its boxes: clients,
the project's instances, ending them (verified), forgetting a box."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

from . import debuglog, hostkeys, sshtarget, state
from .boxkind import Box, Say
from .errors import DlboxError
from .humanize import duration

TERMINATE_TIMEOUT_S = 600
# Instances that are (or can be again) a box; shutting-down and terminated ones are gone.
KEEPABLE_STATES = ("pending", "running", "stopping", "stopped")
BOX_STATE_DIR_ON_BOX = "/var/lib/dlbox"  # made by the user data; the watchdog's state
RUNS_REGISTRY_ON_BOX = f"{BOX_STATE_DIR_ON_BOX}/active"  # runs announce themselves here


def cost_so_far(inst, usd_per_hour: float | None) -> float | None:
    from infra.prices import cost

    return cost(usd_per_hour, (datetime.now(timezone.utc) - inst.launch_time).total_seconds())


def project_instances(ec2, project_dir: Path) -> list:
    """The project's instances that are not ending, found by their project tag."""
    from infra import instances

    return instances.find(ec2, project=project_name(project_dir), states=KEEPABLE_STATES)


def end_project(project_dir: Path, ec2, say: Say, ids: list[str], box: str | None = None,
                whole_project: bool = True) -> list:
    """Terminate ids and every instance tagged with the project (whole_project) or box,
    verified; return the instances that were live. The project's key pair, group and
    placement groups go once nothing uses them."""
    from infra import instances, network

    project = project_name(project_dir)
    live = {i.instance_id: i for i in instances.find(ec2, project=project)} if whole_project \
        else {}
    if box is not None:
        live |= {i.instance_id: i for i in instances.find(ec2, box=box)}
    for instance_id in ids:  # recorded, maybe untagged yet, or unknown to EC2 for a few seconds
        if instance_id not in live and (inst := instances.describe(ec2, instance_id)) is not None \
                and inst.state != "terminated":
            live[instance_id] = inst
    targets = list(dict.fromkeys([*ids, *live]))
    if targets:
        say("terminating " + ", ".join(f"{i} ({live[i].state})" if i in live else i
                                       for i in targets) + "...")
    instances.terminate(ec2, targets, TERMINATE_TIMEOUT_S)
    still = [i.instance_id for i in instances.find(ec2, project=project) if i.state != "terminated"
             and (whole_project or i.instance_id in targets)]
    if still:
        raise DlboxError(f"{', '.join(still)} still running; run `dlbox down` again")
    network.release_unused(ec2, project)
    return list(live.values())


def clients(region: str, profile: str | None):
    """An EC2 client; no credentials or an unknown region fail here, before any network call."""
    return _client(region, profile, "ec2")


def ssm_client(region: str, profile: str | None):
    return _client(region, profile, "ssm")


def _client(region: str, profile: str | None, service: str):
    """A client whose calls the debug log sees (with --verbose)."""
    from infra import aws  # boto3 is imported only when a command needs AWS

    session = aws.session(region, profile)
    debuglog.watch_aws(session)
    return aws.client(session, service)


def project_name(project_dir: Path) -> str:
    """The folder's name plus a hash of its path: two checkouts never share AWS resources."""
    path = project_dir.resolve()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.name)[:32]
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def forget(project_dir: Path, ec2, box: Box) -> None:
    """Delete the box's group, key pair and placement group unless another instance still
    uses them, then forget the box (forget_node)."""
    from infra import network

    network.release_unused(ec2, project_name(project_dir), (box.security_group_id,),
                           (box.key_name,), (box.placement_group,) if box.placement_group else ())
    forget_node(project_dir, box)


def forget_node(project_dir: Path, box: Box) -> None:
    """The box's pinned keys and its record (and, for a chief, .dlbox/ssh_config)."""
    if box.host:  # its address may go to another box tomorrow
        target = box.ssh_target(project_dir)
        hostkeys.forget(Path(target.known_hosts), {target.known_hosts_name})
    state.remove(project_dir, box.name)
    if box.node == 0:
        sshtarget.remove_config(state.state_dir(project_dir))


def every_instance(region: str, profile: str | None) -> tuple[object, list]:
    """(an EC2 client, every dlbox instance in the region, of every project)."""
    from infra import instances

    ec2 = clients(region, profile)
    return ec2, instances.find(ec2)


def describe_for_ending(ec2, found: list) -> list[str]:
    """One line per instance: id, project, state, age and what it cost so far."""
    from infra.prices import AwsPrices

    prices = AwsPrices(ec2)
    lines = []
    for inst in found:
        age = (datetime.now(timezone.utc) - inst.launch_time).total_seconds()
        spent = cost_so_far(inst, prices.hourly(inst.instance_type, inst.zone, inst.spot))
        lines.append(f"{inst.instance_id}  project {inst.project or '?'}  {inst.instance_type} "
                     f"{inst.state}  up {duration(age)}  "
                     + (f"about ${spent:.2f} so far" if spent is not None else "cost unknown"))
    return lines


def end_all(ec2, found: list, region: str, say: Say) -> None:
    """Terminate the instances listed (verified); delete dlbox's groups and key pairs that
    nothing uses any more."""
    from infra import instances, network

    instances.terminate(ec2, [i.instance_id for i in found], TERMINATE_TIMEOUT_S)
    network.release_unused(ec2, None)
    say(f"{len(found)} dlbox instance(s) terminated in {region}")
