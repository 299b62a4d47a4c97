"""Commands on the project's box: init, up, status, down, ssh."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Annotated

import typer

from ..errors import UsageError
from .app import app, project
from .output import UI, echo, errors, say, table

RegionOpt = Annotated[str | None, typer.Option("--region", help="AWS region [dlbox.toml or us-east-1].")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="AWS credentials profile.")]


@app.command()
def init(force: Annotated[bool, typer.Option("--force", help="Overwrite dlbox.toml.")] = False) -> None:
    """Write a commented dlbox.toml with the built-in defaults."""
    from ..config import write_default

    with errors():
        path = write_default(project(), force)
    echo(f"wrote {path}")


@app.command()
def up(
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    instance_type: Annotated[list[str] | None, typer.Option(
        "--instance-type", "-t", help="Instance type to try (repeat for a fallback list).")] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Spot or on-demand.")] = None,
    disk_gb: Annotated[int | None, typer.Option(help="Root volume size in GiB.")] = None,
    idle_minutes: Annotated[int | None, typer.Option(
        help="Power off after N idle minutes (0: never).")] = None,
    max_lifetime_minutes: Annotated[int | None, typer.Option(
        help="Power off N minutes after launch at the latest (0: never).")] = None,
    ssh_cidr: Annotated[str | None, typer.Option(help="Allow SSH from this CIDR, not your IP/32.")] = None,
    ssh_user: Annotated[str | None, typer.Option(help="The AMI's SSH user [ubuntu].")] = None,
    ssh_key: Annotated[str | None, typer.Option(
        help="Your own private key (.pub beside it) instead of dlbox's.")] = None,
    ami: Annotated[str | None, typer.Option(help="ami-..., an SSM path or a name pattern.")] = None,
    local: Annotated[bool, typer.Option("--local", help="Use this machine as the box.")] = False,
    ssh_target: Annotated[list[str] | None, typer.Option(
        "--ssh", help="Use a machine you have: USER@HOST[:PORT] (repeat: a cluster).")] = None,
    key: Annotated[list[str] | None, typer.Option(
        help="--ssh: the private key that logs you in (repeat: one per --ssh).")] = None,
    nodes: Annotated[int | None, typer.Option(
        help="Boxes in the cluster (data-parallel training, one worker per box) [1].")] = None,
    node_address: Annotated[list[str] | None, typer.Option(
        help="--ssh cluster: the address the other nodes reach this one at (repeat: one per "
             "--ssh) [the one its sshd sees].")] = None,
    python: Annotated[str | None, typer.Option(
        help="An interpreter on the box that has TensorFlow [--local: this one].")] = None,
    workdir: Annotated[str | None, typer.Option(
        help="SSH and EC2 boxes: dlbox's folder on the box [~/dlbox].")] = None,
) -> None:
    """Get a box: EC2 by default (or reuse this project's), this machine, or one over SSH."""
    from .. import boxes, boxlock
    from ..boxkind import UpFlags

    def given(values: list[str] | None) -> tuple[str, ...] | None:
        return tuple(values) if values else None

    flags = UpFlags(
        local=local, ssh=given(ssh_target), key=given(key), nodes=nodes,
        node_address=given(node_address), workdir=workdir, python=python, region=region,
        profile=profile, instance_type=given(instance_type), spot=spot, disk_gb=disk_gb,
        idle_minutes=idle_minutes, max_lifetime_minutes=max_lifetime_minutes,
        ssh_cidr=ssh_cidr, ssh_user=ssh_user, ssh_key=ssh_key, ami=ami)
    with errors():
        kind = boxes.kind_for_up(flags)
    with errors(kind.INTERRUPTED_UP), boxlock.held(project(), say):  # two `up` never race
        existing = boxes.current(project())
        if existing is not None and existing.kind != kind.kind:
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first, then "
                             "`dlbox up` again")
        kind.up(project(), flags, existing, say)


@app.command()
def status() -> None:
    """Show this project's box: state, address, uptime, cost, watchdog."""
    from .. import settle

    with errors():
        rows = settle.status(project(), UI)
    if rows is None:
        echo("no box is up in this project (`dlbox up` starts one)")
        return
    table(rows)


@app.command()
def down(
    all_boxes: Annotated[bool, typer.Option("--all", help="Every project's dlbox instances in "
                                            "the region, even without .dlbox/ (asks first).")] = False,
    region: Annotated[str | None, typer.Option(
        "--region", help="Where to look for instances [dlbox.toml or us-east-1].")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="AWS profile [the one the box was started with].")] = None,
    purge: Annotated[bool, typer.Option("--purge", help="SSH box: also delete what dlbox made "
                                        "in its folder there.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask: end runs still going, "
                                      "or every project's instances with --all.")] = False,
) -> None:
    """End the project's box (EC2: terminate, verified), so nobody keeps paying.

    Results of runs that ended but were never pulled are pulled first."""
    from .. import settle
    from ..boxkind import DownFlags

    with errors("the box may still be running: run `dlbox down` again"):
        if all_boxes:
            settle.down_all(project(), region, profile, yes, UI)
            return
        settle.down(project(), DownFlags(purge=purge, profile=profile), yes, UI,
                       region=region)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(ctx: typer.Context) -> None:
    """Log in to the box (or run a command there: dlbox ssh -- nvidia-smi)."""
    from .. import lifecycle, sshtarget, state

    with errors():
        box = lifecycle.current_box(project())
        target = box.ssh_target(project())
        if target is None:
            raise UsageError(f"{box.label} is this machine; no SSH needed")
        ssh_bin = shutil.which("ssh")
        if ssh_bin is None:
            raise UsageError("the OpenSSH client (ssh) is not installed; install openssh-client")
        # Written again from the record: the file a user edited or lost never loosens the pinning.
        sshtarget.write_config(state.state_dir(project()), target)
        argv = sshtarget.argv(target, *ctx.args, batch=False)
    sys.stdout.flush()
    os.execv(ssh_bin, argv)
