"""Files a box writes, parsed as input from a stranger: one checked reader for each.

The box is not trusted: a hand edit, a full disk, another user or a compromised box may
leave anything in a run's files. Each reader returns checked values (types, ranges, sizes)
or raises BadBoxFile, whose message names the file; nothing unchecked reaches a record,
a report or the terminal.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DlboxError
from .humanize import clean

MAX_SMALL_FILE_BYTES = 1 << 20  # status.json, exit_code, metrics.json, a notice: far less
MAX_HISTORY_ROWS = 100_000  # epochs in history.csv
MAX_TEXT_CHARS = 2000  # a string field kept from a box file (an error message, a phase)
# A run id as dlbox makes them: what a box's registry may name (never a path).
RUN_ID = re.compile(r"\d{8}-\d{6}-[a-z0-9]{1,16}(-\d{1,3})?")


class BadBoxFile(DlboxError):
    """A file from the box that is not what dlbox wrote or the trainer writes."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(clean(f"{what} on the box is not valid ({why})"))
        self.what, self.why = what, why


Check = Callable[[Any], bool]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _int(value) and 0 <= value < 1 << 53


def _number(value: Any) -> bool:
    """A number; NaN and infinity too (a diverged loss is the trainer's honest figure)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unit(value: Any) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _numbers_by_name(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v)
                                           for k, v in value.items())


def _texts_by_name(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


def _scalars_by_name(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, str | bool) or _number(v))
        for k, v in value.items())


def _matrix(value: Any) -> bool:
    rows = value.get("rows_true_cols_predicted") if isinstance(value, dict) else None
    return (isinstance(rows, list) and len(rows) == 2
            and all(isinstance(r, list) and len(r) == 2 and all(_count(c) for c in r)
                    for r in rows))


_WORDS = {_int: "a whole number", _count: "a count", _number: "a number",
          _unit: "a number from 0 to 1", _text: "a string", _bool: "true or false",
          _texts: "a list of strings", _numbers_by_name: "an object of numbers",
          _texts_by_name: "an object of strings", _scalars_by_name: "an object of values",
          _matrix: "a 2x2 confusion matrix"}

# status.json, the trainer's heartbeat: the fields dlbox reads (any other key is dropped).
STATUS_FIELDS: dict[str, Check] = {
    "state": _text, "phase": _text, "stage": _text, "epoch": _count, "epochs": _count,
    "step": _count, "steps": _count, "metrics": _numbers_by_name, "eta_seconds": _number,
    "pid": _count, "error": _text, "images_per_second": _number, "shard_images": _count,
    "updated_at": _text, "started_at": _text, "elapsed_seconds": _number,
}
# metrics.json, the trainer's final figures: what records, `dlbox runs` and the report read.
METRICS_FIELDS: dict[str, Check] = {
    "val_accuracy": _unit, "val_loss": _number, "best_epoch": _count, "epochs_run": _count,
    "epochs_planned": _count, "train_images": _count, "val_images": _count,
    "misclassified": _count, "skipped_files": _count, "images_per_second": _number,
    "wall_seconds": _number, "devices": _texts, "replicas": _count, "workers": _count,
    "mixed_precision": _bool, "versions": _texts_by_name, "arguments": _scalars_by_name,
    "confusion_matrix": _matrix, "test_images": _count, "model": _text,
}
NOTICE_FIELDS: dict[str, Check] = {"action": _text, "time": _text}
# history.csv: column -> how its text becomes a value
HISTORY_COLUMNS: dict[str, Callable[[str], Any]] = {
    "epoch": int, "phase": str, "loss": float, "accuracy": float, "val_loss": float,
    "val_accuracy": float, "seconds": float, "images_per_second": float,
}


def _json(raw: bytes, what: str) -> dict:
    if len(raw) > MAX_SMALL_FILE_BYTES:
        raise BadBoxFile(what, f"{len(raw)} bytes, more than {MAX_SMALL_FILE_BYTES}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBoxFile(what, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadBoxFile(what, f"a JSON {type(data).__name__}, not an object")
    return data


def _fields(data: dict, schema: dict[str, Check], what: str) -> dict:
    """The schema's keys of data, each checked (null counts as absent); others dropped."""
    kept = {}
    for key, check in schema.items():
        value = data.get(key)
        if value is None:
            continue
        if not check(value):
            shown = json.dumps(value)[:40]
            raise BadBoxFile(what, f"{key} is {shown}, expected {_WORDS[check]}")
        kept[key] = value[:MAX_TEXT_CHARS] if isinstance(value, str) else value
    return kept


def status(raw: bytes, what: str = "status.json") -> dict:
    """The trainer's heartbeat, its known fields checked."""
    return _fields(_json(raw, what), STATUS_FIELDS, what)


def metrics(raw: bytes, what: str = "metrics.json") -> dict:
    """The trainer's final metrics, their known fields checked."""
    return _fields(_json(raw, what), METRICS_FIELDS, what)


def notice(raw: bytes, what: str = "interruption.json") -> dict:
    """An interruption notice the spot watcher wrote."""
    return _fields(_json(raw, what), NOTICE_FIELDS, what)


def pulled_metrics(run_dir: Path, what: str, warn: Callable[[str], None] | None = None) -> dict:
    """metrics.json as pulled into run_dir, checked; {} when it is missing or not valid
    (said to warn)."""
    try:
        return metrics((run_dir / "metrics.json").read_bytes(), what)
    except FileNotFoundError:
        return {}
    except BadBoxFile as exc:
        if warn is not None:
            warn(f"{exc}; the run is recorded without its final metrics")
        return {}


def exit_code(raw: bytes, what: str = "exit_code") -> int:
    """run.sh's record of the trainer's exit status: 0 to 255."""
    text = raw[:64].decode("ascii", "replace").strip()
    if len(raw) > 64 or not text.isdigit() or not 0 <= int(text) <= 255:
        raise BadBoxFile(what, f"{text[:20]!r}, expected an exit status 0 to 255")
    return int(text)


def history(raw: bytes, what: str = "history.csv") -> list[dict]:
    """history.csv's rows with their columns as numbers (learning_rate and any extra
    column dropped)."""
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
        rows = []
        for n, row in enumerate(reader, start=1):
            if n > MAX_HISTORY_ROWS:
                raise BadBoxFile(what, f"more than {MAX_HISTORY_ROWS} rows")
            missing = [c for c in HISTORY_COLUMNS if row.get(c) is None]
            if missing:
                raise BadBoxFile(what, f"row {n} has no {missing[0]}")
            parsed = {c: kind(row[c]) for c, kind in HISTORY_COLUMNS.items()}
            parsed["phase"] = clean(parsed["phase"])[:MAX_TEXT_CHARS]
            rows.append(parsed)
        return rows
    except (ValueError, csv.Error) as exc:  # int("x"), float("x"), a field too big, not UTF-8
        raise BadBoxFile(what, f"{type(exc).__name__}: {exc}") from None


def run_ids(names: list[str]) -> list[str]:
    """The names that are run ids as dlbox makes them (a box's registry may hold anything)."""
    return [n for n in names if RUN_ID.fullmatch(n)]
