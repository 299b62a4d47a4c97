"""One training run: devices, image cache, resumable epochs (two phases for vgg16), outputs.

With TF_CONFIG naming several workers, every worker runs this same code on its own shard of
the images (MultiWorkerMirroredStrategy); only the chief (worker 0) writes the outputs.
"""

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

from . import data, loop, outputs, pipeline, workers
from .checkpoint import Checkpoints, ResumeState
from .cluster import Cluster
from .errors import DataError, Interrupted, TrainerError
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
    names: list[str]  # this worker's devices
    mixed_precision: bool
    workers: int
    consensus: workers.Consensus

    @property
    def replicas(self) -> int:
        """Replicas of every worker together."""
        return self.strategy.num_replicas_in_sync

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.workers


@dataclass(frozen=True)
class Prepared:
    """The decoded images and the split, ready for batching (this worker's share of them)."""

    images: np.ndarray
    labels: np.ndarray  # float32, dog = 1
    keys: list[str]
    train_index: np.ndarray  # this worker's training shard
    val_index: np.ndarray  # the whole validation split on the chief, the shard elsewhere
    val_shard: np.ndarray  # the part of val_index this worker validates every epoch
    skipped: list[dict]  # {"file", "reason"} for every image that could not be used
    cache: str


@dataclass(frozen=True)
class Job:
    """What every stage of one run shares."""

    o: Options
    out: Path
    cluster: Cluster
    devices: Devices
    hb: Heartbeat
    stop: StopSignal
    ckpt: Checkpoints


def setup_devices(cluster: Cluster, hb: Heartbeat) -> Devices:
    """Mixed precision on tensor-core GPUs; a strategy over the workers, GPUs or CPUs."""
    cpu_replicas = int(os.environ.get(CPU_REPLICAS_ENV, "0") or 0)
    if cpu_replicas > 1 and not cluster.multi:
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
    if cluster.multi:  # before any TensorFlow op, as MultiWorkerMirroredStrategy requires
        if cpu_replicas > 1:
            log.warning("%s is ignored on a cluster: one CPU device per worker", CPU_REPLICAS_ENV)
        strategy = workers.join(cluster, hb)
    elif len(gpus) > 1:
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
    return Devices(strategy, names, mixed, cluster.workers, workers.Consensus(strategy))


