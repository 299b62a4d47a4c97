"""The `dlbox` command line: thin typer commands, each one call into the core."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from infra.errors import InfraError  # no AWS library behind it: cheap to import
from trainer.recipes import MODELS, models_help  # no TensorFlow behind it

from . import __version__, debuglog, events  # stdlib only: cheap to import
from .errors import BoxLost, DlboxError, LostContact, UsageError
from .humanize import clean

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
EXIT_INFRA = 1
COPY_LOCK_TIMEOUT_S = 5  # a checkpoint copy waits this long for another dlbox's (then skips)
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1  # a cluster run a worker's own error stopped


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dlbox {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log every remote command, transfer and AWS call, with its "
        "duration and outcome, to .dlbox/debug.log (for bug reports; also DLBOX_DEBUG=1).")] = False,
) -> None:
    """dlbox: three commands from a laptop to a trained CNN."""
    signal.signal(signal.SIGTERM, _terminated)
    if debuglog.wanted(verbose):
        from . import state

        with _errors():
            debuglog.enable(state.state_dir(_project()))


def _terminated(signum: int, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C does: every cleanup runs and no child (tar, ssh) outlives us."""
    raise SystemExit(128 + signum)


def _echo(message: str, err: bool = False, fg: str | None = None) -> None:
    """Every line dlbox prints: much of it comes from the box (log lines, file names, its
    stderr), so control characters are shown escaped, never obeyed by the terminal."""
    typer.secho(clean(message), err=err, fg=fg)


