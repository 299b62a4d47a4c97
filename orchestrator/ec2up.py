"""`dlbox up` on EC2: reuse the project's instances or launch them, wait for SSH, prepare them.

A single box is one instance. A cluster (--nodes N) is N instances of one type in one zone,
in that zone's cluster placement group, recorded as nodes 0 (the chief) to N-1; its group
lets them reach each other on every port, and each node's `address` is where they do.

Every node is recorded before run_instances is called for it. After run_instances answers,
every path ends in one of two states, and says which: the boxes recorded in
.dlbox/state.json (usable by `dlbox up` and `dlbox down`), or their instances terminated,
verified, because they never became usable.
"""

from __future__ import annotations

import getpass
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from . import (
    config,
    environment,
    hostkeys,
    keys,
    myip,
    netwait,
    parallel,
    registry,
    sshtarget,
    state,
    watchdog,
    workdir,
)
from .boxkind import Box, DownFlags, Say, UpFlags
from .ec2aws import (
    BOX_STATE_DIR_ON_BOX,
    KEEPABLE_STATES,
    RUNS_REGISTRY_ON_BOX,
    clients,
    forget,
    forget_node,
    project_instances,
    project_name,
    ssm_client,
)
from .errors import DlboxError, NeverUsable, UsageError
from .nodes import of_kind
from .render import render
from .sshmachine import SshMachine, own_address

RUNNING_TIMEOUT_S = 600  # pending -> running; a GPU instance usually takes 15-60 s
CLOUD_INIT_TIMEOUT_S = 300  # the user data (watchdog, run registry) done before the first run
# Waits for cloud-init where there is one (a DLAMI); elsewhere nothing to wait for.
CLOUD_INIT_WAIT = ("command -v cloud-init >/dev/null || exit 0; "
                   "cloud-init status --wait >/dev/null 2>&1; exit 0")


_SAY = threading.Lock()  # nodes made ready at once say one line at a time


@dataclass(frozen=True)
class _Like:
    """What a cluster's new node copies from its cluster: one type, one zone, one AMI."""

    instance_type: str
    zone: str
    image_id: str | None  # None: dlbox.toml's AMI


# The instance's purchasing option from IMDSv2 (spot boxes cannot stop, only terminate).
MARKET_COMMAND = ("token=$(curl -sf -m 2 -X PUT http://169.254.169.254/latest/api/token "
                  "-H 'X-aws-ec2-metadata-token-ttl-seconds: 60') && curl -sf -m 2 "
                  "-H \"X-aws-ec2-metadata-token: $token\" "
                  "http://169.254.169.254/latest/meta-data/instance-life-cycle")


def watchdog_script(cfg: config.Config, market_command: str = MARKET_COMMAND,
                    poweroff_command: str = "systemctl poweroff") -> str:
    """The watchdog the user data installs as /usr/local/sbin/dlbox-watchdog."""
    return render(
        "watchdog.sh.j2", state_dir=BOX_STATE_DIR_ON_BOX, registry=RUNS_REGISTRY_ON_BOX,
        idle_seconds=cfg.idle_minutes * 60, max_lifetime_seconds=cfg.max_lifetime_minutes * 60,
        ssh_port=cfg.ssh_port, poweroff_command=poweroff_command, market_command=market_command)


def user_data(cfg: config.Config) -> str:
    """The cloud-init script: installs the watchdog timer."""
    return render("user_data.sh.j2", state_dir=BOX_STATE_DIR_ON_BOX, registry=RUNS_REGISTRY_ON_BOX,
                  unpulled=registry.unpulled_dir(RUNS_REGISTRY_ON_BOX),
                  watchdog=watchdog_script(cfg).rstrip())


