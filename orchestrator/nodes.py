"""A kind's own boxes among the project's records: all of them, and a cluster's nodes.

The kinds use it (a kind never needs another kind's records), so it cannot use the store.
"""

from __future__ import annotations

from pathlib import Path

from . import records, state
from .boxkind import Box
from .errors import UsageError


def build(cls: type[Box], record: dict, project_dir: Path) -> Box:
    """The box of kind cls that record describes; UsageError for a damaged record."""
    try:
        return records.build(cls, record)
    except ValueError as exc:
        path = state.state_file(project_dir)
        raise UsageError(f"{path}: the record of box {record['name']!r} is damaged ({exc}); "
                         "restore it, or move the file away and run `dlbox down`") from exc


def of_kind(project_dir: Path, cls: type[Box]) -> list[Box]:
    """Every box of kind cls that the project records, oldest first."""
    return [build(cls, r, project_dir) for r in state.records(project_dir)
            if r["kind"] == cls.kind]


def cluster(project_dir: Path, chief: Box) -> list[Box]:
    """Every node of chief's cluster, in node order ([chief] for a single box)."""
    if chief.nodes == 1:
        return [chief]
    found = of_kind(project_dir, type(chief))
    if not _one_cluster(found):
        names = ", ".join(b.name for b in found)
        raise UsageError(f"this project records {len(found)} of the {chief.nodes} nodes of its "
                         f"cluster ({names}); `dlbox up` again (same flags) makes the missing "
                         "ones, `dlbox down` ends them all")
    return sorted(found, key=lambda b: b.node)


def _one_cluster(found: list[Box]) -> bool:
    """Whether the records are the nodes 0..N-1 of one cluster (N > 1), all of one kind."""
    return (len(found) > 1 and len({b.kind for b in found}) == 1
            and sorted(b.node for b in found) == list(range(len(found)))
            and all(b.nodes == len(found) for b in found))