def _fail(message: str, code: int) -> typer.Exit:
    _echo(f"dlbox: error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _say(message: str) -> None:
    _echo(message)


def _warn(message: str) -> None:
    _echo(f"dlbox: warning: {message}", err=True, fg=typer.colors.YELLOW)


@contextlib.contextmanager
def _errors(interrupted_hint: str | Callable[[KeyboardInterrupt], str] | None = None
            ) -> Iterator[None]:
    """The one place where errors become a line and an exit code, by their type.
    interrupted_hint: what Ctrl-C leaves and what to do (a callable: as things are then)."""
    try:
        yield
    except DlboxError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except InfraError as exc:
        raise _fail(str(exc), EXIT_INFRA) from None
    except OSError as exc:  # this machine's files: a full disk, a folder not writable
        where = f"{exc.filename}: " if exc.filename else ""
        raise _fail(f"{where}{exc.strerror or exc}; free space or fix the permissions, then run "
                    "the command again", EXIT_INFRA) from None
    except KeyboardInterrupt as exc:
        hint = interrupted_hint(exc) if callable(interrupted_hint) else interrupted_hint
        _echo("dlbox: interrupted" + (f"; {hint}" if hint else ""), err=True,
              fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _project() -> Path:
    return Path.cwd()


def _box(project: Path):
    """The project's box, or a UsageError that says how to get one."""
    from . import boxes

    box = boxes.current(project)
    if box is None:
        raise boxes.no_box()
    return box


RegionOpt = Annotated[str | None, typer.Option("--region", help="AWS region [dlbox.toml or us-east-1].")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="AWS credentials profile.")]


@app.command()
def init(force: Annotated[bool, typer.Option("--force", help="Overwrite dlbox.toml.")] = False) -> None:
    """Write a commented dlbox.toml with the built-in defaults."""
    from .config import write_default

    with _errors():
        path = write_default(_project(), force)
    _echo(f"wrote {path}")


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
    from . import boxes

    flags = boxes.UpFlags(
        local=local, ssh=tuple(ssh_target) if ssh_target else None,
        key=tuple(key) if key else None, nodes=nodes,
        node_address=tuple(node_address) if node_address else None, workdir=workdir,
        python=python,
        region=region, profile=profile,
        instance_type=tuple(instance_type) if instance_type else None, spot=spot,
        disk_gb=disk_gb, idle_minutes=idle_minutes, max_lifetime_minutes=max_lifetime_minutes,
        ssh_cidr=ssh_cidr, ssh_user=ssh_user, ssh_key=ssh_key, ami=ami)
    from . import boxlock

    with _errors():
        kind = boxes.kind_for_up(flags)
    with _errors(kind.INTERRUPTED_UP), boxlock.held(_project(), _say):  # two `up` never race
        existing = boxes.current(_project())
        if existing is not None and existing.kind != kind.kind:
            raise UsageError(f"this project's box is {existing.label}; `dlbox down` first, then "
                             "`dlbox up` again")
        kind.up(_project(), flags, existing, _say)


@app.command()
def status() -> None:
    """Show this project's box: state, address, uptime, cost, watchdog."""
    with _errors():
        from . import boxes

        box = boxes.current(_project())
        if box is None:
            _echo("no box is up in this project (`dlbox up` starts one)")
            return
        rows = [row for node in boxes.cluster(_project(), box)
                for row in node.status(_project())]
        unpulled = [r.run_id for r in _unpulled(box)]
        if unpulled:
            rows.append(("results", f"run(s) {', '.join(unpulled)} not pulled yet: they are on "
                                    f"the box; `dlbox pull {unpulled[0]}` fetches them"))
    _table(rows)


def _unpulled(box) -> list:
    """This box's runs whose results were never pulled (still going, or ended unpulled)."""
    from . import runs

    return [r for r in runs.all_runs(_project(), _warn)
            if r.box == box.name and r.status == "running"]


def _table(rows: list[tuple[str, str]]) -> None:
    if not sys.stdout.isatty():  # piped: tab-separated, for scripts
        for key, value in rows:
            typer.echo(f"{clean(key)}\t{clean(value)}")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(Text(clean(key), style="bold"), Text(clean(value)))
    Console().print(table)


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
    from . import boxes, boxlock

    with _errors("the box may still be running: run `dlbox down` again"):
        if all_boxes:
            _down_every_project(region, profile, yes)
            return
        with boxlock.held(_project(), _say):
            found = boxes.recorded(_project())
            if not found:
                _down_unrecorded(region, profile, yes)
                return
            found.sort(key=lambda b: b.node)  # a cluster's chief first: its runs are settled first
            flags = boxes.DownFlags(purge=purge, profile=profile)
            for box in found:
                boxes.check_down_flags(box, flags)
            for box in found:
                _end_box(box, flags, yes)


def _confirm(question: str, yes: bool, refusal: str) -> None:
    """Go on if --yes was given or the user says so at a terminal; else one line, exit 2."""
    if yes:
        return
    if sys.stdin.isatty() and sys.stdout.isatty():
        if typer.confirm(question, default=False):
            return
        raise UsageError("nothing was ended")
    raise UsageError(refusal)


def _down_every_project(region: str | None, profile: str | None, yes: bool) -> None:
    """`down --all`: list every dlbox instance in the region, ask, end them."""
    from . import config, ec2aws

    cfg = config.load(_project(), region=region, profile=profile)
    ec2, found = ec2aws.every_instance(cfg.region, cfg.profile)
    if not found:
        _echo(f"no dlbox instance is running in {cfg.region}")
        return
    _echo(f"dlbox instances in {cfg.region}, of every project:")
    for line in ec2aws.describe_for_ending(ec2, found):
        _echo(f"  {line}")
    _confirm(f"Terminate these {len(found)} instance(s)?", yes,
             f"{len(found)} instance(s) of every project would be terminated; `dlbox down --all "
             "--yes` ends them (plain `dlbox down` ends only this project's)")
    ec2aws.end_all(ec2, found, cfg.region, _say)


def _down_unrecorded(region: str | None, profile: str | None, yes: bool) -> None:
    """No box recorded: still end this project's EC2 instances, found by their tag."""
    from infra.errors import CredentialsError

    from . import config, ec2aws, runs

    cfg = config.load(_project(), region=region, profile=profile)
    try:
        ec2 = ec2aws.clients(cfg.region, cfg.profile)
    except CredentialsError:  # no AWS here: nothing of this project can be running there
        _echo("no box is up in this project")
        return
    waiting = [r.run_id for r in runs.all_runs(_project(), _warn) if r.status == "running"]
    found = ec2aws.project_instances(ec2, _project())
    if found and waiting and not yes:
        ids = ", ".join(i.instance_id for i in found)
        raise UsageError(f"{ids} of this project is not recorded, and run(s) "
                         f"{', '.join(waiting)} may have results there: `dlbox up` records it "
                         "again (then `dlbox down` pulls them), `dlbox down --yes` ends it "
                         "without them")
    ended = ec2aws.end_project(_project(), ec2, _say, [])
    if ended:
        _echo(f"{len(ended)} instance(s) of this project that .dlbox/state.json did not "
              "record: terminated (verified)")
    else:
        _echo("no box is up in this project")


def _end_box(box, flags, yes: bool) -> None:
    """What `down` does to one box (the caller holds the box lock): pull the results of its
    runs that ended, ask before ending runs still going, end the box."""
    ends_runs = box.ends_runs(flags)
    box = _settle_runs(box, yes, ends_runs)
    box.down(_project(), flags, _say)
    if ends_runs:
        _record_lost(box)


def _record_lost(box) -> None:
    """Runs of a box that ended with their results still there (stopped with --yes, or never
    pulled): recorded as lost, so nothing claims they wait to be pulled."""
    from dataclasses import replace

    from . import runs

    for run in _unpulled(box):
        run = replace(run, status=runs.LOST)
        runs.save(_project(), run)
        runs.ended(_project(), run, runs.LOST)


def _settle_runs(box, yes: bool, ends_runs: bool):
    """Before a box ends: every run the box knows of (its registry: runs alive, runs holding
    unpulled results) or this project records as unpulled on it. Those that ended (or were
    killed) are pulled; one the box holds with no record here, or a damaged one, is recorded
    again from the box first. Runs still going, and results that could not be pulled, are
    given up only with --yes (or a yes at the prompt) when ending the box would end them.
    Returns the box (maybe woken)."""
    from . import registry, runs

    pending = _unpulled(box)
    if not pending and not (ends_runs and box.python):
        return box  # nothing recorded, and ending the box ends nothing it holds (or it never
        # became ready to run anything)
    names = ", ".join(r.run_id for r in pending)
    try:
        box = box.wake(_project(), _say)
        machine = box.machine(_project())
        going = set(registry.live_runs(machine, box.runs_registry()))
        held = set(registry.held_runs(machine, box.runs_registry()))
    except (DlboxError, InfraError) as exc:
        if ends_runs and pending:
            _confirm(f"Cannot reach {box.label} ({exc}); end it without the results of run(s) "
                     f"{names}?", yes, f"cannot reach {box.label} to pull run(s) {names} ({exc}); "
                     "`dlbox down --yes` ends it without them")
        elif ends_runs:  # nothing recorded here says it holds results: it is not kept for a maybe
            _warn(f"could not look for runs on {box.label} ({exc}); ending it all the same")
        return box
    failed = []
    try:
        if not box.shared_workdir:  # every run there is this project's
            pending += _recorded_again(box, machine, (going | held) - _recorded_ids())
        for run in pending:
            if run.run_id in going:
                continue
            try:
                code, life = runs.exit_status(machine, run, _warn)
                run = runs.finish(_project(), run, machine,
                                  code if code is not None else runs.EXIT_KILLED, _say)
                box.release_results(_project(), machine, run.run_id)  # the caller holds the lock
            except (DlboxError, InfraError) as exc:
                failed.append(run.run_id)
                _warn(f"could not pull run {run.run_id}: {exc}")
                continue
            how = "was killed before it ended" if life in ("gone", "starting") else "had ended"
            _echo(f"run {run.run_id} {how} ({run.status}); its results are pulled into "
                  f"{runs.RUNS_DIR}/{run.run_id}/")
    finally:
        machine.close()
    still = [r.run_id for r in pending if r.run_id in going]
    if ends_runs and still:
        listed = ", ".join(still)
        _confirm(f"Run(s) {listed} still going on {box.label}; end them with the box?", yes,
                 f"run(s) {listed} still going on {box.label}: `dlbox attach {still[0]}` waits "
                 "for the results, `dlbox down --yes` ends the box anyway")
    if ends_runs and failed:
        listed = ", ".join(failed)
        _confirm(f"End {box.label} without the results of run(s) {listed}?", yes,
                 f"could not pull run(s) {listed} from {box.label}: `dlbox pull {failed[0]}` "
                 "tries again, `dlbox down --yes` ends the box without them")
    return box


def _recorded_ids() -> set[str]:
    """The runs this project has a readable record of."""
    from . import runs

    return {r.run_id for r in runs.all_runs(_project(), lambda _: None)}


def _recorded_again(box, machine, run_ids: set[str]) -> list:
    """Runs the box holds that this project has no (readable) record of: recorded again
    from their folders there, so that their results can be pulled or waited for."""
    from . import boxfiles, runs

    found = []
    for run_id in sorted(boxfiles.run_ids(list(run_ids))):
        run = runs.adopt(_project(), box, machine, run_id)
        if run is not None:
            _say(f"run {run_id} is on {box.label} but had no readable record in "
                 f"{runs.RUNS_DIR}/{run_id}/; recorded it again from the box")
            found.append(run)
    return found


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=models_help() + ".")],
    data: Annotated[str, typer.Option(help="Kaggle train/ folder or zip (or a folder with "
                                           "train/), or `kaggle`: download it on the box.")],
    test: Annotated[str | None, typer.Option(help="Kaggle test1/ folder or zip (or `kaggle`): "
                                                  "also write submission.csv.")] = None,
    down_after: Annotated[bool, typer.Option("--down-after", help="Take the box down once the "
                                             "results are pulled and verified.")] = False,
    no_recover: Annotated[bool, typer.Option("--no-recover", help="If the box is lost (spot "
                                             "reclaimed), do not go on on a new box.")] = False,
) -> None:
    """Train on the box (other flags go to the trainer, e.g. --epochs 20); pull the results.

    A lost EC2 box (spot reclaimed) is replaced and the run resumed from its checkpoint."""
    from dataclasses import replace

    from . import boxes, boxlock, config, runs

    started: list = []  # the run, once it started

    def left(interrupt: KeyboardInterrupt) -> str:  # what a Ctrl-C leaves
        run = started[0] if started else getattr(interrupt, "run", None)  # started meanwhile
        if run is None:
            return ("a run that had started goes on: `dlbox runs` lists it, `dlbox attach RUN` "
                    "follows it")
        return f"run {run.run_id} goes on: " + _attach_hint(run.run_id)

    with _errors(left):
        if model not in MODELS:
            raise UsageError(f"unknown model {model!r}; choose {' or '.join(MODELS)}")
        cfg = config.load(_project())
        box = _box(_project()).wake(_project(), _say)
        if box.nodes > 1:
            nodes = [box] + [n.wake(_project(), _say)
                             for n in boxes.cluster(_project(), box)[1:]]
            _train_on_cluster(nodes, model, data, test, list(ctx.args), down_after,
                              not no_recover, cfg)
        for attempt in range(cfg.max_recoveries + 1):
            machine = box.machine(_project())
            try:
                with _transfer_bar() as progress:
                    run = runs.start(_project(), box, machine, model, data, test, list(ctx.args),
                                     _say, progress, cfg.pip_args)
                started.append(run)
                break
            except (DlboxError, InfraError) as exc:
                machine.close()
                gone = None if isinstance(exc, UsageError) else box.gone(_project())
                if gone is None or not gone.reclaimed or no_recover or \
                        attempt == cfg.max_recoveries:
                    raise
                orphan = getattr(exc, "run", None)  # recorded as it started, with the box
                if orphan is not None:
                    orphan = replace(orphan, status=runs.LOST)
                    runs.save(_project(), orphan)
                    runs.ended(_project(), orphan, runs.LOST)
                _say(f"{box.label} was lost before the run started ({gone.reason}); "
                     "replacing it")
                with boxlock.held(_project(), _say):
                    box = box.replacement(_project(), _say)
        code, box = _follow_and_finish(run, box, machine, recover=not no_recover,
                                       down_after=down_after)
    if down_after and runs.load(_project(), run.run_id).finished_at:  # pulled and verified
        # As `down` does it: other runs of the box are pulled first, or asked about.
        with _errors(f"its results are in {runs.RUNS_DIR}/{run.run_id}/; the box may still be "
                     "running: run `dlbox down`"), boxlock.held(_project(), _say):
            _end_box(box, boxes.DownFlags(), yes=False)
    raise typer.Exit(code)


