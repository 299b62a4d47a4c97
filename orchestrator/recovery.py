"""Runs that outlive their boxes: the one recovery step of every run, a single box being a
cluster of one node. Each lost node is recorded, made again (or started again, if it was
stopped), and the run resumed on every node from the checkpoint copied off the box (see
checkpoints.py); a run that cannot go on waits for `dlbox attach`."""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from infra.errors import CapacityError, InfraError, QuotaError

from . import boxfiles, boxlock, checkpoints, cluster, events, follow, runs
from .boxkind import Box, Gone
from .errors import BoxLost, DlboxError, NeverUsable, RunInterrupted, UsageError
from .humanize import Say
from .launch import Worker, hourly, launch, stop, workers
from .machine import Machine

INTERRUPTED = "interrupted"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _node(nodes: list, k: int) -> int | None:
    """The node an event names: none for a single box (it is the run's only one)."""
    return k if len(nodes) > 1 else None


def waiting(run: runs.Run) -> bool:
    """The run lost a box and has not gone on since: it waits for `dlbox attach`."""
    return run.status == INTERRUPTED and any(i.get("downtime_s") is None
                                              for i in run.interruptions)


def stopped(run: runs.Run) -> bool:
    """The run stopped on boxes that are still there (a node's worker killed, `dlbox cancel`):
    it can resume from its checkpoint where it was."""
    return run.status == INTERRUPTED and run.finished_at is not None and not waiting(run)


# --- a loss noticed and recorded ----------------------------------------------------------


def gone(project_dir: Path, box: Box) -> Gone | None:
    """Why the box's owner says it can no longer run anything; None while it can, or when
    the owner cannot be asked (the box counts as there)."""
    try:
        return box.gone(project_dir)
    except (DlboxError, InfraError):
        return None


def lost_nodes(project_dir: Path, run: runs.Run, nodes: list, machines: list,
               known: dict[int, BoxLost] | None = None,
               notices: bool = True) -> dict[int, BoxLost]:
    """Every node whose box is gone (terminated, reclaimed, stopped) or, with notices, got
    an interruption notice (spot: it goes within two minutes), with where the run had got to
    (the chief's status, if it still answers); known: the losses follow saw itself. An owner
    that cannot be asked counts the box as there; a node with no box (None) is not asked."""
    from . import spotwatch

    found: dict[int, Gone] = {}
    noticed = set()  # nodes only warned: their box still answers
    for w in workers(run):
        box = nodes[w.node]
        if box is None or (known and w.node in known):
            continue
        why = gone(project_dir, box)
        if why is None and notices and box.interruptible:
            with contextlib.suppress(DlboxError):  # none there, or not the watcher's: none
                raw = machines[w.node].read(f"{w.remote_dir}/{spotwatch.NOTICE_FILE}")
                if raw is not None:
                    why = Gone(spotwatch.reason(boxfiles.notice(raw)), reclaimed=True)
                    noticed.add(w.node)
        if why is not None:
            found[w.node] = why
    lost = dict(known or {})
    if found:
        status = {}
        if 0 not in lost and (0 not in found or 0 in noticed):  # a gone chief: not waited for
            with contextlib.suppress(DlboxError):  # its heartbeat, checked
                status = boxfiles.status(machines[0].read(f"{run.remote_dir}/status.json")
                                         or b"{}")
        for k, why in found.items():
            lost[k] = BoxLost(why.reason, status.get("epoch"), progress=follow.progress_of(status),
                              reclaimed=why.reclaimed, ended_at=why.at, stopped=why.stopped)
    return dict(sorted(lost.items()))


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


def record_losses(project_dir: Path, run: runs.Run, nodes: list[Box],
                  lost: dict[int, BoxLost], own_price: bool = False) -> runs.Run:
    """Each lost node recorded in the run's interruptions, with the run's cost until then
    counted once (with the first: every node billed), or with own_price each box's own (new
    boxes lost while the run was being resumed). A loss recorded already (the run waits for
    a box) is not recorded again."""
    waits = {i["box"] for i in run.interruptions if i.get("downtime_s") is None}
    fresh = [(k, why) for k, why in lost.items() if nodes[k].name not in waits]
    for n, (k, why) in enumerate(fresh):
        usd = None if own_price else run.usd_per_hour if n == 0 else 0.0
        run = record_loss(project_dir, run, nodes[k], why, usd_per_hour=usd,
                          node=_node(nodes, k))
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
    where = "on a new box" if len(run.nodes) <= 1 else "with its lost nodes made again"
    return f"{kept}; `dlbox attach {run.run_id}` resumes it {where}"


