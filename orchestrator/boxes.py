"""The store of the project's boxes: the kinds dlbox knows (their registration), and the
boxes .dlbox/state.json records, decoded into their kinds.

Commands look a box's kind up here, once, and never test what kind a box is. A new kind
is one module implementing boxkind.Box, added to KINDS.
"""

from __future__ import annotations

from pathlib import Path

from . import nodes, state
from .boxkind import MAX_NODES, Box, DownFlags, UpFlags
from .ec2box import Ec2Box
from .errors import UsageError
from .localbox import LocalBox
from .nodes import cluster
from .sshbox import SshBox

KINDS: tuple[type[Box], ...] = (LocalBox, SshBox, Ec2Box)  # the registration of each kind

__all__ = ["KINDS", "cluster", "current", "decode", "kind_for_up", "named", "no_box", "recorded"]


def _registry() -> dict[str, type[Box]]:
    return {cls.kind: cls for cls in KINDS}


def kind_for_up(flags: UpFlags) -> type[Box]:
    """The kind `up` makes: the one whose flag is given (--local, --ssh), else the default
    (EC2); a flag of another kind is refused."""
    registry = _registry()
    asked = [c for c in KINDS if c.CHOSEN_BY and getattr(flags, c.CHOSEN_BY)]
    if len(asked) > 1:
        listed = " and ".join(flags.flag(c.CHOSEN_BY) for c in asked)
        raise UsageError(f"{listed} exclude each other; pick one")
    cls = asked[0] if asked else next(c for c in KINDS if c.CHOSEN_BY is None)
    if flags.nodes is not None and not 1 <= flags.nodes <= MAX_NODES:
        raise UsageError(f"--nodes {flags.nodes}: expected 1 to {MAX_NODES}")
    foreign = [name for name in flags.given() if name not in cls.UP_FLAGS]
    if foreign:
        owners = [c for c in registry.values() if foreign[0] in c.UP_FLAGS]
        which = " or ".join(c.DESCRIPTION for c in owners)
        raise UsageError(f"{flags.flag(foreign[0])} is for {which}, not {cls.DESCRIPTION}; "
                         f"drop {flags.flag(foreign[0])}")
    return cls


def check_down_flags(box: Box, flags: DownFlags) -> None:
    foreign = [name for name in flags.given() if name not in box.DOWN_FLAGS]
    if foreign:
        raise UsageError(f"--{foreign[0]} does not apply to {box.label}; drop it")


def decode(record: dict, project_dir: Path) -> Box:
    """The box a record of project_dir's state describes."""
    cls = _registry().get(record["kind"])
    if cls is None:
        raise UsageError(f"this project records a box of kind {record['kind']!r}, which this "
                         "dlbox does not know; upgrade dlbox (pip install -U dlbox)")
    return nodes.build(cls, record, project_dir)


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