def _attach_hint(run_id: str) -> str:
    return f"`dlbox attach {run_id}` follows it and pulls its results"


def _train_on_cluster(nodes, model: str, data: str, test: str | None, trainer_args: list[str],
                      down_after: bool, recover: bool, cfg) -> None:
    """`train` on a cluster: a worker on every node, followed together; exits."""
    from . import boxes, boxlock, cluster

    machines = [n.machine(_project()) for n in nodes]
    try:
        with _transfer_bar() as progress:
            run = cluster.start(_project(), nodes, machines, model, data, test, trainer_args,
                                _say, progress, cfg.pip_args)
        code = _follow_cluster(run, nodes, machines, recover)
    finally:
        for machine in machines:
            machine.close()
    if down_after and _done(run.run_id):
        with _errors("the cluster may still be running: run `dlbox down`"), \
                boxlock.held(_project(), _say):
            for node in nodes:
                _end_box(node, boxes.DownFlags(), yes=False)
    raise typer.Exit(code)


def _done(run_id: str) -> bool:
    """Whether the run ended well and its results are pulled and verified."""
    from . import runs

    return runs.load(_project(), run_id).status == "done"


def _follow_cluster(run, nodes, machines, recover: bool = True) -> int:
    """Stream a cluster run from its chief, watching the other nodes. A node its owner took
    back (spot) is replaced and the run resumed on every node (at most max_recoveries times
    per command); any other failed node stops the run on every node (resumable by `dlbox
    attach` unless a worker failed of its own error). Pull, record; return the exit status.
    nodes and machines are updated in place."""
    from dataclasses import replace

    from . import boxlock, checkpoints, cluster, config, runs

    budget = config.load(_project()).max_recoveries
    while True:
        failed, code = _follow_cluster_once(run, nodes, machines)
        if code is None:
            return EXIT_INTERRUPTED  # detached: the run goes on
        if failed is not None:
            code = runs.EXIT_RESUMABLE if failed.resumable else EXIT_FAILED
        if code == 0:
            break
        with _errors(f"run {run.run_id} waits: `dlbox attach {run.run_id}` resumes it (a box "
                     "launched meanwhile is recorded: `dlbox down` ends it)"), \
                boxlock.run_held(_project(), run.run_id, _say):  # one dlbox carries a run on
            now = runs.load(_project(), run.run_id)
            if now.nodes != run.nodes:  # another dlbox carried it on meanwhile: follow that
                run = now
                _refresh(nodes, machines, run)
                continue
            gone = cluster.lost_nodes(_project(), nodes, machines, run)
            run = cluster.record_losses(_project(), run, nodes, machines, gone)
            if not recover or budget == 0 or not (gone and all(g.reclaimed for _, g in gone)):
                break
            budget -= 1
            if failed is not None:
                _say(str(failed))
            cluster.stop(run, nodes, machines)
            run = cluster.replace_lost(_project(), run, nodes, machines, gone, _say,
                                       config.load(_project()).pip_args)
            run = cluster.resume(_project(), run, nodes, machines, _say)
            failed = None
    with _errors(f"`dlbox attach {run.run_id}` pulls the results"):
        if failed is not None:
            cluster.stop(run, nodes, machines)
        else:
            cluster.wait_for_workers(run, nodes, machines, time.sleep)
        cluster.pull_logs(_project(), run, machines)
        if failed is not None and failed.node == 0 and failed.box_gone:  # its copy is here
            run = replace(run, status="interrupted", exit_code=code, finished_at=runs.now())
            runs.save(_project(), run)
            runs.ended(_project(), run, "interrupted")
        else:
            run = _finish(run, nodes[0], machines[0], code)
        cluster.release(_project(), run, nodes, machines)
    where = f"{runs.RUNS_DIR}/{run.run_id}/"
    if failed is not None:
        copy = checkpoints.held(_project(), run.run_id)
        epoch = copy.completed if copy else 0
        if not (failed.node == 0 and failed.box_gone):
            with contextlib.suppress(DlboxError):
                epoch = (runs.read_json(machines[0].read(
                    f"{run.remote_dir}/checkpoints/state.json")) or {}).get("completed", epoch)
        then = (f"`dlbox attach {run.run_id}` resumes it from there once the node is back"
                if failed.resumable else f"see `dlbox logs {run.run_id} --node {failed.node}`; "
                f"the run cannot go on as is")
        _echo(f"dlbox: error: {failed}; run {run.run_id} stopped on every node (its "
              f"checkpoint: epoch {epoch}); {then}", err=True, fg=typer.colors.RED)
    elif run.val_accuracy is not None:
        _echo(f"run {run.run_id} {run.status} on {len(nodes)} nodes: val_accuracy "
              f"{run.val_accuracy:.4f}; model, metrics, history and logs in {where}")
    else:
        _echo(f"run {run.run_id} {run.status} (exit {code}); logs in {where}")
    return code