def check_resumable(run: runs.Run) -> None:
    """UsageError, before any box is made, for a run that cannot start again elsewhere."""
    if run.data is None:
        raise UsageError(f"run {run.run_id} was recorded by an older dlbox (no --data in "
                         f"runs/{run.run_id}/run.json); start it again with `dlbox train`")
    runs.check_datasets(run.data, run.test)


def keep_log(project_dir: Path, run: runs.Run, machine: Machine) -> None:
    """A chief that warned before going still answers: its train.log (the run's stretch
    there) is kept as runs/<id>/train.<n>.log, since the next chief's log starts afresh.
    Best effort: the box may go any moment."""
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


# --- the one recovery step ----------------------------------------------------------------


def carry_on(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
             lost: dict[int, BoxLost], say: Say, recover: bool, max_losses: int,
             pip_args: tuple[str, ...] = ()) -> runs.Run:
    """After follow saw nodes lost: each recorded; unless told not to, one was ended on
    purpose, or the run has lost more than max_losses boxes, each made again and the run
    resumed on every node. Returns the run to follow (nodes and machines updated in place);
    raises RunInterrupted, the other nodes' workers stopped, when the run waits for
    `dlbox attach`."""
    for k, why in lost.items():
        say(loss_line(run, nodes[k], why))
    try:
        if 0 in lost and lost[0].warned:
            keep_log(project_dir, run, machines[0])
    finally:
        for k in lost:
            machines[k].close()
    with boxlock.run_held(project_dir, run.run_id, say):  # one dlbox carries a run on
        now = runs.load(project_dir, run.run_id)
        if workers(now) != workers(run):  # another dlbox carried it on meanwhile
            return _moved_on(project_dir, now, nodes, machines, say)
        run = record_losses(project_dir, now, nodes, lost)
        others = [k for k in range(len(nodes)) if k not in lost]
        stop(run, nodes, machines, only=others)  # none waits for its lost peers meanwhile
        try:
            _check_goes_on(project_dir, run, nodes, lost, say, recover)
            return replace_and_resume(project_dir, run, nodes, machines, list(lost), say,
                                      max_losses, pip_args)
        except (DlboxError, InfraError):  # the run waits: the others' logs come here (their
            cluster.pull_logs(project_dir, run, machines, only=others)  # results stay held)
            raise


def _check_goes_on(project_dir: Path, run: runs.Run, nodes: list[Box],
                   lost: dict[int, BoxLost], say: Say, recover: bool) -> None:
    """RunInterrupted, saying what to do, unless every lost box may be replaced now."""
    from . import boxes

    for k, why in lost.items():
        if not why.reclaimed:
            raise RunInterrupted(f"{nodes[k].label} was ended on purpose, not taken back by "
                                 f"AWS; run {run.run_id} stopped with it; "
                                 + resumable_line(project_dir, run))
    if not recover:
        for k in lost:
            nodes[k].retire(project_dir, say)
        raise RunInterrupted(f"run {run.run_id} stopped with its box (--no-recover); "
                             + resumable_line(project_dir, run))
    for k in lost:
        if boxes.named(project_dir, nodes[k].name) is None:  # `dlbox down` forgot it meanwhile
            raise RunInterrupted(f"{nodes[k].label} is no longer this project's box; "
                                 + resumable_line(project_dir, run))


def _moved_on(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
              say: Say) -> runs.Run:
    """The run as another dlbox left it: going on on other boxes (follow it there)."""
    from . import boxes

    team = [boxes.named(project_dir, w.box) for w in workers(run)]
    if run.status != "running" or None in team:
        raise RunInterrupted(f"run {run.run_id} is {run.status}; " + resumable_line(project_dir,
                                                                                   run))
    where = team[0].label if len(team) == 1 else f"{len(team)} nodes"
    say(f"run {run.run_id} goes on on {where} already; following it there")
    for k, box in enumerate(team):  # the same number of nodes: a cluster keeps its size
        machines[k].close()
        nodes[k], machines[k] = box, box.machine(project_dir)
    return run


