"""Multi-node data parallelism: the all-reduce step, measured on loopback and modelled for EC2.

`dlbox up --nodes N` trains with tf.distribute.MultiWorkerMirroredStrategy (MWMS): every
step, each worker sums its gradients with the others' (one all-reduce of the trainable
variables) before the optimizer applies them. A 2-core machine cannot show scaling, so
this script measures what the collective costs and models the rest on paper:

  measured  two MWMS workers on 127.0.0.1 (subprocesses of this script, TF_CONFIG, RING
            collectives over gRPC), one CPU core each, for the scratch CNN, VGG16's head
            (phase 1) and VGG16's head + block5 (phase 2, fine-tuning):
            (1) the all-reduce alone: replica_context.all_reduce(SUM) of tensors shaped
                like the trainable variables, as Keras's optimizer calls it each step;
            (2) a full training step (GradientTape, compute_average_loss, apply_gradients),
                interleaved with its local part alone (forward and backward, no
                collective), with 2 workers, and the same step with a 1-worker cluster.
  modelled  ring all-reduce time 2(N-1)/N * bytes / bandwidth + 2(N-1) * hop latency on
            g4dn.xlarge and g5.xlarge links, against an ASSUMED GPU compute step, giving
            the speedup and the time and cost of one epoch at 1, 2, 4 and 8 nodes.

VGG16 is built with weights=None (no download here): the all-reduce depends on shapes only.
Usage: python benchmarks/allreduce.py [--steps 20] [--step-count 10] [--warmup 3] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.prices import ON_DEMAND_USD_PER_HOUR, PRICE_SOURCE  # noqa: E402

IMG_SIZE_PX = 150  # the trainer's --img-size default; VGG16's head size depends on it
WORKERS = 2
HOST = "127.0.0.1"
MARK = "allreduce figures: "  # a worker's result line on its stdout
CLUSTER_TIMEOUT_S = 600  # one cluster run: start, build three models, time them
KILL_WAIT_S = 10
POLL_S = 0.2  # how often the coordinator looks at its workers
BYTES_PER_PARAM = 4  # gradients are float32, also under mixed_float16 (float32 variables)

# --- the on-paper model -----------------------------------------------------------------
NODES = (1, 2, 4, 8)
GPU_BATCH = 32  # the trainer's --batch-size default: images per step and GPU
EPOCH_IMAGES = 25_000  # the whole Kaggle train set, one pass
HOP_LATENCY_S = 100e-6  # ASSUMED: one TCP hop between instances in one AZ (~50-100 us)
GBIT = 1e9  # bits per Gbit


@dataclass(frozen=True)
class Case:
    """One model and phase: the variables its all-reduce carries."""

    key: str
    label: str
    recipe: str  # trainer.recipes.RECIPES key
    phase: int  # index of the recipe's phase whose trainable variables count


CASES = (
    Case("scratch", "scratch CNN", "scratch", 0),
    Case("vgg16-head", "VGG16 phase 1 (head)", "vgg16", 0),
    Case("vgg16-block5", "VGG16 phase 2 (head + block5)", "vgg16", 1),
)


@dataclass(frozen=True)
class Instance:
    """An instance type's link and its GPU's ASSUMED training speed."""

    name: str
    gpu: str
    baseline_gbit_s: float  # sustained: DescribeInstanceTypes' BaselineBandwidthInGbps
    peak_gbit_s: float  # the "up to" figure: a burst while network I/O credits last (PeakBandwidthInGbps)
    img_per_s: dict[str, float]  # ASSUMED images/s per GPU and Case.key, mixed precision, 150 px


# ASSUMED GPU speeds: no GPU figure exists in BENCHMARKS.md and none can be measured here.
# VGG16 at 150 px: forward ~6.9 GMAC/image (15.5 at 224 px, scaled by (150/224)^2); phase 2
# adds block5's backward (~1.2 GMAC at 9x9). A T4 under TF mixed precision without TensorRT
# is taken at ~800 img/s forward-only; the scratch CNN (~0.5 GFLOP/image for training) is
# memory- and launch-bound, ~6 ms per batch of 32. A10G taken at 2x a T4 for training.
# Links: EC2 DescribeInstanceTypes (NetworkCards, as moto 5.2 ships it), "up to 25 / 10 Gigabit".
INSTANCES = (
    Instance("g4dn.xlarge", "T4", 5.0, 25.0,
             {"scratch": 5_000, "vgg16-head": 800, "vgg16-block5": 700}),
    Instance("g5.xlarge", "A10G", 2.5, 10.0,
             {"scratch": 10_000, "vgg16-head": 1_600, "vgg16-block5": 1_400}),
)


# --- worker: runs inside each MWMS process ----------------------------------------------

def build_case(case: Case):
    """The case's model (weights=None), with the phases up to case.phase applied, and its optimizer."""
    from trainer.recipes import RECIPES

    recipe = RECIPES[case.recipe]
    model = recipe.build(IMG_SIZE_PX, None)
    for phase in recipe.phases[1:case.phase + 1]:
        if phase.prepare is not None:
            phase.prepare(model)
    lr = recipe.defaults.learning_rate * recipe.phases[case.phase].lr_factor
    return model, recipe.optimizer(lr)


