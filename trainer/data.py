"""Kaggle Dogs vs. Cats layouts → labelled file lists: zips, a stable split, bad-file probes."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .extract import extract_once

log = logging.getLogger(__name__)

LABELS = {"cat": 0, "dog": 1}
CLASS_DIRS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}
KAGGLE_NAME = re.compile(r"^(cat|dog)\.[^/]+$", re.IGNORECASE)
MAX_SEARCH_DEPTH = 6  # steps followed into train/ folders, zips and wrapper folders
PROBE_TAIL_BYTES = 4096  # where a complete JPEG has its end-of-image marker
PROBE_THREADS = 16  # header reads are I/O bound (cold EBS), not CPU bound


@dataclass(frozen=True)
class Example:
    """One image file: its key (path relative to the data root, '/'-separated) and label."""

    path: str
    key: str
    label: int  # dog = 1, cat = 0


@dataclass(frozen=True)
class LabelledSet:
    """The labelled images found under --data."""

    root: Path
    layout: str  # "kaggle" (label in the file name) or "class-folders"
    examples: tuple[Example, ...]
    ignored: int  # image files with no label in their name


@dataclass(frozen=True)
class Probe:
    """What a file's first and last bytes say it is."""

    fmt: str | None  # "jpeg", "png", "gif", "bmp", or None when unreadable
    problem: str | None  # why it is unreadable


def find_labelled(path: str | os.PathLike, extract_dir: str | os.PathLike | None = None
                  ) -> LabelledSet:
    """Resolve --data (a folder, train.zip or dogs-vs-cats.zip) to its labelled images.

    Zips are extracted into extract_dir (default: extract.default_dir()), never beside
    themselves: nothing is ever written inside the dataset folder.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"--data {root}: no such file or folder; pass the Kaggle train/ folder or zip")
    for depth in range(MAX_SEARCH_DEPTH + 1):
        if root.is_file():
            root = extract_once(root, extract_dir)
            continue
        found = _labelled_here(root)
        if found is not None:
            return found
        nxt = _descend(root, "train")
        if nxt is None or depth == MAX_SEARCH_DEPTH:
            break
        root = nxt
    raise DataError(
        f"--data {path}: no labelled image found; expected cat.N.jpg/dog.N.jpg files, "
        "cats/ and dogs/ folders, or a train/ folder or train.zip"
    )


def find_unlabelled(path: str | os.PathLike, extract_dir: str | os.PathLike | None = None
                    ) -> list[tuple[int, str]]:
    """Resolve --test (the Kaggle test1/ folder or zip) to (numeric id, path), sorted by id."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"--test {root}: no such file or folder; pass the Kaggle test1/ folder or zip")
    for _ in range(MAX_SEARCH_DEPTH + 1):
        if root.is_file():
            root = extract_once(root, extract_dir)
            continue
        items = _numbered_images(root)
        if items:
            return items
        nxt = _descend(root, "test1")
        if nxt is None:
            break
        root = nxt
    raise DataError(f"--test {path}: no image named N.jpg found; pass the Kaggle test1/ folder or zip")


def _labelled_here(root: Path) -> LabelledSet | None:
    """The labelled images directly in root (Kaggle names) or in its class folders."""
    class_dirs = [d for d in _subdirs(root) if d.name.lower() in CLASS_DIRS]
    if {CLASS_DIRS[d.name.lower()] for d in class_dirs} == {0, 1}:
        examples = [
            Example(str(f), f"{d.name}/{f.name}", CLASS_DIRS[d.name.lower()])
            for d in class_dirs
            for f in _image_files(d)
        ]
        if examples:
            return LabelledSet(root, "class-folders", _sorted(examples), ignored=0)
    examples, ignored = [], 0
    for f in _image_files(root):
        if KAGGLE_NAME.match(f.name):
            examples.append(Example(str(f), f.name, LABELS[f.name[:3].lower()]))
        else:
            ignored += 1
    if examples:
        return LabelledSet(root, "kaggle", _sorted(examples), ignored)
    return None


def _descend(root: Path, want: str) -> Path | None:
    """The next place to look: root/want, root/want.zip, or root's only subfolder."""
    for entry in sorted(root.iterdir()):
        if entry.name.lower() == want and entry.is_dir():
            return entry
    for entry in sorted(root.iterdir()):
        if entry.name.lower() == f"{want}.zip" and entry.is_file():
            return entry
    subdirs = [d for d in _subdirs(root) if not d.name.startswith(".")]
    files = [f for f in _image_files(root)]
    if len(subdirs) == 1 and not files:
        return subdirs[0]
    return None


def _subdirs(root: Path) -> list[Path]:
    with os.scandir(root) as it:
        return sorted(Path(e.path) for e in it if e.is_dir())


def _image_files(root: Path) -> list[Path]:
    with os.scandir(root) as it:
        found = [
            Path(e.path)
            for e in it
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        ]
    # A name that is not UTF-8 (os keeps its bytes as surrogates) cannot reach TensorFlow,
    # the CSVs or the log as text: such a file is skipped, and named with its bytes escaped.
    usable = [f for f in found if _utf8(f.name)]
    for f in found:
        if not _utf8(f.name):
            log.warning("skipped %s: its name is not UTF-8; rename it", ascii(f.name))
    return usable


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _numbered_images(root: Path) -> list[tuple[int, str]]:
    items = []
    for f in _image_files(root):
        stem = f.name.split(".")[0]
        if stem.isdigit():
            items.append((int(stem), str(f)))
    return sorted(items)


def _sorted(examples: list[Example]) -> tuple[Example, ...]:
    return tuple(sorted(examples, key=lambda e: e.key))


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) from key alone: the same on every machine, Python and run."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split(examples: tuple[Example, ...], val_split: float) -> tuple[list[Example], list[Example]]:
    """Train/validation split by a stable hash of each file's key."""
    train, val = [], []
    for ex in examples:
        (val if unit_hash("split", ex.key) < val_split else train).append(ex)
    return train, val


def limit(examples: tuple[Example, ...], n: int | None) -> tuple[Example, ...]:
    """A stable pseudo-random subset of n examples (both classes, any layout)."""
    if n is None or n >= len(examples):
        return examples
    chosen = sorted(examples, key=lambda e: unit_hash("limit", e.key))[:n]
    return _sorted(chosen)


def probe(path: str) -> Probe:
    """Classify a file by its magic bytes; catch empty, truncated and non-image files."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - PROBE_TAIL_BYTES))
            tail = f.read()
    except OSError as exc:
        return Probe(None, f"unreadable ({exc.strerror})")
    if not head:
        return Probe(None, "empty file")
    if head.startswith(b"\xff\xd8\xff"):
        return Probe("jpeg", None) if b"\xff\xd9" in tail else Probe(None, "truncated JPEG")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Probe("png", None) if b"IEND" in tail else Probe(None, "truncated PNG")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Probe("gif", None)
    if head[:2] == b"BM":
        return Probe("bmp", None)
    return Probe(None, "not an image")


def probe_all(paths: list[str]) -> list[Probe]:
    """Probe many files in parallel threads."""
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        return list(pool.map(probe, paths, chunksize=256))
