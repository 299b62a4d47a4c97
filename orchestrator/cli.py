"""The `dlbox` command line: thin typer commands, each one call into the core."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import DlboxError, UsageError

app = typer.Typer(
    name="dlbox",
    help="Train the Dogs vs. Cats CNNs on a rented GPU box: up, train, down.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's help renderer alone costs ~75 ms of start-up (see BENCHMARKS.md).
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Datasets: generate a sample in the Kaggle layout.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")

MAX_SAMPLE_IMAGES = 100_000


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dlbox {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """dlbox: three commands from a laptop to a trained CNN."""


EXIT_INFRA = 1
EXIT_INTERRUPTED = 130


def _fail(exc: DlboxError) -> typer.Exit:
    typer.secho(f"dlbox: error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(exc.exit_code)


def _say(message: str) -> None:
    typer.echo(message)


@contextlib.contextmanager
def _errors(interrupted_hint: str | None = None) -> Iterator[None]:
    """The one place where dlbox's and infra's errors become a line and an exit code."""
    try:
        yield
    except DlboxError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.secho("dlbox: interrupted" + (f"; {interrupted_hint}" if interrupted_hint else ""),
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        # infra is imported lazily (boto3 is slow to import), so match its root by module.
        if type(exc).__module__.startswith("infra."):
            typer.secho(f"dlbox: error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_INFRA) from None
        raise


def _project() -> Path:
    return Path.cwd()


RegionOpt = Annotated[str | None, typer.Option("--region", help="AWS region [dlbox.toml or us-east-1].")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="AWS credentials profile.")]


@app.command()
def init(force: Annotated[bool, typer.Option("--force", help="Overwrite dlbox.toml.")] = False) -> None:
    """Write a commented dlbox.toml with the built-in defaults."""
    from .config import write_default

    with _errors():
        path = write_default(_project(), force)
    typer.echo(f"wrote {path}")


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
    ssh_target: Annotated[str | None, typer.Option(
        "--ssh", help="Use a machine you have: USER@HOST[:PORT].")] = None,
    key: Annotated[str | None, typer.Option(help="--ssh: the private key that logs you in.")] = None,
    python: Annotated[str | None, typer.Option(
        help="An interpreter on the box that has TensorFlow [--local: this one].")] = None,
    workdir: Annotated[str | None, typer.Option(
        help="--ssh: dlbox's folder on the box [~/dlbox].")] = None,
) -> None:
    """Get a box: EC2 by default (or reuse this project's), this machine, or one over SSH."""
    from . import config, ec2box

    if local or ssh_target:
        from . import boxes

        with _errors():
            if local and ssh_target:
                raise UsageError("--local and --ssh exclude each other; pick one")
            if local:
                boxes.up_local(_project(), python, _say)
            else:
                cfg = config.load(_project())
                boxes.up_ssh(_project(), ssh_target, key, python or cfg.python,
                             workdir or cfg.box_workdir, _say, cfg.box_requirements, cfg.pip_args)
        return
    with _errors("the box (if launched) is recorded in .dlbox/state.json: run `dlbox up` to "
                 "keep waiting or `dlbox down` to terminate it"):
        cfg = config.load(_project(), region=region, profile=profile, instance_types=instance_type,
                          spot=spot, disk_gb=disk_gb, idle_minutes=idle_minutes,
                          max_lifetime_minutes=max_lifetime_minutes, ssh_cidr=ssh_cidr,
                          ssh_user=ssh_user, ssh_key=ssh_key, ami=ami, python=python)
        ec2box.up(_project(), cfg, _say)


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


@app.command()
def status() -> None:
    """Show this project's box as AWS sees it: state, address, uptime, cost, watchdog."""
    from rich.console import Console
    from rich.table import Table

    from . import ec2box, state

    with _errors():
        current = state.load_box(_project())
        if isinstance(current, state.LocalBox | state.SshBox):
            typer.echo(f"{current.kind} box {current.name}: {current.python}, runs in "
                       f"{current.workdir}")
            return
        st = ec2box.status(_project())
    if st is None:
        typer.echo("no box is up in this project (`dlbox up` starts one)")
        return
    box = st.box
    table = Table(show_header=False, box=None)
    rows = [
        ("box", box.name),
        ("instance", box.instance_id or "launch in flight"),
        ("type", f"{box.instance_type or '?'} ({'spot' if box.spot else 'on-demand'}) in {box.zone or '?'}"),
        ("state", st.state),
        ("address", f"{st.public_ip}:{box.ssh_port}" if st.public_ip else "-"),
        ("uptime", _duration(st.uptime_seconds)),
        ("cost so far", f"${st.cost_usd:.2f} at ${box.usd_per_hour:.3f}/h" if st.cost_usd is not None
         else "unknown"),
        ("watchdog", _watchdog_line(box, st)),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    Console().print(table)
    if st.state in ("shutting-down", "terminated", "gone"):
        typer.echo("the box has stopped (the watchdog or AWS ended it); `dlbox down` cleans up")


def _watchdog_line(box, st) -> str:
    parts = []
    if box.idle_minutes:
        parts.append(f"powers off after {box.idle_minutes} idle minutes")
    if st.lifetime_ends_at is not None:
        left = (st.lifetime_ends_at - datetime.now(timezone.utc)).total_seconds()
        parts.append(f"at the latest at {st.lifetime_ends_at:%Y-%m-%d %H:%M} UTC "
                     f"(in {_duration(max(0.0, left))})")
    return "; ".join(parts) or "off (the box runs until `dlbox down`)"


@app.command()
def down(
    all_boxes: Annotated[bool, typer.Option("--all", help="Every dlbox instance in the region, "
                                            "even without .dlbox/.")] = False,
    region: Annotated[str | None, typer.Option(
        "--region", help="--all: the region to sweep [dlbox.toml or us-east-1].")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="AWS profile [the one the box was started with].")] = None,
    purge: Annotated[bool, typer.Option("--purge", help="SSH box: also delete dlbox's folder "
                                        "there.")] = False,
) -> None:
    """Terminate the box and wait until AWS confirms it, so nobody keeps paying."""
    from . import config, ec2box, state

    with _errors("the box may still be running: run `dlbox down` again"):
        if all_boxes:
            cfg = config.load(_project(), region=region, profile=profile)
            ec2box.down_all(cfg.region, cfg.profile, _say)
            return
        current = state.load_box(_project())
        if isinstance(current, state.LocalBox | state.SshBox):
            from . import boxes

            boxes.down(_project(), current, purge, _say)
            return
        total = ec2box.down(_project(), _say, profile)
    if total is not None:
        typer.echo(f"box terminated; it cost about ${total:.2f}")


MODELS = ("scratch", "vgg16")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="scratch or vgg16.")],
    data: Annotated[str, typer.Option(help="Kaggle train/ folder or zip (or a folder with "
                                           "train/), or `kaggle`: download it on the box.")],
    test: Annotated[str | None, typer.Option(help="Kaggle test1/ folder or zip (or `kaggle`): "
                                                  "also write submission.csv.")] = None,
    down_after: Annotated[bool, typer.Option("--down-after", help="Take the box down once the "
                                             "results are pulled and verified.")] = False,
) -> None:
    """Train on the box (other flags go to the trainer, e.g. --epochs 20); pull the results."""
    from . import boxes, config, runs, state

    with _errors():
        if model not in MODELS:
            raise UsageError(f"unknown model {model!r}; choose scratch or vgg16")
        box = state.load_box(_project())
        if box is None:
            raise UsageError("no box is up in this project; run `dlbox up --local` first")
        machine = boxes.machine_for(_project(), box)
        with _transfer_bar() as progress:
            run = runs.start(_project(), box, machine, model, data, test, list(ctx.args), _say,
                             progress, config.load(_project()).pip_args)
    code = _follow_and_finish(run, machine)
    if down_after and runs.load(_project(), run.run_id).finished_at:  # pulled and verified
        with _errors("the box may still be running: run `dlbox down`"):
            if isinstance(box, state.Box):
                from . import ec2box

                total = ec2box.down(_project(), _say)
                if total is not None:
                    typer.echo(f"box terminated; it cost about ${total:.2f}")
            else:
                boxes.down(_project(), box, purge=False, say=_say)
    raise typer.Exit(code)