def timed_ms(fns: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Each fn called warmup times, then steps rounds of one call each, interleaved so that they
    share the machine's ups and downs; the milliseconds of every timed call, by name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def allreduce_ms(strategy, shapes: list[tuple[int, ...]], warmup: int,
                 steps: int) -> tuple[list[float], float]:
    """Times of the SUM all-reduce of ones shaped like shapes, and the first element of the sum."""
    import tensorflow as tf

    tensors = [tf.ones(shape) for shape in shapes]

    def replica_sum(values):
        # identity places each tensor on the replica's device, as gradients are (else MWMS
        # finds no destination for a function argument)
        placed = [tf.identity(v) for v in values]
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, placed)

    @tf.function
    def reduce_all(values):
        return strategy.run(replica_sum, (values,))

    def once():
        return float(tf.reshape(reduce_all(tensors)[0], [-1])[0])  # waits for the result

    return timed_ms({"allreduce": once}, warmup, steps)["allreduce"], once()


def step_ms(strategy, model, optimizer, batch: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """Times of a full custom training step (MWMS's all-reduce inside apply_gradients) and of
    its local part alone (forward and backward, no collective)."""
    import keras
    import tensorflow as tf

    global_batch = batch * strategy.num_replicas_in_sync
    x = tf.random.uniform((batch, IMG_SIZE_PX, IMG_SIZE_PX, 3), 0, 255)
    y = tf.cast(tf.range(batch) % 2, tf.float32)[:, None]
    loss_fn = keras.losses.BinaryCrossentropy(reduction=None)

    def loss_and_grads(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)),
                                              global_batch_size=global_batch)
        return loss, tape.gradient(loss, model.trainable_variables)

    def replica_step(x, y):
        loss, grads = loss_and_grads(x, y)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    def replica_local(x, y):
        loss, grads = loss_and_grads(x, y)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])  # keeps the backward pass

    @tf.function
    def train_step():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, (x, y)), axis=None)

    @tf.function
    def local_step():
        return strategy.run(replica_local, (x, y))

    times = timed_ms({"local": lambda: float(local_step()), "step": lambda: float(train_step())},
                     warmup, steps)
    return {"local_ms": times["local"], "step_ms": times["step"]}


