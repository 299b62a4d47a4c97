"""The store of the project's boxes: those .dlbox/state.json records, decoded into their
kinds (registered in kinds.py).

Commands look a box's kind up here, once, and never test what kind a box is. A new kind
is one module implementing boxkind.Box (its part of `down --all`, its watcher, its loss
record), registered in kinds.py with its `up` flags.
"""

from __future__ import annotations

from pathlib import Path

from . import kinds, nodes, state
from .boxkind import Box, DownFlags
from .errors import UsageError
from .kinds import UpFlags
from .nodes import cluster

__all__ = ["classes", "cluster", "current", "decode", "kind_for_up", "named", "no_box", "recorded"]


def classes() -> list[type[Box]]:
    """Every registered kind's class."""
    return [kind.load() for kind in kinds.KINDS]


def kind_for_up(flags: UpFlags) -> type[Box]:
    """The class of the kind `up` makes (kinds.for_up)."""
    return kinds.for_up(flags).load()


def check_down_flags(box: Box, flags: DownFlags) -> None:
    foreign = [name for name in flags.given() if name not in box.DOWN_FLAGS]
    if foreign:
        raise UsageError(f"--{foreign[0]} does not apply to {box.label}; drop it")


def decode(record: dict, project_dir: Path) -> Box:
    """The box a record of project_dir's state describes."""
    kind = kinds.named(record["kind"])
    if kind is None:
        raise UsageError(f"this project records a box of kind {record['kind']!r}, which this "
                         "dlbox does not know; upgrade dlbox (pip install -U dlbox)")
    return nodes.build(kind.load(), record, project_dir)


def recorded(project_dir: Path) -> list[Box]:
    """Every box the project records, oldest first."""
    return [decode(record, project_dir) for record in state.records(project_dir)]


def current(project_dir: Path) -> Box | None:
    """The project's box (a cluster's chief), or None."""
    found = recorded(project_dir)
    if _of_one_cluster(found):  # whole, or a node short (`up` makes it again)
        return min(found, key=lambda b: b.node)
    if len(found) > 1:
        raise UsageError(f"this project records {len(found)} boxes ("
                         + ", ".join(b.label for b in found) + "); `dlbox down` ends them all")
    return found[0] if found else None


def _of_one_cluster(found: list[Box]) -> bool:
    """Whether the records are distinct nodes of one cluster, some maybe missing."""
    sizes = {b.nodes for b in found}
    return (len(found) > 1 and len({b.kind for b in found}) == 1 and len(sizes) == 1
            and sizes.pop() >= len(found) and len({b.node for b in found}) == len(found))


def named(project_dir: Path, name: str) -> Box | None:
    """The recorded box called name, or None."""
    return next((b for b in recorded(project_dir) if b.name == name), None)


def no_box() -> UsageError:
    return UsageError("no box is up in this project; `dlbox up --local` (this machine), "
                      "`dlbox up --ssh USER@HOST --key KEY` or `dlbox up` (EC2) starts one")
