"""Each model's training recipe in one place: flag defaults, builder, optimizer and phases.

Keras is imported inside the functions only: `python -m trainer --help` and flag errors
read the recipes and must answer before the ~4 s TensorFlow import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

SGD_MOMENTUM = 0.9  # the article's SGD(lr=0.01, momentum=0.9)
FINE_TUNE_LR_FACTOR = 0.1  # vgg16 phase 2 learning rate relative to --learning-rate


@dataclass(frozen=True)
class Defaults:
    """The values of the per-model flags when they are not given."""

    epochs: int
    learning_rate: float
    patience: int  # early stopping on val_loss; 0 = off
    fine_tune_epochs: int


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with its own learning rate and trainable layers."""

    name: str  # history.csv's and status.json's phase
    epochs_from_options: str  # the Options field holding its epoch count
    lr_factor: float  # its learning rate relative to --learning-rate
    prepare: Callable[[keras.Model], None] | None  # adapts the model at the phase's start

    def epochs(self, options: Any) -> int:
        return getattr(options, self.epochs_from_options)


@dataclass(frozen=True)
class Recipe:
    """How one model is built and trained."""

    name: str
    summary: str  # one line for help texts (the orchestrator's too)
    defaults: Defaults
    build: Callable[[int, str | None], keras.Model]  # (img_size, weights) -> uncompiled model
    optimizer: Callable[[float], keras.optimizers.Optimizer]  # learning rate -> optimizer
    phases: tuple[Phase, ...]  # in order; the first starts from build, the next from the best
    takes_weights: bool  # whether --weights (base weights) applies

    def epoch_flags(self) -> set[str]:
        """The Options fields that count this recipe's epochs."""
        return {p.epochs_from_options for p in self.phases}

    def schedule(self, options: Any) -> list[tuple[Phase, int, int]]:
        """(phase, first epoch, end epoch) in global 0-based epoch numbers, empty phases left out."""
        planned, first = [], 0
        for phase in self.phases:
            n = phase.epochs(options)
            if n:
                planned.append((phase, first, first + n))
            first += n
        return planned


def _build_scratch(img_size: int, weights: str | None) -> keras.Model:
    from .models import build_scratch

    return build_scratch(img_size)  # no pretrained part: weights never apply


def _sgd(learning_rate: float) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=SGD_MOMENTUM)


def _build_vgg16(img_size: int, weights: str | None) -> keras.Model:
    from .models import build_vgg16

    return build_vgg16(img_size, weights)


def _adam(learning_rate: float) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.Adam(learning_rate=learning_rate)


def _unfreeze_vgg16_top_block(model: keras.Model) -> None:
    from .models import unfreeze_top_block

    unfreeze_top_block(model)


TRAINING = "training"
FINE_TUNING = "fine-tuning"

RECIPES = {
    # The article's small CNN: SGD, early stopping with patience 2, up to 50 epochs.
    "scratch": Recipe(
        name="scratch",
        summary="the article's small CNN trained from scratch, 3 conv blocks at 150x150",
        defaults=Defaults(epochs=50, learning_rate=0.01, patience=2, fine_tune_epochs=0),
        build=_build_scratch,
        optimizer=_sgd,
        phases=(Phase(TRAINING, "epochs", 1.0, None),),
        takes_weights=False,
    ),
    # The head on the frozen base, then block5 unfrozen at a tenth of the learning rate.
    "vgg16": Recipe(
        name="vgg16",
        summary="VGG16 ImageNet transfer learning, then its top block fine-tuned",
        defaults=Defaults(epochs=10, learning_rate=1e-4, patience=3, fine_tune_epochs=10),
        build=_build_vgg16,
        optimizer=_adam,
        phases=(
            Phase(TRAINING, "epochs", 1.0, None),
            Phase(FINE_TUNING, "fine_tune_epochs", FINE_TUNE_LR_FACTOR, _unfreeze_vgg16_top_block),
        ),
        takes_weights=True,
    ),
}

MODELS = tuple(RECIPES)


def models_help() -> str:
    """Every model and its one-line summary: "scratch: ...; vgg16: ..."."""
    return "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
