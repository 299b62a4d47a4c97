"""Which worker of a data-parallel cluster this process is, read from TF_CONFIG (no TensorFlow)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UsageError

TF_CONFIG_ENV = "TF_CONFIG"  # set by dlbox on every node: {"cluster": {"worker": [...]}, "task": {...}}
WORKER_JOB = "worker"


@dataclass(frozen=True)
class Cluster:
    """This worker's place in the cluster; one worker when TF_CONFIG names no other."""

    workers: int = 1
    index: int = 0  # 0 is the chief: it alone writes the run's outputs

    @property
    def chief(self) -> bool:
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.workers > 1

    def shard(self, items: list) -> list:
        """This worker's share of items: every workers-th one, from position index."""
        return items[self.index :: self.workers]


def tf_config(addresses: list[str], index: int) -> str:
    """The TF_CONFIG of worker index in a cluster of addresses (host:port, the chief first):
    what dlbox sets on every node, and what from_env reads."""
    return json.dumps({"cluster": {WORKER_JOB: list(addresses)},
                       "task": {"type": WORKER_JOB, "index": index}})


def from_env(environ: Mapping[str, str] = os.environ) -> Cluster:
    """The cluster TF_CONFIG describes; one worker without it; UsageError if it is malformed."""
    raw = environ.get(TF_CONFIG_ENV, "").strip()
    if not raw:
        return Cluster()
    try:
        config = json.loads(raw)
        workers = config["cluster"][WORKER_JOB]
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{TF_CONFIG_ENV} is not a worker cluster ({exc}); expected "
                         '{"cluster": {"worker": ["host:port", ...]}, '
                         '"task": {"type": "worker", "index": N}}') from exc
    if not isinstance(workers, list) or not workers:
        raise UsageError(f"{TF_CONFIG_ENV} lists no worker; give cluster.worker as a list of host:port")
    others = sorted(set(config["cluster"]) - {WORKER_JOB})
    if others:  # a "chief" or "ps" job would take part in TensorFlow's collectives unseen here
        raise UsageError(f"{TF_CONFIG_ENV} has jobs other than worker ({', '.join(others)}); "
                         "list every node under cluster.worker, the chief first")
    if task.get("type") != WORKER_JOB or not 0 <= index < len(workers):
        raise UsageError(f"{TF_CONFIG_ENV} task {task!r} is not one of the {len(workers)} workers; "
                         f'use {{"type": "worker", "index": 0..{len(workers) - 1}}}')
    return Cluster(workers=len(workers), index=index)
