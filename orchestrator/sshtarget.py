"""How to reach a box over SSH: its address and key, OpenSSH's options, .dlbox/ssh_config.

One list of OpenSSH options serves dlbox's own ssh processes, `dlbox ssh` and the
ssh_config users give to ssh or VS Code: all of them accept only the host key dlbox pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomic
from .errors import DlboxError, UsageError

SSH_CONNECT_TIMEOUT_S = 10
SERVER_ALIVE_INTERVAL_S = 15  # with SERVER_ALIVE_COUNT: a silent peer is dropped within 60 s
SERVER_ALIVE_COUNT = 4
# Seconds between keepalives instead of SERVER_ALIVE_INTERVAL_S (a link that needs another
# bound; the tests' frozen box): the one place dlbox reads it.
SERVER_ALIVE_INTERVAL_ENV = "DLBOX_SERVER_ALIVE_INTERVAL_S"
SSH_CONFIG_FILE = "ssh_config"
SSH_HOST_ALIAS = "dlbox"


@dataclass(frozen=True)
class SshTarget:
    """A box's SSH address, login and the known_hosts file holding its pinned key."""

    host: str
    port: int
    user: str
    key_path: str
    known_hosts: str

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko both look the host key up by."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def server_alive_interval_s() -> int:
    """Seconds between keepalives; a box that answers none of SERVER_ALIVE_COUNT is lost."""
    raw = os.environ.get(SERVER_ALIVE_INTERVAL_ENV)
    if raw is None:
        return SERVER_ALIVE_INTERVAL_S
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"{SERVER_ALIVE_INTERVAL_ENV}={raw!r}: expected whole seconds (1 or "
                         f"more); unset it for the default of {SERVER_ALIVE_INTERVAL_S}")
    return int(raw)


def alive_bound_s() -> int:
    """How long a box may stay silent (no answer to keepalives) before it counts as lost."""
    return server_alive_interval_s() * SERVER_ALIVE_COUNT


def _quoted(value: str) -> str:
    if '"' in value or "\n" in value:
        raise DlboxError(f"cannot hand {value!r} to OpenSSH (a double quote or a newline in a "
                         "path); move the project or key to a plainer path")
    return f'"{value}"'


def check_paths(*paths: str) -> None:
    """DlboxError now for a path OpenSSH could not be given (before anything is started)."""
    for path in paths:
        _quoted(path)


def options(target: SshTarget) -> list[tuple[str, str]]:
    """OpenSSH options: the pinned key only (never a new or changed one), dlbox's key only."""
    return [
        ("IdentityFile", _quoted(target.key_path)),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", _quoted(target.known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("StrictHostKeyChecking", "yes"),
        ("ConnectTimeout", str(SSH_CONNECT_TIMEOUT_S)),
        ("ServerAliveInterval", str(server_alive_interval_s())),
        ("ServerAliveCountMax", str(SERVER_ALIVE_COUNT)),
    ]


def argv(target: SshTarget, *command: str, batch: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
    """`ssh` with dlbox's options for target; batch: never prompt (dlbox's own processes)."""
    opts = [*options(target), *([("BatchMode", "yes")] if batch else [])]
    return ["ssh", *extra, "-p", str(target.port), "-l", target.user,
            *(arg for key, value in opts for arg in ("-o", f"{key}={value}")), "--", target.host,
            *command]


def write_config(state_dir: Path, target: SshTarget) -> Path:
    """.dlbox/ssh_config with a `dlbox` alias: `ssh -F .dlbox/ssh_config dlbox` (and VS Code)."""
    lines = [f"Host {SSH_HOST_ALIAS}", f"    HostName {target.host}", f"    User {target.user}",
             f"    Port {target.port}",
             *(f"    {key} {value}" for key, value in options(target))]
    path = state_dir / SSH_CONFIG_FILE
    write_atomic(path, "\n".join(lines) + "\n", mode=0o600)
    return path


def remove_config(state_dir: Path) -> None:
    """The box is gone: so is its ssh_config."""
    (state_dir / SSH_CONFIG_FILE).unlink(missing_ok=True)