def replace_and_resume(project_dir: Path, run: runs.Run, nodes: list, machines: list,
                       lost: list[int], say: Say, max_losses: int,
                       pip_args: tuple[str, ...] = (), new_box=None) -> runs.Run:
    """Make each lost node again (nodes[k] None: new_box() makes one), then resume the run on
    every node (the caller holds the run's lock). A new box that never becomes usable
    (reclaimed while it is set up) or that is lost before the run goes on there is replaced
    too, until the run has lost more than max_losses boxes; any other failure leaves the run
    waiting for `dlbox attach`. Returns the run as resumed."""
    check_resumable(run)
    failed = [0]  # new boxes that never became usable
    pending = list(lost)  # nodes to make again, one by one: each stays made on a failure
    fresh: set[int] = set()  # nodes whose new box is made but not yet set up for the run
    while True:
        if waiting(run):  # a new stretch of the bill: a box lost before the run goes on
            run = replace(run, segment_started_at=_now().isoformat(timespec="seconds"))
            runs.save(project_dir, run)  # there cost this much
        made = None  # the run with its nodes made again, before it resumed
        try:
            made = _make_pending(project_dir, run, nodes, machines, pending, fresh, failed, say,
                                 max_losses, pip_args, new_box)
            return resume(project_dir, made, nodes, machines, say, pip_args)
        except KeyboardInterrupt as exc:
            going = getattr(exc, "run", None)
            if going is None or going.status != "running":  # it did not go on: it waits again
                runs.save(project_dir, made or runs.load(project_dir, run.run_id))
            raise
        except (RunInterrupted, UsageError):
            raise
        except (DlboxError, InfraError) as exc:
            if made is not None:  # as before this try (not as launch left it)
                runs.save(project_dir, made)
            run = made or runs.load(project_dir, run.run_id)
            before = len(run.interruptions)
            gone = lost_nodes(project_dir, run, nodes, machines)
            run = record_losses(project_dir, run, nodes, gone, own_price=True)
            newly = {i["box"] for i in run.interruptions[before:]}
            again = [k for k in gone if nodes[k].name in newly]
            if not again:  # nothing new was lost: no retry would help now
                raise DlboxError(f"{exc}; run {run.run_id} waits: `dlbox attach {run.run_id}` "
                                 "tries again (a box made meanwhile is recorded: `dlbox down` "
                                 "ends it)") from exc
            for k in again:
                say(f"{nodes[k].label} was lost before the run went on there "
                    f"({gone[k].reason})")
                if not gone[k].reclaimed:
                    raise RunInterrupted(f"{nodes[k].label} was ended on purpose; "
                                         + resumable_line(project_dir, run)) from exc
            fresh.difference_update(again)
            pending[:] = sorted(set(pending) | set(again))


def _make_pending(project_dir: Path, run: runs.Run, nodes: list, machines: list,
                  pending: list[int], fresh: set[int], failed: list[int], say: Say,
                  max_losses: int, pip_args: tuple[str, ...], new_box) -> runs.Run:
    """Each node in pending made again, then set up for the run (taken off pending once set
    up; in fresh while its new box waits to be set up); failed counts the new boxes that
    never became usable."""
    while pending:
        k = pending[0]
        if k not in fresh:
            if len(run.interruptions) + failed[0] > max_losses:
                for j in pending:
                    if nodes[j] is not None:
                        nodes[j].retire(project_dir, say)
                raise RunInterrupted(f"run {run.run_id} lost "
                                     f"{len(run.interruptions) + failed[0]} box(es), more than "
                                     "max_recoveries allows; " + resumable_line(project_dir, run))
            try:
                _new_box_for(project_dir, run, nodes, machines, k, say, new_box)
            except NeverUsable as exc:  # ended (verified) by `up` itself
                failed[0] += 1
                say(f"the new box did not become usable ({exc}); trying another")
                continue  # nodes[k]: still the lost one, whose settings the next one takes
            fresh.add(k)
        run = _set_up(project_dir, run, nodes, machines, k, say, pip_args)
        fresh.discard(k)
        pending.pop(0)
    return run


def _new_box_for(project_dir: Path, run: runs.Run, nodes: list, machines: list, k: int,
                 say: Say, new_box) -> None:
    """Node k's box replaced (a stopped one started again; None: new_box() makes one), in
    nodes and machines in place."""
    with boxlock.held(project_dir, say):
        was = nodes[k].name if nodes[k] is not None else None
        if nodes[k] is not None and len(nodes) > 1:
            say(f"replacing {nodes[k].label}")
        try:
            box = nodes[k].replacement(project_dir, say) if nodes[k] is not None else new_box()
        except (CapacityError, QuotaError) as exc:  # no retry helps now
            raise RunInterrupted(f"no new box for run {run.run_id} ({exc}); nothing of it is "
                                 "left running; " + resumable_line(project_dir, run)) from exc
        nodes[k] = box
        runs.note(project_dir, run.run_id, events.REPLACED, _node(nodes, k), box=box.name,
                  was=was)
    if machines[k] is not None:
        machines[k].close()
    machines[k] = box.machine(project_dir)