def run_worker(args: argparse.Namespace) -> None:
    """One MWMS worker: time every case and print the figures as one JSON line."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one core per worker
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    tiny, _ = allreduce_ms(strategy, [(1,)], args.warmup, args.steps)
    figures = {"workers": strategy.num_replicas_in_sync, "tiny_allreduce_ms": tiny, "cases": {}}
    for case in CASES:
        with strategy.scope():
            model, optimizer = build_case(case)
        shapes = [tuple(v.shape) for v in model.trainable_variables]
        reduce_times, first = allreduce_ms(strategy, shapes, args.warmup, args.steps)
        figures["cases"][case.key] = {
            "params": sum(math.prod(s) for s in shapes),
            "tensors": len(shapes),
            "allreduce_ms": reduce_times,
            "sum_of_ones": first,
            **step_ms(strategy, model, optimizer, args.batch, args.warmup, args.step_count),
        }
    print(MARK + json.dumps(figures), flush=True)


# --- coordinator: spawns the workers, gathers their figures -----------------------------

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on HOST (held together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def worker_env(ports: list[int], index: int) -> dict[str, str]:
    cluster = {"worker": [f"{HOST}:{p}" for p in ports]}
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    return {**os.environ, "TF_CONFIG": tf_config, "PYTHONPATH": str(REPO),
            "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def wait_all(procs: list[subprocess.Popen]) -> list[int | None]:
    """Exit codes once every worker has ended or one has failed (None: still running)."""
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    while True:
        codes = [p.poll() for p in procs]
        if None not in codes or any(code not in (None, 0) for code in codes):
            return codes
        if time.monotonic() > deadline:
            sys.exit(f"the {len(procs)} worker(s) did not finish within {CLUSTER_TIMEOUT_S} s")
        time.sleep(POLL_S)


def read_figures(out_path: Path) -> dict:
    lines = [line for line in out_path.read_text().splitlines() if line.startswith(MARK)]
    if not lines:
        sys.exit(f"a worker printed no figures:\n{out_path.read_text()[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def run_cluster(n_workers: int, args: argparse.Namespace) -> list[dict]:
    """Start n_workers MWMS workers on loopback, wait (bounded) and return their figures."""
    ports = free_ports(n_workers)
    worker_args = ["--worker", "--steps", str(args.steps), "--step-count", str(args.step_count),
                   "--warmup", str(args.warmup), "--batch", str(args.batch)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="allreduce-") as tmp:
        outs = [(Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err") for i in range(n_workers)]
        try:
            for i, (out, err) in enumerate(outs):
                with out.open("w") as o, err.open("w") as e:  # the child keeps its own copies
                    procs.append(subprocess.Popen([sys.executable, __file__, *worker_args],
                                                  env=worker_env(ports, i), stdout=o, stderr=e))
            codes = wait_all(procs)
            failed = [(code, err) for (_, err), code in zip(outs, codes, strict=True) if code]
            if failed:  # a None code is a worker still waiting for the failed one
                code, err = failed[0]
                sys.exit(f"a worker failed (exit {code}):\n{err.read_text()[-3000:]}")
            return [read_figures(out) for out, _ in outs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=KILL_WAIT_S)


def median_p90(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=10, method="inclusive")[-1]


def slowest(figures: list[dict], pick) -> list[float]:
    """Per step, the slowest worker's time: a collective step ends when every worker is done."""
    return [max(times) for times in zip(*(pick(f) for f in figures), strict=True)]


# --- printing -----------------------------------------------------------------------------

def check_sums(pair: list[dict]) -> None:
    """Every worker's all-reduce of ones must give the number of workers."""
    sums = {(case.key, f["cases"][case.key]["sum_of_ones"]) for case in CASES for f in pair}
    wrong = sorted(s for s in sums if s[1] != WORKERS)
    if wrong:
        sys.exit(f"the all-reduce of ones did not sum to {WORKERS}: {wrong}")


