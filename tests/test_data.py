"""Dataset discovery: Kaggle names, class folders, zips (extracted once, elsewhere), the split."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from trainer import data, extract, options
from trainer.errors import DataError

CONCURRENT_TRIES = 5
DEAD_PID = 2**22 + 1  # above Linux's pid_max ceiling (4194304): never a live process


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0fake\xff\xd9")


def _zip_folder(src: Path, archive: Path, arcroot: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f"{arcroot}/{f.relative_to(src)}")


def test_kaggle_flat_folder_labels_from_names(tmp_path):
    _touch_images(tmp_path / "train", ["cat.0.jpg", "dog.0.jpg", "Dog.1.JPG", "notes.jpg"])
    found = data.find_labelled(tmp_path / "train")
    assert found.layout == "kaggle"
    assert {(e.key, e.label) for e in found.examples} == {
        ("cat.0.jpg", 0), ("dog.0.jpg", 1), ("Dog.1.JPG", 1)
    }
    assert found.ignored == 1


def test_dataset_root_descends_into_train(sample):
    found = data.find_labelled(sample)
    assert found.root == sample / "train"
    assert len(found.examples) == 1000 + 7  # the generated images and the bad files


def test_class_folders(tmp_path):
    _touch_images(tmp_path / "cats", ["1.jpg", "2.jpg"])
    _touch_images(tmp_path / "dogs", ["1.jpg"])
    found = data.find_labelled(tmp_path)
    assert found.layout == "class-folders"
    assert [(e.key, e.label) for e in found.examples] == [
        ("cats/1.jpg", 0), ("cats/2.jpg", 0), ("dogs/1.jpg", 1)
    ]


def test_a_name_that_is_not_utf8_is_skipped_and_named(tmp_path, caplog):
    """Such a name cannot reach TensorFlow, the CSVs or the log as text (it crashed the split
    hash): the file is left out with a warning that shows its bytes, the rest is used."""
    _touch_images(tmp_path / "cats", ["1.jpg"])
    _touch_images(tmp_path / "dogs", ["1.jpg"])
    (tmp_path / "cats" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"\xff\xd8")
    with caplog.at_level("WARNING", logger="trainer"):
        found = data.find_labelled(tmp_path)
    assert [e.key for e in found.examples] == ["cats/1.jpg", "dogs/1.jpg"]
    train, val = data.split(found.examples, 0.5)  # hashing every key works
    assert sorted(e.key for e in train + val) == ["cats/1.jpg", "dogs/1.jpg"]
    assert "skipped 'caf\\udce9.jpg': its name is not UTF-8" in caplog.text


def _files(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under root: (size, mtime_ns, SHA-256 of the content)."""
    found = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        found[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return found


def _only_extraction(extract_dir: Path) -> Path:
    entries = sorted(extract_dir.iterdir())
    assert len(entries) == 1, entries
    return entries[0]


@pytest.fixture()
def extract_dir(tmp_path) -> Path:
    return tmp_path / "extracted"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Extractions without an explicit folder land in a temporary XDG cache, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture()
def train_zip(tmp_path) -> Path:
    """A dataset folder holding only the Kaggle train.zip (two images)."""
    _touch_images(tmp_path / "src", ["cat.0.jpg", "dog.0.jpg"])
    (tmp_path / "dataset").mkdir()
    archive = tmp_path / "dataset" / "train.zip"
    _zip_folder(tmp_path / "src", archive, "train")
    return archive


def test_dataset_folder_is_never_written(tmp_path, train_zip, extract_dir):
    """On a box the dataset folder is a synced mirror: a file written there is deleted by the next sync."""
    dataset = train_zip.parent
    _touch_images(tmp_path / "u", ["1.jpg", "2.jpg"])
    _zip_folder(tmp_path / "u", dataset / "test1.zip", "test1")
    before = _files(dataset)
    found = data.find_labelled(dataset, extract_dir)
    assert [e.key for e in found.examples] == ["cat.0.jpg", "dog.0.jpg"]
    assert [i for i, _ in data.find_unlabelled(dataset, extract_dir)] == [1, 2]
    data.find_labelled(dataset, extract_dir)  # the reuse path too
    assert _files(dataset) == before
    assert found.root.is_relative_to(extract_dir)
    assert sorted(p.name.split("-")[0] for p in extract_dir.iterdir()) == ["test1", "train"]


def test_train_zip_is_extracted_once_and_reused(train_zip, extract_dir):
    first = data.find_labelled(train_zip, extract_dir)
    assert [e.key for e in first.examples] == ["cat.0.jpg", "dog.0.jpg"]
    folder = _only_extraction(extract_dir)
    assert folder.name.startswith("train-")
    marker = folder / extract.MARKER
    assert json.loads(marker.read_text())["path"] == str(train_zip.resolve())
    stamp = marker.stat().st_mtime_ns
    extracted = Path(first.examples[0].path)
    extracted.write_bytes(b"changed-in-cache")  # a re-extraction would restore it
    again = data.find_labelled(train_zip, extract_dir)
    assert again.root == first.root
    assert marker.stat().st_mtime_ns == stamp
    assert extracted.read_bytes() == b"changed-in-cache"


def test_changed_zip_is_extracted_again_and_the_old_extraction_removed(tmp_path, train_zip,
                                                                        extract_dir):
    old = data.find_labelled(train_zip, extract_dir).root
    _touch_images(tmp_path / "src", ["dog.1.jpg"])
    _zip_folder(tmp_path / "src", train_zip, "train")
    os.utime(train_zip, ns=(1, 1))
    new = data.find_labelled(train_zip, extract_dir)
    assert len(new.examples) == 3
    assert not old.exists()
    assert new.root.is_relative_to(_only_extraction(extract_dir))


def test_another_zip_of_the_same_name_keeps_its_extraction(tmp_path, train_zip, extract_dir):
    data.find_labelled(train_zip, extract_dir)
    other = tmp_path / "elsewhere" / "train.zip"
    other.parent.mkdir()
    shutil.copy2(train_zip, other)
    data.find_labelled(other, extract_dir)
    assert len(list(extract_dir.iterdir())) == 2


def test_default_extract_dir_honours_xdg_cache_home(tmp_path, monkeypatch, train_zip):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert extract.default_dir() == tmp_path / "xdg" / "dlbox" / "extracted"
    found = data.find_labelled(train_zip)
    assert found.root.is_relative_to(tmp_path / "xdg" / "dlbox" / "extracted")
    opts = options.parse(["scratch", "--data", str(train_zip), "--out", str(tmp_path / "o")])
    assert opts.extract_dir == str(tmp_path / "xdg" / "dlbox" / "extracted")
    chosen = options.parse(["scratch", "--data", "d", "--out", "o", "--extract-dir", "~/x"])
    assert chosen.extract_dir == str(Path.home() / "x")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert extract.default_dir() == tmp_path / "home" / ".cache" / "dlbox" / "extracted"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec ignores it
    assert extract.default_dir() == tmp_path / "home" / ".cache" / "dlbox" / "extracted"


def _extract_in_child(archive: str, into: str, barrier, results) -> None:
    barrier.wait()  # start together: both miss the cache and extract
    try:
        results.put(str(extract.extract_once(Path(archive), into)))
    except BaseException as exc:  # reported to the test, not lost in the child
        results.put(f"failed: {exc!r}")


def test_concurrent_extractions_agree_and_leave_one(tmp_path, extract_dir):
    _touch_images(tmp_path / "src", [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(300)])
    archive = tmp_path / "train.zip"
    _zip_folder(tmp_path / "src", archive, "train")
    ctx = multiprocessing.get_context("fork")  # only the standard library is loaded here
    for attempt in range(CONCURRENT_TRIES):
        os.utime(archive, ns=(attempt + 10, attempt + 10))  # a new identity: extract again
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_extract_in_child,
                             args=(str(archive), str(extract_dir), barrier, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert got[0] == got[1], got
        folder = _only_extraction(extract_dir)  # no temporary folder, no older extraction
        assert str(folder) == got[0]
        assert len(list((folder / "train").iterdir())) == 600


def test_losing_the_publish_race_adopts_the_winners_extraction(train_zip, extract_dir,
                                                                monkeypatch):
    """Another trainer publishes while this one extracts: this one's copy is discarded."""
    real_extractall = zipfile.ZipFile.extractall
    rival = []

    def extractall_after_a_rival(self, path=None, *args, **kwargs):
        if not rival:
            rival.append(None)  # the rival's own extractall runs unpatched
            rival[0] = extract.extract_once(train_zip, extract_dir)  # publishes first
        return real_extractall(self, path, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extractall_after_a_rival)
    mine = extract.extract_once(train_zip, extract_dir)
    assert rival == [mine]
    assert _only_extraction(extract_dir) == mine


def test_nested_zips_are_extracted_into_the_cache(tmp_path, extract_dir):
    _touch_images(tmp_path / "t", ["cat.0.jpg", "dog.0.jpg"])
    _touch_images(tmp_path / "u", ["2.jpg", "10.jpg", "1.jpg"])
    outer_src = tmp_path / "outer"
    outer_src.mkdir()
    _zip_folder(tmp_path / "t", outer_src / "train.zip", "train")
    _zip_folder(tmp_path / "u", outer_src / "test1.zip", "test1")
    (outer_src / "sampleSubmission.csv").write_text("id,label\n")
    (tmp_path / "dataset").mkdir()
    archive = tmp_path / "dataset" / "dogs-vs-cats.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in outer_src.iterdir():
            zf.write(f, f.name)
    before = _files(archive.parent)
    assert len(data.find_labelled(archive, extract_dir).examples) == 2
    assert [i for i, _ in data.find_unlabelled(archive, extract_dir)] == [1, 2, 10]
    assert _files(archive.parent) == before
    names = sorted(p.name.split("-")[0] for p in extract_dir.iterdir())
    assert names == ["dogs", "test1", "train"]
    # A new outer zip: its old extraction goes, and so do those of the zips inside it.
    os.utime(archive, ns=(1, 1))
    data.find_labelled(archive, extract_dir)
    names = sorted(p.name.split("-")[0] for p in extract_dir.iterdir())
    assert names == ["dogs", "train"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated garbage", b"not a zip"])
def test_unreadable_zip_is_a_data_error(tmp_path, extract_dir, content):
    archive = tmp_path / "train.zip"
    archive.write_bytes(content)
    with pytest.raises(DataError, match="zip"):
        data.find_labelled(archive, extract_dir)
    assert not extract_dir.exists() or not list(extract_dir.iterdir())  # nothing half-extracted


def test_corrupt_member_is_a_data_error_and_leaves_nothing(tmp_path, train_zip, extract_dir):
    raw = bytearray(train_zip.read_bytes())
    raw[40:60] = b"\0" * 20  # inside the first member's data: a CRC or inflate error
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt zip"):
        data.find_labelled(broken, extract_dir)
    assert not list(extract_dir.iterdir())


def test_unwritable_extract_dir_is_a_data_error(tmp_path, train_zip):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(DataError, match="--extract-dir") as err:
        data.find_labelled(train_zip, blocker / "extracted")
    assert str(blocker / "extracted") in str(err.value)


def test_abandoned_temporary_folders_are_removed(train_zip, extract_dir):
    """A trainer killed while extracting leaves a temporary folder; the next one removes it."""
    extract_dir.mkdir()
    leftover = extract_dir / f"{extract.TMP_PREFIX}{socket.gethostname()}-{DEAD_PID}-train-x"
    (leftover / "train").mkdir(parents=True)
    live = extract_dir / f"{extract.TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-train-y"
    live.mkdir()
    data.find_labelled(train_zip, extract_dir)
    assert not leftover.exists() and live.exists()


def test_missing_and_unlabelled_data_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.find_labelled(tmp_path / "nope")
    with pytest.raises(DataError, match="no labelled image"):
        data.find_labelled(tmp_path)
    _touch_images(tmp_path / "x", ["1.jpg"])
    with pytest.raises(DataError, match="no labelled image"):
        data.find_labelled(tmp_path / "x")


def test_split_is_stable_and_about_the_requested_share():
    keys = [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(5000)]
    examples = tuple(data.Example(k, k, int(k.startswith("dog"))) for k in keys)
    train, val = data.split(examples, 0.2)
    assert len(train) + len(val) == len(examples)
    assert abs(len(val) / len(examples) - 0.2) < 0.015
    shuffled = tuple(sorted(examples, key=lambda e: data.unit_hash("x", e.key)))
    _, val_again = data.split(shuffled, 0.2)
    assert {e.key for e in val_again} == {e.key for e in val}
    # Pinned: the split must not change between versions, machines or Python builds.
    first_val = [e.key for e in val if e.key.startswith("cat.")][:5]
    assert first_val == PINNED_FIRST_VAL_CATS


PINNED_FIRST_VAL_CATS = ["cat.0.jpg", "cat.3.jpg", "cat.5.jpg", "cat.6.jpg", "cat.8.jpg"]


def test_limit_is_a_stable_subset_with_both_classes():
    keys = [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(500)]
    examples = tuple(data.Example(k, k, int(k.startswith("dog"))) for k in keys)
    a, b = data.limit(examples, 100), data.limit(examples[::-1], 100)
    assert len(a) == 100 and a == b
    assert 30 < sum(e.label for e in a) < 70


def test_probe_classifies_files(tmp_path):
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "b").write_bytes(b"\xff\xd8\xff\xe0" + b"x" * 100)
    (tmp_path / "c").write_bytes(b"hello")
    (tmp_path / "d").write_bytes(b"\x89PNG\r\n\x1a\n....IEND\xaeB`\x82")
    got = data.probe_all([str(tmp_path / n) for n in "abcd"] + [str(tmp_path / "missing")])
    assert [p.problem for p in got] == [
        "empty file", "truncated JPEG", "not an image", None, "unreadable (No such file or directory)"
    ]
    assert got[3].fmt == "png"


def test_test_folder_ids_sorted_numerically(sample):
    items = data.find_unlabelled(sample)
    assert [i for i, _ in items] == list(range(1, 32))


def test_copy_free_discovery(sample, tmp_path):
    """Discovery reads the folder in place: nothing is copied into class folders."""
    before = {p.name for p in sample.iterdir()}
    data.find_labelled(sample)
    assert {p.name for p in sample.iterdir()} == before
    shutil.rmtree(tmp_path)
