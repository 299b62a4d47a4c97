"""Box kinds behind one interface: the protocol each kind implements, and their registry.

The registry turns a recorded kind back into its implementation; commands look the kind
up here, once, and never test what kind a box is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Protocol

from . import records, registry, state
from .errors import UsageError
from .humanize import Say
from .machine import Machine
from .sshtarget import SshTarget

MAX_NODES = 64  # boxes in one cluster: a typo (--nodes 200) must not launch a fleet


@dataclass(frozen=True)
class UpFlags:
    """`dlbox up`'s flags as given (None: not given). Each kind takes only its own."""

    local: bool = False
    ssh: tuple[str, ...] | None = None  # one USER@HOST[:PORT] per node
    key: tuple[str, ...] | None = None  # one for every node, or one per --ssh
    nodes: int | None = None  # boxes in the cluster (--ssh: as many as given)
    node_address: tuple[str, ...] | None = None  # --ssh: where the others reach each node
    workdir: str | None = None
    python: str | None = None
    region: str | None = None
    profile: str | None = None
    instance_type: tuple[str, ...] | None = None
    spot: bool | None = None
    disk_gb: int | None = None
    idle_minutes: int | None = None
    max_lifetime_minutes: int | None = None
    ssh_cidr: str | None = None
    ssh_user: str | None = None
    ssh_key: str | None = None
    ami: str | None = None

    def given(self) -> list[str]:
        return _given(self)

    def flag(self, name: str) -> str:
        """The name on the command line, for messages."""
        if name == "spot":
            return "--spot" if self.spot else "--on-demand"
        return f"--{name.replace('_', '-')}"


@dataclass(frozen=True)
class DownFlags:
    """`dlbox down`'s flags (for one project's boxes)."""

    purge: bool = False
    profile: str | None = None

    def given(self) -> list[str]:
        return _given(self)


def _given(flags) -> list[str]:
    """The flags that differ from their default (`--on-demand` is given, spot=False)."""
    return [f.name for f in fields(flags) if getattr(flags, f.name) != f.default]


@dataclass(frozen=True)
class Gone:
    """Why a box can no longer run anything, in its owner's words."""

    reason: str
    reclaimed: bool  # taken back by its owner (spot, a failed host), not ended on purpose
    at: float | None = None  # time.time() when it ended, if its owner says
    stopped: bool = False  # stopped, not ended: it can start again (its disk kept)


def registry_in(workdir: str) -> str:
    """Where runs announce themselves on a box that has no watchdog: under dlbox's folder."""
    return f"{workdir}/active"


class Box(Protocol):
    """A box of some kind: a frozen record in .dlbox/state.json plus what can be done with it.

    A cluster is several records of one kind, node 0 (the chief) to nodes - 1; commands
    that act on "the box" act on the chief, and `train` runs one worker on every node.
    """

    kind: str  # the registry key, recorded with the box
    name: str  # unique in the project
    node: int  # its index in the cluster (0: the chief, and the only node of a single box)
    nodes: int  # how many boxes the cluster has (1: a single box)
    address: str | None  # where the other nodes reach it (None: a single box)
    workdir: str | None  # dlbox's folder on the box (None until the box is ready)
    python: str | None  # the interpreter that trains there
    rented: ClassVar[bool]  # paid by the hour (EC2): an unknown price is an unknown cost
    # Its folder may hold other projects' runs (an SSH box's ~/dlbox): a run there that this
    # project has no record of is not taken for one of its own.
    shared_workdir: ClassVar[bool]
    DESCRIPTION: ClassVar[str]  # "EC2 boxes", "the local box"...
    INTERRUPTED_UP: ClassVar[str]  # what Ctrl-C during `up` leaves, and what to do
    UP_FLAGS: ClassVar[frozenset[str]]  # the `up` flags this kind takes
    DOWN_FLAGS: ClassVar[frozenset[str]]

    @classmethod
    def up(cls, project_dir: Path, flags: UpFlags, existing: Box | None, say: Say) -> Box:
        """Make (or reuse) a box of this kind, ready to train, and record it."""

    @property
    def label(self) -> str:
        """How messages name the box: "the local box", "the SSH box u@h:22"..."""

    @property
    def hourly_usd(self) -> float | None:
        """What the box costs per hour (None: nobody rents it by the hour)."""

    def machine(self, project_dir: Path) -> Machine:
        """The machine to run commands on; UsageError if the box is not ready for it."""

    def ssh_target(self, project_dir: Path) -> SshTarget | None:
        """How to log in to the box over SSH (None: it is this machine)."""

    def runs_registry(self) -> str:
        """The folder on the box where each live run leaves its pid (the watchdog reads it)."""

    def status(self, project_dir: Path) -> list[tuple[str, str]]:
        """What `dlbox status` shows, as (what, value) rows, read from the box's owner."""

    def down(self, project_dir: Path, flags: DownFlags, say: Say) -> None:
        """End (or forget) the box, verified, and remove its record."""

    def ends_runs(self, flags: DownFlags) -> bool:
        """Whether `down` with flags ends the runs on the box (and what they have not written out)."""

    def wake(self, project_dir: Path, say: Say) -> Box:
        """The box ready for commands: started again if it was stopped to keep results."""

    def hold_results(self, project_dir: Path) -> None:
        """A run holds results on the box: nothing that ends the box on its own may destroy them."""

    def release_results(self, project_dir: Path, machine: Machine, run_id: str) -> None:
        """run_id's results are pulled (verified): the box may end on its own again once no
        other run holds results there."""

    @property
    def interruptible(self) -> bool:
        """Whether its owner may take the box back with a warning (EC2 spot): runs watch for it."""

    @property
    def replaceable(self) -> bool:
        """Whether dlbox can make another like it when it is lost (runs copy their checkpoints
        off it as they go)."""

    def gone(self, project_dir: Path) -> Gone | None:
        """Why the box can no longer run anything (terminated, reclaimed); None while it can
        (a stopped box can be started again: see wake)."""

    def retire(self, project_dir: Path, say: Say) -> None:
        """End a lost box's machine (verified) so that nothing bills, keeping its record: a
        replacement later takes the same settings."""

    def up_flags(self, project_dir: Path) -> UpFlags:
        """`up`'s flags that make a box like this one (replaceable boxes)."""

    def replacement(self, project_dir: Path, say: Say) -> Box:
        """End this lost box (verified) and make a new one like it, ready to train, recorded
        in its place. The caller holds the box lock."""


