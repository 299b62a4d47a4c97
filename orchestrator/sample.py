"""A small, learnable Dogs vs. Cats look-alike in the exact Kaggle layout (for demos and tests)."""

from __future__ import annotations

import io
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

MIN_SIDE_PX, MAX_SIDE_PX = 160, 500  # Kaggle's photos are at most 500 px a side
JPEG_QUALITY = (70, 95)
PARALLEL_MIN_IMAGES = 400  # below this, worker start-up costs more than it saves
# Fur colours overlap on purpose: the classes differ by shape (ears, muzzle, nose), not hue.
CAT_FUR = [(214, 137, 60), (128, 128, 128), (40, 40, 40), (230, 220, 200), (170, 110, 70)]
DOG_FUR = [(150, 100, 55), (218, 170, 90), (40, 40, 40), (230, 220, 200), (110, 80, 60)]
BAD_KINDS = ("empty", "truncated", "png", "text", "grayscale", "cmyk", "corrupt")


@dataclass(frozen=True)
class SampleSummary:
    """What was written."""

    root: Path
    train: int
    test: int
    bad: int


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    top = tuple(rng.randrange(40, 230) for _ in range(3))
    bottom = tuple(rng.randrange(40, 230) for _ in range(3))
    gradient = Image.linear_gradient("L").resize((w, h))
    img = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), gradient)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(2, 7)):  # class-neutral clutter
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(10, w // 2), y0 + rng.randrange(10, h // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randrange(2, 8))
    noise = Image.frombytes("L", size, rng.randbytes(w * h)).convert("RGB")
    return Image.blend(img, noise, rng.uniform(0.05, 0.2))


def _animal(img: Image.Image, rng: random.Random, dog: bool) -> None:
    """Draw a cat (pointed ears, whiskers) or a dog (floppy ears, muzzle, big nose)."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * min(w, h)
    cx = rng.uniform(r * 1.3, w - r * 1.3)
    cy = rng.uniform(r * 1.3, h - r * 1.1)
    fur = rng.choice(DOG_FUR if dog else CAT_FUR)
    dark = tuple(max(0, c - 70) for c in fur)
    if dog:
        for side in (-1, 1):  # floppy ears hang beside the head
            ex = cx + side * r * 0.95
            draw.ellipse((ex - r * 0.35, cy - r * 0.7, ex + r * 0.35, cy + r * 0.6), fill=dark)
        draw.ellipse((cx - r * 0.85, cy - r, cx + r * 0.85, cy + r * 0.9), fill=fur)
        draw.ellipse((cx - r * 0.5, cy + r * 0.1, cx + r * 0.5, cy + r * 0.85),
                     fill=tuple(min(255, c + 40) for c in fur))
        draw.ellipse((cx - r * 0.25, cy + r * 0.15, cx + r * 0.25, cy + r * 0.45), fill=(15, 15, 15))
        if rng.random() < 0.5:
            draw.ellipse((cx - r * 0.15, cy + r * 0.6, cx + r * 0.15, cy + r * 1.0),
                         fill=(220, 90, 110))
        eye = (30, 20, 10)
        for side in (-1, 1):
            ex = cx + side * r * 0.35
            draw.ellipse((ex - r * 0.11, cy - r * 0.4, ex + r * 0.11, cy - r * 0.18), fill=eye)
    else:
        for side in (-1, 1):  # pointed ears stand on top of the head
            bx = cx + side * r * 0.55
            draw.polygon([(bx - r * 0.35, cy - r * 0.6), (bx + r * 0.35, cy - r * 0.6),
                          (bx + side * r * 0.25, cy - r * 1.45)], fill=fur)
            draw.polygon([(bx - r * 0.18, cy - r * 0.65), (bx + r * 0.18, cy - r * 0.65),
                          (bx + side * r * 0.2, cy - r * 1.2)], fill=(230, 160, 170))
        draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=fur)
        eye = rng.choice([(90, 200, 60), (230, 200, 40)])
        for side in (-1, 1):
            ex = cx + side * r * 0.4
            draw.ellipse((ex - r * 0.2, cy - r * 0.3, ex + r * 0.2, cy - r * 0.05), fill=eye)
            draw.ellipse((ex - r * 0.05, cy - r * 0.3, ex + r * 0.05, cy - r * 0.05), fill=(0, 0, 0))
        draw.polygon([(cx - r * 0.1, cy + r * 0.1), (cx + r * 0.1, cy + r * 0.1),
                      (cx, cy + r * 0.22)], fill=(230, 120, 140))
        for side in (-1, 1):
            for k in (-1, 0, 1):
                draw.line((cx + side * r * 0.15, cy + r * 0.25,
                           cx + side * r * 1.1, cy + r * (0.2 + 0.12 * k)),
                          fill=(240, 240, 240), width=max(1, int(r / 40)))


TEST_INDEX_BASE = 5_000_000  # render() index of test1/1.jpg


def is_dog(seed: int, index: int) -> bool:
    """Which animal render(seed, index, dog=None) draws (the answer key of test1/)."""
    return random.Random(seed * 1_000_003 + index).random() < 0.5


def render(seed: int, index: int, dog: bool | None) -> bytes:
    """One JPEG: a cat, a dog, or (dog=None, for test1/) either, chosen by the seed."""
    rng = random.Random(seed * 1_000_003 + index)
    if dog is None:
        dog = rng.random() < 0.5  # the same first draw as is_dog()
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    long_side = min(MAX_SIDE_PX, rng.randrange(300, 600))  # like Kaggle: many exactly 500
    w, h = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
    img = _background(rng, (max(w, MIN_SIDE_PX), max(h, MIN_SIDE_PX)))
    _animal(img, rng, dog)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randrange(*JPEG_QUALITY))
    return buf.getvalue()


def _bad_file(kind: str, seed: int) -> bytes:
    good = render(seed, 10_000_000 + BAD_KINDS.index(kind), dog=False)
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "text":
        return b"<html>404 Not Found</html>\n"
    if kind == "corrupt":  # valid markers around garbage: passes a header check, fails to decode
        return b"\xff\xd8\xff\xe0" + random.Random(seed).randbytes(4000) + b"\xff\xd9"
    img = Image.open(io.BytesIO(good))
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, "PNG")
    elif kind == "grayscale":
        img.convert("L").save(buf, "JPEG")
    else:
        img.convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def bad_file_name(n: int, kind: str) -> str:
    """Where generate(..., bad=True) puts the bad file of this kind for n training images."""
    k = BAD_KINDS.index(kind)
    return f"{'dog' if k % 2 else 'cat'}.{n // 2 + 1_000 + k}.jpg"


def _write_one(job: tuple[str, int, int, bool | None]) -> None:
    path, seed, index, dog = job
    Path(path).write_bytes(render(seed, index, dog))


def generate(root: Path, n: int, *, test_n: int = 50, bad: bool = False, seed: int = 0,
             workers: int | None = None) -> SampleSummary:
    """Write root/train/{cat,dog}.N.jpg (n images, half each) and root/test1/N.jpg."""
    train_dir, test_dir = root / "train", root / "test1"
    train_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int, int, bool | None]] = []
    for i in range(n):
        dog = i % 2 == 1
        jobs.append((str(train_dir / f"{'dog' if dog else 'cat'}.{i // 2}.jpg"), seed, i, dog))
    for i in range(test_n):
        jobs.append((str(test_dir / f"{i + 1}.jpg"), seed, TEST_INDEX_BASE + i, None))
    if len(jobs) >= PARALLEL_MIN_IMAGES and workers != 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)
    n_bad = 0
    if bad:
        for kind in BAD_KINDS:
            (train_dir / bad_file_name(n, kind)).write_bytes(_bad_file(kind, seed))
        (test_dir / f"{test_n + 1}.jpg").write_bytes(b"")
        n_bad = len(BAD_KINDS) + 1
    return SampleSummary(root, n, test_n, n_bad)
