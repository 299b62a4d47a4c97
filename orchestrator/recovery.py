"""Runs that outlive their box: a lost box is recorded, replaced, and the run resumed there
from the checkpoint copied off the old one (see checkpoints.py)."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from infra.errors import CapacityError, InfraError, QuotaError

from . import boxlock, checkpoints, events, runs
from .boxkind import Box
from .errors import BoxLost, DlboxError, NeverUsable, RunInterrupted, UsageError
from .humanize import Say
from .launch import Worker, launch
from .machine import Machine

INTERRUPTED = "interrupted"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def record_loss(project_dir: Path, run: runs.Run, box: Box, lost: BoxLost,
                usd_per_hour: float | None = None, node: int | None = None) -> runs.Run:
    """The run's record with the loss added (when, which epoch, why, what the box cost, how
    much training is redone). usd_per_hour: what the run's boxes cost together, if not the
    lost box's alone (a cluster's nodes; 0: already counted with another node lost); node:
    which node of a cluster run it was."""
    now = _now()
    ended = lost.ended_at or now.timestamp()  # the bill ran until EC2 ended it, or we do
    segment = datetime.fromisoformat(run.segment_started_at or run.started_at).timestamp()
    usd = box.hourly_usd if usd_per_hour is None else usd_per_hour
    copy = checkpoints.held(project_dir, run.run_id)
    lost_s = lost_epochs = None
    # Measured: how far the trainer had got (its last heartbeat seen, or where it stopped by
    # its own partial checkpoint) against where the resume starts: the step the checkpoint
    # was saved at (a warned stop's partial one: --resume goes on from that step), else the
    # end of its last whole epoch.
    reached = [p for p in (lost.progress, copy.stopped_at if copy else None) if p is not None]
    if reached:
        resumes_at = (copy.stopped_at if copy.stopped_at is not None else copy.completed) \
            if copy else 0
        lost_epochs = max(0.0, max(reached) - resumes_at)
        per_epoch = checkpoints.epoch_seconds(project_dir, run.run_id)
        lost_s = lost_epochs * per_epoch if per_epoch is not None else None
    flags = box.up_flags(project_dir) if box.replaceable else None
    named = {"instance": None, "instance_type": None, "zone": None, **box.loss_fields()}
    entry = runs.Interruption(
        at=now.isoformat(timespec="seconds"), epoch=lost.epoch, box=box.name, **named,
        spot=box.interruptible, usd_per_hour=box.hourly_usd,
        reason=lost.reason, warned=lost.warned,
        cost_usd=usd * max(0.0, ended - segment) / 3600 if usd is not None else None,
        checkpoint_epochs=copy.completed if copy else None,
        work_lost_s=round(lost_s, 1) if lost_s is not None else None,
        work_lost_epochs=round(lost_epochs, 2) if lost_epochs is not None else None,
        up_flags=flags.as_dict() if flags is not None else None)
    run = replace(run, status=INTERRUPTED, interruptions=(*run.interruptions, asdict(entry)))
    runs.save(project_dir, run)
    runs.note(project_dir, run.run_id, events.LOST, node, box=box.name, reason=lost.reason,
              epoch=lost.epoch, warned=lost.warned, reclaimed=lost.reclaimed,
              cost_usd=entry.cost_usd, work_lost_s=entry.work_lost_s)
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


def check_resumable(run: runs.Run) -> None:
    """UsageError, before any box is made, for a run that cannot start again elsewhere."""
    if run.data is None:
        raise UsageError(f"run {run.run_id} was recorded by an older dlbox (no --data in "
                         f"runs/{run.run_id}/run.json); start it again with `dlbox train`")
    runs.check_datasets(run.data, run.test)


def resume(project_dir: Path, run: runs.Run, box: Box, say: Say,
           pip_args: tuple[str, ...] = ()) -> tuple[runs.Run, Machine]:
    """Start run again on box, from its off-box checkpoint: data and code synced (only what
    the box lacks), the checkpoint pushed, the trainer started with --resume."""
    check_resumable(run)
    machine = box.machine(project_dir)
    try:
        shipped = runs.ship(box, machine, run.data, run.test, say, pip_args=pip_args)
        remote = runs.reserve_folder(machine, box.workdir, run.run_id)
        copy = None
        if checkpoints.held(project_dir, run.run_id) is not None:
            copy = checkpoints.push(project_dir, run, machine, remote, shipped.data)
        now = _now()
        done = [i if i.get("downtime_s") is not None else {**i, "downtime_s": round(
            (now - datetime.fromisoformat(i["at"])).total_seconds(), 1)} for i in run.interruptions]
        run = replace(run, box=box.name, remote_dir=remote, status="running", exit_code=None,
                      rented=box.rented,
                      usd_per_hour=box.hourly_usd, segment_started_at=now.isoformat(
                          timespec="seconds"), interruptions=tuple(done))
        team = [Worker(0, box.name, remote, "", shipped.code, shipped.data, shipped.test)]
        run = launch(project_dir, run, [box], [machine], team, say, events.RESUMED,
                     {"epochs": copy.completed if copy else 0})
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
        machine.fetch(f"{run.remote_dir}/train.log", part, runs.MAX_RESULT_BYTES)
        os.replace(part, target)
    except (DlboxError, OSError):
        pass  # the log of a box that went meanwhile goes with it
    finally:
        part.unlink(missing_ok=True)


def carry_on(project_dir: Path, run: runs.Run, box: Box, machine: Machine, lost: BoxLost,
             say: Say, recover: bool, max_losses: int,
             pip_args: tuple[str, ...] = ()) -> tuple[runs.Run, Box, Machine]:
    """After a loss: record it; unless told not to, the box was ended on purpose, or the run
    has lost more than max_losses boxes, replace the box and resume the run there. Returns
    (run, box, machine) to follow; raises RunInterrupted with what to do when the run waits
    for `dlbox attach`. machine (the lost box's) is closed."""
    say(loss_line(run, box, lost))
    try:
        if lost.warned:
            keep_log(project_dir, run, machine)
    finally:
        machine.close()
    with boxlock.run_held(project_dir, run.run_id, say):
        now = runs.load(project_dir, run.run_id)
        if (now.box, now.remote_dir) != (run.box, run.remote_dir):
            return _moved_on(project_dir, now, say)  # another dlbox carried it on meanwhile
        run = record_loss(project_dir, now, box, lost)
        if not lost.reclaimed:
            raise RunInterrupted(f"{box.label} was ended on purpose, not taken back by AWS; run "
                                 f"{run.run_id} stopped with it; " + resumable_line(project_dir,
                                                                                     run))
        if not recover:
            box.retire(project_dir, say)
            raise RunInterrupted(f"run {run.run_id} stopped with its box (--no-recover); "
                                 + resumable_line(project_dir, run))
        from . import boxes

        if boxes.named(project_dir, box.name) is None:  # `dlbox down` forgot it meanwhile
            raise RunInterrupted(f"{box.label} is no longer this project's box; "
                                 + resumable_line(project_dir, run))
        return on_new_box(project_dir, run, box, say, max_losses, pip_args)


def _moved_on(project_dir: Path, run: runs.Run, say: Say) -> tuple[runs.Run, Box, Machine]:
    """The run as another dlbox left it: going on on another box (follow it there)."""
    from . import boxes

    box = boxes.named(project_dir, run.box)
    if run.status != "running" or box is None:
        raise RunInterrupted(f"run {run.run_id} is {run.status}; " + resumable_line(project_dir,
                                                                                   run))
    say(f"run {run.run_id} goes on on {box.label} already; following it there")
    return run, box, box.machine(project_dir)


def on_new_box(project_dir: Path, run: runs.Run, box: Box | None, say: Say,
               max_losses: int, pip_args: tuple[str, ...] = (),
               new_box=None, reuse: bool = False) -> tuple[runs.Run, Box, Machine]:
    """Replace box (lost; or None: make one with new_box()) and resume run there (the caller
    holds the run's lock); reuse: box is up again (a stopped one, started), resume there
    first. A new box that never becomes usable (reclaimed while it is set up) or that is
    lost before the run goes on there is replaced too, until the run has lost more than
    max_losses boxes."""
    check_resumable(run)
    failed = 0  # new boxes that never became usable
    while True:
        if reuse:  # box is up again: the run resumes there, as on a box made now
            reuse = False
        else:
            if len(run.interruptions) + failed > max_losses:
                if box is not None:
                    box.retire(project_dir, say)
                raise RunInterrupted(f"run {run.run_id} lost {len(run.interruptions) + failed} "
                                     "box(es), more than max_recoveries allows; "
                                     + resumable_line(project_dir, run))
            try:
                with boxlock.held(project_dir, say):
                    was = box.name if box is not None else None
                    if box is not None:
                        box.retire(project_dir, say)  # its errors are its own
                    try:
                        box = box.replacement(project_dir, say) if box is not None \
                            else new_box()
                    except (CapacityError, QuotaError) as exc:  # no retry helps now
                        raise RunInterrupted(f"no new box for run {run.run_id} ({exc}); nothing "
                                             "of it is left running; "
                                             + resumable_line(project_dir, run)) from exc
                    runs.note(project_dir, run.run_id, events.REPLACED, box=box.name, was=was)
            except NeverUsable as exc:  # ended (verified) by `up` itself
                failed += 1
                say(f"the new box did not become usable ({exc}); trying another")
                continue  # box: still the lost one, whose settings the next replacement takes
        run = replace(run, segment_started_at=_now().isoformat(timespec="seconds"))
        try:
            run, machine = resume(project_dir, run, box, say, pip_args)
            return run, box, machine
        except KeyboardInterrupt as exc:
            going = getattr(exc, "run", None)
            if going is None or going.status != "running":  # it did not go on: it waits again
                runs.save(project_dir, run)  # for a box, as before this try
            raise
        except (DlboxError, InfraError) as exc:
            gone = box.gone(project_dir)
            if gone is None:
                runs.save(project_dir, run)  # waiting for a box, as before this try
                raise DlboxError(f"{exc}; {box.label} stays up and recorded: `dlbox attach "
                                 f"{run.run_id}` tries again, `dlbox down` ends it") from exc
            say(f"{box.label} was lost before the run went on there ({gone.reason})")
            run = record_loss(project_dir, run, box, BoxLost(gone.reason, reclaimed=gone.reclaimed,
                                                             ended_at=gone.at))
            if not gone.reclaimed:
                raise RunInterrupted(f"{box.label} was ended on purpose; "
                                     + resumable_line(project_dir, run)) from exc
