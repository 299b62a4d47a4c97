"""The sample-data generator: Kaggle layout, realistic JPEGs, deterministic, bad files."""

from __future__ import annotations

import io
import subprocess
import sys

from PIL import Image

from orchestrator.sample import BAD_KINDS, bad_file_name, generate
from trainer import data


def test_layout_matches_kaggle(small_sample):
    train = sorted(p.name for p in (small_sample / "train").iterdir())
    assert len(train) == 200
    assert sum(n.startswith("cat.") for n in train) == 100
    assert sum(n.startswith("dog.") for n in train) == 100
    assert {"cat.0.jpg", "cat.99.jpg", "dog.0.jpg", "dog.99.jpg"} <= set(train)
    assert sorted(p.name for p in (small_sample / "test1").iterdir()) == [
        f"{i}.jpg" for i in sorted(range(1, 6), key=str)
    ]


def test_images_are_realistic_jpegs(small_sample):
    sizes, byte_sizes = set(), []
    for path in sorted((small_sample / "train").iterdir())[:60]:
        raw = path.read_bytes()
        img = Image.open(io.BytesIO(raw))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert min(img.size) >= 160 and max(img.size) <= 500
        sizes.add(img.size)
        byte_sizes.append(len(raw))
    assert len(sizes) > 40  # varied sizes and aspect ratios
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert 5_000 < sum(byte_sizes) / len(byte_sizes) < 80_000


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, 6, test_n=1, seed=7)
    generate(b, 6, test_n=1, seed=7)
    generate(c, 6, test_n=1, seed=8)
    for name in ("cat.0.jpg", "dog.2.jpg"):
        assert (a / "train" / name).read_bytes() == (b / "train" / name).read_bytes()
        assert (a / "train" / name).read_bytes() != (c / "train" / name).read_bytes()


def test_bad_files_cover_every_kind(tmp_path):
    summary = generate(tmp_path, 4, test_n=2, bad=True, seed=3)
    assert summary.bad == len(BAD_KINDS) + 1
    path = {kind: tmp_path / "train" / bad_file_name(4, kind) for kind in BAD_KINDS}
    probes = {kind: data.probe(str(p)) for kind, p in path.items()}
    assert probes["empty"].problem == "empty file"
    assert probes["truncated"].problem == "truncated JPEG"
    assert probes["text"].problem == "not an image"
    # "corrupt" passes the header probe but cannot be decoded (the pipeline catches it).
    assert probes["corrupt"] == data.Probe("jpeg", None)
    assert probes["png"] == data.Probe("png", None)
    assert Image.open(path["grayscale"]).mode == "L"
    assert Image.open(path["cmyk"]).mode == "CMYK"
    assert (tmp_path / "test1" / "3.jpg").stat().st_size == 0


def test_cli_writes_sample_and_refuses_a_non_empty_dir(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "data", "sample", str(tmp_path / "d"),
           "--n", "4", "--test-n", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "wrote 4 training images" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert "not empty" in again.stderr and "Traceback" not in again.stderr


def test_cli_rejects_bad_count(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "data", "sample", str(tmp_path), "--n", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--n must be" in result.stderr and "Traceback" not in result.stderr
