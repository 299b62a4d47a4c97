"""Runs that outlive their box: a lost box is recorded, replaced, and the run resumed there
from the checkpoint copied off the old one (see checkpoints.py)."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from infra.errors import InfraError

from . import boxlock, checkpoints, runs
from .boxes import Box
from .errors import BoxLost, DlboxError, RunInterrupted
from .humanize import Say
from .machine import Machine

INTERRUPTED = "interrupted"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _checkpoint_taken(project_dir: Path, run_id: str) -> float | None:
    """When the off-box checkpoint was taken (time.time(); None: there is none)."""
    try:
        return (checkpoints.local_dir(project_dir, run_id) / checkpoints.STATE_FILE).stat().st_mtime
    except OSError:
        return None


def record_loss(project_dir: Path, run: runs.Run, box: Box, lost: BoxLost) -> runs.Run:
    """The run's record with the loss added (when, which epoch, why, what the box cost, how
    much training is redone)."""
    now = _now()
    segment = datetime.fromisoformat(run.segment_started_at or run.started_at)
    usd = box.hourly_usd
    copy = checkpoints.held(project_dir, run.run_id)
    taken = _checkpoint_taken(project_dir, run.run_id)
    if copy is not None and copy.partial and lost.warned:  # the weights at the notice itself
        lost_s, lost_epochs = 0.0, 0.0
    else:
        seen = lost.last_seen if lost.last_seen is not None else now.timestamp()
        lost_s = max(0.0, seen - max(taken or 0.0, segment.timestamp()))
        done = copy.completed if copy else 0
        lost_epochs = max(0.0, lost.progress - done) if lost.progress is not None else None
    entry = runs.Interruption(
        at=now.isoformat(timespec="seconds"), epoch=lost.epoch, box=box.name,
        instance=getattr(box, "instance_id", None), instance_type=getattr(box, "instance_type",
                                                                          None),
        zone=getattr(box, "zone", None), spot=box.interruptible, usd_per_hour=usd,
        reason=lost.reason, warned=lost.warned,
        cost_usd=usd * (now - segment).total_seconds() / 3600 if usd else None,
        checkpoint_epochs=copy.completed if copy else None, work_lost_s=round(lost_s, 1),
        work_lost_epochs=round(lost_epochs, 2) if lost_epochs is not None else None)
    run = replace(run, status=INTERRUPTED, interruptions=(*run.interruptions, asdict(entry)))
    runs.save(project_dir, run)
    return run


def loss_line(run: runs.Run, box: Box, lost: BoxLost) -> str:
    """One line: which box, when, at which epoch, why (in its owner's words)."""
    at = f" during epoch {lost.epoch}" if lost.epoch else ""
    return (f"{box.label} was lost at {_now():%H:%M:%S}{at} of run {run.run_id}: {lost.reason}")


def resumable_line(project_dir: Path, run: runs.Run) -> str:
    copy = checkpoints.held(project_dir, run.run_id)
    kept = (f"its checkpoint ({copy.completed} epoch(s) done"
            + (", taken mid-epoch" if copy.partial else "") + f") is in "
            f"{runs.RUNS_DIR}/{run.run_id}/{checkpoints.LOCAL_DIR}/"
            if copy else "it had no checkpoint yet (it starts over)")
    return f"{kept}; `dlbox attach {run.run_id}` resumes it on a new box"


def resume(project_dir: Path, run: runs.Run, box: Box, say: Say,
           pip_args: tuple[str, ...] = ()) -> tuple[runs.Run, Machine]:
    """Start run again on box, from its off-box checkpoint: data and code synced (only what
    the box lacks), the checkpoint pushed, the trainer started with --resume."""
    if run.data is None:
        raise DlboxError(f"run {run.run_id} was recorded by an older dlbox (no --data in "
                         f"runs/{run.run_id}/run.json); start it again with `dlbox train`")
    machine = box.machine(project_dir)
    try:
        shipped = runs.ship(box, machine, run.data, run.test, say, pip_args=pip_args)
        remote = runs.reserve_folder(machine, box.workdir, run.run_id)
        copy = None
        if checkpoints.held(project_dir, run.run_id) is not None:
            copy = checkpoints.push(project_dir, run, machine, remote, shipped.data)
        now = _now()
        done = list(run.interruptions)
        if done and done[-1].get("downtime_s") is None:
            done[-1] = {**done[-1], "downtime_s": round(
                (now - datetime.fromisoformat(done[-1]["at"])).total_seconds(), 1)}
        run = replace(run, box=box.name, remote_dir=remote, status="running", exit_code=None,
                      usd_per_hour=box.hourly_usd, segment_started_at=now.isoformat(
                          timespec="seconds"), interruptions=tuple(done))
        run = runs.launch(project_dir, box, machine, run, shipped)
    except BaseException:
        machine.close()
        raise
    say(f"run {run.run_id} resumed on {box.label} "
        + (f"from its checkpoint after {copy.completed} epoch(s)" if copy else "from the start"))
    return run, machine


def keep_log(project_dir: Path, run: runs.Run, machine: Machine) -> None:
    """A box that warned before going still answers: its train.log (the run's stretch there)
    is kept as runs/<id>/train.<n>.log, since the next box's log starts afresh. Best effort:
    the box may go any moment."""
    n = len(run.interruptions) + 1
    target = project_dir / runs.RUNS_DIR / run.run_id / f"train.{n}.log"
    part = runs.partial_dir(project_dir) / f"{os.getpid()}.{run.run_id}.{target.name}.part"
    try:
        machine.fetch(f"{run.remote_dir}/train.log", part)
        os.replace(part, target)
    except (DlboxError, OSError):
        pass  # the log of a box that went meanwhile goes with it
    finally:
        part.unlink(missing_ok=True)


def carry_on(project_dir: Path, run: runs.Run, box: Box, machine: Machine, lost: BoxLost,
             say: Say, recover: bool, max_recoveries: int,
             pip_args: tuple[str, ...] = ()) -> tuple[runs.Run, Box, Machine]:
    """After a loss: record it; unless told not to (or out of recoveries), replace the box
    and resume the run there. Returns (run, box, machine) to follow; raises RunInterrupted
    with what to do when the run waits for `dlbox attach`. machine (the lost box's) is closed."""
    say(loss_line(run, box, lost))
    try:
        if lost.warned:
            keep_log(project_dir, run, machine)
    finally:
        machine.close()
    run = record_loss(project_dir, run, box, lost)
    if not recover:
        box.retire(project_dir, say)
        raise RunInterrupted(f"run {run.run_id} stopped with its box (--no-recover); "
                             + resumable_line(project_dir, run))
    return on_new_box(project_dir, run, box, say, max_recoveries, pip_args)


def on_new_box(project_dir: Path, run: runs.Run, box: Box | None, say: Say,
               max_losses: int, pip_args: tuple[str, ...] = (),
               new_box=None) -> tuple[runs.Run, Box, Machine]:
    """Replace box (lost; or None: make one with new_box()) and resume run there. A new box
    that never becomes usable (reclaimed while it is set up) or that is lost before the run
    goes on there is replaced too, until the run has lost more than max_losses boxes."""
    failed = 0  # new boxes that never became usable
    while True:
        if len(run.interruptions) + failed > max_losses:
            if box is not None:
                box.retire(project_dir, say)
            raise RunInterrupted(f"run {run.run_id} lost {len(run.interruptions) + failed} "
                                 "box(es), more than max_recoveries allows; "
                                 + resumable_line(project_dir, run))
        try:
            with boxlock.held(project_dir, say):
                box = box.replacement(project_dir, say) if box is not None else new_box()
        except InfraError as exc:  # no capacity anywhere, a quota: no retry helps now
            raise RunInterrupted(f"no new box for run {run.run_id} ({exc}); nothing of it is "
                                 "left running; " + resumable_line(project_dir, run)) from exc
        except DlboxError as exc:  # ended (verified) by `up` itself; the old box is gone too
            failed += 1
            say(f"the new box did not become usable ({exc}); trying another")
            continue  # box: still the lost one, whose settings the next replacement takes
        try:
            run, machine = resume(project_dir, run, box, say, pip_args)
            return run, box, machine
        except (DlboxError, InfraError):
            why = box.gone(project_dir)
            if why is None:
                raise
            lost = BoxLost(why)
            say(f"{box.label} was lost before the run went on there ({why}); replacing it")
            run = record_loss(project_dir, run, box, lost)
