"""One training run: devices, image cache, resumable epochs (two phases for vgg16), outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from . import data, outputs, pipeline
from .checkpoint import Checkpoints, ResumeState
from .errors import DataError, TrainerError
from .options import Options
from .recipes import Phase
from .status import Heartbeat
from .stop import StopSignal

log = logging.getLogger("trainer")

PREDICT_BATCH = 64
MIXED_PRECISION_MIN_CC = (7, 0)  # tensor cores: Volta (V100), Turing (T4), Ampere (A10G) and up
CPU_REPLICAS_ENV = "DLBOX_CPU_REPLICAS"  # split the CPU into N devices (tests MirroredStrategy)


@dataclass(frozen=True)
class Devices:
    """Where the model runs."""

    strategy: tf.distribute.Strategy
    names: list[str]
    mixed_precision: bool


@dataclass(frozen=True)
class Prepared:
    """The decoded images and the split, ready for batching."""

    images: np.ndarray
    labels: np.ndarray  # float32, dog = 1
    keys: list[str]
    train_index: np.ndarray
    val_index: np.ndarray
    skipped: list[dict]  # {"file", "reason"} for every image that could not be used
    cache: str


def setup_devices() -> Devices:
    """Mixed precision on tensor-core GPUs; MirroredStrategy over several GPUs (or CPUs)."""
    cpu_replicas = int(os.environ.get(CPU_REPLICAS_ENV, "0") or 0)
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)]
        )
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    details = [tf.config.experimental.get_device_details(g) for g in gpus]
    mixed = bool(gpus) and all(
        tuple(d.get("compute_capability") or (0, 0)) >= MIXED_PRECISION_MIN_CC for d in details
    )
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    elif gpus:
        log.warning("a GPU older than compute capability %d.%d: no mixed precision (slower)",
                    *MIXED_PRECISION_MIN_CC)
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    elif cpu_replicas > 1:
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")]
        )
    else:
        strategy = tf.distribute.get_strategy()
    names = [d.get("device_name", "GPU") for d in details] or [
        d.name for d in tf.config.list_logical_devices("CPU")
    ]
    return Devices(strategy, names, mixed)


def prepare(o: Options, labelled: data.LabelledSet, out: Path, hb: Heartbeat,
            stop: StopSignal) -> Prepared:
    """Split and decode every labelled image once into the cache; name the files skipped."""
    examples = data.limit(labelled.examples, o.limit)
    train, val = data.split(examples, o.val_split)
    if not train or not val:
        raise DataError(f"{len(examples)} labelled images are too few to split "
                        f"with --val-split {o.val_split}; add images or change --val-split")
    ordered = train + val
    paths = [e.path for e in ordered]
    hb.update(phase="caching", step=0, steps=len(paths))
    images, ok, location = _image_cache(o, out, paths, hb, stop)
    skipped = _why_skipped([e.key for e in ordered], paths, ok)
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["reason"])
    labels = np.array([e.label for e in ordered], np.float32)
    position = np.arange(len(ordered))
    train_index = position[: len(train)][ok[: len(train)]]
    val_index = position[len(train):][ok[len(train):]]
    if len(train_index) == 0 or len(val_index) == 0:
        which = "validation" if len(train_index) else "training"
        raise DataError(f"no readable image left in the {which} split ({len(skipped)} skipped); "
                        f"check the files under {labelled.root}")
    if len(set(labels[train_index].tolist())) < 2:
        raise DataError(f"the training split holds only one class; --data {o.data} needs both "
                        "cats and dogs")
    return Prepared(images, labels, [e.key for e in ordered], train_index, val_index,
                    skipped, location)


def _why_skipped(names: list[str], paths: list[str], ok: np.ndarray) -> list[dict]:
    """Name every file that did not decode, with the reason its bytes give."""
    bad = np.flatnonzero(~ok)
    probes = data.probe_all([paths[i] for i in bad])
    return [{"file": names[i], "reason": p.problem or "could not be decoded"}
            for i, p in zip(bad, probes, strict=True)]


def _image_cache(o: Options, out: Path, paths: list[str], hb: Heartbeat,
                 stop: StopSignal) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode into RAM when it fits, else into a .npy on disk (reused by --resume)."""
    n = len(paths)
    on_disk = o.cache == "disk" or (
        o.cache == "auto" and not pipeline.cache_fits_in_memory(n, o.img_size)
    )
    npy = ok_path = None
    if on_disk and o.cache == "auto":
        log.warning("%d decoded images do not fit in half the free memory: caching them on disk "
                    "(slower; --cache memory to insist)", n)
    if on_disk:
        key = _files_key(paths, o.img_size)
        npy = out / "cache" / f"images-{o.img_size}px-{key}.npy"
        ok_path = npy.with_suffix(".ok.npy")
        if npy.exists() and ok_path.exists():
            log.info("reusing the decoded-image cache %s", npy)
            return np.load(npy, mmap_mode="r"), np.load(ok_path), str(npy)
        shutil.rmtree(npy.parent, ignore_errors=True)  # older caches of other files or sizes
    images, location = pipeline.allocate(n, o.img_size, npy)
    started = time.monotonic()

    def progress(done: int) -> None:
        hb.update(step=done)
        stop.check()

    ok = pipeline.decode_into(images, paths, o.img_size, progress)
    seconds = time.monotonic() - started
    log.info("decoded %d images in %.1f s (%.0f images/s) into %s",
             int(ok.sum()), seconds, n / max(seconds, 1e-9), location)
    if npy is not None:
        images.flush()
        tmp = ok_path.with_name(f".{ok_path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, ok)
        os.replace(tmp, ok_path)  # written last, atomically: its presence marks the cache complete
    return images, ok, location


def _files_key(paths: list[str], img_size: int) -> str:
    digest = hashlib.sha256(str(img_size).encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class Progress(keras.callbacks.Callback):
    """Feeds the heartbeat with steps and metrics; turns a stop request into stop_training."""

    async_safe = True  # only touches the heartbeat (locked) and flags

    def __init__(self, hb: Heartbeat, stop: StopSignal) -> None:
        super().__init__()
        self.hb, self.stop = hb, stop

    def on_train_begin(self, logs=None):
        self.hb.update(stage="train", step=0, steps=self.params.get("steps") or 0)

    def on_train_batch_end(self, batch, logs=None):
        self.hb.update(step=batch + 1, metrics=_floats(logs))
        if self.stop.requested:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self.hb.update(stage="validate")

    def on_test_batch_end(self, batch, logs=None):
        if self.stop.requested:
            self.model.stop_evaluating = True


def _floats(logs: dict | None) -> dict:
    return {k: round(float(v), 6) for k, v in (logs or {}).items()}


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])


