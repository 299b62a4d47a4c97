"""Two trainer processes as a TF_CONFIG cluster on 127.0.0.1: real TensorFlow on the CPU.

The trainer's contract with dlbox on a cluster: the chief alone writes the outputs, every
worker ends with the same weights (status.json's weights_sha256), a stop asked of any worker
stops all of them at the same step, and a worker that dies does not leave the others
waiting.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.sample import bad_file_name
from tests.conftest import REPO, run_trainer, trainer_cmd
from trainer.cluster import Cluster, from_env
from trainer.errors import Interrupted, PeerFailed, UsageError

WORKERS = 2
POLL_S = 0.05
START_LIMIT_S = 180  # two TensorFlow imports and a decode on 2 busy cores
RUN_LIMIT_S = 300
PEER_EXIT_LIMIT_S = 60  # a worker whose peer died must exit within this
EXIT_INTERRUPTED = 75
EXIT_USAGE = 2
EXIT_PEER_LOST = 69
# 32 px, as tests/test_training.py: the sample is learnt well past chance in 12 epochs.
LEARN_ARGS = ("scratch", "--img-size", "32", "--epochs", "12", "--patience", "0")
# One image per step: an epoch is ~240 steps, ~5 s here, longer than status.json's 2 s period.
LONG_EPOCH_ARGS = ("scratch", "--img-size", "32", "--batch-size", "1", "--patience", "0",
                   "--limit", "600")
STOPPED_RUN_EPOCHS = 2


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Zips the trainer extracts land in a temporary XDG cache, not the developer's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports: list[int], index: int) -> str:
    """What dlbox sets on each node (the one function that builds it), on 127.0.0.1."""
    from trainer.cluster import tf_config

    return tf_config([f"127.0.0.1:{p}" for p in ports], index)


@dataclass(frozen=True)
class Worker:
    """One trainer process of the cluster; its stderr goes to a file (a pipe could fill up)."""

    proc: subprocess.Popen
    out: Path
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()


def _start(args, outs: list[Path], *extra: str) -> list[Worker]:
    """One trainer per worker, each with its own --out, as dlbox starts them."""
    ports = _free_ports(len(outs))
    workers = []
    for k, out in enumerate(outs):
        log = out.with_name(f"{out.name}-stderr-{time.monotonic_ns()}.txt")
        with open(log, "w") as stderr:
            proc = subprocess.Popen(trainer_cmd(*args, "--out", out, *extra), cwd=REPO,
                                    env={**os.environ, "TF_CONFIG": _tf_config(ports, k)},
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        workers.append(Worker(proc, out, log))
    return workers


def _finish(workers: list[Worker], limit_s: float = RUN_LIMIT_S) -> list[tuple[int, str]]:
    """Each worker's exit code and stderr; every worker is killed if one overstays."""
    try:
        return [(w.proc.wait(timeout=limit_s), w.stderr()) for w in workers]
    finally:
        _kill(workers)


def _kill(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def _json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for(predicate, workers: list[Worker], what: str):
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        ended = [w for w in workers if w.proc.poll() is not None]
        if ended:
            _kill(workers)
            pytest.fail(f"a worker exited ({ended[0].proc.returncode}) before {what}: "
                        f"{ended[0].stderr()}")
        time.sleep(POLL_S)
    _kill(workers)
    pytest.fail(f"timed out waiting for {what}")


def _training(out: Path, before_half: bool = False):
    """A predicate: status.json says the worker in out is in a training step.

    status.json is rewritten every 2 s: the worker may be that much further on, so "early in
    an epoch" (before_half) leaves it most of the epoch to go.
    """

    def check() -> bool:
        status = _json_or_none(out / "status.json") or {}
        step, steps = status.get("step", 0), status.get("steps", 0)
        return (status.get("stage") == "train" and status.get("state") == "running"
                and step > 0 and (not before_half or step < steps // 2))

    return check


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_tf_config_names_this_worker():
    assert from_env({}) == Cluster(workers=1, index=0)
    two = from_env({"TF_CONFIG": _tf_config([1111, 2222], 1)})
    assert (two.workers, two.index, two.chief, two.multi) == (2, 1, False, True)
    assert two.shard(list(range(7))) == [1, 3, 5]
    chief_job = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker",
                                                                          "index": 0}}
    for bad in ("{", '{"cluster": {}}', _tf_config([1111], 3), json.dumps(chief_job),
                json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}})):
        with pytest.raises(UsageError, match="TF_CONFIG"):
            from_env({"TF_CONFIG": bad})


def test_plan_gives_every_worker_the_same_steps():
    from trainer import loop

    plan = loop.plan([5, 3], batch_size=2, local_replicas=1)
    assert plan.steps == 3  # the larger shard's; the smaller one is padded
    assert plan.denominators.tolist() == [4, 3, 1]  # real examples of each global step
    assert loop.plan([8], batch_size=2, local_replicas=2).denominators.tolist() == [4, 4]