def up(kind: type[Box], project_dir: Path, flags: UpFlags, existing: Box | None, say: Say
       ) -> Box:
    """Reuse the project's box (running, or stopped: started again) or launch one; return it
    once it can train. The caller holds the project's box lock. A cluster: every node
    reused, a node that is gone made again like the others, or all launched; the chief
    is returned. kind: the class of the boxes made (Box).

    The project's instances are looked up by their tag first, so an instance the state file
    lost is reused or named, never doubled. Local checks come first (dlbox.toml, region,
    credentials), then the network.
    """
    cfg = _config(project_dir, flags, existing)
    nodes = existing.nodes if existing is not None and flags.nodes is None else cfg.nodes
    if existing is not None and existing.nodes != nodes:
        what = existing.label if existing.nodes == 1 else f"a cluster of {existing.nodes} nodes"
        raise UsageError(f"this project's box is {what}; `dlbox down` first to make "
                         + ("a single box" if nodes == 1 else f"a cluster of {nodes}"))
    if existing is not None and existing.region != cfg.region:
        raise UsageError(f"this project's box is in {existing.region}; `dlbox down` first to "
                         f"start one in {cfg.region}")
    # Paths OpenSSH cannot take are refused now, not after a launch.
    sshtarget.check_paths(cfg.ssh_key or str(state.state_dir(project_dir) / "keys"),
                          state.known_hosts(project_dir))
    # The account the box lives in, unless told otherwise: a plain `up` after
    # `up --profile work` must find it, not launch a second one elsewhere.
    ec2 = clients(cfg.region, flags.profile or (existing.profile if existing else cfg.profile))
    mates = _nodes_of(project_dir, existing)
    mine = {b.node: inst for b in mates if (inst := _instance_of(ec2, b)) is not None}
    known = {i.instance_id for i in mine.values()}
    others = [i for i in project_instances(ec2, project_dir) if i.instance_id not in known]
    if others and (existing is not None or len(others) > 1 or nodes > 1):
        listed = ", ".join(f"{i.instance_id} ({i.state})" for i in others)
        where = ("which .dlbox/state.json does not record" if existing is None and nodes > 1
                 else "besides " + ("one another" if existing is None else existing.label
                                    if existing.nodes == 1 else "the nodes of its cluster"))
        raise UsageError(f"this project has instance(s) {listed} {where}; `dlbox down` ends "
                         "all of them, then `dlbox up` starts " + ("one" if nodes == 1 else
                                                                    "the cluster"))
    if others:
        reused = {0: (_adopt(kind, project_dir, ec2, cfg, others[0], say), others[0])}
    else:
        reused = {b.node: (replace(b, instance_id=mine[b.node].instance_id), mine[b.node])
                  for b in mates if b.node in mine}
        for box, inst in reused.values():
            say(f"reusing box {box.name} ({inst.instance_id}, {inst.state})")
    if not reused:
        if mates:
            say(f"box {mates[0].name} is gone; launching a new one" if len(mates) == 1 else
                f"the nodes of this project's cluster ({', '.join(b.name for b in mates)}) are "
                "gone; launching a new cluster")
        for gone in mates:
            forget(project_dir, ec2, gone)
        return _chief(_launch(kind, project_dir, cfg, clients(cfg.region, cfg.profile), say,
                              range(nodes), nodes))
    # What this `up` was asked (flags over the recorded settings) is what the box keeps now.
    boxes = [replace(reused[k][0], settings=asdict(cfg)) for k in sorted(reused)]
    try:
        from infra import instances, network

        stopped = [inst for _, inst in reused.values() if inst.state in ("stopping", "stopped")]
        for inst in stopped:
            say(f"{inst.instance_id} is stopped (its disk kept); starting it...")
        parallel.each(lambda inst: instances.start(ec2, inst.instance_id, RUNNING_TIMEOUT_S), stopped)
        # Your address may have changed since the launch: open SSH to today's.
        network.ensure_security_group(ec2, f"dlbox-{project_name(project_dir)}",
                                      cfg.ssh_cidr or myip.public_cidr(), boxes[0].ssh_port,
                                      _tags(project_dir), cluster=nodes > 1)
    except BaseException:
        _give_up(project_dir, boxes, launched_now=False, say=say)
    ready = _ready(project_dir, ec2, boxes, cfg, say, launched_now=False)
    lost = [b for b in mates if b.node not in reused]
    missing = [k for k in range(nodes) if k not in reused]
    if missing:
        inst = next(iter(reused.values()))[1]
        say(f"node(s) {', '.join(map(str, missing))} of the cluster are gone; making them again "
            f"in {inst.zone}")
        for old in lost:
            old.retire(project_dir, say)
        ready += _remake(kind, project_dir, cfg, ec2, say, lost, missing, nodes,
                         _Like(inst.instance_type, inst.zone, inst.image_id))
    return _chief(ready)


