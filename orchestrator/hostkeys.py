"""Host-key pinning: a new box's first key is recorded, and after that only that key is accepted.

The first key is checked against the EC2 console's fingerprints when it has printed them.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from .atomic import write_atomic


class HostKeyMismatch(Exception):
    """Raised inside the SSH handshake: the key is not one the box announced."""


def fingerprint(key) -> str:
    """OpenSSH's SHA256:... fingerprint of a paramiko key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def console_fingerprints(console: str) -> set[str]:
    """The SHA256 host-key fingerprints cloud-init prints to an EC2 console, if any yet."""
    inside, found = False, set()
    for line in console.splitlines():
        if "BEGIN SSH HOST KEY FINGERPRINTS" in line:
            inside = True
        elif "END SSH HOST KEY FINGERPRINTS" in line:
            inside = False
        elif inside:
            found.update(word for word in line.split() if word.startswith("SHA256:"))
    return found


def _lines(known_hosts: Path) -> list[str]:
    try:
        return known_hosts.read_text().splitlines()
    except FileNotFoundError:
        return []


def pin(known_hosts: Path, name: str, key_type: str, key_base64: str) -> None:
    """Add name's key to known_hosts (in one rename; existing lines kept)."""
    kept = [line for line in _lines(known_hosts) if line.strip()]
    write_atomic(known_hosts, "".join(f"{line}\n" for line in [*kept, f"{name} {key_type} {key_base64}"]),
                 mode=0o600)


def forget(known_hosts: Path, names: set[str]) -> None:
    """Drop the keys pinned for names: their address may go to another box tomorrow."""
    lines = _lines(known_hosts)
    kept = [line for line in lines if not set(line.split(" ", 1)[0].split(",")) & names]
    if len(kept) != len(lines):
        write_atomic(known_hosts, "".join(f"{line}\n" for line in kept), mode=0o600)


def pin_first_key_policy(known_hosts: Path, expected: set[str] | None):
    """A paramiko policy for a box met for the first time: record its key, or refuse it
    when the box's console announced other keys (someone may be in the middle)."""
    import paramiko

    class PinFirstKey(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if expected and fingerprint(key) not in expected:
                raise HostKeyMismatch(f"{hostname} presented host key {fingerprint(key)}, "
                                      "which the box's console output does not list; refusing "
                                      "to connect (someone may be in the middle)")
            client.get_host_keys().add(hostname, key.get_name(), key)
            pin(known_hosts, hostname, key.get_name(), key.get_base64())

    return PinFirstKey()


def moved(known_hosts: Path, old_name: str, new_name: str) -> None:
    """The keys pinned for old_name now pin new_name instead (a stopped box started again
    gets a new address, not a new key: only the key seen before is accepted there)."""
    lines = _lines(known_hosts)
    keys = [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == old_name]
    if not keys:
        return
    kept = [line for line in lines if line.split(" ", 1)[0] not in (old_name, new_name)]
    write_atomic(known_hosts, "".join(f"{line}\n" for line in
                                      [*kept, *(f"{new_name} {key}" for key in keys)]), mode=0o600)