def _set_up(project_dir: Path, run: runs.Run, nodes: list, machines: list, k: int, say: Say,
            pip_args: tuple[str, ...]) -> runs.Run:
    """Node k's new box gets the code, the data and a folder for the run; the run records
    where its worker now is (so that a recovery cut short does not make it twice)."""
    box = nodes[k]
    shipped = runs.ship(box, machines[k], run.data or "", run.test, say, None, pip_args)
    remote = runs.reserve_folder(machines[k], box.workdir, run.run_id)
    team = workers(run)
    team[k] = Worker(k, box.name, remote, "", shipped.code, shipped.data, shipped.test)
    if k == 0:
        run = replace(run, box=box.name, remote_dir=remote)
    run = replace(run, nodes=tuple(asdict(w) for w in team))
    runs.save(project_dir, run)
    return run


def resume(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
           say: Say, pip_args: tuple[str, ...] = ()) -> runs.Run:
    """Start a stopped run again on every node, from the chief's checkpoint (or the copy
    taken off it, for a new chief): every worker gets it (they must all resume from the same
    step)."""
    check_resumable(run)
    team = workers(run)
    if [w.box for w in team] != [b.name for b in nodes]:
        raise UsageError(f"run {run.run_id} ran on nodes {', '.join(w.box for w in team)}; "
                         "this project's cluster is not those any more, so it cannot resume")
    stop(run, nodes, machines)  # nothing of the run may still hold a port or a file
    for w in team:  # a node wiped since: code, data and a folder first (code and data
        # only, where an older dlbox did not record them)
        wiped = machines[w.node].run(cluster.state_command(w.remote_dir)).stdout.split()[:1] \
            == ["missing"]
        if wiped or not w.data:
            shipped = runs.ship(nodes[w.node], machines[w.node], run.data or "", run.test, say,
                                None, pip_args)
            remote = runs.reserve_folder(machines[w.node], nodes[w.node].workdir, run.run_id) \
                if wiped else w.remote_dir
            team[w.node] = Worker(w.node, w.box, remote, "", shipped.code, shipped.data,
                                  shipped.test)
            if w.node == 0:
                run = replace(run, remote_dir=remote)
    copy = checkpoints.pull(project_dir, run, machines[0]) or \
        checkpoints.held(project_dir, run.run_id)
    for w in team:
        on_box = runs.read_json(machines[w.node].read(
            f"{w.remote_dir}/{checkpoints.REMOTE_DIR}/{checkpoints.STATE_FILE}"))
        if w.node == 0 and on_box is not None:
            continue  # the chief's own: what the copy was taken from
        machines[w.node].run(
            f"rm -rf -- {shlex.quote(f'{w.remote_dir}/{checkpoints.REMOTE_DIR}')}")
        if copy is not None:
            checkpoints.push(project_dir, run, machines[w.node], w.remote_dir, w.data)
    back = waiting(run)
    run = replace(run, box=nodes[0].name, status="running", exit_code=None, finished_at=None,
                  rented=nodes[0].rented)
    if back:  # back after a loss: a new stretch begins, billed at today's boxes
        now = _now()
        run = replace(run, segment_started_at=now.isoformat(timespec="seconds"),
                      usd_per_hour=hourly(nodes), interruptions=tuple(
                          i if i.get("downtime_s") is not None else {**i, "downtime_s": round(
                              (now - datetime.fromisoformat(i["at"])).total_seconds(), 1)}
                          for i in run.interruptions))
    epochs = copy.completed if copy is not None else 0
    # Same folders, same code and data, new endpoints (the old ports may be taken now).
    run = launch(project_dir, run, nodes, machines, team, say, events.RESUMED,
                 {"nodes": len(nodes), "boxes": [b.name for b in nodes], "epochs": epochs})
    where = nodes[0].label if len(nodes) == 1 else f"{len(nodes)} nodes"
    say(f"run {run.run_id} resumed on {where} "
        + (f"from its checkpoint after {epochs} epoch(s)" if copy is not None
           else "from the start (no checkpoint yet)"))
    return run
