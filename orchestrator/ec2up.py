"""`dlbox up` on EC2: reuse the project's instance or launch one, wait for SSH, prepare it.

After run_instances answers, every path ends in one of two states, and says which: the box
recorded in .dlbox/state.json (usable by `dlbox up` and `dlbox down`), or the instance
terminated, verified, because it never became usable.
"""

from __future__ import annotations

import getpass
from dataclasses import replace
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
    registry,
    sshtarget,
    state,
    watchdog,
    workdir,
)
from .boxes import Box, DownFlags, Say, UpFlags
from .ec2box import (
    BOX_STATE_DIR_ON_BOX,
    KEEPABLE_STATES,
    RUNS_REGISTRY_ON_BOX,
    Ec2Box,
    clients,
    forget,
    project_instances,
    project_name,
    ssm_client,
)
from .errors import DlboxError, NeverUsable, UsageError
from .render import render
from .sshmachine import SshMachine

RUNNING_TIMEOUT_S = 600  # pending -> running; a GPU instance usually takes 15-60 s
CLOUD_INIT_TIMEOUT_S = 300  # the user data (watchdog, run registry) done before the first run
# Waits for cloud-init where there is one (a DLAMI); elsewhere nothing to wait for.
CLOUD_INIT_WAIT = ("command -v cloud-init >/dev/null || exit 0; "
                   "cloud-init status --wait >/dev/null 2>&1; exit 0")


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


