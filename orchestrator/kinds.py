"""The box kinds dlbox knows, registered: where each kind's class is, how messages name its
boxes, the `up` flag that chooses it and the `up` flags it takes. Read without importing any
kind, so that the CLI builds `up` from them and still starts fast; boxes.py loads the classes.

A new kind is one module implementing boxkind.Box, and its entry in KINDS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

MAX_NODES = 64  # boxes in one cluster: a typo (--nodes 200) must not launch a fleet


@dataclass(frozen=True)
class UpOption:
    """A flag of `dlbox up`, declared by each kind that takes it (Kind.up_options): the CLI
    builds `up` from every kind's, so a new kind brings its flags along."""

    name: str  # how kinds read it: flags.<name>
    help: str
    type: str = "text"  # "text", "texts" (repeatable), "int", "switch" (--x), "toggle" (--x/--y)
    decls: tuple[str, ...] = ()  # its names on the command line [--name-with-dashes]

    @property
    def names(self) -> tuple[str, ...]:
        return self.decls or (f"--{self.name.replace('_', '-')}",)

    def accepts(self, value: object) -> bool:
        """Whether value is of this flag's type (a record read back may be damaged)."""
        if self.type in ("switch", "toggle"):
            return isinstance(value, bool)
        if self.type == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if self.type == "texts":
            return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        return isinstance(value, str)

    def said(self, value: object) -> str:
        """How the command line says it was given (`--on-demand` for a toggle's False)."""
        first = self.names[0]
        if self.type == "toggle" and "/" in first:
            on, off = first.split("/")
            return on if value else off
        return first


# Flags more than one kind takes (each kind that does lists it in its up_options).
PYTHON_OPTION = UpOption("python", "An interpreter on the box that has TensorFlow "
                                   "[--local: this one].")
NODES_OPTION = UpOption("nodes", "Boxes in the cluster (data-parallel training, one worker per "
                                 "box) [1].", "int")
WORKDIR_OPTION = UpOption("workdir", "SSH and EC2 boxes: dlbox's folder on the box [~/dlbox].")


@dataclass(frozen=True)
class UpFlags:
    """`dlbox up`'s flags as given, by name (what a kind declares in up_options); a flag not
    given reads as None. Each kind takes only its own."""

    values: tuple[tuple[str, Any], ...] = ()  # (name, value) of each flag given, by name

    @classmethod
    def of(cls, **values: Any) -> UpFlags:
        """The flags given (None and empty lists are not): lists become tuples."""
        given = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()
                 if v is not None and v != [] and v != ()}
        return cls(tuple(sorted(given.items())))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # not a flag: copy, pickle and the like ask for these
            raise AttributeError(name)
        return dict(self.values).get(name)

    def given(self) -> list[str]:
        return [name for name, _ in self.values]

    def as_dict(self) -> dict[str, Any]:
        """For a record (JSON): UpFlags.of(**it) reads it back."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in self.values}



@dataclass(frozen=True)
class Kind:
    """A box kind as dlbox registers it (its class is imported when a box of it is used)."""

    name: str  # the records' kind
    module: str  # where its class is: orchestrator.localbox
    class_name: str
    description: str  # "EC2 boxes", "the local box"...
    chosen_by: str | None  # the `up` flag that asks for it (None: the kind made by default)
    up_options: tuple[UpOption, ...]  # the `up` flags it takes

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)


KINDS: tuple[Kind, ...] = (
    Kind("local", "orchestrator.localbox", "LocalBox", "the local box", "local", (
        UpOption("local", "Use this machine as the box.", "switch"), NODES_OPTION,
        PYTHON_OPTION)),
    Kind("ssh", "orchestrator.sshbox", "SshBox", "SSH boxes", "ssh", (
        UpOption("ssh", "Use a machine you have: USER@HOST[:PORT] (repeat: a cluster).", "texts"),
        UpOption("key", "--ssh: the private key that logs you in (repeat: one per --ssh).",
                 "texts"),
        NODES_OPTION,
        UpOption("node_address", "--ssh cluster: the address the other nodes reach this one at "
                                 "(repeat: one per --ssh) [the one its sshd sees].", "texts"),
        PYTHON_OPTION, WORKDIR_OPTION)),
    Kind("ec2", "orchestrator.ec2box", "Ec2Box", "EC2 boxes", None, (
        UpOption("region", "AWS region [dlbox.toml or us-east-1]."),
        UpOption("profile", "AWS credentials profile."),
        UpOption("instance_type", "Instance type to try (repeat for a fallback list).", "texts",
                 ("--instance-type", "-t")),
        UpOption("spot", "Spot or on-demand.", "toggle", ("--spot/--on-demand",)),
        UpOption("disk_gb", "Root volume size in GiB.", "int"),
        UpOption("idle_minutes", "Power off after N idle minutes (0: never).", "int"),
        UpOption("max_lifetime_minutes", "Power off N minutes after launch at the latest "
                                         "(0: never).", "int"),
        UpOption("ssh_cidr", "Allow SSH from this CIDR, not your IP/32."),
        UpOption("ssh_user", "The AMI's SSH user [ubuntu]."),
        UpOption("ssh_key", "Your own private key (.pub beside it) instead of dlbox's."),
        UpOption("ami", "ami-..., an SSM path or a name pattern."),
        NODES_OPTION, PYTHON_OPTION, WORKDIR_OPTION)),
)


def named(name: str) -> Kind | None:
    """The registered kind whose records say name, or None."""
    return next((k for k in KINDS if k.name == name), None)


def up_options() -> dict[str, UpOption]:
    """Every flag of `dlbox up`, by name, in the kinds' order (a flag several kinds take is
    declared once, above)."""
    found: dict[str, UpOption] = {}
    for kind in KINDS:
        for option in kind.up_options:
            found.setdefault(option.name, option)
    return found


def flags_from(values: dict[str, Any]) -> UpFlags:
    """UpFlags from `up`'s command line or a record of it: names no kind takes, values not
    of their flag's type (a damaged record) and a switch left off are not flags given."""
    known = up_options()
    return UpFlags.of(**{name: value for name, value in values.items() if name in known
                         and known[name].accepts(value)
                         and not (known[name].type == "switch" and value is False)})


def for_up(flags: UpFlags) -> Kind:
    """The kind `up` makes: the one whose flag is given (--local, --ssh), else the default
    (EC2); a flag of another kind is refused."""
    options = up_options()

    def said(name: str) -> str:
        return options[name].said(getattr(flags, name))

    asked = [k for k in KINDS if k.chosen_by and getattr(flags, k.chosen_by)]
    if len(asked) > 1:
        listed = " and ".join(said(k.chosen_by) for k in asked)
        raise UsageError(f"{listed} exclude each other; pick one")
    kind = asked[0] if asked else next(k for k in KINDS if k.chosen_by is None)
    if flags.nodes is not None and not 1 <= flags.nodes <= MAX_NODES:
        raise UsageError(f"--nodes {flags.nodes}: expected 1 to {MAX_NODES}")
    own = {option.name for option in kind.up_options}
    foreign = [name for name in flags.given() if name not in own]
    if foreign:
        owners = [k for k in KINDS if any(o.name == foreign[0] for o in k.up_options)]
        which = " or ".join(k.description for k in owners)
        raise UsageError(f"{said(foreign[0])} is for {which}, not {kind.description}; "
                         f"drop {said(foreign[0])}")
    return kind
