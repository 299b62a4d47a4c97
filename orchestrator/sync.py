"""Dataset sync to a box: compare manifests (name, size, mtime), send only what differs as
one tar stream, verify, and leave an exact copy. An interrupted sync resumes: what arrived
whole is recognised and not sent again."""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DlboxError
from .machines import Machine

Manifest = dict[str, tuple[int, int]]  # relative name -> (size in bytes, mtime in whole seconds)


@dataclass(frozen=True)
class SyncResult:
    """What one sync did."""

    remote_path: str  # the dataset on the box (a folder, or a zip file)
    files: int
    sent_files: int
    sent_bytes: int
    removed_files: int
    seconds: float


def cache_dir(workdir: str, local: Path) -> str:
    """Where a dataset lives on the box: keyed by its name and local path, shared by runs."""
    key = hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:8]
    return f"{workdir}/data/{local.name}-{key}"


def local_manifest(root: Path, names: list[str] | None = None) -> Manifest:
    """Every file under root (or just names), with size and mtime."""
    found: Manifest = {}
    if names is not None:
        for name in names:
            st = (root / name).stat()
            found[name] = (st.st_size, int(st.st_mtime))
        return found
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for file in files:
            path = os.path.join(directory, file)
            st = os.stat(path)
            found[os.path.relpath(path, root)] = (st.st_size, int(st.st_mtime))
    return found


def remote_manifest(machine: Machine, remote_root: str) -> Manifest:
    """The same listing from the box, in one command however many files there are."""
    done = machine.run(f"cd {shlex.quote(remote_root)} 2>/dev/null && "
                       "find . -type f -printf '%P\\t%s\\t%T@\\n'")
    found: Manifest = {}
    for line in done.stdout.splitlines():
        name, size, mtime = line.rsplit("\t", 2)
        found[name] = (int(size), int(float(mtime)))
    return found


def sync(machine: Machine, local: Path, workdir: str,
         progress: Callable[[int, int], None] | None = None) -> SyncResult:
    """Make the box's cached copy of local (a folder or one file) exactly equal to it."""
    started = time.monotonic()
    base = cache_dir(workdir, local)
    if local.is_dir():
        root, remote_root, names = local, f"{base}/{local.name}", None
    else:
        root, remote_root, names = local.parent, base, [local.name]
    mine = local_manifest(root, names)
    theirs = remote_manifest(machine, remote_root)
    todo = sorted(n for n, meta in mine.items() if theirs.get(n) != meta)
    extra = sorted(n for n in theirs if n not in mine and names is None)
    if extra:  # files deleted locally since the last sync: the copy must be exact
        machine.run(f"cd {shlex.quote(remote_root)} && rm -f -- "
                    + " ".join(shlex.quote(n) for n in extra))
    total = sum(mine[n][0] for n in todo)
    sent = 0

    def on_bytes(n: int) -> None:
        nonlocal sent
        sent += n
        if progress is not None:
            progress(min(sent, total), total)

    if todo:
        machine.upload(root, todo, remote_root, on_bytes, {n: mine[n][0] for n in todo})
    # Nothing sent: the first listing already proved the copy equal.
    after = remote_manifest(machine, remote_root) if todo or extra else theirs
    wrong = [n for n in mine if after.get(n) != mine[n]]
    if wrong:
        raise DlboxError(f"{len(wrong)} file(s) differ on the box after the sync (first: "
                         f"{wrong[0]}); run the command again")
    remote_path = remote_root if names is None else f"{remote_root}/{local.name}"
    return SyncResult(remote_path, len(mine), len(todo), total, len(extra),
                      time.monotonic() - started)