def test_padded_batches_weigh_only_real_examples():
    import numpy as np

    from trainer import pipeline

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(32, 1).repeat(32, 2)
    images = images.repeat(3, 3)
    labels = np.arange(10, dtype=np.float32)
    ds = pipeline.padded_batches(images, labels, np.array([1, 4, 7, 9, 2]), 2, 4, training=False)
    batches = [(x.numpy(), y.numpy(), w.numpy()) for x, y, w in ds]
    assert [x.shape for x, _, _ in batches] == [(2, 32, 32, 3)] * 4  # full batches: one trace
    weights = np.concatenate([w for _, _, w in batches])
    seen = np.concatenate([y for _, y, _ in batches])
    assert sorted(seen[weights == 1].tolist()) == [1, 2, 4, 7, 9]
    assert weights.sum() == 5
    assert all((x[:, 0, 0, 0] == y).all() for x, y, _ in batches)  # labels follow images


def test_workers_agree_or_all_fail_alike():
    from trainer import workers
    from trainer.stop import StopSignal

    def report(**changes):
        return {"stopped": False, "error": None, "exit_code": None, "train": 4, "val": 1,
                "skipped": [{"file": "cat.1.jpg", "reason": "empty file"}],
                "resume": {"completed": 2, "last": "last-0002.keras"}, **changes}

    peers = workers.agree([report(), report(train=3)], None, StopSignal())
    assert (peers.train_counts, peers.train_images, len(peers.skipped)) == ((4, 3), 7, 1)
    with pytest.raises(UsageError) as refused:
        workers.agree([report(), report(resume={"completed": 0, "last": None})], None,
                      StopSignal())
    assert str(refused.value) == (
        "workers resumed from different checkpoints: worker 0 after epoch 2 (last-0002.keras), "
        "worker 1 after epoch 0 (no checkpoint); copy the chief's checkpoints/ to every worker")
    with pytest.raises(PeerFailed, match="worker 1 failed: bad data") as failed:
        workers.agree([report(), report(error="bad data", exit_code=2)], None, StopSignal())
    assert failed.value.exit_code == 2
    with pytest.raises(Interrupted) as stopped:
        workers.agree([report(), report(stopped=True)], None, StopSignal())
    assert stopped.value.exit_code == EXIT_INTERRUPTED and "another worker" in str(stopped.value)


@pytest.fixture(scope="module")
def cluster_run(sample, tmp_path_factory):
    """A two-worker run to the end, and a one-worker run with the same global batch."""
    root = tmp_path_factory.mktemp("cluster")
    outs = [root / f"worker{k}" for k in range(WORKERS)]
    data = ("--data", sample, "--test", sample)
    workers = _start(LEARN_ARGS, outs, *data, "--batch-size", "16")
    single = run_trainer(*LEARN_ARGS, *data, "--batch-size", "32", "--out", root / "single")
    results = _finish(workers)
    assert single.returncode == 0, single.stderr
    for code, stderr in results:
        assert code == 0, stderr
    return outs, root / "single"


@pytest.mark.slow
def test_two_workers_train_as_one(cluster_run):
    (chief, worker), _ = cluster_run
    for name in ("model.keras", "history.csv", "metrics.json", "val_predictions.csv",
                 "submission.csv", "train.log", "status.json"):
        assert (chief / name).stat().st_size > 0, name
    assert sorted(os.listdir(worker)) == ["status.json", "train.log"]  # checkpoints cleaned
    metrics = json.loads((chief / "metrics.json").read_text())
    assert (metrics["workers"], metrics["replicas"]) == (2, 2)
    statuses = [json.loads((out / "status.json").read_text()) for out in (chief, worker)]
    assert [(s["state"], s["node"], s["nodes"]) for s in statuses] == [("done", 0, 2),
                                                                       ("done", 1, 2)]
    digests = {s["weights_sha256"] for s in statuses} | {metrics["weights_sha256"]}
    assert len(digests) == 1 and len(digests.pop()) == 64  # the same final weights everywhere
    assert statuses[1]["epochs_run"] == metrics["epochs_run"] == 12


@pytest.mark.slow
def test_each_worker_decodes_its_share(cluster_run):
    (chief, worker), single = cluster_run
    metrics = json.loads((chief / "metrics.json").read_text())
    alone = json.loads((single / "metrics.json").read_text())
    assert metrics["train_images"] + metrics["val_images"] == 1000 + 3  # + png, grey, cmyk
    assert (metrics["train_images"], metrics["val_images"]) == (alone["train_images"],
                                                                alone["val_images"])
    # The bad files lie in both workers' shards: the chief names every one of them.
    assert {s["file"] for s in metrics["skipped"]} == {
        bad_file_name(1000, kind) for kind in ("empty", "truncated", "text", "corrupt")}
    decoded = int((worker / "train.log").read_text().split("INFO decoded ")[1].split()[0])
    assert decoded < 0.6 * (1000 + 7)  # its half of the training and validation images


