"""Off-box checkpoint copies: whole whatever the trainer commits meanwhile; pushed for --resume.

The trainer side is trainer.checkpoint.Checkpoints itself, committing as fast as it can;
only the model is a stand-in (its file names the epoch it holds), so no TensorFlow starts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

from orchestrator import checkpoints, runs
from orchestrator.localmachine import LocalMachine
from trainer.checkpoint import Checkpoints, ResumeState

COMMITS = 150  # at least; more until the copies have seen DISTINCT_COPIES epochs
DISTINCT_COPIES = 3
EPOCH_S = 0.01  # the stand-in trainer's epochs: far shorter than a copy takes
# Every PAUSE_EVERY epochs one takes PAUSE_S, so that a copy can land mid-run on a loaded
# machine too (at EPOCH_S alone every try may meet a commit: the copy then waits, exit 5).
PAUSE_EVERY, PAUSE_S = 15, 0.3
TRAINER_DEADLINE_S = 120.0


class EpochModel:
    """Saves a file whose every byte says which epoch it holds (big enough to take time)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def save(self, path: Path) -> None:
        Path(path).write_bytes(f"epoch {self.epoch:04d}\n".encode() * 20_000)


def _epoch_of(path: Path) -> int:
    data = path.read_bytes()
    first = data[:11]
    assert data == first * (len(data) // len(first)), f"{path.name} is torn"
    return int(first.split()[1])


def _run(box_dir: Path) -> runs.Run:
    return runs.Run(run_id="20261204-000000-scratch", model="scratch", box="b",
                    remote_dir=str(box_dir), args=[], started_at="2026-12-04T00:00:00+00:00",
                    data="/data")


def test_copies_taken_while_the_trainer_commits_are_always_whole(tmp_path):
    """Every copy's state.json names files that are here, whole, of the epochs it says;
    files it no longer names are gone; nothing of the copies is left on the box."""
    box_dir, project = tmp_path / "box" / "run", tmp_path / "project"
    project.mkdir()
    ckpt = Checkpoints(box_dir / "checkpoints")
    run, machine = _run(box_dir), LocalMachine()
    assert checkpoints.pull(project, run, machine) is None  # nothing committed yet

    seen: list[int] = []
    final = [0]

    def trainer() -> None:
        state, epoch = ResumeState(options={"data": "/data"}), 0
        deadline = time.monotonic() + TRAINER_DEADLINE_S
        while (epoch < COMMITS or len(set(seen)) < DISTINCT_COPIES) \
                and time.monotonic() < deadline:
            epoch += 1
            best = state.best if epoch % 3 else ckpt.save_model(EpochModel(epoch),
                                                                 f"best-{epoch:04d}.keras")
            state = replace(state, completed=epoch, best=best,
                            last=ckpt.save_model(EpochModel(epoch), f"last-{epoch:04d}.keras"))
            ckpt.commit(state)
            time.sleep(PAUSE_S if epoch % PAUSE_EVERY == 0 else EPOCH_S)  # the epoch's training
        final[0] = epoch

    writer = threading.Thread(target=trainer)
    writer.start()
    while writer.is_alive() or not seen or seen[-1] < final[0]:
        copy = checkpoints.pull(project, run, machine)
        if copy is None:
            continue
        here = checkpoints.local_dir(project, run.run_id)
        state = json.loads((here / "state.json").read_text())
        assert _epoch_of(here / state["last"]) == state["completed"] == copy.completed
        if state["best"]:
            assert _epoch_of(here / state["best"]) <= state["completed"]
        assert {p.name for p in here.glob("*.keras")} == {state["last"], state["best"]} - {None}
        seen.append(copy.completed)
    writer.join()
    assert seen == sorted(seen) and len(set(seen)) >= DISTINCT_COPIES
    assert seen[-1] == final[0] >= COMMITS
    assert not list(box_dir.glob(".dlbox-ckpt-*"))


def test_a_push_puts_the_checkpoint_where_resume_finds_it_naming_the_new_data(tmp_path):
    box_dir, project = tmp_path / "box" / "run", tmp_path / "project"
    project.mkdir()
    ckpt = Checkpoints(box_dir / "checkpoints")
    ckpt.commit(ResumeState(options={"data": "/old/data", "img_size": 32}, completed=2,
                            last=ckpt.save_model(EpochModel(2), "partial-0003.keras"),
                            best=ckpt.save_model(EpochModel(2), "best-0002.keras")))
    run, machine = _run(box_dir), LocalMachine()
    copy = checkpoints.pull(project, run, machine)
    assert copy == checkpoints.Copy(completed=2, last="partial-0003.keras", partial=True)

    new_dir = tmp_path / "newbox" / "run.2"
    checkpoints.push(project, run, machine, str(new_dir), "/new/data")
    pushed = Checkpoints(new_dir / "checkpoints").load()
    assert pushed.completed == 2 and pushed.options == {"data": "/new/data", "img_size": 32}
    for name in (pushed.last, pushed.best):
        assert _epoch_of(new_dir / "checkpoints" / name) == 2


def test_a_runs_cost_adds_up_every_box_it_ran_on(tmp_path):
    """Two boxes lost under it, then a third that finished: the cost is the sum; an older
    run.json (no such fields) still loads."""
    run = replace(_run(tmp_path), usd_per_hour=0.36, segment_started_at="2026-12-04T01:00:00+00:00",
                  finished_at="2026-12-04T02:00:00+00:00",
                  interruptions=({"box": "a", "cost_usd": 0.2}, {"box": "b", "cost_usd": None}))
    assert abs(run.cost_usd - (0.2 + 0.36)) < 1e-9 and run.boxes == ("a", "b", "b")
    runs.save(tmp_path, run)
    assert runs.load(tmp_path, run.run_id) == run
    old = {k: v for k, v in json.loads((tmp_path / "runs" / run.run_id / "run.json").read_text())
           .items() if k not in ("data", "test", "trainer_args", "segment_started_at",
                                 "interruptions")}
    (tmp_path / "runs" / run.run_id / "run.json").write_text(json.dumps(old))
    assert runs.load(tmp_path, run.run_id).interruptions == ()