def replace_node(project_dir: Path, lost: Box, say: Say) -> Box:
    """A lost node of a cluster (terminated, verified) made again: the same index, type,
    zone and placement group, recorded in its place, ready. The caller holds the box lock."""
    from infra import instances

    cfg = _config(project_dir, UpFlags(), lost)
    ec2 = clients(lost.region, lost.profile)
    if lost.instance_type is not None and lost.zone is not None:
        old = instances.describe(ec2, lost.instance_id) if lost.instance_id else None
        like = _Like(lost.instance_type, lost.zone, old.image_id if old else None)
    else:  # it never launched: like the nodes left
        found = [inst for b in _nodes_of(project_dir, lost) if b.name != lost.name
                 and (inst := _instance_of(ec2, b)) is not None]
        if not found:
            raise UsageError(f"{lost.label} never launched, and no node of its cluster is left "
                             f"to copy; `dlbox down`, then `dlbox up --nodes {lost.nodes}`")
        like = _Like(found[0].instance_type, found[0].zone, found[0].image_id)
    return _remake(type(lost), project_dir, cfg, ec2, say, [lost], [lost.node], lost.nodes, like)[0]


def _config(project_dir: Path, flags: UpFlags, existing: Box | None = None) -> config.Config:
    """The flags given over what the project's box was made with (its record keeps every
    choice of the `up` that made it, dlbox.toml's and the flags'), or over dlbox.toml for a
    new box."""
    given = dict(region=flags.region, profile=flags.profile,
                 instance_types=flags.instance_type, spot=flags.spot,
                 disk_gb=flags.disk_gb, idle_minutes=flags.idle_minutes,
                 max_lifetime_minutes=flags.max_lifetime_minutes,
                 ssh_cidr=flags.ssh_cidr, ssh_user=flags.ssh_user, ssh_key=flags.ssh_key,
                 ami=flags.ami, python=flags.python, box_workdir=flags.workdir,
                 nodes=flags.nodes)
    settings = getattr(existing, "settings", None)
    if settings is None:
        return config.load(project_dir, **given)
    where = f"{state.state_file(project_dir)} (box {existing.name})"
    return config.with_flags(config.recorded(settings, where), **given)


def _nodes_of(project_dir: Path, box: Box | None) -> list[Box]:
    """The recorded nodes of box's cluster ([box] for a single box; [] for None)."""
    if box is None:
        return []
    if box.nodes == 1:
        return [box]
    return sorted(of_kind(project_dir, type(box)), key=lambda b: b.node)


def _chief(boxes: list[Box]) -> Box:
    return next(b for b in boxes if b.node == 0)


def _instance_of(ec2, box: Box):
    """The box's instance unless it is ending or ended: by id, else by its tags."""
    from infra import instances

    found = instances.describe(ec2, box.instance_id) if box.instance_id else None
    if found is None:
        tagged = instances.find(ec2, box=box.name, states=KEEPABLE_STATES)
        found = tagged[0] if tagged else None
    return found if found is not None and found.state in KEEPABLE_STATES else None


def _adopt(kind: type[Box], project_dir: Path, ec2, cfg: config.Config, inst, say: Say) -> Box:
    """Record an instance of this project that the state file lost (deleted, or a crash
    before it was written), if this project's key logs in to it; else say how to end it."""
    from infra.prices import AwsPrices

    key_path = Path(cfg.ssh_key).expanduser() if cfg.ssh_key else (
        state.state_dir(project_dir) / "keys" / keys.KEY_FILE)
    public = keys.public_key(key_path) if key_path.is_file() else None
    expected = f"dlbox-{project_name(project_dir)}-{keys.fingerprint(public)}" if public else None
    if inst.key_name is None or inst.key_name != expected or not inst.security_group_ids:
        raise UsageError(f"this project has instance {inst.instance_id} ({inst.state}), which "
                         f".dlbox/state.json does not record and {key_path} cannot log in to; "
                         "`dlbox down` terminates it, then `dlbox up` starts a new one")
    box = kind(
        name=inst.box or inst.instance_id, region=cfg.region, profile=cfg.profile,
        key_name=inst.key_name, key_path=str(key_path.resolve()),
        security_group_id=inst.security_group_ids[0], ssh_user=cfg.ssh_user,
        ssh_port=cfg.ssh_port, idle_minutes=cfg.idle_minutes,
        max_lifetime_minutes=cfg.max_lifetime_minutes, instance_id=inst.instance_id,
        instance_type=inst.instance_type, zone=inst.zone, spot=inst.spot,
        usd_per_hour=AwsPrices(ec2).hourly(inst.instance_type, inst.zone, inst.spot),
        settings=asdict(cfg))
    state.put(project_dir, box)
    say(f"found {inst.instance_id} ({inst.state}) of this project, which .dlbox/state.json did "
        "not record; reusing it")
    return box


