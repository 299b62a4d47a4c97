"""runs/<id>/report.html: learning curves, final metrics, confusion matrix, misclassified images."""

from __future__ import annotations

import csv
from pathlib import Path

from markupsafe import Markup

from . import boxfiles, events, timeline
from .atomic import write_atomic
from .render import render

CHART_W, CHART_H, CHART_PAD = 460, 260, 44
SERIES_COLOURS = {"training": "#1f77b4", "validation": "#d62728"}


def svg_chart(title: str, epochs: list[int], series: dict[str, list[float]]) -> Markup:
    """A small line chart as inline SVG (no plotting library needed on the laptop)."""
    values = [v for vs in series.values() for v in vs]
    if not epochs or not values:
        return Markup(f'<svg class="chart" width="{CHART_W}" height="{CHART_H}"><text x="10" '
                      f'y="20">{title}: no epochs yet</text></svg>')
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = epochs[0], max(epochs[-1], epochs[0] + 1)
    width, height = CHART_W - 2 * CHART_PAD, CHART_H - 2 * CHART_PAD

    def xy(epoch: int, value: float) -> str:
        x = CHART_PAD + (epoch - x0) / (x1 - x0) * width
        y = CHART_PAD + (1 - (value - lo) / (hi - lo)) * height
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" '
             f'height="{CHART_H}" role="img" aria-label="{title}">',
             f'<text x="{CHART_W / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>',
             f'<rect x="{CHART_PAD}" y="{CHART_PAD}" width="{width}" height="{height}" '
             'fill="none" stroke="#999"/>',
             f'<text x="{CHART_PAD - 4}" y="{CHART_PAD + 4}" text-anchor="end" '
             f'font-size="11">{hi:.3f}</text>',
             f'<text x="{CHART_PAD - 4}" y="{CHART_PAD + height}" text-anchor="end" '
             f'font-size="11">{lo:.3f}</text>',
             f'<text x="{CHART_W / 2}" y="{CHART_H - 8}" text-anchor="middle" font-size="11">'
             f'epoch {x0}–{epochs[-1]}</text>']
    for n, (name, vs) in enumerate(series.items()):
        colour = SERIES_COLOURS.get(name, "#333")
        points = " ".join(xy(e, v) for e, v in zip(epochs, vs, strict=True))
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{points}"/>')
        parts.append(f'<text x="{CHART_PAD + 8 + 110 * n}" y="{CHART_PAD - 8}" font-size="12" '
                     f'fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


CHARTED = ("epoch", "loss", "val_loss", "accuracy", "val_accuracy")
TABLED = dict.fromkeys(("phase", "seconds", "images_per_second"), "")  # shown if there


def _plottable(row: dict) -> bool:
    """A history row with every charted column a number (a damaged row is left out)."""
    try:
        return all(float(row[name]) == float(row[name]) for name in CHARTED)  # NaN is not
    except (KeyError, TypeError, ValueError):
        return False


def _nodes(run_dir: Path, run) -> list[dict]:
    """Each node of a cluster run with what its last status says it trained, and how fast
    (none for a single box: a cluster of one)."""
    if len(run.nodes) < 2:
        return []
    found = []
    for node in run.nodes:
        k = node.get("node")
        where = run_dir / "status.json" if k == 0 else run_dir / "nodes" / str(k) / "status.json"
        try:
            status = boxfiles.status(where.read_bytes())
        except (OSError, boxfiles.BadBoxFile):
            status = {}
        rate = status.get("images_per_second")
        found.append({"node": k, "box": node.get("box"), "address": node.get("address"),
                      "images": status.get("shard_images"),
                      "images_per_second": rate if isinstance(rate, (int, float)) else None})
    return found


def _timeline(run_dir: Path, run) -> list[dict]:
    """The rows of the report's timeline: each stretch of the run on its box(es)."""
    rows = []
    for n, s in enumerate(timeline.stretches(events.read(run_dir), run.usd_per_hour), 1):
        ran = (f"{s.epochs[0]}–{s.epochs[-1]} ({len(s.epochs)})" if len(s.epochs) > 1
               else str(s.epochs[0]) if s.epochs else "none")
        rows.append({"n": n, "boxes": ", ".join(s.boxes), "replaced": ", ".join(s.replaced),
                     "from": s.started_at, "to": s.ended_at or "-", "epochs": ran,
                     "ending": s.ending + (f" (after {s.notices} notice)" if s.notices else ""),
                     "cost": f"${s.cost_usd:.2f}" if s.cost_usd is not None else "-"})
    return rows


def write(run_dir: Path, run, box: str, duration: str, cost: str,
          metrics: dict | None = None) -> Path:
    """Render the report from what was pulled into run_dir (metrics: metrics.json as
    boxfiles.metrics checked it; read here if not given)."""
    if metrics is None:
        metrics = boxfiles.pulled_metrics(run_dir, f"run {run.run_id}'s metrics.json")
    try:
        with open(run_dir / "history.csv", newline="") as f:
            history = [{**TABLED, **row} for row in csv.DictReader(f) if _plottable(row)]
    except (OSError, csv.Error, UnicodeDecodeError):
        history = []
    epochs = [int(float(r["epoch"])) for r in history]

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in history]

    matrix = (metrics.get("confusion_matrix") or {}).get("rows_true_cols_predicted")
    path = run_dir / "report.html"
    write_atomic(path, render(
        "report.html.j2", run=run, metrics=metrics, history=history, box=box, duration=duration,
        cost=cost, matrix=matrix,
        loss_chart=svg_chart("Loss", epochs, {"training": column("loss"),
                                              "validation": column("val_loss")}),
        accuracy_chart=svg_chart("Accuracy", epochs, {"training": column("accuracy"),
                                                      "validation": column("val_accuracy")}),
        misclassified=(run_dir / "misclassified.jpg").exists(),
        nodes=_nodes(run_dir, run), timeline=_timeline(run_dir, run),
        time_lost=sum((i.get("work_lost_s") or 0) + (i.get("downtime_s") or 0)
                      for i in run.interruptions),
    ))
    return path
