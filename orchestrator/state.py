"""The project's boxes in .dlbox/state.json: versioned records, locked while changed, written atomically.

A project may hold several boxes (a replacement during a run, the nodes of a cluster); each
record is a dict with at least "kind" and "name". What a kind's record means is the kind's
business (orchestrator/boxes.py decodes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from .atomic import write_atomic
from .errors import UsageError

STATE_DIR = ".dlbox"
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
STATE_VERSION = 2  # 1: {"box": {...} or null}; 2: {"boxes": [{...}, ...]}
KNOWN_HOSTS_FILE = "known_hosts"  # pinned host keys of this project's boxes, under .dlbox/


def state_dir(project_dir: Path) -> Path:
    return project_dir / STATE_DIR


def state_file(project_dir: Path) -> Path:
    """.dlbox/state.json: the project's box records."""
    return state_dir(project_dir) / STATE_FILE


def known_hosts(project_dir: Path) -> str:
    """The file holding the pinned host keys of the project's boxes (absolute)."""
    return str(state_dir(project_dir).resolve() / KNOWN_HOSTS_FILE)


def ensure_dir(project_dir: Path) -> Path:
    """.dlbox/, private to its owner (it holds keys and addresses)."""
    directory = state_dir(project_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def records(project_dir: Path) -> list[dict]:
    """Every box record of the project, oldest first ([] when there is no state)."""
    path = state_file(project_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"version {version!r}")
        if version > STATE_VERSION:
            raise UsageError(f"{path} was written by a newer dlbox (state version {version}; "
                             f"this one reads up to {STATE_VERSION}); upgrade dlbox "
                             "(pip install -U dlbox) to manage this project's boxes")
        found = ([data["box"]] if data.get("box") else []) if version == 1 else data.get("boxes")
        if not isinstance(found, list):
            raise ValueError(f'"boxes": expected a list, got {json.dumps(found)[:40]}')
        for record in found:
            if not isinstance(record, dict):
                raise ValueError(f"a box record is {json.dumps(record)[:40]}, not an object")
            record.setdefault("kind", "ec2")  # version 1 wrote no kind for EC2 boxes
            if not isinstance(record.get("name"), str) or not isinstance(record["kind"], str):
                raise ValueError("a box without kind or name")
        return found
    except UsageError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise UsageError(f"{path} is damaged ({exc}); restore it, or move it away and run "
                         "`dlbox down`") from exc


@contextlib.contextmanager
def locked(project_dir: Path) -> Iterator[None]:
    """Hold the project's state lock: read-modify-write of the records by one dlbox at a time."""
    directory = ensure_dir(project_dir)
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write(project_dir: Path, boxes: list[dict]) -> None:
    # fsynced: an instance id must survive a power cut, not only a Ctrl-C.
    ensure_dir(project_dir)
    write_atomic(state_file(project_dir),
                 json.dumps({"version": STATE_VERSION, "boxes": boxes}, indent=2) + "\n",
                 mode=0o600, durable=True)


def put(project_dir: Path, box) -> None:
    """Record a box (a dataclass with kind and name), replacing the record of that name."""
    record = dataclasses.asdict(box)
    with locked(project_dir):
        boxes = [r for r in records(project_dir) if r["name"] != record["name"]]
        _write(project_dir, [*boxes, record])


def remove(project_dir: Path, name: str) -> None:
    """Forget the box called name (nothing happens if it is not recorded)."""
    with locked(project_dir):
        boxes = records(project_dir)
        kept = [r for r in boxes if r["name"] != name]
        if len(kept) != len(boxes):
            _write(project_dir, kept)