def print_measured(pair: list[dict], single: list[dict], args: argparse.Namespace) -> None:
    print(f"\nMeasured: MWMS on {HOST}, 1 CPU thread per worker, {args.steps} all-reduces and "
          f"{args.step_count} steps (batch {args.batch} per worker, {IMG_SIZE_PX} px) after "
          f"{args.warmup} warm-up; median / p90 ms, the slower worker per step.\n")
    tiny = median_p90(slowest(pair, lambda f: f["tiny_allreduce_ms"]))
    print(f"All-reduce of 1 float, 2 workers (fixed cost): {tiny[0]:.2f} / {tiny[1]:.2f} ms\n")
    print("| model / phase | trainable params | MB per step | all-reduce alone, 2 workers | loopback "
          "Gbit/s | step, 1 worker | fwd+bwd only, 2 workers | step, 2 workers | step minus fwd+bwd "
          "(share of the step) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        params = pair[0]["cases"][case.key]["params"]
        nbytes = params * BYTES_PER_PARAM
        ar, local2, step2 = (slowest(pair, lambda f, k=case.key, t=t: f["cases"][k][t])
                             for t in ("allreduce_ms", "local_ms", "step_ms"))
        step1 = single[0]["cases"][case.key]["step_ms"]
        extra = statistics.median(s - loc for s, loc in zip(step2, local2, strict=True))
        bus_gbit_s = 2 * (WORKERS - 1) / WORKERS * nbytes * 8 / (statistics.median(ar) / 1e3) / GBIT
        print(f"| {case.label} | {params:,} | {nbytes / 1e6:.1f} | {ms_cell(ar)} | {bus_gbit_s:.2f} | "
              + " | ".join(ms_cell(t) for t in (step1, local2, step2))
              + f" | {extra:.0f} ({extra / statistics.median(step2):.0%}) |")


def ms_cell(times: list[float]) -> str:
    median, p90 = median_p90(times)
    return f"{median:.0f} / {p90:.0f}"


def ring_allreduce_s(nbytes: float, nodes: int, gbit_s: float) -> float:
    """Ring all-reduce: each node sends and receives 2(N-1)/N of the bytes in 2(N-1) hops."""
    if nodes == 1:
        return 0.0
    return 2 * (nodes - 1) / nodes * nbytes * 8 / (gbit_s * GBIT) + 2 * (nodes - 1) * HOP_LATENCY_S


def speedup(nodes: int, compute_s: float, reduce_s: float, overlap: bool = False) -> float:
    """Throughput at N nodes over one node; overlap: the all-reduce hidden behind the backward pass."""
    return nodes * compute_s / (max(compute_s, reduce_s) if overlap else compute_s + reduce_s)


def epoch_s_usd(nodes: int, compute_s: float, reduce_s: float, usd_per_hour: float) -> tuple[float, float]:
    """Seconds and dollars of one pass over EPOCH_IMAGES at nodes x GPU_BATCH images per step."""
    seconds = math.ceil(EPOCH_IMAGES / (nodes * GPU_BATCH)) * (compute_s + reduce_s)
    return seconds, nodes * usd_per_hour * seconds / 3600


def paper_rows(params: dict[str, int]):
    """(case, instance, link name, Gbit/s, bytes per all-reduce, assumed compute s per step) per row."""
    for case in CASES:
        nbytes = params[case.key] * BYTES_PER_PARAM
        for inst in INSTANCES:
            compute_s = GPU_BATCH / inst.img_per_s[case.key]
            for link, gbit_s in (("baseline", inst.baseline_gbit_s), ("peak", inst.peak_gbit_s)):
                yield case, inst, link, gbit_s, nbytes, compute_s


def print_paper(params: dict[str, int]) -> None:
    print(f"\nModelled (on paper): ring all-reduce of float32 gradients, hop latency "
          f"{HOP_LATENCY_S * 1e6:.0f} us, batch {GPU_BATCH} per GPU; GPU img/s ASSUMED.")
    print("Speedup = N t_compute / (t_compute + t_allreduce) (no overlap, as MWMS runs it); "
          "'overlapped' = N t_compute / max(t_compute, t_allreduce).\n")
    print("| model / phase | instance (GPU, img/s assumed) | link Gbit/s | MB per step | compute ms/step "
          "| all-reduce ms at 2 / 4 / 8 | speedup at 2 / 4 / 8 | overlapped at 8 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case, inst, link, gbit_s, nbytes, compute_s in paper_rows(params):
        ar = [ring_allreduce_s(nbytes, n, gbit_s) for n in NODES[1:]]
        sp = [speedup(n, compute_s, a) for n, a in zip(NODES[1:], ar, strict=True)]
        print(f"| {case.label} | {inst.name} ({inst.gpu}, {inst.img_per_s[case.key]:,.0f}) | "
              f"{link} {gbit_s:g} | {nbytes / 1e6:.1f} | {compute_s * 1e3:.1f} | "
              + " / ".join(f"{a * 1e3:.0f}" for a in ar) + " | "
              + " / ".join(f"{x:.2f}" for x in sp) + " | "
              f"{speedup(NODES[-1], compute_s, ar[-1], overlap=True):.2f} |")
    print_epoch_cost(params)


def print_epoch_cost(params: dict[str, int]) -> None:
    print(f"\nOne epoch of {EPOCH_IMAGES:,} images: seconds / on-demand US cents at "
          + ", ".join(str(n) for n in NODES) + f" nodes, no overlap ({PRICE_SOURCE}).\n")
    nodes = " | ".join(f"{n} node{'s' * (n > 1)}" for n in NODES)
    print(f"| model / phase | instance | link | {nodes} |")
    print("| --- | --- | --- |" + " ---: |" * len(NODES))
    for case, inst, link, gbit_s, nbytes, compute_s in paper_rows(params):
        usd_h = ON_DEMAND_USD_PER_HOUR[inst.name]
        cells = [epoch_s_usd(n, compute_s, ring_allreduce_s(nbytes, n, gbit_s), usd_h) for n in NODES]
        print(f"| {case.label} | {inst.name} (${usd_h:.3f}/h) | {link} {gbit_s:g} Gbit/s | "
              + " | ".join(f"{sec:.0f} s / {usd * 100:.2f} ¢" for sec, usd in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed all-reduces per case")
    parser.add_argument("--step-count", type=int, default=10, help="timed training steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each timing")
    parser.add_argument("--batch", type=int, default=4, help="images per worker in a CPU training step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    start = time.monotonic()
    single = run_cluster(1, args)
    pair = run_cluster(WORKERS, args)
    check_sums(pair)
    print_measured(pair, single, args)
    print_paper({case.key: pair[0]["cases"][case.key]["params"] for case in CASES})
    print(f"\n(total {time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