def _refresh(nodes, machines, run) -> None:
    """nodes and machines (in place) as the run's record names them now."""
    from . import boxes, cluster

    for w in cluster.workers(run):
        if nodes[w.node].name != w.box:
            box = boxes.named(_project(), w.box)
            if box is None:
                raise UsageError(f"node {w.node} of run {run.run_id} ({w.box}) is not recorded; "
                                 f"`dlbox up` makes the cluster whole, then `dlbox attach "
                                 f"{run.run_id}`")
            machines[w.node].close()
            nodes[w.node], machines[w.node] = box, box.machine(_project())


def _follow_cluster_once(run, nodes, machines):
    """One follow of a cluster run: (the failed node or None, the chief's exit status; None
    when Ctrl-C detached)."""
    from . import cluster, follow, runs

    chief = nodes[0]
    last_words: list[str] = []  # the chief's error line: said unless a node took it down
    try:
        with _status_bar() as (say, on_status):
            code = follow.follow(
                run, machines[0], say, err=last_words.append,
                on_status=on_status, peers=cluster.watcher(run, nodes, machines),
                on_checkpoint=_checkpoint_copier(run, machines[0]) if chief.replaceable else None,
                gone=(lambda: chief.gone(_project())) if chief.replaceable else None,
                on_event=runs.recorder(_project(), run.run_id))
    except KeyboardInterrupt:
        runs.note(_project(), run.run_id, events.DETACHED)
        _echo(f"detached; run {run.run_id} goes on. `dlbox attach {run.run_id}` follows "
              "it and pulls its results")
        return None, None
    except cluster.NodeFailed as exc:
        return exc, runs.EXIT_RESUMABLE
    except BoxLost as exc:
        return cluster.NodeFailed(0, chief.label, f"was lost ({exc.reason})",
                                  box_gone=True), runs.EXIT_RESUMABLE
    except LostContact as exc:
        raise _fail(f"{exc.reason}; run {run.run_id} goes on there: `dlbox attach "
                    f"{run.run_id}` follows it again", exc.exit_code) from None
    except DlboxError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    failed = None
    if code not in (0, runs.EXIT_RESUMABLE):  # the chief failed: a node may have taken it down
        with contextlib.suppress(DlboxError):
            failed = cluster.check(run, nodes, machines)
        if code != runs.EXIT_PEER_LOST and (failed is None
                                            or failed.code == runs.EXIT_PEER_LOST):
            # The chief went first (the others lost it): the chief is the node to name.
            words = f": {last_words[-1]}" if last_words else ""
            failed = cluster.NodeFailed(0, chief.label, f"had its worker end with exit status "
                                        f"{code}{words}", code=code,
                                        resumable=code in cluster.RESUMABLE_EXITS)
    if failed is None:
        for line in last_words:
            _echo(line, err=True)
    return failed, code