class Unwatched:
    """What boxes with no watchdog share (this machine, one reached over SSH): nothing ends
    them on their own, so results on them need no holding; a pull only clears its marker."""

    def wake(self, project_dir: Path, say: Say) -> Box:
        return self  # always there

    def hold_results(self, project_dir: Path) -> None:
        pass  # results stay until `dlbox down`, which pulls them first

    def release_results(self, project_dir: Path, machine: Machine, run_id: str) -> None:
        registry.release(machine, self.runs_registry(), run_id)

    interruptible = False  # nobody takes it back
    replaceable = False
    rented = False  # the user's own machine
    shared_workdir = False

    def gone(self, project_dir: Path) -> Gone | None:
        return None  # unreachable is not gone: it is the user's machine

    def retire(self, project_dir: Path, say: Say) -> None:
        pass  # never lost

    def replacement(self, project_dir: Path, say: Say) -> Box:
        raise UsageError(f"{self.label} cannot be replaced by dlbox")  # never gone, never asked


def _registry() -> dict[str, type[Box]]:
    from .ec2box import Ec2Box
    from .localbox import LocalBox
    from .sshbox import SshBox

    return {cls.kind: cls for cls in (LocalBox, SshBox, Ec2Box)}


def kind_for_up(flags: UpFlags) -> type[Box]:
    """The kind `up` makes: --local, --ssh, else EC2; a flag of another kind is refused."""
    registry = _registry()
    if flags.local and flags.ssh:
        raise UsageError("--local and --ssh exclude each other; pick one")
    cls = registry["local" if flags.local else "ssh" if flags.ssh else "ec2"]
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
    try:
        return records.build(cls, record)
    except ValueError as exc:
        path = state.state_file(project_dir)
        raise UsageError(f"{path}: the record of box {record['name']!r} is damaged ({exc}); "
                         "restore it, or move the file away and run `dlbox down`") from exc


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


def _one_cluster(found: list[Box]) -> bool:
    """Whether the records are the nodes 0..N-1 of one cluster (N > 1), all of one kind."""
    return (len(found) > 1 and len({b.kind for b in found}) == 1
            and sorted(b.node for b in found) == list(range(len(found)))
            and all(b.nodes == len(found) for b in found))


def _of_one_cluster(found: list[Box]) -> bool:
    """Whether the records are distinct nodes of one cluster, some maybe missing."""
    sizes = {b.nodes for b in found}
    return (len(found) > 1 and len({b.kind for b in found}) == 1 and len(sizes) == 1
            and sizes.pop() >= len(found) and len({b.node for b in found}) == len(found))


def cluster(project_dir: Path, chief: Box) -> list[Box]:
    """Every node of chief's cluster, in node order ([chief] for a single box)."""
    if chief.nodes == 1:
        return [chief]
    found = [b for b in recorded(project_dir) if b.kind == chief.kind]
    if not _one_cluster(found):
        names = ", ".join(b.name for b in found)
        raise UsageError(f"this project records {len(found)} of the {chief.nodes} nodes of its "
                         f"cluster ({names}); `dlbox up` again (same flags) makes the missing "
                         "ones, `dlbox down` ends them all")
    return sorted(found, key=lambda b: b.node)


def named(project_dir: Path, name: str) -> Box | None:
    """The recorded box called name, or None."""
    return next((b for b in recorded(project_dir) if b.name == name), None)


def no_box() -> UsageError:
    return UsageError("no box is up in this project; `dlbox up --local` (this machine), "
                      "`dlbox up --ssh USER@HOST --key KEY` or `dlbox up` (EC2) starts one")