def prepare(o: Options, labelled: data.LabelledSet, out: Path, hb: Heartbeat,
            stop: StopSignal, cluster: Cluster) -> Prepared:
    """Split and decode this worker's images once into the cache; name the files skipped.

    A worker decodes every workers-th training image of the split's order; the chief also
    decodes the whole validation split (it alone evaluates the best model on it at the end).
    """
    examples = data.limit(labelled.examples, o.limit)
    train, val = data.split(examples, o.val_split)
    if not train or not val:
        raise DataError(f"{len(examples)} labelled images are too few to split "
                        f"with --val-split {o.val_split}; add images or change --val-split")
    if min(len(train), len(val)) < cluster.workers:
        raise DataError(f"{len(train)} training and {len(val)} validation images are too few "
                        f"for {cluster.workers} workers; add images or use fewer workers")
    train = cluster.shard(train)
    val_decoded = val if cluster.chief else cluster.shard(val)
    ordered = train + val_decoded
    paths = [e.path for e in ordered]
    hb.update(phase="caching", step=0, steps=len(paths))
    images, ok, location = _image_cache(o, out, paths, hb, stop)
    skipped = _why_skipped([e.key for e in ordered], paths, ok)
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["reason"])
    labels = np.array([e.label for e in ordered], np.float32)
    position = np.arange(len(ordered))
    is_train = position < len(train)
    # The chief validates every epoch on its shard of the split like any worker.
    in_shard = (position - len(train)) % (cluster.workers if cluster.chief else 1) == 0
    train_index = position[is_train & ok]
    val_index = position[~is_train & ok]
    val_shard = position[~is_train & ok & in_shard]
    if len(train_index) == 0 or len(val_shard) == 0:
        which = "validation" if len(train_index) else "training"
        raise DataError(f"no readable image left in the {which} split ({len(skipped)} skipped); "
                        f"check the files under {labelled.root}")
    if len(set(labels[train_index].tolist())) < 2:
        raise DataError(f"the training split holds only one class; --data {o.data} needs both "
                        "cats and dogs")
    return Prepared(images, labels, [e.key for e in ordered], train_index, val_index, val_shard,
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


def _rounded(metrics: dict) -> dict:
    return {k: round(float(v), 6) for k, v in metrics.items()}


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    # Compiled although fit is never called: the saved model keeps its optimizer and loss, and
    # under mixed_float16 compile wraps the optimizer in the LossScaleOptimizer the step uses.
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    if not model.optimizer.built:  # its variables now, in the strategy's scope, not mid-step
        model.optimizer.build(model.trainable_variables)


def _load(strategy: tf.distribute.Strategy, path: Path) -> keras.Model:
    with strategy.scope():
        return keras.models.load_model(path)


def _start_phase(job: Job, phase: Phase, first_phase: bool, state: ResumeState) -> keras.Model:
    """A phase's starting model: built (first phase) or the best so far; prepared, compiled."""
    o = job.o
    if not first_phase and state.best is None:
        raise TrainerError(f"no epoch before {phase.name} produced a finite validation loss "
                           "(the loss diverged); lower --learning-rate")
    with job.devices.strategy.scope():
        if first_phase:
            model = o.recipe.build(o.img_size, o.weights)
        else:
            model = keras.models.load_model(job.ckpt.path(state.best))
        if phase.prepare is not None:
            phase.prepare(model)
        _compile(model, o.recipe.optimizer(o.learning_rate * phase.lr_factor))
    return model


@dataclass(frozen=True)
class Batches:
    """Both splits' batches on this worker, and the plans every worker shares."""

    train: object  # tf.distribute.DistributedDataset
    train_plan: loop.Plan
    val: object
    val_plan: loop.Plan
    train_images: int  # over every worker: the images one epoch trains on
    shard_images: int  # this worker's share of them


def _batches(job: Job, prep: Prepared, peers: workers.Peers) -> Batches:
    strategy, local = job.devices.strategy, job.devices.local_replicas
    train_plan = loop.plan(peers.train_counts, job.o.batch_size, local)
    val_plan = loop.plan(peers.val_counts, job.o.batch_size, local)
    return Batches(
        loop.distribute(strategy, prep.images, prep.labels, prep.train_index, train_plan,
                        training=True, seed=job.o.seed),
        train_plan,
        loop.distribute(strategy, prep.images, prep.labels, prep.val_shard, val_plan,
                        training=False),
        val_plan,
        peers.train_images,
        len(prep.train_index),
    )


def fit(job: Job, prep: Prepared, peers: workers.Peers, state: ResumeState
        ) -> tuple[ResumeState, keras.Model | None]:
    """Run (or continue) every epoch of every phase; return the final state and model."""
    o, hb, ckpt = job.o, job.hb, job.ckpt
    if state.completed:  # a warning: whoever follows the run should see it was resumed
        log.warning("resuming after epoch %d of %d from the run's checkpoint", state.completed,
                    o.total_epochs)
    # Weights, shuffling and augmentation; a resumed run does not replay epoch 1's order.
    keras.utils.set_random_seed(o.seed + state.completed)
    batches = _batches(job, prep, peers)
    model = None
    for index, (phase, first, end) in enumerate(o.recipe.schedule(o)):
        if phase.name in state.phases_done:
            continue
        if state.phase == phase.name and state.last:  # resumed mid-phase: weights and optimizer
            model = _load(job.devices.strategy, ckpt.path(state.last))
        else:
            model = _start_phase(job, phase, index == 0, state)
            state = replace(state, wait=0)  # early stopping counts within a phase
        steps = loop.Steps(job.devices.strategy, model)
        for epoch in range(max(first, state.completed), end):
            if o.patience and state.wait >= o.patience:  # checked first: --resume agrees
                log.info("early stopping: val_loss has not improved for %d epochs", o.patience)
                break
            hb.update(phase=phase.name, epoch=epoch + 1, epochs=o.total_epochs)
            start = _steps_done(state, phase.name, epoch, batches.train_plan.steps)
            row = _one_epoch(job, model, steps, batches, phase.name, epoch, state, start)
            state = _after_epoch(job, model, row, state)
            if job.devices.consensus.anyone(job.stop.requested):  # every worker, the same epoch
                raise job.stop.interrupted()
        state = replace(state, phases_done=(*state.phases_done, phase.name), stopped_at=None)
        ckpt.commit(state)
    return state, model


def _after_epoch(job: Job, model: keras.Model, row: dict, state: ResumeState) -> ResumeState:
    """Keep the best and the last model, commit the state; history.csv on the chief."""
    ckpt, epoch = job.ckpt, row["epoch"]
    # NaN never improves and is never kept as the best (x < NaN is always False). val_loss
    # is reduced over every worker: each one takes the same decision.
    improved = not math.isnan(row["val_loss"]) and (
        state.best_val_loss is None or row["val_loss"] < state.best_val_loss)
    if improved:
        state = replace(state, best=ckpt.save_model(model, f"best-{epoch:04d}.keras"),
                        best_val_loss=row["val_loss"], best_epoch=epoch, wait=0)
    else:
        state = replace(state, wait=state.wait + 1)
    state = replace(state, history=(*state.history, row), phase=row["phase"], completed=epoch,
                    last=ckpt.save_model(model, f"last-{epoch:04d}.keras"), stopped_at=None)
    ckpt.commit(state)
    if job.cluster.chief:
        outputs.write_history(job.out, list(state.history))
    job.hb.epoch_done(row["seconds"])
    job.hb.update(metrics={k: row[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")})
    log.info("%s epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f "
             "(%.1f s, %.0f img/s)%s", row["phase"], epoch, job.o.total_epochs,
             row["loss"], row["accuracy"], row["val_loss"], row["val_accuracy"],
             row["seconds"], row["images_per_second"], " *best*" if improved else "")
    return state


def _steps_done(state: ResumeState, phase: str, epoch: int, steps: int) -> int:
    """The training steps of this epoch that the checkpoint's weights hold already: those a
    run stopped mid-epoch had done (its partial checkpoint says how far it got), which
    --resume does not train again; 0 for any other epoch. At least one step is left to run:
    a run stopped while validating trains its epoch's last step again."""
    if (state.stopped_at is None or state.phase != phase or not state.last
            or not state.last.startswith("partial-")
            or not epoch <= state.stopped_at <= epoch + 1):
        return 0
    return max(0, min(steps - 1, round((state.stopped_at - epoch) * steps)))


def _one_epoch(job: Job, model: keras.Model, steps: loop.Steps, batches: Batches, phase: str,
               epoch: int, state: ResumeState, start: int = 0) -> dict:
    """Train (from step start: a resumed stop) and validate one epoch; on a stop request,
    checkpoint the weights and raise."""
    hb, stop = job.hb, job.stop
    if start:
        log.info("resuming epoch %d at step %d of %d (the steps before are in the weights)",
                 epoch + 1, start, batches.train_plan.steps)

    def stop_here(stopped: bool, trained: float) -> None:  # --resume goes on from here
        if stopped:
            partial = job.ckpt.save_model(model, f"partial-{epoch + 1:04d}.keras")
            job.ckpt.commit(replace(state, phase=phase, last=partial,
                                    stopped_at=round(epoch + trained, 4)))
            raise stop.interrupted()

    def progress(step: int, metrics: dict) -> None:
        hb.update(step=step, metrics=_rounded(metrics))

    started = time.monotonic()
    hb.update(stage="train", step=start, steps=batches.train_plan.steps)
    train = loop.run_pass(steps.train, batches.train, batches.train_plan,
                          lambda: stop.requested, progress, start)
    trained = time.monotonic()
    ran = (batches.train_plan.steps - start) / max(batches.train_plan.steps, 1)  # of the epoch
    # This worker's own rate, for the cluster's per-node figures (report.html).
    hb.update(shard_images=batches.shard_images, images_per_second=round(
        batches.shard_images * ran / max(trained - started, 1e-9), 1))
    stop_here(train.stopped, train.steps / max(batches.train_plan.steps, 1))
    hb.update(stage="validate")
    val = loop.run_pass(steps.evaluate, batches.val, batches.val_plan, lambda: stop.requested)
    stop_here(val.stopped, 1.0)
    return {
        "epoch": epoch + 1,
        "phase": phase,
        "loss": round(train.loss, 6),
        "accuracy": round(train.accuracy, 6),
        "val_loss": round(val.loss, 6),
        "val_accuracy": round(val.accuracy, 6),
        "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        "seconds": round(time.monotonic() - started, 3),
        # Every worker's images: the cluster's rate.
        "images_per_second": round(batches.train_images * ran / max(trained - started, 1e-9),
                                   1),
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


def _resume_state(job: Job) -> ResumeState:
    o = job.o
    return (job.ckpt.load_for_resume(o.as_dict()) if o.resume else None) or ResumeState(o.as_dict())


def _start_together(job: Job, labelled: data.LabelledSet
                    ) -> tuple[Prepared, ResumeState, workers.Peers]:
    """Load the checkpoint and decode on every worker, then agree: one problem stops them all.

    A worker that failed alone would leave the others waiting in their first collective, so
    problems are exchanged instead of raised; every worker then raises the same one.
    """
    prep, state, problem = None, ResumeState(job.o.as_dict()), None
    try:
        state = _resume_state(job)
        prep = prepare(job.o, labelled, job.out, job.hb, job.stop, job.cluster)
    except Interrupted:
        pass  # job.stop.requested tells the others
    except TrainerError as exc:
        problem = exc
    mine = {
        "stopped": job.stop.requested,
        "error": None if problem is None else str(problem),
        "exit_code": None if problem is None else problem.exit_code,
        "train": 0 if prep is None else len(prep.train_index),
        "val": 0 if prep is None else len(prep.val_shard),
        "skipped": [] if prep is None else prep.skipped,
        "resume": {"completed": state.completed, "phase": state.phase,
                   "phases_done": list(state.phases_done), "last": state.last, "best": state.best},
    }
    peers = workers.agree(job.devices.consensus.exchange(mine, job.cluster.index), problem,
                          job.stop)
    assert prep is not None  # no problem anywhere
    return prep, state, peers


def run(o: Options, out: Path, labelled: data.LabelledSet, test_items: list | None,
        hb: Heartbeat, stop: StopSignal, cluster: Cluster | None = None) -> dict:
    """Train, pick the best model, write every output (chief); return metrics.json's content.

    A worker other than the chief returns a summary of the run instead and leaves no file
    but its log and status.json behind.
    """
    started = time.monotonic()
    cluster = cluster or Cluster()
    devices = setup_devices(cluster, hb)
    stop.install()  # again: TensorFlow's preemption notifier took SIGTERM as the cluster formed
    log.info("devices: %s (replicas %d, workers %d, mixed precision %s)", ", ".join(devices.names),
             devices.replicas, cluster.workers, devices.mixed_precision)
    job = Job(o, out, cluster, devices, hb, stop, Checkpoints(out / "checkpoints"))
    with workers.answering(cluster):
        prep, state, peers = _start_together(job, labelled)
        log.info("%d training and %d validation images (%d and %d on this worker, %d skipped), "
                 "cache in %s", peers.train_images, sum(peers.val_counts), len(prep.train_index),
                 len(prep.val_shard), len(peers.skipped), prep.cache)
        state, model = fit(job, prep, peers, state)
        if state.best is None:
            raise TrainerError("no epoch produced a finite validation loss (the loss diverged); "
                               "lower --learning-rate")
        digest = loop.weights_sha256(model or _load(devices.strategy, job.ckpt.path(state.last)))
        log.info("final weights: sha256 %s", digest)
        workers.part(devices.consensus, cluster)
    if not cluster.chief:
        return _worker_done(job, state, digest)
    return _write_outputs(job, prep, peers, state, test_items, digest, started)


def _summary(state: ResumeState) -> dict:
    """The best epoch's validation figures (reduced over the workers) and the epochs run."""
    best = next(r for r in state.history if r["epoch"] == state.best_epoch)
    return {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
            "best_epoch": state.best_epoch, "epochs_run": len(state.history)}


def _worker_done(job: Job, state: ResumeState, digest: str) -> dict:
    """A worker other than the chief: its checkpoints were the chief's twins; drop them."""
    for folder in ("checkpoints", "cache"):
        shutil.rmtree(job.out / folder, ignore_errors=True)
    job.hb.update(stage=None)
    summary = {**_summary(state), "weights_sha256": digest}
    log.info("done: worker %d of %d, val_accuracy %.4f val_loss %.4f (best epoch %d of %d); "
             "the chief writes the outputs", job.cluster.index, job.cluster.workers,
             summary["val_accuracy"], summary["val_loss"], summary["best_epoch"],
             summary["epochs_run"])
    return summary


def _write_outputs(job: Job, prep: Prepared, peers: workers.Peers, state: ResumeState,
                   test_items: list | None, digest: str, started: float) -> dict:
    """The chief's outputs from the best model; return metrics.json's content."""
    o, out, hb, devices = job.o, job.out, job.hb, job.devices
    outputs.write_history(out, list(state.history))  # again: a kill may have come before the last write
    hb.update(phase="evaluating", stage=None)
    # The other workers are gone: outside MultiWorkerMirroredStrategy, no collective may run.
    strategy = tf.distribute.get_strategy() if job.cluster.multi else devices.strategy
    local = 1 if job.cluster.multi else devices.replicas
    best = _load(strategy, job.ckpt.path(state.best))
    shutil.copyfile(job.ckpt.path(state.best), out / "model.keras.tmp")
    os.replace(out / "model.keras.tmp", out / "model.keras")
    p_val, final = evaluate_best(best, prep, o.batch_size * local)
    val_keys = [prep.keys[i] for i in prep.val_index]
    outputs.write_val_predictions(out, val_keys, prep.labels[prep.val_index], p_val)
    misclassified = outputs.write_misclassified(out, prep.images, prep.val_index, val_keys,
                                                prep.labels[prep.val_index], p_val)
    test_skipped = None
    if test_items is not None:
        test_skipped = predict_test(o, out, best, test_items, hb, job.stop)
    rates = [r["images_per_second"] for r in state.history]
    metrics = {
        "model": o.model,
        **final,
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "epochs_planned": o.total_epochs,
        "train_images": peers.train_images,
        "val_images": len(prep.val_index),
        "misclassified": misclassified,
        "skipped_files": len(peers.skipped),
        "skipped": peers.skipped,
        "images_per_second": round(sum(rates) / len(rates), 1) if rates else None,
        "wall_seconds": round(time.monotonic() - started, 1),
        "devices": devices.names,
        "replicas": devices.replicas,
        "workers": job.cluster.workers,
        "mixed_precision": devices.mixed_precision,
        "image_cache": prep.cache,
        "weights_sha256": digest,
        "versions": outputs.versions(),
        "arguments": o.as_dict(),
    }
    if test_skipped is not None:
        metrics["test_images"] = len(test_items)
        metrics["test_skipped"] = test_skipped
    outputs.write_metrics(out, metrics)
    job.ckpt.commit(replace(state, finished=True))
    log.info("done: val_accuracy %.4f val_loss %.4f (best epoch %d of %d) in %.0f s",
             metrics["val_accuracy"], metrics["val_loss"], metrics["best_epoch"],
             metrics["epochs_run"], metrics["wall_seconds"])
    return metrics


def finished_metrics(out: Path, o: Options, cluster: Cluster | None = None) -> dict | None:
    """metrics.json of a run in --out that already finished (for an idempotent --resume).

    A worker other than the chief has no metrics.json: the chief's checkpoints/ copied into
    its --out say the run finished, and a summary of them stands in.
    """
    state = Checkpoints(out / "checkpoints").load_for_resume(o.as_dict()) if o.resume else None
    if not state or not state.finished:
        return None
    metrics = out / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    return _summary(state) if cluster is not None and not cluster.chief else None