def _cluster_of(run):
    """(nodes, machines) of the cluster a recorded run ran on, woken."""
    from . import boxes, cluster

    chief = boxes.named(_project(), run.box)
    if chief is None:
        raise _not_recorded(run, f"box {run.box}", f"runs/{run.run_id}/")
    chief = chief.wake(_project(), _say)
    nodes = boxes.cluster(_project(), chief)
    names = [w.box for w in cluster.workers(run)]
    if [n.name for n in nodes] != names:
        raise UsageError(f"run {run.run_id} ran on nodes {', '.join(names)}, which are not this "
                         f"project's cluster any more; its results are in runs/{run.run_id}/")
    nodes = [chief] + [n.wake(_project(), _say) for n in nodes[1:]]
    return nodes, [n.machine(_project()) for n in nodes]


def _attach_cluster(run_id: str, recover: bool = True) -> int:
    """attach for a cluster run: follow it, or resume it on every node if it was stopped
    (a node its owner took back replaced first)."""
    from . import boxlock, cluster, config, runs
    from .errors import RunInterrupted

    nodes, machines = [], []
    try:
        with _errors(f"`dlbox attach {run_id}` again resumes it"), \
                boxlock.run_held(_project(), run_id, _say):  # one dlbox carries a run on
            run = runs.load(_project(), run_id)  # as the last holder left it
            nodes, machines = _cluster_of(run)
            if run.status == "interrupted" and run.finished_at is not None:
                gone = cluster.lost_nodes(_project(), nodes, machines, run)
                run = cluster.record_losses(_project(), run, nodes, machines, gone)
                if gone and not recover:
                    raise RunInterrupted(f"run {run.run_id} lost node(s) "
                                         f"{', '.join(str(k) for k, _ in gone)}; `dlbox attach "
                                         f"{run.run_id}` without --no-recover replaces them")
                if gone:
                    run = cluster.replace_lost(_project(), run, nodes, machines, gone, _say,
                                               config.load(_project()).pip_args)
                run = cluster.resume(_project(), run, nodes, machines, _say)
        return _follow_cluster(run, nodes, machines, recover)
    finally:
        for machine in machines:
            machine.close()


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
    """(say, on_status) for follow: a live bar with metrics and ETA on a terminal.

    Epoch lines go through the bar's console so they scroll above it; off a terminal
    (a pipe, a log file, CI) there is no bar, only those lines.
    """
    if not sys.stdout.isatty():
        yield _say, None
        return
    from rich import progress as rp

    from .follow import bar_view

    eta = rp.TextColumn("{task.fields[eta]}")
    # markup=False: the description and metrics come from the box's status.json
    with rp.Progress(rp.TextColumn("{task.description}", markup=False), rp.BarColumn(),
                     rp.MofNCompleteColumn(),
                     rp.TextColumn("{task.fields[metrics]}", markup=False), eta,
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

        yield (lambda line: bar.console.print(clean(line), markup=False, highlight=False)), on_status


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _box_of(run):
    """(box, machine) of the box a recorded run ran on (it must still be this project's box),
    started again if it was stopped to keep results."""
    from . import boxes

    box = boxes.named(_project(), run.box)
    if box is None:
        raise _not_recorded(run, f"box {run.box}", f"runs/{run.run_id}/")
    box = box.wake(_project(), _say)
    return box, box.machine(_project())


def _not_recorded(run, what: str, pulled: str) -> UsageError:
    """The error for a run whose box this project no longer records. With the state file
    itself gone (`.dlbox/` lost, not `down`) the box may still be there: `up` records it again."""
    from . import state

    if not state.state_file(_project()).exists():
        nodes = f" (a cluster: `--nodes {len(run.nodes)}`)" if run.nodes else ""
        return UsageError(f"run {run.run_id} ran on {what}, and this project's record of its box "
                          f"is gone (.dlbox/{state.STATE_FILE}); if the box is still there, "
                          f"`dlbox up` with the flags it was made with{nodes} records it again, "
                          f"then run this command again; what was pulled is in {pulled}")
    return UsageError(f"run {run.run_id} ran on {what}, which is not this project's box any "
                      f"more; what was pulled is in {pulled}")


def _finish(run, box, machine, code: int, cancelled: bool = False):
    """Pull and record the results of a run that ended; then the box may end on its own."""
    from . import runs

    run = runs.finish(_project(), run, machine, code, _say, cancelled)
    _release(run, box, machine)
    return run


def _release(run, box, machine) -> None:
    """run's results are here, verified: the box need not keep them (idempotent)."""
    from . import boxlock

    with boxlock.held(_project(), _say):
        box.release_results(_project(), machine, run.run_id)


def _follow_and_finish(run, box, machine, recover: bool = True,
                       down_after: bool = False) -> tuple[int, object]:
    """Stream the run; Ctrl-C detaches (the run goes on); a lost box is replaced and the run
    resumed there (at most max_recoveries more boxes in this command); pull and record the
    results (Ctrl-C then says what was not done). Returns (exit status, the last box)."""
    from . import checkpoints, config, follow, recovery, runs

    shown = 0  # epochs shown already: a run resumed elsewhere brings its history along
    budget = len(run.interruptions)  # boxes the run had lost before this command
    while True:
        try:
            with _status_bar() as (say, on_status):
                code = follow.follow(
                    run, machine, say, err=lambda line: _echo(line, err=True),
                    on_status=on_status, shown=shown,
                    on_checkpoint=_checkpoint_copier(run, machine) if box.replaceable else None,
                    gone=(lambda b=box: b.gone(_project())) if box.replaceable else None,
                    on_event=runs.recorder(_project(), run.run_id))
            break
        except KeyboardInterrupt:
            runs.note(_project(), run.run_id, events.DETACHED)
            _echo(f"detached; run {run.run_id} goes on. " + _attach_hint(run.run_id))
            return EXIT_INTERRUPTED, box  # as shells expect of Ctrl-C; the run itself goes on
        except BoxLost as lost:
            with _errors(f"run {run.run_id} waits: `dlbox attach {run.run_id}` resumes it (a "
                         "box launched meanwhile is recorded: `dlbox down` ends it)"):
                cfg = config.load(_project())
                run, box, machine = recovery.carry_on(
                    _project(), run, box, machine, lost, _say, recover,
                    budget + cfg.max_recoveries, cfg.pip_args)
                copy = checkpoints.held(_project(), run.run_id)
                shown = copy.completed if copy else 0
        except LostContact as exc:  # the run itself is detached and goes on
            raise _fail(f"{exc.reason}; run {run.run_id} goes on there: `dlbox attach "
                        f"{run.run_id}` follows it again", exc.exit_code) from None
        except DlboxError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except InfraError as exc:
            raise _fail(str(exc), EXIT_INFRA) from None
    with _errors(f"run {run.run_id} ended, and pulling its results was cut short"
                 + ("; the box was not ended" if down_after else "")
                 + f": `dlbox pull {run.run_id}` fetches them"
                 + (", then `dlbox down` ends the box" if down_after else "")):
        run = _finish(run, box, machine, code)
    machine.close()
    where = f"{runs.RUNS_DIR}/{run.run_id}/"
    lost = f" after {len(run.interruptions)} lost box(es)" if run.interruptions else ""
    if run.val_accuracy is not None:
        _echo(f"run {run.run_id} {run.status}{lost}: val_accuracy {run.val_accuracy:.4f}; "
              f"model, metrics, history and log in {where}")
    else:
        _echo(f"run {run.run_id} {run.status}{lost} (exit {code}); logs in {where}")
    return code, box


def _checkpoint_copier(run, machine):
    """on_checkpoint for follow: copy the checkpoint off the box (one dlbox at a time per
    run); a failure is said once and tried again at the next poll (a box that is going is
    noticed by follow itself)."""
    from . import boxlock, checkpoints

    failed = []

    def copy() -> bool:
        try:
            with boxlock.run_held(_project(), run.run_id, timeout_s=COPY_LOCK_TIMEOUT_S):
                checkpoints.pull(_project(), run, machine)
        except (DlboxError, InfraError) as exc:
            if not failed:
                _warn(f"could not copy the checkpoint of run {run.run_id} off the box ({exc}); "
                      "trying again")
            failed.append(exc)
            return False
        return True

    return copy


@app.command()
def attach(
    run_id: Annotated[str, typer.Argument(help="The run's id (see `dlbox runs`).")],
    no_recover: Annotated[bool, typer.Option("--no-recover", help="If the run's box was lost, "
                                             "do not resume it on a new box.")] = False,
) -> None:
    """Follow a run again and pull its results when it ends. A run whose box was lost
    resumes on a new box (or the project's box) from its checkpoint."""
    from . import boxes, boxlock, config, recovery, runs
    from .errors import RunInterrupted

    with _errors(f"`dlbox attach {run_id}` again resumes it (a box launched meanwhile is "
                 "recorded: `dlbox down` ends it)"):
        nodes = runs.load(_project(), run_id).nodes  # one line for a run that does not exist
        runs.note(_project(), run_id, events.ATTACHED)
        if nodes:
            raise typer.Exit(_attach_cluster(run_id, not no_recover))
        cfg = config.load(_project())
        with boxlock.run_held(_project(), run_id, _say):  # one dlbox carries a run on
            run = runs.load(_project(), run_id)  # as the last holder left it
            box = boxes.named(_project(), run.box)
            waiting = run.status == recovery.INTERRUPTED and bool(run.interruptions) \
                and run.interruptions[-1].get("downtime_s") is None
            woken = False  # a stopped box started again, where the run died with the stop
            if not waiting and box is not None and run.finished_at is None:
                gone = box.gone(_project())
                if gone is not None and gone.stopped:  # did the run end before the stop?
                    box = box.wake(_project(), _say)
                    machine = box.machine(_project())
                    try:
                        woken = runs.exit_status(machine, run)[1] == "gone"
                    finally:
                        machine.close()
                if gone is not None and (woken or not gone.stopped):  # lost, unfollowed
                    lost = BoxLost(gone.reason, reclaimed=gone.reclaimed, ended_at=gone.at)
                    _say(recovery.loss_line(run, box, lost))
                    run, waiting = recovery.record_loss(_project(), run, box, lost), True
            if waiting and no_recover:
                raise RunInterrupted(f"run {run.run_id} lost its box; "
                                     + recovery.resumable_line(_project(), run))
            if waiting:
                run, box, machine = recovery.on_new_box(
                    _project(), run, box, _say, len(run.interruptions) + cfg.max_recoveries,
                    cfg.pip_args, new_box=lambda: _box_to_resume_on(run), reuse=woken)
        if not waiting:
            box, machine = _box_of(run)
    with _errors(f"run {run_id} goes on: " + _attach_hint(run_id)):
        code = _follow_and_finish(run, box, machine, recover=not no_recover)[0]
    raise typer.Exit(code)


def _box_to_resume_on(run):
    """For a run whose box is no longer recorded: the project's box, or a new one like its
    last (the flags recorded with the loss; dlbox.toml's if they are damaged). The caller
    holds the box lock."""
    from . import boxes, records

    current = boxes.current(_project())
    if current is not None:
        return current.wake(_project(), _say)
    try:
        flags = records.build(boxes.UpFlags, run.interruptions[-1].get("up_flags") or {})
    except ValueError:
        flags = boxes.UpFlags()
    return boxes.kind_for_up(flags).up(_project(), flags, None, _say)


@app.command()
def pull(run_id: Annotated[str, typer.Argument(help="The run's id (see `dlbox runs`).")]) -> None:
    """Copy a run's results from the box into runs/<id>/ again (verified)."""
    from . import runs

    with _errors():
        run = runs.load(_project(), run_id)
        box, machine = _box_of(run)
        code, _ = runs.exit_status(machine, run, _warn)
        if code is None:  # still going: a snapshot of what it has
            local = runs.pull(_project(), run, machine, _say)
        elif run.finished_at:  # recorded already: copy again (and let the box go, if it waits)
            local = runs.pull(_project(), run, machine, _say, ended=True)
            _release(run, box, machine)
        else:  # ended: its results are final, and once here the box need not keep them
            _finish(run, box, machine, code)
            local = _project() / runs.RUNS_DIR / run.run_id
        machine.close()
        if run.nodes:  # the other nodes' logs too; once the run ended, they may let it go
            _pull_nodes(run_id, ended=code is not None)
    _echo(f"pulled into {local}")


def _pull_nodes(run_id: str, ended: bool) -> None:
    """A cluster run's other nodes: their logs into runs/<id>/nodes/; released once ended."""
    from . import cluster, runs

    run = runs.load(_project(), run_id)
    nodes, machines = _cluster_of(run)
    try:
        cluster.pull_logs(_project(), run, machines)
        if ended:
            cluster.release(_project(), run, nodes, machines)
    finally:
        for machine in machines:
            machine.close()


@app.command()
def logs(
    run_id: Annotated[str | None, typer.Argument(help="The run's id [the latest].")] = None,
    follow_log: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines "
                                             "until the run ends.")] = False,
    node: Annotated[int | None, typer.Option(help="A cluster run: node K's log [0, the "
                                             "chief].")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="The bytes as they are on the box, "
                                      "control characters and all.")] = False,
) -> None:
    """Print a run's train.log from the box (control characters shown escaped, unless --raw)."""
    import codecs

    from . import follow, runs
    from .humanize import clean_lines

    text = codecs.getincrementaldecoder("utf-8")("replace")  # a chunk may end mid-character
    with _errors():
        run = runs.resolve(_project(), run_id)
        _, machine = _box_of(run)
        if node:
            machine.close()
            run, machine = _node_of(run, node)
        offset = 0
        while True:
            chunk, ended = follow.read_log(machine, run, offset)
            if chunk:
                shown = chunk if raw else clean_lines(text.decode(chunk)).encode()
                sys.stdout.buffer.write(shown)
                sys.stdout.flush()
                offset += len(chunk)
            if len(chunk) == follow.LOG_CHUNK_BYTES:
                continue  # more of it is there now
            if not follow_log or ended:
                return  # the poll that saw the end also brought the log's last lines
            time.sleep(runs.STATUS_POLL_S)


