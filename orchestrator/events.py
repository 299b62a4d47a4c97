"""A run's event log, runs/<id>/events.jsonl: every change of its state, one JSON line each.

Appended, never rewritten: each event is one write(2) on a file opened O_APPEND, so a
dlbox killed at any point (SIGKILL included) leaves whole lines, at worst a torn last one,
which readers skip and the next append starts on a line of its own. `dlbox runs`, the
report's timeline and later features (budgets, notifications) read runs from here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
MAX_EVENT_BYTES = 4096  # one line; a detail from the box longer than this is cut
MAX_DETAIL_CHARS = 500
MAX_LOG_BYTES = 16 << 20  # read at most this much of a log (a run of many thousand epochs)

# The kinds of event, in a run's life. The end of a run is one of ENDS.
STARTED = "started"  # the trainer started on its box(es): box, nodes, model
EPOCH = "epoch"  # an epoch finished (seen while following): epoch, phase, val_accuracy
CHECKPOINT = "checkpoint"  # its checkpoint copied off the box: epochs, partial
NOTICE = "notice"  # the box's owner warned it will take the box back: action, time
LOST = "box-lost"  # a box was lost under the run: box, reason, epoch, cost_usd
REPLACED = "replaced"  # a box made in a lost one's place: box, was
RESUMED = "resumed"  # the run started again from its checkpoint: box, epochs
DETACHED = "detached"  # the user left it running (Ctrl-C while following)
ATTACHED = "attached"  # a dlbox follows it again
PULLED = "pulled"  # results copied into runs/<id>/: files, bytes, final
CANCELLED = "cancelled"  # the end of a run `dlbox cancel` stopped (logged as it asks)
ENDS = ("done", "failed", CANCELLED, "interrupted", "lost")
KINDS = (STARTED, EPOCH, CHECKPOINT, NOTICE, LOST, REPLACED, RESUMED, DETACHED, ATTACHED,
         PULLED, *ENDS)


@dataclass(frozen=True)
class Event:
    """One line of the log."""

    at: str  # ISO 8601, UTC, seconds
    kind: str
    node: int | None = None  # a cluster run's node it concerns (None: the run as a whole)
    details: dict[str, Any] = field(default_factory=dict)


def _detail(value: Any) -> Any:
    """A value fit for the log: numbers, short strings, None, lists of those."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_detail(v) for v in value[:64]]
    text = str(value)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def append(run_dir: Path, kind: str, node: int | None = None, **details: Any) -> Event:
    """Add an event to the log in run_dir (runs/<id>/, made if need be); returns it."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    event = Event(at=datetime.now(timezone.utc).isoformat(timespec="seconds"), kind=kind,
                  node=node, details={k: _detail(v) for k, v in details.items()})
    record = {"at": event.at, "kind": kind, "node": node, **event.details}
    line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    if len(line) >= MAX_EVENT_BYTES:  # never one that a reader would refuse
        line = json.dumps({"at": event.at, "kind": kind, "node": node}, separators=(",", ":"))
    path = run_dir / EVENTS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # RDWR: see _ends_torn
    try:
        data = line.encode() + b"\n"
        if _ends_torn(fd):  # a line a killed writer left half: this one starts afresh
            data = b"\n" + data
        os.write(fd, data)  # one write: appended whole (a local file; its size is small)
    finally:
        os.close(fd)
    return event


def _ends_torn(fd: int) -> bool:
    """Whether the file does not end with a newline (and is not empty)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def since_start(found: list[Event]) -> list[Event]:
    """The events since the run last started or resumed (its current stretch)."""
    starts = [i for i, event in enumerate(found) if event.kind in (STARTED, RESUMED)]
    return found[starts[-1] + 1:] if starts else found


def epochs_seen(found: list[Event]) -> set[tuple[Any, Any]]:
    """(phase, epoch) of the epochs logged in the current stretch: a follow that shows them
    again (`dlbox attach`, or two dlbox following at once) does not log them twice."""
    return {(e.details.get("phase"), e.details.get("epoch")) for e in since_start(found)
            if e.kind == EPOCH}


def has(found: list[Event], kind: str) -> bool:
    """Whether an event of kind is logged in the current stretch."""
    return any(e.kind == kind for e in since_start(found))


def has_ended(found: list[Event]) -> bool:
    """Whether the run's end is logged in the current stretch (two dlbox that both saw it
    end, `train` following it and `cancel` stopping it, log it once)."""
    return any(e.kind in ENDS for e in since_start(found))


def read(run_dir: Path) -> list[Event]:
    """The run's events, oldest first; lines that are not a whole event (a torn last line,
    a hand edit) are skipped. [] for a run with no log (recorded by an older dlbox)."""
    path = run_dir / EVENTS_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOG_BYTES)
    except OSError:
        return []
    found = []
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            continue
        if not (isinstance(record, dict) and isinstance(record.get("at"), str)
                and record.get("kind") in KINDS):
            continue
        node = record.pop("node", None)
        found.append(Event(at=record.pop("at"), kind=record.pop("kind"),
                           node=node if isinstance(node, int) else None, details=record))
    return found
