"""The trainer package on the box: stored once under its content hash, published in one rename."""

from __future__ import annotations

import hashlib
import shlex
import uuid
from pathlib import Path

from .errors import DlboxError
from .machine import Machine

CODE_DIR = "code"
HASH_FILE = ".dlbox-hash"  # inside a published folder: the hash it was published under


def content_hash(paths: list[Path], root: Path) -> str:
    """A short hash of files' names and bytes: the identity of shipped code."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def trainer_dir() -> Path:
    """The `trainer` package of this install: what every run ships to its box."""
    import trainer

    return Path(trainer.__file__).resolve().parent


def ship(machine: Machine, workdir: str) -> str:
    """This install's trainer on the box (sent only if missing); the folder to put on PYTHONPATH.

    The folder appears whole or not at all (a staging folder renamed into place), and is
    trusted only if it names its own hash: two first runs at once, or a folder left by a
    killed or older dlbox, can never leave a half-shipped package in use.
    """
    package = trainer_dir()
    digest = content_hash(list(package.glob("*.py")), package)
    code = f"{workdir}/{CODE_DIR}/{digest}"
    if machine.read(f"{code}/{HASH_FILE}") == digest.encode():
        return code
    staging = f"{workdir}/{CODE_DIR}/.staging-{uuid.uuid4().hex[:12]}"
    machine.upload_tree(package, staging)
    machine.write(f"{staging}/{HASH_FILE}", digest.encode())
    s, c, h = shlex.quote(staging), shlex.quote(code), shlex.quote(digest)
    stale = shlex.quote(f"{code}.stale-{uuid.uuid4().hex[:12]}")
    machine.run(
        f"rm -rf {s}/trainer/__pycache__; mv -T {s} {c} 2>/dev/null && exit 0; "
        # Taken: keep it if it is this code (another dlbox was faster), else replace it.
        f'if [ "$(cat {c}/{HASH_FILE} 2>/dev/null)" = {h} ]; then rm -rf {s}; exit 0; fi; '
        f"mv -T {c} {stale} && mv -T {s} {c} && rm -rf {stale}")
    if machine.read(f"{code}/{HASH_FILE}") != digest.encode():
        raise DlboxError(f"could not put the trainer's code in {code} on the box; run the "
                         "command again")
    return code
