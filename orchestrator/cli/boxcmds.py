"""Commands on the project's box: init, up, status, down, ssh."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .app import app, project
from .output import UI, echo, errors, say, table


@app.command()
def init(force: Annotated[bool, typer.Option("--force", help="Overwrite dlbox.toml.")] = False) -> None:
    """Write a commented dlbox.toml with the built-in defaults."""
    from ..config import write_default

    with errors():
        path = write_default(project(), force)
    echo(f"wrote {path}")


# The type each kind of flag (kinds.UpOption.type) has on `up`.
_ANNOTATION = {"text": str | None, "texts": list[str] | None, "int": int | None, "switch": bool,
               "toggle": bool | None}


def up_command() -> Callable[..., None]:
    """`dlbox up`, with the flags every registered box kind takes (kinds.py): a new kind
    brings its own."""
    from ..kinds import up_options  # its registration alone: no kind is imported

    def up(**values: Any) -> None:
        """Get a box: EC2 by default (or reuse this project's), this machine, or one over SSH."""
        from .. import boxes, boxlock, kinds

        with errors():
            flags = kinds.flags_from(values)
            kind = boxes.kind_for_up(flags)
        with errors(kind.INTERRUPTED_UP), boxlock.held(project(), say):  # two `up` never race
            existing = boxes.current(project())
            if existing is not None and existing.kind != kind.kind:
                raise UsageError(f"this project's box is {existing.label}; `dlbox down` first, "
                                 "then `dlbox up` again")
            kind.up(project(), flags, existing, say)

    up.__signature__ = inspect.Signature([inspect.Parameter(
        option.name, inspect.Parameter.KEYWORD_ONLY,
        default=False if option.type == "switch" else None,
        annotation=Annotated[_ANNOTATION[option.type], typer.Option(*option.names,
                                                                    help=option.help)])
        for option in up_options().values()], return_annotation=None)
    return up


app.command("up")(up_command())


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
