"""Data-parallel epochs under any tf.distribute strategy: one train step, one eval step.

The same code runs on one device, under MirroredStrategy and under
MultiWorkerMirroredStrategy (where Keras' fit fails: keras-team/keras#20585). Every
decision that changes what a worker does next (stop, early stopping, the best model) is
taken from values reduced across all workers, so every worker takes it at the same step:
a decision that differed would leave the others waiting in a collective forever.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from . import pipeline

# The fields of each step's result, summed over every replica of every worker.
LOSS_SUM, CORRECT, COUNT, STOP_VOTES = range(4)
ACCURACY_THRESHOLD = 0.5  # Keras' binary "accuracy": P(dog) above it counts as a dog
# Each step's results are read one step late: the device has the next step queued while the
# host waits for them (Keras' fit gets the same overlap from its asynchronous callbacks).
READ_LAG_STEPS = 1


@dataclass(frozen=True)
class Plan:
    """One pass over a split: the same number of steps on every worker."""

    steps: int
    batch_size: int  # examples per replica and step
    local_replicas: int
    denominators: np.ndarray  # (steps,) real examples in each step's global batch


def plan(counts: Sequence[int], batch_size: int, local_replicas: int) -> Plan:
    """The steps that cover every worker's shard (counts: real examples per worker)."""
    per_worker = batch_size * local_replicas
    steps = max(math.ceil(c / per_worker) for c in counts)
    starts = np.arange(steps) * per_worker
    denominators = sum(np.clip(c - starts, 0, per_worker) for c in counts)
    return Plan(steps, batch_size, local_replicas, np.asarray(denominators, np.float32))


def distribute(strategy: tf.distribute.Strategy, images: np.ndarray, labels: np.ndarray,
               index: np.ndarray, p: Plan, *, training: bool, seed: int = 0):
    """This worker's shard as p.steps steps of per-replica (images, labels, weights) batches."""

    def per_worker(_context: tf.distribute.InputContext) -> tf.data.Dataset:
        # Each local replica takes the next batch in turn: steps x local replicas batches.
        return pipeline.padded_batches(images, labels, index, p.batch_size,
                                       p.steps * p.local_replicas, training=training, seed=seed)

    return strategy.distribute_datasets_from_function(per_worker)


class Steps:
    """A compiled model's train and eval steps, traced once and run on every replica."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model) -> None:
        self.strategy, self.model = strategy, model
        # What Keras' fit would do: XLA on one GPU, never under tf.distribute or on a CPU.
        jit = bool(model.jit_compile)
        train_on = tf.function(self._train_replicas, jit_compile=jit, reduce_retracing=True)
        eval_on = tf.function(self._eval_replicas, jit_compile=jit, reduce_retracing=True)
        # next() outside the XLA function, as Keras does: the iterator is no XLA op.
        self.train = tf.function(lambda it, denominator, stop: train_on(next(it), denominator, stop))
        self.evaluate = tf.function(lambda it, denominator, stop: eval_on(next(it), stop))

    def _train_replicas(self, batch, denominator, stop):
        results = self.strategy.run(self._train_one, args=(batch, denominator, stop))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, results, axis=None)

    def _eval_replicas(self, batch, stop):
        results = self.strategy.run(self._eval_one, args=(batch, stop))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, results, axis=None)

    def _train_one(self, batch, denominator, stop):
        """One replica's step: the global batch's mean loss, its gradients summed over replicas."""
        x, y, weights = batch
        model, optimizer = self.model, self.model.optimizer
        with tf.GradientTape() as tape:
            p_dog = model(x, training=True)
            per_example = keras.losses.binary_crossentropy(y[:, None], p_dog)
            # Divided by the real examples of the whole step on every worker: the replicas'
            # gradients, summed by apply_gradients, are those of the global batch's mean.
            loss = tf.reduce_sum(per_example * weights) / denominator
            regularization = self._regularization()
            loss += tf.nn.scale_regularization_loss(regularization)
            scaled = optimizer.scale_loss(loss)  # a LossScaleOptimizer under mixed_float16
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        return _sums(p_dog, y, weights, per_example, regularization, stop)

    def _eval_one(self, batch, stop):
        x, y, weights = batch
        p_dog = self.model(x, training=False)
        per_example = keras.losses.binary_crossentropy(y[:, None], p_dog)
        return _sums(p_dog, y, weights, per_example, self._regularization(), stop)

    def _regularization(self) -> tf.Tensor:
        losses = self.model.losses
        return tf.add_n([tf.cast(v, tf.float32) for v in losses]) if losses else tf.constant(0.0)


def _sums(p_dog, y, weights, per_example, regularization, stop) -> tf.Tensor:
    """This replica's share of LOSS_SUM, CORRECT, COUNT and STOP_VOTES (zero weights add nothing)."""
    predicted = tf.cast(p_dog[:, 0] > ACCURACY_THRESHOLD, tf.float32)
    correct = tf.cast(tf.equal(predicted, y), tf.float32)
    count = tf.reduce_sum(weights)
    # Keras reports the loss with the regularization in it: once per real example here.
    return tf.stack([tf.reduce_sum(per_example * weights) + regularization * count,
                     tf.reduce_sum(correct * weights), count, tf.cast(stop, tf.float32)])


@dataclass(frozen=True)
class Pass:
    """What one pass over a split measured, summed over every worker."""

    loss: float
    accuracy: float
    stopped: bool  # a worker asked to stop: every worker ended this pass at the same step
    steps: int = 0  # steps this pass ran


def run_pass(step: Callable, batches, p: Plan, stop_requested: Callable[[], bool],
             on_step: Callable[[int, dict], None] | None = None, start: int = 0) -> Pass:
    """Run p.steps steps (fewer if any worker asks to stop); return the reduced metrics.
    start: steps a stopped run trained already in this pass (their batches are skipped,
    not trained again; the metrics are those of the steps run here)."""
    iterator = iter(batches)
    for _ in range(start):
        next(iterator)
    totals = np.zeros(4)
    in_flight: list[tf.Tensor] = []
    done = start

    def read_one() -> None:
        nonlocal totals, done
        totals = totals + in_flight.pop(0).numpy()
        done += 1
        if on_step is not None:
            on_step(done, _metrics(totals))

    for k in range(start, p.steps):
        in_flight.append(step(iterator, tf.constant(p.denominators[k]),
                              tf.constant(float(stop_requested()))))
        if len(in_flight) > READ_LAG_STEPS:
            read_one()
            if totals[STOP_VOTES] > 0:  # the same reduced value on every worker: the same step
                break
    while in_flight:  # dispatched already: their updates happened, count them
        read_one()
    metrics = _metrics(totals)
    return Pass(metrics["loss"], metrics["accuracy"], stopped=bool(totals[STOP_VOTES] > 0),
                steps=done)


def _metrics(totals: np.ndarray) -> dict:
    count = max(totals[COUNT], 1.0)
    return {"loss": float(totals[LOSS_SUM] / count), "accuracy": float(totals[CORRECT] / count)}


def weights_sha256(model: keras.Model) -> str:
    """SHA-256 of the model's weights (values, dtypes, shapes in order): equal on every worker."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
