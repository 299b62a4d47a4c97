"""Commands on runs: train, attach, pull, logs, cancel, runs. Each is one call into the
lifecycle (lifecycle.py), whatever box or cluster the run is on."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from trainer.recipes import MODELS, models_help  # no TensorFlow behind it

from ..errors import UsageError
from .app import app, project
from .output import UI, echo, errors, table, warn

RunArg = Annotated[str, typer.Argument(help="The run's id (see `dlbox runs`).")]


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
    from .. import lifecycle

    started: list = []  # the run, once it started

    def left(interrupt: KeyboardInterrupt) -> str:  # what a Ctrl-C leaves
        run = started[0] if started else getattr(interrupt, "run", None)  # started meanwhile
        if run is None:
            return ("a run that had started goes on: `dlbox runs` lists it, `dlbox attach RUN` "
                    "follows it")
        if run.status == "failed":  # cut short as it started: stopped and recorded so
            return (f"run {run.run_id} was stopped before it had started on every node; "
                    "`dlbox train` starts it again")
        return f"run {run.run_id} goes on: " + lifecycle.attach_hint(run.run_id)

    with errors(left):
        if model not in MODELS:
            raise UsageError(f"unknown model {model!r}; choose {' or '.join(MODELS)}")
        code = lifecycle.train(project(), model, data, test, list(ctx.args), UI,
                               recover=not no_recover, down_after=down_after,
                               on_started=started.append)
    raise typer.Exit(code)


@app.command()
def attach(
    run_id: RunArg,
    no_recover: Annotated[bool, typer.Option("--no-recover", help="If the run's box was lost, "
                                             "do not resume it on a new box.")] = False,
) -> None:
    """Follow a run again and pull its results when it ends. A run whose box was lost
    resumes on a new box (or the project's box) from its checkpoint."""
    from .. import lifecycle

    with errors(f"run {run_id} goes on: " + lifecycle.attach_hint(run_id)):
        code = lifecycle.attach(project(), run_id, UI, recover=not no_recover)
    raise typer.Exit(code)


@app.command()
def pull(run_id: RunArg) -> None:
    """Copy a run's results from the box into runs/<id>/ again (verified)."""
    from .. import lifecycle

    with errors():
        local = lifecycle.pull(project(), run_id, UI)
    echo(f"pulled into {local}")


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

    from .. import follow, lifecycle, runs
    from ..humanize import clean_lines

    text = codecs.getincrementaldecoder("utf-8")("replace")  # a chunk may end mid-character
    with errors():
        run, machine = lifecycle.node_of(project(), runs.resolve(project(), run_id), node or 0, UI)
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


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Stop a run with SIGTERM: the trainer checkpoints (resumable) and exits 75."""
    from .. import lifecycle, runs

    with errors():
        run, code = lifecycle.cancel(project(), run_id, UI)
    on = f" on {len(run.nodes)} nodes" if len(run.nodes) > 1 else ""
    echo(f"run {run.run_id} {run.status}{on} (exit {code}); what it had is in "
         f"{runs.RUNS_DIR}/{run.run_id}/")


@app.command("runs")
def list_runs() -> None:
    """A table of this project's runs (boxes lost and epochs so far from each run's event log)."""
    from .. import runs, timeline
    from ..humanize import duration

    header = ("run", "model", "status", "val acc", "epochs", "duration", "box", "cost", "results")
    rows = []
    with errors():
        recorded = runs.all_runs(project(), warn)
    for run in recorded:
        metrics = runs.read_local_json(project() / runs.RUNS_DIR / run.run_id / "metrics.json")
        log = runs.events_of(project(), run.run_id)
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
    table(rows, header)