@pytest.mark.slow
def test_cluster_learns_like_one_worker(cluster_run):
    (chief, _), single = cluster_run
    metrics = json.loads((chief / "metrics.json").read_text())
    alone = json.loads((single / "metrics.json").read_text())
    assert metrics["val_accuracy"] >= 0.75  # well above chance; 0.9 and more takes 15 epochs
    assert abs(metrics["val_accuracy"] - alone["val_accuracy"]) <= 0.1
    history = (chief / "history.csv").read_text().splitlines()
    assert history[0].split(",") == ["epoch", "phase", "loss", "accuracy", "val_loss",
                                     "val_accuracy", "learning_rate", "seconds",
                                     "images_per_second"]
    assert len(history) == 1 + 12


@pytest.fixture(scope="module")
def stopped_cluster(sample, tmp_path_factory):
    """A cluster stopped by SIGTERM to the non-chief mid-epoch; a pristine copy of its folders."""
    root = tmp_path_factory.mktemp("stopped")
    outs = [root / f"worker{k}" for k in range(WORKERS)]
    args = (*LONG_EPOCH_ARGS, "--epochs", str(STOPPED_RUN_EPOCHS), "--data", sample)
    workers = _start(args, outs)
    _wait_for(_training(outs[1], before_half=True), workers,
              "the first half of an epoch on the non-chief")
    workers[1].proc.send_signal(signal.SIGTERM)
    results = _finish(workers, PEER_EXIT_LIMIT_S)
    pristine = tmp_path_factory.mktemp("stopped-copy") / "run"
    shutil.copytree(root, pristine)
    return args, outs, results, pristine


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both(stopped_cluster):
    _, outs, results, _ = stopped_cluster
    assert [code for code, _ in results] == [EXIT_INTERRUPTED, EXIT_INTERRUPTED], results
    assert "another worker" in _last_line(results[0][1])
    assert "SIGTERM" in _last_line(results[1][1])
    states = [json.loads((out / "checkpoints" / "state.json").read_text()) for out in outs]
    assert states[0]["last"].startswith("partial-"), states[0]
    assert states[0]["last"] == states[1]["last"]  # both stopped at the same step
    for out in outs:
        assert json.loads((out / "status.json").read_text())["state"] == "interrupted"


@pytest.mark.slow
def test_resumed_cluster_finishes_the_planned_epochs(stopped_cluster):
    args, (chief, worker), _, _ = stopped_cluster
    shutil.rmtree(worker / "checkpoints")  # what dlbox does before resuming a cluster
    shutil.copytree(chief / "checkpoints", worker / "checkpoints")
    results = _finish(_start(args, [chief, worker], "--resume"))
    assert [code for code, _ in results] == [0, 0], results
    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["epochs_run"] == STOPPED_RUN_EPOCHS
    rows = (chief / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STOPPED_RUN_EPOCHS + 1))
    digests = {json.loads((out / "status.json").read_text())["weights_sha256"]
               for out in (chief, worker)}
    assert len(digests) == 1


@pytest.mark.slow
def test_resume_from_different_checkpoints_is_refused(stopped_cluster, tmp_path):
    args, _, _, pristine = stopped_cluster
    chief, worker = (shutil.copytree(pristine / f"worker{k}", tmp_path / f"worker{k}")
                     for k in range(WORKERS))
    shutil.rmtree(worker / "checkpoints")  # a worker that never got the chief's copy
    results = _finish(_start(args, [chief, worker], "--resume"))
    for code, stderr in results:
        assert code == EXIT_USAGE, stderr
        line = _last_line(stderr)
        assert line.startswith("trainer: error: workers resumed from different checkpoints")
        assert "copy the chief's checkpoints/ to every worker" in line
    assert not (chief / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["chief-killed", "worker-killed"])
def test_sigkill_of_one_worker_ends_the_other(sample, tmp_path, victim):
    outs = [tmp_path / f"worker{k}" for k in range(WORKERS)]
    workers = _start((*LONG_EPOCH_ARGS, "--epochs", "50", "--data", sample), outs)
    _wait_for(_training(outs[victim]), workers, "a training step")
    workers[victim].proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (code, stderr), = _finish([workers[1 - victim]], PEER_EXIT_LIMIT_S)
    seconds = time.monotonic() - killed_at
    _kill(workers)
    assert code == EXIT_PEER_LOST, stderr
    assert seconds < PEER_EXIT_LIMIT_S
    assert "another worker of the cluster stopped answering" in _last_line(stderr)
    status = json.loads((outs[1 - victim] / "status.json").read_text())
    assert status["state"] == "failed"


@pytest.mark.slow
def test_a_chief_alone_gives_up_on_the_cluster(small_sample, tmp_path):
    """TensorFlow waits for the others holding the GIL, deaf to SIGTERM: the watchdog ends it."""
    out = tmp_path / "worker0"
    env = {**os.environ, "TF_CONFIG": _tf_config(_free_ports(WORKERS), 0),
           "DLBOX_CLUSTER_START_TIMEOUT_S": "3"}
    result = subprocess.run(trainer_cmd("scratch", "--data", small_sample, "--out", out), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=START_LIMIT_S)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert _last_line(result.stderr) == ("trainer: error: the other workers in TF_CONFIG did not "
                                         "all start within 3 s; start every worker with the same "
                                         "cluster")
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["phase"]) == ("failed", "waiting for the cluster")
    assert "did not all start" in (out / "train.log").read_text()
