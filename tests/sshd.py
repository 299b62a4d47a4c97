"""A real OpenSSH server on loopback for tests (own host key, own authorized key, own port)."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # absolute: sshd re-executes itself
SSHD_READY_TIMEOUT_S = 10
POLL_S = 0.02


@dataclass(frozen=True)
class Sshd:
    host: str
    port: int
    user: str
    client_key: Path
    host_public_key: str
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner(host: str, port: int) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(64)
    except OSError:
        return b""


def _keygen(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def start(directory: Path, env: dict[str, str] | None = None, port: int | None = None,
          host: str = "127.0.0.1") -> Sshd:
    """Start sshd; env is set in every session (as a box's own /etc/environment would).

    Keys already in directory are kept (a restart is the same server); port: a given one;
    host: any loopback address (127.0.0.2...: several "boxes" on one port)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("host_ed25519", "client_ed25519"):
        if not (directory / name).exists():
            _keygen(directory / name)
    if not (directory / "authorized_keys").exists():
        (directory / "authorized_keys").write_text((directory / "client_ed25519.pub").read_text())
    port, user = port or free_port(), getpass.getuser()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", f"ListenAddress {host}", f"HostKey {directory / 'host_ed25519'}",
        f"PidFile {directory / 'sshd.pid'}", f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", f"AllowUsers {user}",
        "Subsystem sftp internal-sftp",
        *([" ".join(["SetEnv", *(f"{k}={v}" for k, v in env.items())])] if env else []), "",
    ]))
    if os.geteuid() == 0:  # root's sshd wants its privilege-separation folder; a user's does not
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = directory / "sshd.log"  # a file: a pipe nobody drains would stall sshd at 64 KiB
    proc = subprocess.Popen([SSHD, "-D", "-E", str(log), "-f", str(config)])
    deadline = time.monotonic() + SSHD_READY_TIMEOUT_S
    while not banner(host, port).startswith(b"SSH-"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sshd did not start: {log.read_text() if log.exists() else ''}")
        time.sleep(POLL_S)
    return Sshd(host, port, user, directory / "client_ed25519",
                (directory / "host_ed25519.pub").read_text().strip(), proc)


def stop(server: Sshd) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=10)


def restart(server: Sshd, new_host_key: bool = False) -> Sshd:
    """The same server stopped and started on its port (with a new host key if asked: a
    rebuilt box, or someone in the middle)."""
    stop(server)
    directory = server.client_key.parent
    if new_host_key:
        _keygen(directory / "host_ed25519")
    return start(directory, port=server.port, host=server.host)


def authorize(server: Sshd, public_key: str) -> None:
    """Let public_key log in too (as cloud-init installs an EC2 key pair)."""
    path = server.client_key.parent / "authorized_keys"
    path.write_text(path.read_text() + public_key.strip() + "\n")