def _tags(project_dir: Path) -> dict[str, str]:
    from infra.models import TAG_OWNER, TAG_PROJECT

    return {TAG_PROJECT: project_name(project_dir), TAG_OWNER: getpass.getuser()}


def _launch(kind: type[Box], project_dir: Path, cfg: config.Config, ec2, say: Say, indexes: Sequence[int],
            nodes: int, like: _Like | None = None) -> list[Box]:
    """Launch the nodes indexes of a cluster of nodes (range(1), 1: a single box), all in
    one zone (like's, with its type and AMI, for nodes made again), and make them ready."""
    from infra import ami, instances, network
    from infra.errors import InfraError
    from infra.models import LaunchSpec
    from infra.prices import AwsPrices

    project = project_name(project_dir)
    name = f"dlbox-{project}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    names = [name] if nodes == 1 else [f"{name}-{k}" for k in indexes]
    cidr = cfg.ssh_cidr or myip.public_cidr()
    image = ami.resolve(ec2, ssm_client(cfg.region, cfg.profile),
                        like.image_id if like is not None and like.image_id else cfg.ami)
    say(f"AMI {image.image_id} ({image.name or image.source})")
    if cfg.ssh_key:
        key_path, public_key = keys.own(cfg.ssh_key)
    else:
        key_path, public_key = keys.ensure(state.ensure_dir(project_dir) / "keys")
    tags = _tags(project_dir)
    key_name = f"dlbox-{project}-{keys.fingerprint(public_key)}"
    network.ensure_key_pair(ec2, key_name, public_key, tags)
    try:
        group_id, _ = network.ensure_security_group(ec2, f"dlbox-{project}", cidr, cfg.ssh_port,
                                                    tags, cluster=nodes > 1)
    except InfraError:
        if like is None:  # nodes made again: the others still use the key pair
            network.delete_key_pair(ec2, key_name)
        raise
    say(f"SSH open to {cidr} only (security group {group_id})"
        + ("; every port open between the cluster's nodes" if nodes > 1 else ""))
    made = [kind(
        name=names[i], region=cfg.region, profile=cfg.profile, key_name=key_name,
        key_path=str(key_path.resolve()), security_group_id=group_id,
        ssh_user=cfg.ssh_user, ssh_port=cfg.ssh_port,
        idle_minutes=cfg.idle_minutes, max_lifetime_minutes=cfg.max_lifetime_minutes,
        node=k, nodes=nodes, settings=asdict(cfg),
    ) for i, k in enumerate(indexes)]
    for box in made:
        state.put(project_dir, box)  # before launching: `down` can find each by its tag
    spec = LaunchSpec(
        box=names[0], project=project, owner=getpass.getuser(), image=image,
        instance_types=(like.instance_type,) if like is not None else cfg.instance_types,
        spot=cfg.spot, spot_fallback=cfg.spot_fallback,
        key_name=key_name, security_group_id=group_id, disk_gb=cfg.disk_gb,
        user_data=user_data(cfg), iam_instance_profile=cfg.iam_instance_profile,
        placement_group=f"dlbox-{project}" if nodes > 1 else None,
    )

    def record(i: int, instance_id: str | None) -> None:
        made[i] = replace(made[i], instance_id=instance_id)
        state.put(project_dir, made[i])

    try:
        launched = instances.launch_cluster(
            ec2, spec, tuple(names), on_launched=record, on_dropped=lambda i: record(i, None),
            zones=(like.zone,) if like is not None else None)
    except BaseException as exc:
        if any(box.instance_id is not None for box in made):
            _give_up(project_dir, made, launched_now=True, say=say)
        if isinstance(exc, InfraError):  # nothing runs: remove the key and groups we made
            try:
                for box in made:
                    forget(project_dir, ec2, box)
            except Exception as cleanup:
                raise DlboxError(f"{exc}; nothing was launched, but deleting its key pair and "
                                 f"group failed too ({cleanup}): `dlbox down` retries") from exc
        raise
    try:
        for attempt in launched.attempts[:-1]:
            say(f"no {attempt.market} {attempt.instance_type} in {attempt.zone} "
                f"({attempt.outcome}); trying the next")
        prices = AwsPrices(ec2)
        for i, inst in enumerate(launched.instances):
            usd = prices.hourly(inst.instance_type, inst.zone, inst.spot)
            made[i] = replace(made[i], instance_type=inst.instance_type, zone=inst.zone,
                              spot=inst.spot, usd_per_hour=usd,
                              placement_group=inst.placement_group)
            state.put(project_dir, made[i])
            market = "spot" if inst.spot else "on-demand"
            price = f"${usd:.3f}/h" if usd is not None else "price unknown"
            say(f"launched {inst.instance_id}: {market} {inst.instance_type} in {inst.zone}, "
                f"{price}" + (f" (node {made[i].node} of {nodes}, placement group "
                              f"{inst.placement_group})" if nodes > 1 else ""))
    except BaseException:
        _give_up(project_dir, made, launched_now=True, say=say)
    return _ready(project_dir, ec2, made, cfg, say, launched_now=True)


