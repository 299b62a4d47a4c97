"""Zip archives extracted once into a cache outside the dataset folder, published atomically.

Each zip becomes DIR/<zip stem>-<key>/, key a short SHA-256 of the zip's identity (resolved
path, size, st_mtime_ns). A marker file holding that identity is written last, inside a
private temporary folder, and the folder is then renamed into place: a folder under its
final name is always complete, so any number of trainers may share DIR. The dataset folder
itself is only ever read: on a box it is a synced mirror, and anything written into it
would be deleted by the next sync.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DataError

MARKER = ".dlbox-extracted.json"
KEY_HEX_CHARS = 12  # 48 bits: no collision among the zips one user ever extracts
TMP_PREFIX = ".tmp-"  # extractions in progress and stale ones being removed
CACHE_SUBDIR = ("dlbox", "extracted")  # under $XDG_CACHE_HOME or ~/.cache
# A second publisher's os.rename onto a complete folder fails with one of these.
TAKEN_ERRNOS = (errno.ENOTEMPTY, errno.EEXIST)
PUBLISH_ATTEMPTS = 2  # a damaged folder in the way is removed once, then the rename retried
CORRUPT_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, zlib.error)
ENCRYPTED_FLAG = 0x1  # general-purpose bit 0 of a zip member


@dataclass(frozen=True)
class Identity:
    """What makes an extraction reusable: the zip's resolved path, size and mtime."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, archive: Path) -> Identity:
        resolved = archive.resolve()
        st = resolved.stat()
        return cls(str(resolved), st.st_size, st.st_mtime_ns)

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX_CHARS]


def default_dir() -> Path:
    """$XDG_CACHE_HOME/dlbox/extracted, else ~/.cache/dlbox/extracted."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative = unset
    return base.joinpath(*CACHE_SUBDIR)


def extract_once(archive: Path, into: str | os.PathLike | None = None) -> Path:
    """The folder holding archive's files under into (extracted now unless already there)."""
    into = (default_dir() if into is None else Path(into)).expanduser().resolve()
    identity = Identity.of(archive)
    stem = archive.name[:-4] if archive.name.lower().endswith(".zip") else archive.name
    final = into / f"{stem}-{identity.key()}"
    if _marker(final) == identity:
        _remove_stale(into, identity)  # a publisher killed before its clean-up leaves them
        return final
    if not zipfile.is_zipfile(archive):
        raise DataError(f"{archive}: not a readable zip archive; download it again")
    tmp = _private_dir(into, stem)
    try:
        _extract(archive, tmp)
        (tmp / MARKER).write_text(json.dumps(asdict(identity)))
        _publish(tmp, final, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a leftover otherwise
    _remove_stale(into, identity)
    return final


def _private_dir(into: Path, stem: str) -> Path:
    """A fresh temporary folder inside into; dead extractions' leftovers are removed first."""
    try:
        into.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(into)
        return Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix()}{stem}-", dir=into))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # exit code 74 in __main__, like every full disk
        raise DataError(f"--extract-dir {into}: cannot write there ({exc.strerror or exc}); "
                        "pass --extract-dir with a writable folder") from exc


def _extract(archive: Path, tmp: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            if any(info.flag_bits & ENCRYPTED_FLAG for info in zf.infolist()):
                raise DataError(f"{archive}: the zip is encrypted; extract it yourself and "
                                "pass the folder")
            zf.extractall(tmp)  # extractall drops absolute and '..' components
    except CORRUPT_ERRORS as exc:
        raise DataError(f"{archive}: corrupt zip archive ({exc}); download it again") from exc
    except NotImplementedError as exc:  # a compression method zipfile lacks (e.g. Deflate64)
        raise DataError(f"{archive}: cannot extract it ({exc}); extract it yourself and "
                        "pass the folder") from exc


def _publish(tmp: Path, final: Path, identity: Identity) -> None:
    """Rename tmp to final; if another trainer got there first with the same zip, keep theirs."""
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:
            if exc.errno not in TAKEN_ERRNOS or attempt == PUBLISH_ATTEMPTS - 1:
                raise
        if _marker(final) == identity:
            return  # theirs is complete and identical; ours is removed by the caller
        _discard(final)  # no marker: damaged by hand, never a published extraction


def _marker(folder: Path) -> Identity | None:
    """The identity a complete extraction records, or None."""
    try:
        return Identity(**json.loads((folder / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _remove_stale(into: Path, current: Identity) -> None:
    """Remove older extractions of the same zip path, and the extractions of zips inside them.

    Only while the zip still has the identity just extracted: a trainer that read the old
    identity before the zip changed must not remove the newer extraction.
    """
    try:
        if Identity.of(Path(current.path)) != current:
            return
        published = {p: _marker(p) for p in into.iterdir() if not p.name.startswith(".")}
    except OSError:
        return  # clean-up is best effort; the extraction itself is fine
    stale = [p for p, ident in published.items()
             if ident is not None and ident.path == current.path and ident != current]
    while stale:
        folder = stale.pop()
        inside = f"{folder}{os.sep}"
        stale += [p for p, ident in published.items()
                  if ident is not None and ident.path.startswith(inside) and p.exists()]
        _discard(folder)


def _discard(folder: Path) -> None:
    """Rename folder out of its published name first (atomic), then delete it."""
    doomed = folder.with_name(f"{_tmp_prefix()}stale-{folder.name}")
    try:
        os.rename(folder, doomed)
    except OSError:
        return  # another trainer is removing it, or it is already gone
    shutil.rmtree(doomed, ignore_errors=True)


def _tmp_prefix() -> str:
    """Names this process's temporary folders, so a later run can tell they were abandoned."""
    return f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _remove_abandoned(into: Path) -> None:
    """Delete temporary folders left by killed extractions on this host (their pid is gone)."""
    host_prefix = f"{TMP_PREFIX}{socket.gethostname()}-"
    for entry in into.iterdir():
        if not entry.name.startswith(host_prefix):
            continue
        pid = entry.name[len(host_prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
