"""A run's timeline, read from its event log: each stretch on a box (or a cluster's boxes),
how it ended, the epochs it ran and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from . import events
from .events import Event


@dataclass
class Stretch:
    """The run on one set of boxes, from its start (or resume) there to its end or loss."""

    boxes: list[str]
    started_at: str
    ended_at: str | None = None
    ending: str = "going"  # "done", "failed"..., "lost: <why>" (going: no end logged yet)
    epochs: list[int] = field(default_factory=list)  # finished there, in order
    cost_usd: float | None = None
    replaced: list[str] = field(default_factory=list)  # boxes made for it in lost ones' place
    notices: int = 0  # interruption notices its boxes got

    @property
    def seconds(self) -> float | None:
        if self.ended_at is None:
            return None
        return (datetime.fromisoformat(self.ended_at)
                - datetime.fromisoformat(self.started_at)).total_seconds()


def stretches(found: list[Event], usd_per_hour: float | None = None) -> list[Stretch]:
    """The run's stretches, oldest first. usd_per_hour: what the last stretch's boxes cost
    (the run record's price); a lost stretch's cost is the one its loss recorded."""
    out: list[Stretch] = []
    replaced: list[str] = []
    for event in found:
        d = event.details
        now = out[-1] if out else None
        if event.kind in (events.STARTED, events.RESUMED):
            boxes = d.get("boxes") if isinstance(d.get("boxes"), list) else [d.get("box")]
            out.append(Stretch(boxes=[str(b) for b in boxes], started_at=event.at,
                               replaced=replaced))
            replaced = []
        elif now is None:
            continue  # a log that lost its start: nothing to hang the event on
        elif event.kind == events.REPLACED:
            replaced.append(str(d.get("box")))
        elif event.kind == events.EPOCH and isinstance(d.get("epoch"), int):
            now.epochs.append(d["epoch"])
        elif event.kind == events.NOTICE:
            now.notices += 1
        elif event.kind == events.LOST:
            lost = f"lost {d.get('box')}: {d.get('reason')}"
            now.ending = lost if not now.ending.startswith("lost") else f"{now.ending}; {lost}"
            now.ended_at = now.ended_at or event.at
            if isinstance(d.get("cost_usd"), (int, float)):
                now.cost_usd = (now.cost_usd or 0.0) + d["cost_usd"]
        elif event.kind in events.ENDS and not now.ending.startswith("lost"):
            now.ending, now.ended_at = event.kind, event.at
    if out and usd_per_hour is not None and out[-1].cost_usd is None \
            and out[-1].seconds is not None:
        out[-1].cost_usd = usd_per_hour * out[-1].seconds / 3600
    return out


def boxes_lost(found: list[Event]) -> int:
    """How many boxes were lost under the run."""
    return sum(1 for event in found if event.kind == events.LOST)


def last_epoch(found: list[Event]) -> int | None:
    """The last epoch the run finished, as far as the log saw."""
    epochs = [e.details["epoch"] for e in found
              if e.kind == events.EPOCH and isinstance(e.details.get("epoch"), int)]
    return epochs[-1] if epochs else None
