"""The trainer's command line: flags in, one validated frozen Options out."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import extract
from .errors import UsageError
from .recipes import MODELS, RECIPES, Recipe, models_help


@dataclass(frozen=True)
class Options:
    """Everything one training run needs to know."""

    model: str
    data: str
    out: str
    epochs: int
    batch_size: int
    img_size: int
    val_split: float
    seed: int
    limit: int | None
    resume: bool
    test: str | None
    weights: str | None  # "imagenet", None (random init) or a weights file
    fine_tune_epochs: int
    learning_rate: float
    patience: int  # 0 disables early stopping
    cache: str  # "auto", "memory" or "disk"
    extract_dir: str  # where zips are extracted (never inside the dataset folder)

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.model]

    @property
    def total_epochs(self) -> int:
        return sum(phase.epochs(self) for phase in self.recipe.phases)

    def as_dict(self) -> dict:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see python -m trainer --help")


def _parser() -> argparse.ArgumentParser:
    tuned = _recipes_with("fine_tune_epochs")
    p = _Parser(
        prog="python -m trainer",
        description="Train the article's Dogs vs. Cats CNN (scratch) or VGG16 transfer model.",
    )
    p.add_argument("model", choices=MODELS, help=models_help())
    p.add_argument("--data", required=True, help="Kaggle train/ folder, train.zip, "
                   "dogs-vs-cats.zip, or a folder with cats/ and dogs/")
    p.add_argument("--out", required=True, help="output folder (model, metrics, checkpoints)")
    p.add_argument("--epochs", type=int, help="training epochs (vgg16: head epochs) "
                   f"[{_defaults('epochs')}]")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and device")
    p.add_argument("--img-size", type=int, default=150, help="square input size in pixels")
    p.add_argument("--val-split", type=float, default=0.2, help="validation share, by file name")
    p.add_argument("--seed", type=int, default=42, help="seed for weights, shuffling, augmentation")
    p.add_argument("--limit", type=int, help="use at most N labelled images (stable subset)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out if any")
    p.add_argument("--test", help="Kaggle test1/ folder or zip: also write submission.csv")
    p.add_argument("--weights", default="imagenet",
                   help="vgg16 base weights: imagenet, none, or a weights file")
    p.add_argument("--fine-tune-epochs", type=int,
                   help=f"{_names(tuned)}: epochs with the last conv block unfrozen "
                   f"[{_defaults('fine_tune_epochs', tuned)}]")
    p.add_argument("--learning-rate", type=float,
                   help=f"initial learning rate [{_defaults('learning_rate')}]")
    p.add_argument("--patience", type=int, help="early-stopping patience on val_loss, "
                   f"0 = off [{_defaults('patience')}]")
    p.add_argument("--cache", choices=("auto", "memory", "disk"), default="auto",
                   help="where decoded images are kept: RAM when they fit, else --out/cache")
    p.add_argument("--extract-dir", help="where zips are extracted, once per zip version "
                   "[$XDG_CACHE_HOME/dlbox/extracted, else ~/.cache/dlbox/extracted]")
    return p


def _recipes_with(epochs_flag: str) -> list[Recipe]:
    """The recipes with a phase that trains for the epochs in that Options field."""
    return [r for r in RECIPES.values() if epochs_flag in r.epoch_flags()]


def _names(recipes) -> str:
    return ", ".join(r.name for r in recipes)


def _defaults(flag: str, recipes=None) -> str:
    """Each recipe's default for flag, for --help: 'scratch 50, vgg16 10'."""
    recipes = RECIPES.values() if recipes is None else recipes
    return ", ".join(f"{r.name} {getattr(r.defaults, flag):g}" for r in recipes)


def parse(argv: list[str] | None = None) -> Options:
    """Parse and validate argv; raise UsageError naming the bad flag and the fix."""
    ns = _parser().parse_args(argv)
    recipe = RECIPES[ns.model]
    defaults = recipe.defaults
    if ns.fine_tune_epochs and "fine_tune_epochs" not in recipe.epoch_flags():
        tuned = _names(_recipes_with("fine_tune_epochs"))
        raise UsageError(f"--fine-tune-epochs applies to {tuned} only; drop it for {ns.model}")
    if ns.weights not in ("imagenet", "none") and not recipe.takes_weights:
        takers = _names(r for r in RECIPES.values() if r.takes_weights)
        raise UsageError(f"--weights applies to {takers} only; drop it for {ns.model}")
    weights = {"imagenet": "imagenet", "none": None}.get(ns.weights, ns.weights)
    if recipe.takes_weights and weights not in ("imagenet", None):
        if not Path(weights).expanduser().is_file():
            raise UsageError(f"--weights {ns.weights}: no such file; pass imagenet, none or "
                             "a VGG16 (include_top=False) weights file")
        weights = str(Path(weights).expanduser().resolve())
    opts = Options(
        model=ns.model,
        data=str(Path(ns.data).expanduser()),
        out=str(Path(ns.out).expanduser()),
        epochs=_given_or(ns.epochs, defaults.epochs),
        batch_size=ns.batch_size,
        img_size=ns.img_size,
        val_split=ns.val_split,
        seed=ns.seed,
        limit=ns.limit,
        resume=ns.resume,
        test=None if ns.test is None else str(Path(ns.test).expanduser()),
        weights=weights if recipe.takes_weights else None,
        fine_tune_epochs=_given_or(ns.fine_tune_epochs, defaults.fine_tune_epochs),
        learning_rate=_given_or(ns.learning_rate, defaults.learning_rate),
        patience=_given_or(ns.patience, defaults.patience),
        cache=ns.cache,
        extract_dir=str(Path(ns.extract_dir).expanduser() if ns.extract_dir
                        else extract.default_dir()),
    )
    _validate(opts)
    return opts


def _validate(o: Options) -> None:
    checks = [
        (o.epochs >= 1, f"--epochs must be at least 1 (got {o.epochs})"),
        (o.batch_size >= 1, f"--batch-size must be at least 1 (got {o.batch_size})"),
        (32 <= o.img_size <= 1024, f"--img-size must be 32..1024 pixels (got {o.img_size})"),
        (0 < o.val_split < 1, f"--val-split must be between 0 and 1, e.g. 0.2 (got {o.val_split})"),
        (o.limit is None or o.limit >= 2, f"--limit must be at least 2 (got {o.limit})"),
        (o.fine_tune_epochs >= 0, f"--fine-tune-epochs must be 0 or more (got {o.fine_tune_epochs})"),
        (0 < o.learning_rate < 10, f"--learning-rate must be a small positive number, e.g. 0.01 "
                                   f"(got {o.learning_rate})"),
        (o.patience >= 0, f"--patience must be 0 (off) or more (got {o.patience})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _given_or(value, default):
    return default if value is None else value


def prepare_out(o: Options) -> Path:
    """Create --out, check it is writable, and refuse to clobber another run's checkpoints."""
    out = Path(o.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: not writable ({exc.strerror}); choose another folder") from exc
    if not o.resume and (out / "checkpoints" / "state.json").exists():
        raise UsageError(f"--out {out} holds an earlier run; pass --resume to continue it "
                         "or choose another --out")
    return out