def _node_of(run, node: int):
    """(run as node K sees it: its folder there, the machine of node K)."""
    from dataclasses import replace

    from . import boxes, cluster

    team = cluster.workers(run)
    if not 0 <= node < len(team):
        what = f"{len(team)} nodes (0 to {len(team) - 1})" if team else "one box (no --node)"
        raise UsageError(f"--node {node}: run {run.run_id} ran on {what}")
    box = boxes.named(_project(), team[node].box)
    if box is None:
        raise _not_recorded(run, f"node {node} ({team[node].box})",
                            f"runs/{run.run_id}/nodes/{node}/")
    box = box.wake(_project(), _say)
    return replace(run, remote_dir=team[node].remote_dir), box.machine(_project())


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Stop a run with SIGTERM: the trainer checkpoints (resumable) and exits 75."""
    from . import runs

    with _errors():
        run = runs.load(_project(), run_id)
        if run.nodes:
            _cancel_cluster(run)
            return
        box, machine = _box_of(run)
        code = runs.cancel(run, machine, _say)
        run = _finish(run, box, machine, code, cancelled=True)
    _echo(f"run {run.run_id} {run.status} (exit {code}); what it had is in "
          f"{runs.RUNS_DIR}/{run.run_id}/")


def _cancel_cluster(run) -> None:
    """cancel on a cluster: SIGTERM every worker (they stop at the same step, checkpoint and
    exit 75), wait for the chief, then as any ended cluster run."""
    from . import cluster, runs

    nodes, machines = _cluster_of(run)
    try:
        cluster.signal_workers(run, machines)
        code = runs.cancel(run, machines[0], _say)
        cluster.wait_for_workers(run, nodes, machines, time.sleep)
        cluster.pull_logs(_project(), run, machines)
        run = _finish(run, nodes[0], machines[0], code, cancelled=True)
        cluster.release(_project(), run, nodes, machines)
    finally:
        for machine in machines:
            machine.close()
    _echo(f"run {run.run_id} {run.status} on {len(nodes)} nodes (exit {code}); what it had "
          f"is in {runs.RUNS_DIR}/{run.run_id}/")


@app.command("runs")
def list_runs() -> None:
    """A table of this project's runs (boxes lost and epochs so far from each run's event log)."""
    from . import runs, timeline
    from .humanize import duration

    header = ("run", "model", "status", "val acc", "epochs", "duration", "box", "cost", "results")
    rows = []
    with _errors():
        recorded = runs.all_runs(_project(), _warn)
    for run in recorded:
        metrics = runs.read_local_json(_project() / runs.RUNS_DIR / run.run_id / "metrics.json")
        log = runs.events_of(_project(), run.run_id)
        lost = timeline.boxes_lost(log) if log else len(run.interruptions)  # an older run: no log
        seen = timeline.last_epoch(log)
        rows.append((
            run.run_id, run.model, run.status + (f" ({lost} lost box(es))" if lost else ""),
            f"{run.val_accuracy:.4f}" if run.val_accuracy is not None else "-",
            str(metrics.get("epochs_run", "-" if seen is None else f"{seen} so far")),
            duration(run.seconds) if run.seconds is not None else "-",
            run.box + (f" (+{len(run.nodes) - 1} node(s))" if len(run.nodes) > 1 else ""),
            f"${run.cost_usd:.2f}" if run.cost_usd is not None else "-",
            f"{runs.RUNS_DIR}/{run.run_id}/" if run.finished_at else
            "lost with its box" if run.status == runs.LOST else
            f"its checkpoint here (`dlbox attach {run.run_id}` resumes it)" if run.interruptions
            and run.status == "interrupted" else f"on the box (`dlbox pull {run.run_id}`)",
        ))
    if not sys.stdout.isatty():  # piped: tab-separated, for scripts
        for row in (header, *rows):
            typer.echo("\t".join(clean(cell) for cell in row))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*header)
    for row in rows:
        table.add_row(*(Text(clean(cell)) for cell in row))
    Console().print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(ctx: typer.Context) -> None:
    """Log in to the box (or run a command there: dlbox ssh -- nvidia-smi)."""
    from . import sshtarget, state

    with _errors():
        box = _box(_project())
        target = box.ssh_target(_project())
        if target is None:
            raise UsageError(f"{box.label} is this machine; no SSH needed")
        ssh_bin = shutil.which("ssh")
        if ssh_bin is None:
            raise UsageError("the OpenSSH client (ssh) is not installed; install openssh-client")
        # Written again from the record: the file a user edited or lost never loosens the pinning.
        sshtarget.write_config(state.state_dir(_project()), target)
        argv = sshtarget.argv(target, *ctx.args, batch=False)
    sys.stdout.flush()
    os.execv(ssh_bin, argv)


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

    with _errors():
        if not 2 <= n <= MAX_SAMPLE_IMAGES:
            raise UsageError(f"--n must be 2..{MAX_SAMPLE_IMAGES} (got {n})")
        if not 0 <= test_n <= MAX_SAMPLE_IMAGES:
            raise UsageError(f"--test-n must be 0..{MAX_SAMPLE_IMAGES} (got {test_n})")
        train_dir = directory / "train"
        if train_dir.exists() and (not train_dir.is_dir() or any(train_dir.iterdir())):
            raise UsageError(f"{directory / 'train'} is not empty; choose another directory")
        try:
            summary = generate(directory, n, test_n=test_n, bad=bad, seed=seed)
        except OSError as exc:
            raise UsageError(f"cannot write to {directory} ({exc.strerror}); choose another "
                             "directory") from exc
    _echo(
        f"wrote {summary.train} training images to {directory / 'train'}, {summary.test} test "
        f"images to {directory / 'test1'}" + (f", {summary.bad} bad files" if bad else "")
    )


if __name__ == "__main__":
    app()