def _remake(kind: type[Box], project_dir: Path, cfg: config.Config, ec2, say: Say, lost: list[Box],
            indexes: list[int], nodes: int, like: _Like) -> list[Box]:
    """Nodes of a cluster made again like the others (lost: their old records, whose
    instances are ended already): each new one recorded in its old one's place. One that
    could not be made leaves its old record there: the cluster stays whole in the state
    file, and `dlbox up` makes that node again (`dlbox down` ends the cluster)."""
    for old in lost:
        forget_node(project_dir, old)  # the key pair and groups stay: the other nodes use them
    try:
        return _launch(kind, project_dir, cfg, ec2, say, indexes, nodes, like)
    except BaseException:
        taken = {b.node for b in of_kind(project_dir, kind)}
        for old in lost:
            if old.node not in taken:
                state.put(project_dir, old)
        raise


def _ready(project_dir: Path, ec2, boxes: list[Box], cfg: config.Config, say: Say,
           launched_now: bool) -> list[Box]:
    """Wait for running, an SSH banner and a first login that prepares each box; the
    waits of several nodes at once."""
    from infra import instances

    boxes = list(boxes)
    try:
        found = instances.wait_all_running(ec2, [b.instance_id for b in boxes], RUNNING_TIMEOUT_S)
        for i, inst in enumerate(found):
            if not inst.public_ip:
                raise DlboxError(f"{inst.instance_id} has no public IP; the default subnet must "
                                 "assign public addresses")
            box = boxes[i]
            if box.host is not None and box.host != inst.public_ip:  # started again: moved
                hostkeys.moved(Path(state.known_hosts(project_dir)),
                               box.ssh_target(project_dir).known_hosts_name,
                               replace(box, host=inst.public_ip).ssh_target(project_dir)
                               .known_hosts_name)
            boxes[i] = replace(box, host=inst.public_ip)
            state.put(project_dir, boxes[i])
        banners = parallel.each(lambda b: netwait.wait_for_ssh(b.host, b.ssh_port), boxes)
        boxes = _log_in(project_dir, ec2, boxes, cfg, say)
        if any(b.node == 0 for b in boxes):
            sshtarget.write_config(state.state_dir(project_dir),
                                   _chief(boxes).ssh_target(project_dir))
    except BaseException:
        _give_up(project_dir, boxes, launched_now, say)
    for box, banner in zip(boxes, banners, strict=True):
        notes = [f"node {box.node} of {box.nodes}, reached by the others at {box.address}"
                 ] if box.nodes > 1 else []
        if box.node == 0:
            notes.append(f"`dlbox ssh` or `ssh -F .dlbox/ssh_config {sshtarget.SSH_HOST_ALIAS}`")
        say(f"box {box.name} is up at {box.host}:{box.ssh_port} ({banner}); " + "; ".join(notes))
    return boxes


