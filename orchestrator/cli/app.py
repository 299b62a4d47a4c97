"""The `dlbox` typer app and its global options; the commands register on it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__, debuglog  # stdlib only: cheap to import
from .output import errors

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


def project() -> Path:
    """The project every command acts on: the current folder."""
    return Path.cwd()


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
        from .. import state

        with errors():
            debuglog.enable(state.state_dir(project()))


def _terminated(signum: int, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C does: every cleanup runs and no child (tar, ssh) outlives us."""
    raise SystemExit(128 + signum)
