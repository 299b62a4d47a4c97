"""tf.data input pipeline: parallel decode into a uint8 image cache, then augmented batches."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

FORMAT_CODES = {"jpeg": 0, "png": 1, "gif": 1, "bmp": 1}
DECODE_BATCH = 128  # images handed from the decoders to the cache writer at a time
JPEG_RATIOS = (8, 4, 2, 1)  # DCT-domain downscaling libjpeg can do while decoding
MEMORY_CACHE_FRACTION = 0.5  # keep the cache in RAM only if it needs at most this share
# The article's ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True);
# Keras' shear_range is in degrees, so the article's shear is tiny but kept faithfully.
SHEAR_DEGREES = 0.2
ZOOM_RANGE = 0.2


@dataclass(frozen=True)
class ImageCache:
    """Decoded, resized images (RAM or a .npy memmap on disk) and which ones decoded."""

    images: np.ndarray  # (n, size, size, 3) uint8
    ok: np.ndarray  # (n,) bool: False where the file could not be decoded
    location: str  # "memory" or the .npy path


def _decode_jpeg(contents: tf.Tensor, size: int) -> tf.Tensor:
    """Decode a JPEG at the coarsest DCT scale that still covers size x size (much faster)."""
    shape = tf.io.extract_jpeg_shape(contents)
    short_side = tf.minimum(shape[0], shape[1])
    ratios = tf.constant(JPEG_RATIOS)
    fits = short_side // ratios >= size
    branch = tf.argmax(tf.cast(fits, tf.int32))  # first (largest) ratio that fits; else 1
    branch = tf.where(tf.reduce_any(fits), branch, len(JPEG_RATIOS) - 1)
    branches = [
        (lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in JPEG_RATIOS
    ]
    return tf.switch_case(tf.cast(branch, tf.int32), branches)


def load_image(path: tf.Tensor, fmt: tf.Tensor, size: int) -> tf.Tensor:
    """Read, decode (any RGB/grey/CMYK JPEG, PNG, GIF, BMP) and resize to uint8 size x size."""
    contents = tf.io.read_file(path)
    image = tf.cond(
        tf.equal(fmt, FORMAT_CODES["jpeg"]),
        lambda: _decode_jpeg(contents, size),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
    )
    image = tf.image.resize(image, (size, size))
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def cache_fits_in_memory(n: int, size: int) -> bool:
    """Whether n decoded images fit comfortably in the RAM available now."""
    need = n * size * size * 3
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True  # no way to tell (not Linux): trust RAM
    return need <= MEMORY_CACHE_FRACTION * available


def allocate(n: int, size: int, disk_path: Path | None) -> tuple[np.ndarray, str]:
    """An (n, size, size, 3) uint8 array in RAM, or a .npy memmap at disk_path."""
    shape = (n, size, size, 3)
    if disk_path is None:
        return np.zeros(shape, np.uint8), "memory"
    disk_path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(disk_path, mode="w+", dtype=np.uint8, shape=shape)
    return array, str(disk_path)


def decode_into(
    images: np.ndarray,
    paths: list[str],
    formats: list[str | None],
    size: int,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decode paths in parallel into images; return the mask of those that decoded.

    Files already known to be unreadable (format None) are not read. A file that fails to
    decode is dropped by ignore_errors and stays False in the mask, so one bad file never
    stops the run and every failure is known by name.
    """
    ok = np.zeros(len(paths), bool)
    todo = [i for i, f in enumerate(formats) if f is not None]
    if not todo:
        return ok
    ds = tf.data.Dataset.from_tensor_slices(
        (
            tf.constant([paths[i] for i in todo]),
            tf.constant([FORMAT_CODES[formats[i]] for i in todo], tf.int32),
            tf.constant(todo, tf.int64),
        )
    )
    ds = ds.map(
        lambda p, f, i: (load_image(p, f, size), i),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    ds = ds.ignore_errors().batch(DECODE_BATCH).prefetch(tf.data.AUTOTUNE)
    done = 0
    for batch, index in ds:
        index = index.numpy()
        images[index] = batch.numpy()
        ok[index] = True
        done += len(index)
        if on_batch is not None:
            on_batch(done)
    return ok


def augment(images: tf.Tensor) -> tf.Tensor:
    """Random zoom, shear and horizontal flip as one affine warp per image (float32 in/out)."""
    shape = tf.shape(images)
    batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    zx = tf.random.uniform([batch], 1 - ZOOM_RANGE, 1 + ZOOM_RANGE)
    zy = tf.random.uniform([batch], 1 - ZOOM_RANGE, 1 + ZOOM_RANGE)
    shear = tf.random.uniform([batch], -SHEAR_DEGREES, SHEAR_DEGREES) * (math.pi / 180)
    flip = tf.where(tf.random.uniform([batch]) < 0.5, -1.0, 1.0)
    # Output pixel (x, y) samples input A @ (x - c, y - c) + c, A = shear @ zoom @ flip.
    a00, a01 = zx * flip, -tf.sin(shear) * zy
    a10, a11 = tf.zeros_like(zx), tf.cos(shear) * zy
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transforms = tf.stack(
        [
            a00,
            a01,
            cx - a00 * cx - a01 * cy,
            a10,
            a11,
            cy - a10 * cx - a11 * cy,
            tf.zeros_like(zx),
            tf.zeros_like(zx),
        ],
        axis=1,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    index: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (float32 images, float32 labels) gathered from the cache by index.

    Gathering by index keeps one copy of the cache (RAM or memmap) instead of a second
    one inside TensorFlow; shuffling indices is cheap at any dataset size. Without
    training, batches keep the order of index.
    """
    size = images.shape[1]

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(rows)  # sequential reads when the cache is a memmap
        return images[rows], labels[rows]

    def load(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [rows], (tf.uint8, tf.float32), stateful=False)
        x = tf.cast(tf.ensure_shape(x, (None, size, size, 3)), tf.float32)
        return x, tf.ensure_shape(y, (None,))

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(index, np.int64))
    if training:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # One worker: nothing to shard, and FILE sharding cannot apply to an index dataset.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
