"""The `dlbox` command line: thin typer commands, each one call into the core."""

from __future__ import annotations

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
)
data_app = typer.Typer(help="Datasets: generate a sample in the Kaggle layout.", no_args_is_help=True)
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


def _fail(exc: DlboxError) -> typer.Exit:
    typer.secho(f"dlbox: error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(exc.exit_code)


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
        if (directory / "train").exists() and any((directory / "train").iterdir()):
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
