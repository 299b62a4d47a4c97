"""The run's output files: history.csv, val_predictions.csv, submission.csv, metrics.json."""

from __future__ import annotations

import csv
import io
import platform
from pathlib import Path

import numpy as np

from .status import write_json_atomic, write_text_atomic

HISTORY_COLUMNS = (
    "epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
    "learning_rate", "seconds", "images_per_second",
)
SUBMISSION_CLIP = 0.005  # Kaggle scores log loss: a confident mistake must not cost infinity
LOSS_EPSILON = 1e-7  # Keras' clip for binary cross-entropy
MISCLASSIFIED_SHOWN = 24
GRID_COLUMNS = 6
TILE_PX = 128
CAPTION_PX = 28


def _csv(rows: list[dict] | list[list], header: tuple[str, ...] | list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[c] for c in header] if isinstance(row, dict) else row)
    return buf.getvalue()


def write_history(out: Path, rows: list[dict]) -> None:
    write_text_atomic(out / "history.csv", _csv(rows, HISTORY_COLUMNS))


def binary_metrics(labels: np.ndarray, p_dog: np.ndarray) -> dict:
    """Accuracy, log loss and the confusion matrix at 0.5 (rows: true cat, true dog)."""
    labels = labels.astype(int)
    predicted = (p_dog > 0.5).astype(int)
    p = np.clip(p_dog, LOSS_EPSILON, 1 - LOSS_EPSILON)
    loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    matrix = [[int(np.sum((labels == t) & (predicted == q))) for q in (0, 1)] for t in (0, 1)]
    return {
        "val_accuracy": float(np.mean(predicted == labels)),
        "val_loss": float(loss),
        "confusion_matrix": {"labels": ["cat", "dog"], "rows_true_cols_predicted": matrix},
    }


def write_val_predictions(out: Path, keys: list[str], labels: np.ndarray, p_dog: np.ndarray):
    rows = [[k, int(y), f"{p:.6f}"] for k, y, p in zip(keys, labels, p_dog, strict=True)]
    write_text_atomic(out / "val_predictions.csv", _csv(rows, ("file", "label", "p_dog")))


def write_submission(out: Path, ids: list[int], p_dog: np.ndarray) -> None:
    """Kaggle's id,label with label = P(dog) clipped away from 0 and 1, sorted by id."""
    p = np.clip(p_dog, SUBMISSION_CLIP, 1 - SUBMISSION_CLIP)
    rows = sorted(zip(ids, p, strict=True))
    write_text_atomic(out / "submission.csv", _csv([[i, f"{q:.6f}"] for i, q in rows],
                                                    ("id", "label")))


def write_misclassified(out: Path, images: np.ndarray, rows: np.ndarray, keys: list[str],
                        labels: np.ndarray, p_dog: np.ndarray) -> int:
    """misclassified.jpg: the most confidently wrong validation images, captioned; the count.

    images[rows[k]] is the k-th validation image (the cache is not copied).
    """
    from PIL import Image, ImageDraw

    wrong = np.flatnonzero((p_dog > 0.5) != (labels > 0.5))
    if not len(wrong):
        return 0
    worst = wrong[np.argsort(-np.abs(p_dog[wrong] - labels[wrong]))][:MISCLASSIFIED_SHOWN]
    cols = min(GRID_COLUMNS, len(worst))
    lines = -(-len(worst) // cols)
    grid = Image.new("RGB", (cols * TILE_PX, lines * (TILE_PX + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(grid)
    for n, i in enumerate(worst):
        x, y = (n % cols) * TILE_PX, (n // cols) * (TILE_PX + CAPTION_PX)
        grid.paste(Image.fromarray(np.asarray(images[rows[i]])).resize((TILE_PX, TILE_PX)), (x, y))
        truth = "dog" if labels[i] > 0.5 else "cat"
        draw.text((x + 3, y + TILE_PX + 2), f"{keys[i][:18]}", fill="black")
        draw.text((x + 3, y + TILE_PX + 14), f"{truth}, P(dog) {p_dog[i]:.2f}", fill="firebrick")
    grid.save(out / "misclassified.jpg", quality=88)
    return len(wrong)


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def write_metrics(out: Path, metrics: dict) -> None:
    write_json_atomic(out / "metrics.json", metrics)