def _log_in(project_dir: Path, ec2, boxes: list[Box], cfg: config.Config,
            say: Say) -> list[Box]:
    """First SSH login to each box: pin its host key (checked against the console's
    fingerprints when the console shows them), then, every node at once, make dlbox's
    folder, check the Python that will train and (a cluster) find its address."""
    from infra import instances

    from .hostkeys import console_fingerprints

    machines, checked = [], []
    try:
        for box in boxes:  # one at a time: a pin rewrites the one known_hosts file
            expected = console_fingerprints(instances.console_output(ec2, box.instance_id))
            machines.append(SshMachine(box.ssh_target(project_dir), pin_new_host=True,
                                       expected_fingerprints=expected or None,
                                       connect_deadline_s=cfg.login_timeout_seconds))
            machines[-1].conn  # noqa: B018 - the first login, which pins the key, now
            checked.append(bool(expected))
        boxes = parallel.each(lambda pair: _prepare(pair[0], pair[1], cfg, _node_say(say, pair[0])),
                      list(zip(boxes, machines, strict=True)))
    finally:
        for machine in machines:
            machine.close()
    say(("host key " if len(boxes) == 1 else "host keys ")
        + ("checked against the console output and " if all(checked) else "")
        + f"pinned in .dlbox/{state.KNOWN_HOSTS_FILE}")
    for box in boxes:
        state.put(project_dir, box)
    return boxes


def _prepare(box: Box, machine: SshMachine, cfg: config.Config, say: Say) -> Box:
    """One logged-in box ready to train: cloud-init done, its watchdog checked, dlbox's
    folder, a Python with TensorFlow, and (a cluster's node) its address."""
    machine.run(CLOUD_INIT_WAIT, timeout=CLOUD_INIT_TIMEOUT_S)
    _say_watchdog(machine, cfg, say)
    box = replace(box, workdir=workdir.prepare(machine, cfg.box_workdir, box.label))
    python, versions = environment.ready_python(machine, box.workdir, cfg.python or box.python,
                                                say, cfg.box_requirements, cfg.pip_args)
    say(f"box Python: {versions}")
    box = replace(box, python=python)
    if box.nodes > 1:  # where sshd took this login: the instance's private address on EC2
        box = replace(box, address=own_address(machine, box.label))
    return box


def _node_say(say: Say, box: Box) -> Say:
    """say for one node of several made ready at once: its lines named, one at a time."""
    if box.nodes == 1:
        return say

    def said(line: str) -> None:
        with _SAY:
            say(f"node {box.node}: {line}")

    return said


def _say_watchdog(machine: SshMachine, cfg: config.Config, say: Say) -> None:
    """Check on the box that the watchdog runs; say plainly when it does not."""
    if not (cfg.idle_minutes or cfg.max_lifetime_minutes):
        say("watchdog off (idle_minutes and max_lifetime_minutes are 0): `dlbox down` ends the box")
        return
    dog = watchdog.check(machine)
    say(("watchdog " if dog.protecting else "warning: the watchdog is ") + dog.line())


def _give_up(project_dir: Path, boxes: list[Box], launched_now: bool, say: Say) -> NoReturn:
    """Called from an except block after run_instances: end in one of the two states, say which.

    Ctrl-C, a closed stdout, or boxes that were already up: they stay recorded. Boxes
    launched now that failed to become usable: ended as `dlbox down` ends them (terminated,
    verified by id and by tag; key pair and groups deleted once nothing uses them). Always
    raises.
    """
    import sys

    from infra.errors import InfraError

    exc = sys.exc_info()[1]
    if isinstance(exc, KeyboardInterrupt | SystemExit | BrokenPipeError):  # SystemExit: SIGTERM
        raise exc  # the CLI says the box is recorded: `dlbox up` resumes, `dlbox down` ends it
    why = str(exc) if isinstance(exc, DlboxError | InfraError) else f"{type(exc).__name__}: {exc}"
    ids = ", ".join(b.instance_id or b.name for b in boxes)
    one = len(boxes) == 1
    it, they = ("it", "it stays") if one else ("them", "they stay")
    if not launched_now:
        raise DlboxError(f"{why}; {ids} {'stays' if one else 'stay'} up and recorded: `dlbox "
                         f"up` tries again, `dlbox down` terminates {it}") from exc
    try:
        for box in boxes:
            box.down(project_dir, DownFlags(), say)
    except Exception as failed:
        raise DlboxError(f"{ids} never became usable ({why}), and ending {it} failed "
                         f"({failed}); {they} recorded: run `dlbox down`") from exc
    raise NeverUsable(f"{ids} never became usable ({why}); {'it was' if one else 'they were'} "
                      f"terminated (verified) and nothing of {it} is left running") from exc
