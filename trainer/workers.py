"""What the workers of a cluster do together: form it, agree before training, part.

Every decision here ends the same on every worker: a worker that went its own way would
leave the others waiting in a collective that never completes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .cluster import TF_CONFIG_ENV, Cluster
from .errors import PeerFailed, PeerLost, TrainerError, UsageError
from .status import Heartbeat
from .stop import StopSignal

log = logging.getLogger("trainer")

# TensorFlow waits for every worker in TF_CONFIG without a limit, holding the GIL and deaf
# to SIGTERM (its preemption notifier holds the signal): past this, trainer.watchdog kills
# the worker (exit status 137, status.json "failed", the error line on stderr).
CLUSTER_START_TIMEOUT_S = 300
CLUSTER_START_TIMEOUT_ENV = "DLBOX_CLUSTER_START_TIMEOUT_S"  # overrides it (seconds)
# What a collective raises once a worker is gone. Measured on TensorFlow 2.21 (127.0.0.1):
# a killed worker's closed connections fail the others' next collective within ~1 s; a
# frozen or unreachable one is found by the coordination service's heartbeats in ~10 s.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.AbortedError, tf.errors.CancelledError)
RESUME_MISMATCH = "workers resumed from different checkpoints"


def join(cluster: Cluster, hb: Heartbeat) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy over TF_CONFIG's workers, once every one of them is up."""
    limit_s = float(os.environ.get(CLUSTER_START_TIMEOUT_ENV) or CLUSTER_START_TIMEOUT_S)
    log.info("worker %d of %d: waiting for the cluster (at most %g s)", cluster.index,
             cluster.workers, limit_s)
    hb.update(phase="waiting for the cluster")
    hb.write()  # now: the heartbeat's thread does not run until the wait is over
    with _watchdog(hb.path.parent, limit_s):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log.info("cluster of %d workers ready (%d replicas)", cluster.workers,
             strategy.num_replicas_in_sync)
    return strategy


@contextlib.contextmanager
def _watchdog(out: Path, limit_s: float) -> Iterator[None]:
    """A process that kills this one if the block does not end within limit_s.

    TensorFlow's wait for the workers holds the GIL and ignores SIGTERM: no thread of this
    process could end it. The watchdog's stdin is closed when the block ends, or when this
    process does, whichever comes first; then it exits.
    """
    message = (f"the other workers in {TF_CONFIG_ENV} did not all start within {limit_s:g} s; "
               "start every worker with the same cluster")
    package_parent = str(Path(__file__).resolve().parents[1])
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "trainer.watchdog", str(os.getpid()),
         str(limit_s), str(out), message],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": package_parent}, cwd=package_parent)
    try:
        yield
    finally:
        watchdog.stdin.close()
        watchdog.wait()


class Consensus:
    """Decisions all workers take together, through the strategy's collectives."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self._sum = tf.function(self._sum_replicas)
        self._gather = tf.function(self._gather_replicas)

    def _sum_replicas(self, value):
        per_replica = self.strategy.run(tf.identity, args=(value,))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _gather_replicas(self, value):
        return self.strategy.gather(self.strategy.run(tf.identity, args=(value,)), axis=0)

    def anyone(self, flag: bool) -> bool:
        """Whether flag is true on any worker (the same answer everywhere)."""
        return bool(self._sum(tf.constant(float(flag))).numpy() > 0)

    def exchange(self, payload: dict, index: int) -> list[dict]:
        """Every worker's JSON payload, in worker order (index: this worker's)."""
        raw = json.dumps({"worker": index, "payload": payload}).encode()
        # Bytes as float32 (exact up to 2**24) behind their count: any device can gather them.
        blob = np.concatenate([[len(raw)], np.frombuffer(raw, np.uint8)]).astype(np.float32)
        gathered = self._gather(tf.constant(blob)).numpy()
        found: dict[int, dict] = {}
        at = 0
        while at < len(gathered):  # one blob per replica: several per worker
            n = int(gathered[at])
            item = json.loads(gathered[at + 1 : at + 1 + n].astype(np.uint8).tobytes())
            found.setdefault(item["worker"], item["payload"])
            at += 1 + n
        return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class Peers:
    """What the workers told each other before training."""

    train_counts: tuple[int, ...]  # readable training images of each worker
    val_counts: tuple[int, ...]  # readable validation images each worker validates
    skipped: list[dict]  # the files any worker skipped, each named once

    @property
    def train_images(self) -> int:
        return sum(self.train_counts)


def agree(shared: list[dict], problem: TrainerError | None, stop: StopSignal) -> Peers:
    """The same decision on every worker from everybody's report: stop, fail, or go on.

    Each report (see train._start_together) says whether that worker was stopped, its
    error, its shard's counts and skipped files, and the checkpoint it resumes from.
    """
    if any(p["stopped"] for p in shared):
        raise stop.interrupted()
    if problem is not None:
        raise problem
    for k, p in enumerate(shared):
        if p["error"] is not None:
            raise PeerFailed(f"worker {k} failed: {p['error']}", p["exit_code"])
    resumes = [p["resume"] for p in shared]
    if any(r != resumes[0] for r in resumes):
        seen = ", ".join(f"worker {k} after epoch {r['completed']} ({r['last'] or 'no checkpoint'})"
                         for k, r in enumerate(resumes))
        raise UsageError(f"{RESUME_MISMATCH}: {seen}; copy the chief's checkpoints/ to every "
                         "worker")
    skipped, named = [], set()
    for p in shared:  # the chief's first: it names the validation split's files too
        for s in p["skipped"]:
            if s["file"] not in named:
                named.add(s["file"])
                skipped.append(s)
    return Peers(tuple(p["train"] for p in shared), tuple(p["val"] for p in shared), skipped)


@contextlib.contextmanager
def answering(cluster: Cluster) -> Iterator[None]:
    """On a cluster, a collective that fails because a worker is gone becomes PeerLost."""
    try:
        yield
    except PEER_ERRORS as exc:
        if not cluster.multi:
            raise
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        why = next((x for x in lines if "aborted by" in x), lines[0] if lines else "")
        raise PeerLost(f"another worker of the cluster stopped answering ({type(exc).__name__}: "
                       f"{why}); see its train.log, then rerun every worker with --resume") from exc


def part(consensus: Consensus, cluster: Cluster) -> None:
    """A last collective: a worker past it knows every worker is done with the ones before."""
    if not cluster.multi:
        return
    try:
        consensus.anyone(False)
    except PEER_ERRORS as exc:
        if not cluster.chief:
            raise
        # The others may leave as soon as their part is done: the chief needs no more of them.
        log.info("the other workers left during the last collective (%s)", type(exc).__name__)
