"""The contract of a box kind: the protocol each kind implements and what the kinds without a
watchdog share. Nothing here knows which kinds there are (kinds.py registers them)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Protocol

from . import registry
from .errors import UsageError
from .humanize import Say
from .kinds import UpFlags
from .machine import Machine
from .sshtarget import SshTarget
from .ui import Ui


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
    INTERRUPTED_UP: ClassVar[str]  # what Ctrl-C during `up` leaves, and what to do
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

    def watcher(self) -> str | None:
        """The script run beside each trainer that turns its owner's warning into a
        checkpoint (EC2 spot: spotwatch.sh); None when nobody takes the box back."""

    def loss_fields(self) -> dict[str, str | None]:
        """What a run's record of this box's loss names it by: instance, instance_type,
        zone (those it has)."""

    def retire(self, project_dir: Path, say: Say) -> None:
        """End a lost box's machine (verified) so that nothing bills, keeping its record: a
        replacement later takes the same settings."""

    def up_flags(self, project_dir: Path) -> UpFlags:
        """`up`'s flags that make a box like this one (replaceable boxes)."""

    def replacement(self, project_dir: Path, say: Say) -> Box:
        """End this lost box (verified) and make a new one like it, ready to train, recorded
        in its place. The caller holds the box lock."""

    @classmethod
    def down_unrecorded(cls, project_dir: Path, region: str | None, profile: str | None,
                        yes: bool, ui: Ui) -> bool:
        """`down` with no box recorded: end what of the project this kind still finds (EC2:
        instances by their tag). True once it said what it found."""

    @classmethod
    def down_every_project(cls, project_dir: Path, region: str | None, profile: str | None,
                           yes: bool, ui: Ui) -> bool:
        """`down --all`: list this kind's boxes of every project, ask, end them. True if
        the kind has such a place to look (it said what it found)."""


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

    def watcher(self) -> str | None:
        return None  # nobody takes it back

    def loss_fields(self) -> dict[str, str | None]:
        return {}  # never lost

    def retire(self, project_dir: Path, say: Say) -> None:
        pass  # never lost

    def replacement(self, project_dir: Path, say: Say) -> Box:
        raise UsageError(f"{self.label} cannot be replaced by dlbox")  # never gone, never asked

    @classmethod
    def down_unrecorded(cls, project_dir: Path, region: str | None, profile: str | None,
                        yes: bool, ui: Ui) -> bool:
        return False  # nothing of it exists that the project does not record

    @classmethod
    def down_every_project(cls, project_dir: Path, region: str | None, profile: str | None,
                           yes: bool, ui: Ui) -> bool:
        return False  # no fleet of them to look through