@contextlib.contextmanager
def _transfer_bar():
    """A progress bar with bytes/s and ETA for uploads, on a terminal; else no bar."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich import progress as rp

    with rp.Progress("sending", rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn(),
                     rp.TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("sync", total=None, visible=False)  # shown once bytes move
        yield lambda done, total: bar.update(task, completed=done, total=total, visible=True)


@contextlib.contextmanager
def _status_bar():
    """(say, on_status) for runs.follow: a live bar with metrics and ETA on a terminal.

    Epoch lines go through the bar's console so they scroll above it; off a terminal
    (a pipe, a log file, CI) there is no bar, only those lines.
    """
    if not sys.stdout.isatty():
        yield _say, None
        return
    from rich import progress as rp

    from .runs import bar_view

    eta = rp.TextColumn("{task.fields[eta]}")
    with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TextColumn("{task.fields[metrics]}"), eta,
                     transient=True) as bar:
        task = bar.add_task("starting", total=None, metrics="", eta="")

        def on_status(status: dict) -> None:
            view = bar_view(status)
            if view is None:
                bar.update(task, visible=False)
                return
            left = "" if view.eta_seconds is None else f"ETA {_hms(view.eta_seconds)}"
            bar.update(task, description=view.label, completed=view.step, total=view.steps,
                       metrics=view.metrics, eta=left, visible=True)

        yield (lambda line: bar.console.print(line, markup=False, highlight=False)), on_status


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _machine_of(run):
    """The machine a recorded run ran on (it must still be this project's box)."""
    from . import boxes, state

    box = state.load_box(_project())
    if box is None or box.name != run.box:
        raise UsageError(f"run {run.run_id} ran on box {run.box}, which is not this project's box "
                         "any more; its results are only what was pulled into runs/")
    return boxes.machine_for(_project(), box)


def _follow_and_finish(run, machine) -> int:
    """Stream the run; Ctrl-C detaches (the run goes on); pull and record the results."""
    from . import runs

    try:
        with _status_bar() as (say, on_status):
            code = runs.follow(run, machine, say, err=lambda line: typer.echo(line, err=True),
                               on_status=on_status)
    except KeyboardInterrupt:
        typer.echo(f"detached; run {run.run_id} goes on. `dlbox attach {run.run_id}` follows it "
                   "and pulls its results")
        return 0
    except DlboxError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # the SSH link dropped: the run itself is detached and goes on
        typer.secho(f"dlbox: lost contact with the box ({exc}); run {run.run_id} goes on there: "
                    f"`dlbox attach {run.run_id}`", err=True, fg=typer.colors.RED)
        return EXIT_INFRA
    with _errors():
        run = runs.finish(_project(), run, machine, code)
    machine.close()
    where = f"{runs.RUNS_DIR}/{run.run_id}/"
    if run.val_accuracy is not None:
        typer.echo(f"run {run.run_id} {run.status}: val_accuracy {run.val_accuracy:.4f}; "
                   f"model, metrics, history and log in {where}")
    else:
        typer.echo(f"run {run.run_id} {run.status} (exit {code}); logs in {where}")
    return code


@app.command()
def attach(run_id: Annotated[str, typer.Argument(help="The run's id (see runs/).")]) -> None:
    """Follow a run again and pull its results when it ends."""
    from . import runs

    with _errors():
        run = runs.load(_project(), run_id)
        machine = _machine_of(run)
    raise typer.Exit(_follow_and_finish(run, machine))


@app.command()
def pull(run_id: Annotated[str, typer.Argument(help="The run's id (see runs/).")]) -> None:
    """Copy a run's results from the box into runs/<id>/ again (verified)."""
    from . import runs

    with _errors():
        run = runs.load(_project(), run_id)
        machine = _machine_of(run)
        local = runs.pull(_project(), run, machine)
    typer.echo(f"pulled into {local}")


@app.command()
def logs(
    run_id: Annotated[str | None, typer.Argument(help="The run's id [the latest].")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
) -> None:
    """Print a run's train.log from the box."""
    import time

    from . import runs

    with _errors():
        run = runs.resolve(_project(), run_id)
        machine = _machine_of(run)
        offset = 0
        while True:
            chunk = runs.read_log(run, machine, offset)
            if chunk:
                typer.echo(chunk.decode(errors="replace"), nl=False)
                offset += len(chunk)
            if not follow or machine.read(f"{run.remote_dir}/exit_code") is not None:
                return
            time.sleep(runs.STATUS_POLL_S)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Stop a run with SIGTERM: the trainer checkpoints (resumable) and exits 75."""
    from . import runs

    with _errors():
        run = runs.load(_project(), run_id)
        machine = _machine_of(run)
        code = runs.cancel(run, machine, _say)
        run = runs.finish(_project(), run, machine, code)
    typer.echo(f"run {run.run_id} {run.status} (exit {code}); what it had is in "
               f"{runs.RUNS_DIR}/{run.run_id}/")


@app.command("runs")
def list_runs() -> None:
    """A table of this project's runs."""
    from rich.console import Console
    from rich.table import Table

    from . import runs

    header = ("run", "model", "status", "val acc", "epochs", "duration", "box", "cost")
    rows = []
    for run in runs.all_runs(_project()):
        metrics = runs.read_local_json(_project() / runs.RUNS_DIR / run.run_id / "metrics.json")
        rows.append((
            run.run_id, run.model, run.status,
            f"{run.val_accuracy:.4f}" if run.val_accuracy is not None else "-",
            str(metrics.get("epochs_run", "-")),
            _duration(run.seconds) if run.seconds is not None else "-",
            run.box,
            f"${run.cost_usd:.2f}" if run.cost_usd is not None else "-",
        ))
    if not sys.stdout.isatty():  # piped: tab-separated, for scripts
        for row in (header, *rows):
            typer.echo("\t".join(row))
        return
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def ssh() -> None:
    """Open an interactive shell on the box."""
    from . import ec2box, state

    config_file = state.state_dir(_project()) / ec2box.SSH_CONFIG_FILE
    if not config_file.exists():
        raise _fail(UsageError("no box is up in this project; run `dlbox up` first"))
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        raise _fail(UsageError("the OpenSSH client (ssh) is not installed"))
    os.execv(ssh_bin, [ssh_bin, "-F", str(config_file), ec2box.SSH_HOST_ALIAS])


@data_app.command("sample")
def data_sample(
    directory: Annotated[Path, typer.Argument(help="Where to write train/ and test1/.")],
    n: Annotated[int, typer.Option("--n", help="Labelled training images (half cats, half dogs).")] = 1000,
    test_n: Annotated[int, typer.Option("--test-n", help="Unlabelled images in test1/.")] = 50,
    bad: Annotated[bool, typer.Option("--bad", help="Add deliberately broken and odd files.")] = False,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files.")] = 0,
) -> None:
    """Write a small learnable dataset in the exact Kaggle layout."""
    from .sample import generate

    try:
        if not 2 <= n <= MAX_SAMPLE_IMAGES:
            raise UsageError(f"--n must be 2..{MAX_SAMPLE_IMAGES} (got {n})")
        if test_n < 0:
            raise UsageError(f"--test-n must be 0 or more (got {test_n})")
        train_dir = directory / "train"
        if train_dir.exists() and (not train_dir.is_dir() or any(train_dir.iterdir())):
            raise UsageError(f"{directory / 'train'} is not empty; choose another directory")
        try:
            summary = generate(directory, n, test_n=test_n, bad=bad, seed=seed)
        except OSError as exc:
            raise UsageError(f"cannot write to {directory} ({exc.strerror}); choose another "
                             "directory") from exc
    except DlboxError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"wrote {summary.train} training images to {directory / 'train'}, {summary.test} test "
        f"images to {directory / 'test1'}" + (f", {summary.bad} bad files" if bad else "")
    )


if __name__ == "__main__":
    app()
