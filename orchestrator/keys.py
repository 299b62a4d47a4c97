"""The project's SSH key: ed25519, made once under .dlbox/keys/ with mode 0600, never overwritten."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .atomic import write_atomic
from .errors import UsageError

KEY_FILE = "id_ed25519"


def ensure(keys_dir: Path) -> tuple[Path, str]:
    """(private key path, OpenSSH public key); creates the key if there is none yet."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = keys_dir / KEY_FILE
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        tmp = keys_dir / f".{KEY_FILE}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:  # link, not rename: an existing key (another `up` was faster) is never replaced
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # ssh refuses a private key others can read
    public = _derived_public_key(path)
    write_atomic(keys_dir / f"{KEY_FILE}.pub", public + "\n")
    return path, public


def _derived_public_key(path: Path) -> str:
    try:
        private = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise UsageError(f"{path} is not a readable private key; move it away and run "
                         "`dlbox up` again for a new one") from exc
    return private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()


def public_key(private_key: Path) -> str:
    """The OpenSSH public key of an existing private key (its .pub beside it, if there)."""
    beside = private_key.with_name(private_key.name + ".pub")
    if beside.is_file():
        return beside.read_text().strip()
    return _derived_public_key(private_key)


def fingerprint(public_key: str) -> str:
    """A short stable id of a public key, for AWS key-pair names."""
    return hashlib.sha256(public_key.split()[1].encode()).hexdigest()[:12]


def own(private_key: str) -> tuple[Path, str]:
    """(private key path, public key) for the user's own key; its .pub must sit beside it."""
    path = Path(private_key).expanduser().resolve()
    public = path.with_name(path.name + ".pub")
    if not path.is_file() or not public.is_file():
        raise UsageError(f"ssh_key {private_key}: need the private key and {public.name} beside it")
    return path, public.read_text().strip()
