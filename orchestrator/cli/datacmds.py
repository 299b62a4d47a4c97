"""Dataset commands: `dlbox data sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .app import data_app
from .output import echo, errors

MAX_SAMPLE_IMAGES = 100_000


@data_app.command("sample")
def data_sample(
    directory: Annotated[Path, typer.Argument(help="Where to write train/ and test1/.")],
    n: Annotated[int, typer.Option("--n", help="Labelled training images (half cats, half dogs).")] = 1000,
    test_n: Annotated[int, typer.Option("--test-n", help="Unlabelled images in test1/.")] = 50,
    bad: Annotated[bool, typer.Option("--bad", help="Add deliberately broken and odd files.")] = False,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files.")] = 0,
) -> None:
    """Write a small learnable dataset in the exact Kaggle layout."""
    from ..sample import generate

    with errors():
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
    echo(
        f"wrote {summary.train} training images to {directory / 'train'}, {summary.test} test "
        f"images to {directory / 'test1'}" + (f", {summary.bad} bad files" if bad else "")
    )