def up(project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> Ec2Box:
    """Reuse the project's box (running, or stopped: started again) or launch one; return it
    once it can train. The caller holds the project's box lock.

    The project's instances are looked up by their tag first, so an instance the state file
    lost is reused or named, never doubled. Local checks come first (dlbox.toml, region,
    credentials), then the network.
    """
    cfg = config.load(project_dir, region=flags.region, profile=flags.profile,
                      instance_types=flags.instance_type, spot=flags.spot, disk_gb=flags.disk_gb,
                      idle_minutes=flags.idle_minutes,
                      max_lifetime_minutes=flags.max_lifetime_minutes, ssh_cidr=flags.ssh_cidr,
                      ssh_user=flags.ssh_user, ssh_key=flags.ssh_key, ami=flags.ami,
                      python=flags.python, box_workdir=flags.workdir)
    if existing is not None and existing.region != cfg.region:
        raise UsageError(f"this project's box is in {existing.region}; `dlbox down` first to "
                         f"start one in {cfg.region}")
    # Paths OpenSSH cannot take are refused now, not after a launch.
    sshtarget.check_paths(cfg.ssh_key or str(state.state_dir(project_dir) / "keys"),
                          state.known_hosts(project_dir))
    # The account the box lives in, unless told otherwise: a plain `up` after
    # `up --profile work` must find it, not launch a second one elsewhere.
    ec2 = clients(cfg.region, flags.profile or (existing.profile if existing else cfg.profile))
    mine = _instance_of(ec2, existing) if existing is not None else None
    others = [i for i in project_instances(ec2, project_dir)
              if mine is None or i.instance_id != mine.instance_id]
    if others and (existing is not None or len(others) > 1):
        listed = ", ".join(f"{i.instance_id} ({i.state})" for i in others)
        raise UsageError(f"this project has instance(s) {listed} besides "
                         f"{existing.label if existing else 'one another'}; `dlbox down` ends "
                         "all of them, then `dlbox up` starts one")
    if others:
        box, mine = _adopt(project_dir, ec2, cfg, others[0], say), others[0]
    elif mine is not None:
        box = replace(existing, instance_id=mine.instance_id)
        say(f"reusing box {box.name} ({mine.instance_id}, {mine.state})")
    else:
        if existing is not None:
            say(f"box {existing.name} is gone; launching a new one")
            forget(project_dir, ec2, existing)
        return _launch(project_dir, cfg, clients(cfg.region, cfg.profile), say)
    try:
        from infra import instances, network

        if mine.state in ("stopping", "stopped"):
            say(f"{mine.instance_id} is stopped (its disk kept); starting it...")
            instances.start(ec2, mine.instance_id, RUNNING_TIMEOUT_S)
        # Your address may have changed since the launch: open SSH to today's.
        network.ensure_security_group(ec2, f"dlbox-{project_name(project_dir)}",
                                      cfg.ssh_cidr or myip.public_cidr(), box.ssh_port,
                                      _tags(project_dir))
    except BaseException:
        _give_up(project_dir, box, launched_now=False, say=say)
    return _ready(project_dir, ec2, box, cfg, say, launched_now=False)


def _instance_of(ec2, box: Ec2Box):
    """The box's instance unless it is ending or ended: by id, else by its tags."""
    from infra import instances

    found = instances.describe(ec2, box.instance_id) if box.instance_id else None
    if found is None:
        tagged = instances.find(ec2, box=box.name, states=KEEPABLE_STATES)
        found = tagged[0] if tagged else None
    return found if found is not None and found.state in KEEPABLE_STATES else None


def _adopt(project_dir: Path, ec2, cfg: config.Config, inst, say: Say) -> Ec2Box:
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
    box = Ec2Box(
        name=inst.box or inst.instance_id, region=cfg.region, profile=cfg.profile,
        key_name=inst.key_name, key_path=str(key_path.resolve()),
        security_group_id=inst.security_group_ids[0], ssh_user=cfg.ssh_user,
        ssh_port=cfg.ssh_port, idle_minutes=cfg.idle_minutes,
        max_lifetime_minutes=cfg.max_lifetime_minutes, instance_id=inst.instance_id,
        instance_type=inst.instance_type, zone=inst.zone, spot=inst.spot,
        usd_per_hour=AwsPrices(ec2).hourly(inst.instance_type, inst.zone, inst.spot))
    state.put(project_dir, box)
    say(f"found {inst.instance_id} ({inst.state}) of this project, which .dlbox/state.json did "
        "not record; reusing it")
    return box


def _tags(project_dir: Path) -> dict[str, str]:
    from infra.models import TAG_OWNER, TAG_PROJECT

    return {TAG_PROJECT: project_name(project_dir), TAG_OWNER: getpass.getuser()}


def _launch(project_dir: Path, cfg: config.Config, ec2, say: Say) -> Ec2Box:
    from infra import ami, instances, network
    from infra.errors import InfraError
    from infra.models import LaunchSpec
    from infra.prices import AwsPrices

    project = project_name(project_dir)
    name = f"dlbox-{project}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    cidr = cfg.ssh_cidr or myip.public_cidr()
    image = ami.resolve(ec2, ssm_client(cfg.region, cfg.profile), cfg.ami)
    say(f"AMI {image.image_id} ({image.name or image.source})")
    if cfg.ssh_key:
        key_path, public_key = keys.own(cfg.ssh_key)
    else:
        key_path, public_key = keys.ensure(state.ensure_dir(project_dir) / "keys")
    tags = _tags(project_dir)
    key_name = f"dlbox-{project}-{keys.fingerprint(public_key)}"
    network.ensure_key_pair(ec2, key_name, public_key, tags)
    try:
        group_id, _ = network.ensure_security_group(ec2, f"dlbox-{project}", cidr, cfg.ssh_port, tags)
    except InfraError:
        network.delete_key_pair(ec2, key_name)
        raise
    say(f"SSH open to {cidr} only (security group {group_id})")
    box = Ec2Box(
        name=name, region=cfg.region, profile=cfg.profile, key_name=key_name,
        key_path=str(key_path.resolve()), security_group_id=group_id,
        ssh_user=cfg.ssh_user, ssh_port=cfg.ssh_port,
        idle_minutes=cfg.idle_minutes, max_lifetime_minutes=cfg.max_lifetime_minutes,
    )
    state.put(project_dir, box)  # before launching: `down` can find the box by its tag
    spec = LaunchSpec(
        box=name, project=project, owner=getpass.getuser(), image=image,
        instance_types=cfg.instance_types, spot=cfg.spot, spot_fallback=cfg.spot_fallback,
        key_name=key_name, security_group_id=group_id, disk_gb=cfg.disk_gb,
        user_data=user_data(cfg), iam_instance_profile=cfg.iam_instance_profile,
    )

    def record(instance_id: str) -> None:
        nonlocal box
        box = replace(box, instance_id=instance_id)
        state.put(project_dir, box)

    try:
        launched = instances.launch(ec2, spec, on_launched=record)
    except BaseException as exc:
        if box.instance_id is not None:
            _give_up(project_dir, box, launched_now=True, say=say)
        if isinstance(exc, InfraError):  # nothing runs: remove the key and group we made
            try:
                forget(project_dir, ec2, box)
            except Exception as cleanup:
                raise DlboxError(f"{exc}; nothing was launched, but deleting its key pair and "
                                 f"group failed too ({cleanup}): `dlbox down` retries") from exc
        raise
    try:
        for attempt in launched.attempts[:-1]:
            say(f"no {attempt.market} {attempt.instance_type} in {attempt.zone} "
                f"({attempt.outcome}); trying the next")
        inst = launched.instance
        usd = AwsPrices(ec2).hourly(inst.instance_type, inst.zone, inst.spot)
        box = replace(box, instance_type=inst.instance_type, zone=inst.zone, spot=inst.spot,
                      usd_per_hour=usd)
        state.put(project_dir, box)
        market = "spot" if inst.spot else "on-demand"
        price = f"${usd:.3f}/h" if usd is not None else "price unknown"
        say(f"launched {inst.instance_id}: {market} {inst.instance_type} in {inst.zone}, {price}")
    except BaseException:
        _give_up(project_dir, box, launched_now=True, say=say)
    return _ready(project_dir, ec2, box, cfg, say, launched_now=True)


def _ready(project_dir: Path, ec2, box: Ec2Box, cfg: config.Config, say: Say,
           launched_now: bool) -> Ec2Box:
    """Wait for running, an SSH banner and a first login that prepares the box."""
    from infra import instances

    try:
        inst = instances.wait_running(ec2, box.instance_id, RUNNING_TIMEOUT_S)
        if not inst.public_ip:
            raise DlboxError(f"{inst.instance_id} has no public IP; the default subnet must "
                             "assign public addresses")
        if box.host is not None and box.host != inst.public_ip:  # started again: a new address
            hostkeys.moved(Path(state.known_hosts(project_dir)),
                           box.ssh_target(project_dir).known_hosts_name,
                           replace(box, host=inst.public_ip).ssh_target(project_dir).known_hosts_name)
        box = replace(box, host=inst.public_ip)
        state.put(project_dir, box)
        banner = netwait.wait_for_ssh(inst.public_ip, box.ssh_port)
        box = _log_in(project_dir, ec2, box, cfg, say)
        sshtarget.write_config(state.state_dir(project_dir), box.ssh_target(project_dir))
    except BaseException:
        _give_up(project_dir, box, launched_now, say)
    say(f"box {box.name} is up at {box.host}:{box.ssh_port} ({banner}); "
        f"`dlbox ssh` or `ssh -F .dlbox/ssh_config {sshtarget.SSH_HOST_ALIAS}`")
    return box


def _log_in(project_dir: Path, ec2, box: Ec2Box, cfg: config.Config, say: Say) -> Ec2Box:
    """First SSH login: pin the host key (checked against the console's fingerprints when
    the console shows them), make dlbox's folder, check the Python that will train."""
    from infra import instances

    from .hostkeys import console_fingerprints

    expected = console_fingerprints(instances.console_output(ec2, box.instance_id))
    machine = SshMachine(box.ssh_target(project_dir), pin_new_host=True,
                         expected_fingerprints=expected or None,
                         connect_deadline_s=cfg.login_timeout_seconds)
    try:
        machine.run(CLOUD_INIT_WAIT, timeout=CLOUD_INIT_TIMEOUT_S)
        _say_watchdog(machine, cfg, say)
        box = replace(box, workdir=workdir.prepare(machine, cfg.box_workdir, box.label))
        python, versions = environment.ready_python(machine, box.workdir, cfg.python or box.python,
                                                    say, cfg.box_requirements, cfg.pip_args)
        say(f"box Python: {versions}")
        box = replace(box, python=python)
    finally:
        machine.close()
    say("host key " + ("checked against the console output and " if expected else "")
        + f"pinned in .dlbox/{state.KNOWN_HOSTS_FILE}")
    state.put(project_dir, box)
    return box


def _say_watchdog(machine: SshMachine, cfg: config.Config, say: Say) -> None:
    """Check on the box that the watchdog runs; say plainly when it does not."""
    if not (cfg.idle_minutes or cfg.max_lifetime_minutes):
        say("watchdog off (idle_minutes and max_lifetime_minutes are 0): `dlbox down` ends the box")
        return
    dog = watchdog.check(machine)
    say(("watchdog " if dog.protecting else "warning: the watchdog is ") + dog.line())


def _give_up(project_dir: Path, box: Ec2Box, launched_now: bool, say: Say) -> NoReturn:
    """Called from an except block after run_instances: end in one of the two states, say which.

    Ctrl-C, a closed stdout, or a box that was already up: it stays recorded. A box launched
    now that failed to become usable: ended as `dlbox down` ends a box (terminated, verified
    by id and by tag, key pair and group deleted). Always raises.
    """
    import sys

    from infra.errors import InfraError

    exc = sys.exc_info()[1]
    if isinstance(exc, KeyboardInterrupt | SystemExit | BrokenPipeError):  # SystemExit: SIGTERM
        raise exc  # the CLI says the box is recorded: `dlbox up` resumes, `dlbox down` ends it
    why = str(exc) if isinstance(exc, DlboxError | InfraError) else f"{type(exc).__name__}: {exc}"
    if not launched_now:
        raise DlboxError(f"{why}; {box.instance_id} stays up and recorded: `dlbox up` tries "
                         "again, `dlbox down` terminates it") from exc
    try:
        box.down(project_dir, DownFlags(), say)
    except Exception as failed:
        raise DlboxError(f"{box.instance_id} never became usable ({why}), and ending it failed "
                         f"({failed}); it stays recorded: run `dlbox down`") from exc
    raise NeverUsable(f"{box.instance_id} never became usable ({why}); it was terminated "
                      "(verified) and nothing of it is left running") from exc