def _load(devices: Devices, path: Path) -> keras.Model:
    with devices.strategy.scope():
        return keras.models.load_model(path)


def _start_phase(o: Options, devices: Devices, phase: Phase, first_phase: bool,
                 state: ResumeState, ckpt: Checkpoints) -> keras.Model:
    """A phase's starting model: built (first phase) or the best so far; prepared, compiled."""
    if not first_phase and state.best is None:
        raise TrainerError(f"no epoch before {phase.name} produced a finite validation loss "
                           "(the loss diverged); lower --learning-rate")
    with devices.strategy.scope():
        if first_phase:
            model = o.recipe.build(o.img_size, o.weights)
        else:
            model = keras.models.load_model(ckpt.path(state.best))
        if phase.prepare is not None:
            phase.prepare(model)
        _compile(model, o.recipe.optimizer(o.learning_rate * phase.lr_factor))
    return model


def fit(o: Options, out: Path, prep: Prepared, devices: Devices, hb: Heartbeat,
        stop: StopSignal) -> ResumeState:
    """Run (or continue) every epoch of every phase; return the final checkpoint state."""
    ckpt = Checkpoints(out / "checkpoints")
    state = (ckpt.load_for_resume(o.as_dict()) if o.resume else None) or ResumeState(o.as_dict())
    if state.completed:  # a warning: whoever follows the run should see it was resumed
        log.warning("resuming after epoch %d of %d from the run's checkpoint", state.completed,
                    o.total_epochs)
    # Weights, shuffling and augmentation; a resumed run does not replay epoch 1's order.
    keras.utils.set_random_seed(o.seed + state.completed)
    replicas = devices.strategy.num_replicas_in_sync
    global_batch = o.batch_size * replicas
    train_ds = pipeline.batches(prep.images, prep.labels, prep.train_index, global_batch,
                                training=True, seed=o.seed)
    val_ds = pipeline.batches(prep.images, prep.labels, prep.val_index, global_batch,
                              training=False)
    callbacks = [Progress(hb, stop)]
    for index, (phase, first, end) in enumerate(o.recipe.schedule(o)):
        if phase.name in state.phases_done:
            continue
        if state.phase == phase.name and state.last:  # resumed mid-phase: weights and optimizer
            model = _load(devices, ckpt.path(state.last))
        else:
            model = _start_phase(o, devices, phase, index == 0, state, ckpt)
            state = replace(state, wait=0)  # early stopping counts within a phase
        for epoch in range(max(first, state.completed), end):
            if o.patience and state.wait >= o.patience:  # checked first: --resume agrees
                log.info("early stopping: val_loss has not improved for %d epochs", o.patience)
                break
            hb.update(phase=phase.name, epoch=epoch + 1, epochs=o.total_epochs)
            row = _one_epoch(model, phase.name, epoch, train_ds, val_ds, len(prep.train_index),
                             callbacks, state, ckpt, stop)
            # NaN never improves and is never kept as the best (x < NaN is always False).
            improved = not math.isnan(row["val_loss"]) and (
                state.best_val_loss is None or row["val_loss"] < state.best_val_loss)
            if improved:
                state = replace(state, best=ckpt.save_model(model, f"best-{epoch + 1:04d}.keras"),
                                best_val_loss=row["val_loss"], best_epoch=epoch + 1, wait=0)
            else:
                state = replace(state, wait=state.wait + 1)
            state = replace(state, history=(*state.history, row), phase=phase.name,
                            completed=epoch + 1,
                            last=ckpt.save_model(model, f"last-{epoch + 1:04d}.keras"))
            ckpt.commit(state)
            outputs.write_history(out, list(state.history))
            hb.epoch_done(row["seconds"])
            hb.update(metrics={k: row[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")})
            log.info("%s epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f "
                     "(%.1f s, %.0f img/s)%s", phase.name, epoch + 1, o.total_epochs,
                     row["loss"], row["accuracy"], row["val_loss"], row["val_accuracy"],
                     row["seconds"], row["images_per_second"], " *best*" if improved else "")
            stop.check()
        state = replace(state, phases_done=(*state.phases_done, phase.name))
        ckpt.commit(state)
    return state


def _one_epoch(model, phase: str, epoch: int, train_ds, val_ds, n_train: int, callbacks,
               state: ResumeState, ckpt: Checkpoints, stop: StopSignal) -> dict:
    """Train and validate one epoch; on a stop request, checkpoint the weights and raise."""

    def stop_here() -> None:  # the epoch does not count: --resume redoes it from these weights
        if stop.requested:
            partial = ckpt.save_model(model, f"partial-{epoch + 1:04d}.keras")
            ckpt.commit(replace(state, phase=phase, last=partial))
            stop.check()

    started = time.monotonic()
    history = model.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                        shuffle=False, callbacks=callbacks)
    trained = time.monotonic()
    stop_here()
    val = model.evaluate(val_ds, verbose=0, return_dict=True, callbacks=callbacks)
    stop_here()
    return {
        "epoch": epoch + 1,
        "phase": phase,
        "loss": round(float(history.history["loss"][-1]), 6),
        "accuracy": round(float(history.history["accuracy"][-1]), 6),
        "val_loss": round(float(val["loss"]), 6),
        "val_accuracy": round(float(val["accuracy"]), 6),
        "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        "seconds": round(time.monotonic() - started, 3),
        "images_per_second": round(n_train / max(trained - started, 1e-9), 1),
    }


def evaluate_best(model: keras.Model, prep: Prepared, batch: int) -> tuple[np.ndarray, dict]:
    ds = pipeline.batches(prep.images, prep.labels, prep.val_index, batch, training=False)
    p_dog = model.predict(ds, verbose=0).reshape(-1)
    return p_dog, outputs.binary_metrics(prep.labels[prep.val_index], p_dog)


def predict_test(o: Options, out: Path, model: keras.Model, items: list[tuple[int, str]],
                 hb: Heartbeat, stop: StopSignal) -> list[dict]:
    """Write submission.csv for the test images; unreadable ones get 0.5 and are listed."""
    ids, paths = [i for i, _ in items], [p for _, p in items]
    hb.update(phase="predicting", step=0, steps=len(paths))
    images, _ = pipeline.allocate(len(paths), o.img_size, None)
    ok = pipeline.decode_into(images, paths, o.img_size,
                              lambda done: (hb.update(step=done), stop.check()))
    index = np.flatnonzero(ok)
    p_dog = np.full(len(paths), 0.5, np.float32)
    zeros = np.zeros(len(paths), np.float32)
    if len(index):
        ds = pipeline.batches(images, zeros, index, PREDICT_BATCH, training=False)
        p_dog[index] = model.predict(ds, verbose=0).reshape(-1)
    outputs.write_submission(out, ids, p_dog)
    return _why_skipped([os.path.basename(p) for p in paths], paths, ok)


def run(o: Options, out: Path, labelled: data.LabelledSet, test_items: list | None,
        hb: Heartbeat, stop: StopSignal) -> dict:
    """Train, pick the best model, write every output; return metrics.json's content."""
    started = time.monotonic()
    devices = setup_devices()
    log.info("devices: %s (replicas %d, mixed precision %s)", ", ".join(devices.names),
             devices.strategy.num_replicas_in_sync, devices.mixed_precision)
    prep = prepare(o, labelled, out, hb, stop)
    log.info("%d training and %d validation images (%d skipped), cache in %s",
             len(prep.train_index), len(prep.val_index), len(prep.skipped), prep.cache)
    state = fit(o, out, prep, devices, hb, stop)
    if state.best is None:
        raise TrainerError("no epoch produced a finite validation loss (the loss diverged); "
                           "lower --learning-rate")
    outputs.write_history(out, list(state.history))  # again: a kill may have come before the last write

    hb.update(phase="evaluating", stage=None)
    best = _load(devices, Path(out / "checkpoints" / state.best))
    shutil.copyfile(out / "checkpoints" / state.best, out / "model.keras.tmp")
    os.replace(out / "model.keras.tmp", out / "model.keras")
    p_val, final = evaluate_best(best, prep, o.batch_size * devices.strategy.num_replicas_in_sync)
    val_keys = [prep.keys[i] for i in prep.val_index]
    outputs.write_val_predictions(out, val_keys, prep.labels[prep.val_index], p_val)
    misclassified = outputs.write_misclassified(out, prep.images, prep.val_index, val_keys,
                                                prep.labels[prep.val_index], p_val)

    test_skipped = None
    if test_items is not None:
        test_skipped = predict_test(o, out, best, test_items, hb, stop)

    rates = [r["images_per_second"] for r in state.history]
    metrics = {
        "model": o.model,
        **final,
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "epochs_planned": o.total_epochs,
        "train_images": len(prep.train_index),
        "val_images": len(prep.val_index),
        "misclassified": misclassified,
        "skipped_files": len(prep.skipped),
        "skipped": prep.skipped,
        "images_per_second": round(sum(rates) / len(rates), 1) if rates else None,
        "wall_seconds": round(time.monotonic() - started, 1),
        "devices": devices.names,
        "replicas": devices.strategy.num_replicas_in_sync,
        "mixed_precision": devices.mixed_precision,
        "image_cache": prep.cache,
        "versions": outputs.versions(),
        "arguments": o.as_dict(),
    }
    if test_skipped is not None:
        metrics["test_images"] = len(test_items)
        metrics["test_skipped"] = test_skipped
    outputs.write_metrics(out, metrics)
    Checkpoints(out / "checkpoints").commit(replace(state, finished=True))
    log.info("done: val_accuracy %.4f val_loss %.4f (best epoch %d of %d) in %.0f s",
             metrics["val_accuracy"], metrics["val_loss"], metrics["best_epoch"],
             metrics["epochs_run"], metrics["wall_seconds"])
    return metrics


def finished_metrics(out: Path, o: Options) -> dict | None:
    """metrics.json of a run in --out that already finished (for an idempotent --resume)."""
    state = Checkpoints(out / "checkpoints").load_for_resume(o.as_dict()) if o.resume else None
    metrics = out / "metrics.json"
    if state and state.finished and metrics.exists():
        return json.loads(metrics.read_text())
    return None
