"""A run's life, outside the CLI: start it, follow it, copy its checkpoints off the box,
notice a lost box, replace it, resume, pull the results and let the box go (settle.py
settles a box's runs before `down` ends it).

Every function here names a step the CLI's commands call; it speaks through a Ui and
raises the orchestrator's errors (the CLI turns them into exit codes). Each change of a
run's state is an event in its log (events.py), written by the step that makes it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from . import events
from .errors import BoxLost, CommandTimedOut, DlboxError, Interrupted, LostContact, UsageError
from .machine import COMMAND_TIMEOUT_S
from .ui import Ui

EXIT_INTERRUPTED = 130  # detached by Ctrl-C: the run goes on (as shells expect of Ctrl-C)
EXIT_FAILED = 1  # a cluster run a worker's own error stopped
COPY_LOCK_TIMEOUT_S = 5  # a checkpoint copy waits this long for another dlbox's (then skips)


@contextlib.contextmanager
def on_interrupt(hint: str) -> Iterator[None]:
    """Ctrl-C in the block becomes Interrupted(hint): what it leaves, and what to do."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(hint) from None


def attach_hint(run_id: str) -> str:
    return f"`dlbox attach {run_id}` follows it and pulls its results"


# --- the boxes a run is on ----------------------------------------------------------------


def current_box(project: Path):
    """The project's box, or a UsageError that says how to get one."""
    from . import boxes

    box = boxes.current(project)
    if box is None:
        raise boxes.no_box()
    return box


def not_recorded(project: Path, run, what: str, pulled: str) -> UsageError:
    """The error for a run whose box this project no longer records. With the state file
    itself gone (`.dlbox/` lost, not `down`) the box may still be there: `up` records it again."""
    from . import state

    if not state.state_file(project).exists():
        nodes = f" (a cluster: `--nodes {len(run.nodes)}`)" if len(run.nodes) > 1 else ""
        return UsageError(f"run {run.run_id} ran on {what}, and this project's record of its box "
                          f"is gone (.dlbox/{state.STATE_FILE}); if the box is still there, "
                          f"`dlbox up` with the flags it was made with{nodes} records it again, "
                          f"then run this command again; what was pulled is in {pulled}")
    return UsageError(f"run {run.run_id} ran on {what}, which is not this project's box any "
                      f"more; what was pulled is in {pulled}")


def crew_of(project: Path, run, ui: Ui):
    """(nodes, machines) the run is on, chief first, woken ([box], [machine] for a single
    box): they must still be this project's boxes."""
    from . import boxes, launch

    nodes = []
    for w in launch.workers(run):
        box = boxes.named(project, w.box)
        if box is None:
            what, pulled = (f"box {w.box}", f"runs/{run.run_id}/") if w.node == 0 else \
                (f"node {w.node} ({w.box})", f"runs/{run.run_id}/ and its nodes/ folder")
            raise not_recorded(project, run, what, pulled)
        nodes.append(box.wake(project, ui.say))
    return nodes, [n.machine(project) for n in nodes]


def _close(machines) -> None:
    for machine in machines:
        machine.close()


def node_of(project: Path, run, node: int, ui: Ui):
    """(run as node K sees it: its folder there, the machine of node K)."""
    from . import boxes, launch

    team = launch.workers(run)
    if node and not 0 <= node < len(team):
        what = f"{len(team)} nodes (0 to {len(team) - 1})" if len(team) > 1 else \
            "one box (no --node)"
        raise UsageError(f"--node {node}: run {run.run_id} ran on {what}")
    if not node:
        box = boxes.named(project, run.box)
        if box is None:
            raise not_recorded(project, run, f"box {run.box}", f"runs/{run.run_id}/")
        return run, box.wake(project, ui.say).machine(project)
    box = boxes.named(project, team[node].box)
    if box is None:
        raise not_recorded(project, run, f"node {node} ({team[node].box})",
                           f"runs/{run.run_id}/nodes/{node}/")
    box = box.wake(project, ui.say)
    return replace(run, remote_dir=team[node].remote_dir), box.machine(project)


# --- start --------------------------------------------------------------------------------


@dataclass
class Crew:
    """A run and the boxes it is on, chief first: a single box is a crew of one. The
    lifecycle's steps replace a lost box in place."""

    run: Any
    nodes: list
    machines: list

    @property
    def many(self) -> bool:
        return len(self.nodes) > 1

    def close(self) -> None:
        _close(self.machines)


@dataclass(frozen=True)
class _Stop:
    """How a follow ended: the chief's exit status, or what took the run down."""

    code: int
    failed: Any = None  # cluster.NodeFailed: a node failed or its box stopped answering
    lost: BoxLost | None = None  # the chief's box is gone (or going: an interruption notice)


def train(project: Path, model: str, data: str, test: str | None, trainer_args: list[str],
          ui: Ui, recover: bool = True, down_after: bool = False,
          on_started: Callable = lambda run: None) -> int:
    """Start a run on the project's box (a worker on every node of a cluster), follow it to
    its end, pull its results; with down_after, end the box once they are here. Returns the
    run's exit status."""
    from . import boxlock, recovery, runs, settle

    crew = start(project, model, data, test, trainer_args, ui, recover)
    on_started(crew.run)
    try:
        code = follow(project, crew, ui, recover, down_after)
    finally:
        crew.close()
    now = runs.load(project, crew.run.run_id)
    # The results are here and verified, and the run ended for good: a stopped one resumes
    # where it is (`dlbox attach`), so its boxes are kept.
    if down_after and now.finished_at and not recovery.stopped(now):
        # As `down` does it: other runs of the boxes are pulled first, or asked about.
        with on_interrupt(f"its results are in {runs.RUNS_DIR}/{crew.run.run_id}/; the box may "
                          "still be running: run `dlbox down`"), boxlock.held(project, ui.say):
            from .boxkind import DownFlags

            for node in crew.nodes:
                settle.end_box(project, node, DownFlags(), False, ui)
    return code


def start(project: Path, model: str, data: str, test: str | None, trainer_args: list[str],
          ui: Ui, recover: bool = True) -> Crew:
    """Ship code and data to every node of the project's box and start a worker on each;
    a box its owner took back before the run started is replaced and the start tried again
    (at most max_recoveries times)."""
    from . import boxes, boxlock, config, launch, recovery, runs

    cfg = config.load(project)
    chief = current_box(project).wake(project, ui.say)
    nodes = [chief] + [n.wake(project, ui.say) for n in boxes.cluster(project, chief)[1:]]
    for attempt in range(cfg.max_recoveries + 1):
        machines = [n.machine(project) for n in nodes]
        try:
            with ui.transfer() as progress:
                run = launch.start(project, nodes, machines, model, data, test, trainer_args,
                                   ui.say, progress, cfg.pip_args)
            return Crew(run, nodes, machines)
        except BaseException as exc:
            _close(machines)
            if not isinstance(exc, (DlboxError, InfraError)):
                raise  # Ctrl-C, SIGTERM: what it leaves is said by the command
            lost = {} if isinstance(exc, UsageError) else {
                k: why for k, box in enumerate(nodes) if (why := recovery.gone(project, box))}
            if not lost or not all(g.reclaimed for g in lost.values()) or not recover or \
                    attempt == cfg.max_recoveries:
                raise
            orphan = getattr(exc, "run", None)  # recorded as it started, with the boxes
            if orphan is not None:
                orphan = replace(orphan, status=runs.LOST)
                runs.save(project, orphan)
                runs.ended(project, orphan, runs.LOST)
            for k, gone in lost.items():
                ui.say(f"{nodes[k].label} was lost before the run started ({gone.reason}); "
                       "replacing it")
                with boxlock.held(project, ui.say):
                    nodes[k] = nodes[k].replacement(project, ui.say)
    raise AssertionError("unreachable: the last attempt raises")


def follow(project: Path, crew: Crew, ui: Ui, recover: bool = True,
           down_after: bool = False) -> int:
    """Stream the run from its chief, watching the other nodes; Ctrl-C detaches (the run
    goes on). A box its owner took back is replaced and the run resumed (on every node)
    from its checkpoint; any other failed node stops the run on every node. Then pull and
    record the results (Ctrl-C then says what was not done). Returns the exit status;
    crew is updated in place."""
    from . import checkpoints, config, recovery

    cfg = config.load(project)
    max_losses = len(crew.run.interruptions) + cfg.max_recoveries  # boxes, by the end of it
    shown = 0  # epochs shown already: a run resumed elsewhere brings its history along
    while True:
        stop = _watch(project, crew, ui, shown)
        if stop is None:
            return EXIT_INTERRUPTED  # detached: the run goes on
        if stop.code == 0 or not (stop.lost or stop.failed):
            break
        with on_interrupt(f"run {crew.run.run_id} waits: `dlbox attach {crew.run.run_id}` "
                          "resumes it (a box launched meanwhile is recorded: `dlbox down` "
                          "ends it)"):
            lost = recovery.lost_nodes(project, crew.run, crew.nodes, crew.machines,
                                       {0: stop.lost} if stop.lost else None)
            if not lost:
                break  # a worker stopped on a box that is still there: stopped on every node
            crew.run = recovery.carry_on(project, crew.run, crew.nodes, crew.machines, lost,
                                         ui.say, recover, max_losses, cfg.pip_args)
        copy = checkpoints.held(project, crew.run.run_id)
        shown = copy.completed if copy else 0
    with on_interrupt(f"run {crew.run.run_id} ended, and pulling its results was cut short"
                      + ("; the box was not ended" if down_after else "")
                      + f": `dlbox pull {crew.run.run_id}` fetches them"
                      + (", then `dlbox down` ends the box" if down_after else "")):
        return _finish(project, crew, stop, ui)


def _watch(project: Path, crew: Crew, ui: Ui, shown: int) -> _Stop | None:
    """One follow of the run until it ends or a box takes it down; None when Ctrl-C
    detached."""
    from . import cluster, runs
    from . import follow as following

    run, chief = crew.run, crew.nodes[0]
    last_words: list[str] = []  # a cluster chief's error: said unless a node took it down
    try:
        with ui.status() as (say, on_status):
            code = following.follow(
                run, crew.machines[0], say, err=last_words.append if crew.many else ui.err,
                on_status=on_status, shown=shown,
                peers=cluster.watcher(run, crew.nodes, crew.machines) if crew.many else None,
                on_checkpoint=checkpoint_copier(project, run, crew.machines[0], ui)
                if chief.replaceable else None,
                gone=(lambda: chief.gone(project)) if chief.replaceable else None,
                on_event=runs.recorder(project, run.run_id))
    except KeyboardInterrupt:
        _detached(project, run, ui)
        return None
    except cluster.NodeFailed as exc:
        return _Stop(runs.EXIT_RESUMABLE if exc.resumable else EXIT_FAILED, failed=exc)
    except BoxLost as exc:
        return _Stop(runs.EXIT_RESUMABLE, lost=exc)
    except LostContact as exc:  # the run itself is detached and goes on
        raise _goes_on(run, exc) from None
    failed = None
    if crew.many and code not in (0, runs.EXIT_RESUMABLE):  # a node may have taken it down
        with contextlib.suppress(DlboxError):
            failed = cluster.check(run, crew.nodes, crew.machines)
        if code != runs.EXIT_PEER_LOST and (failed is None
                                            or failed.code == runs.EXIT_PEER_LOST):
            # The chief went first (the others lost it): the chief is the node to name.
            words = f": {last_words[-1]}" if last_words else ""
            failed = cluster.NodeFailed(0, chief.label, f"had its worker end with exit status "
                                        f"{code}{words}", code=code,
                                        resumable=code in cluster.RESUMABLE_EXITS)
    if failed is None:
        for line in last_words:
            ui.err(line)
        return _Stop(code)
    return _Stop(runs.EXIT_RESUMABLE if failed.resumable else EXIT_FAILED, failed=failed)


def _finish(project: Path, crew: Crew, stop: _Stop, ui: Ui) -> int:
    """The run ended (or stopped on every node): the other nodes' workers ended or stopped,
    their logs and the chief's results pulled and recorded, every box let go of them; one
    line says how it went. Returns the exit status."""
    from . import checkpoints, cluster, launch, runs

    run, failed, code = crew.run, stop.failed, stop.code
    if failed is not None:
        launch.stop(run, crew.nodes, crew.machines)
    else:
        cluster.wait_for_workers(run, crew.nodes, crew.machines, time.sleep)
    cluster.pull_logs(project, run, crew.machines)
    run = finish(project, run, crew.nodes[0], crew.machines[0], code, ui)
    cluster.release(project, run, crew.nodes, crew.machines)
    crew.run = run
    where = f"{runs.RUNS_DIR}/{run.run_id}/"
    if failed is not None:
        copy = checkpoints.held(project, run.run_id)
        epoch = copy.completed if copy else 0
        with contextlib.suppress(DlboxError):
            epoch = (runs.read_json(crew.machines[0].read(
                f"{run.remote_dir}/checkpoints/state.json")) or {}).get("completed", epoch)
        then = (f"`dlbox attach {run.run_id}` resumes it from there once the node is back"
                if failed.resumable else f"see `dlbox logs {run.run_id} --node {failed.node}`; "
                f"the run cannot go on as is")
        ui.fail(f"{failed}; run {run.run_id} stopped on every node (its checkpoint: epoch "
                f"{epoch}); {then}")
        return code
    on = f" on {len(crew.nodes)} nodes" if crew.many else ""
    lost = f" after {len(run.interruptions)} lost box(es)" if run.interruptions else ""
    if run.val_accuracy is not None:
        ui.say(f"run {run.run_id} {run.status}{on}{lost}: val_accuracy {run.val_accuracy:.4f}; "
               f"model, metrics, history and log{'s' if crew.many else ''} in {where}")
    else:
        ui.say(f"run {run.run_id} {run.status}{on}{lost} (exit {code}); logs in {where}")
    return code


def _detached(project: Path, run, ui: Ui) -> None:
    from . import runs

    runs.note(project, run.run_id, events.DETACHED)
    ui.say(f"detached; run {run.run_id} goes on. " + attach_hint(run.run_id))


def _goes_on(run, exc: LostContact) -> LostContact:
    """Contact lost while following: the run goes on there, and attach follows it again."""
    again = LostContact(exc.reason, f"run {run.run_id} goes on there: `dlbox attach "
                                    f"{run.run_id}` follows it again")
    again.exit_code = exc.exit_code
    return again


def checkpoint_copier(project: Path, run, machine, ui: Ui):
    """on_checkpoint for follow: copy the checkpoint off the box (one dlbox at a time per
    run); a failure is said once and tried again at the next poll (a box that is going is
    noticed by follow itself); a box silent too long is CommandTimedOut, for follow to ask
    its owner about."""
    from . import boxlock, checkpoints
    from . import follow as following

    failed = []
    # Every wait for the box is bounded by this silence, so that a box that vanished during a
    # copy is noticed as soon as by a poll (follow asks its owner). A box merely slow (a big
    # checkpoint hashed) is given twice as long at each next copy.
    wait_s = [following.ANSWER_WAIT_S]

    def copy() -> bool:
        try:
            with boxlock.run_held(project, run.run_id, timeout_s=COPY_LOCK_TIMEOUT_S):
                checkpoints.pull(project, run, machine, wait_s=wait_s[0])
        except CommandTimedOut:
            wait_s[0] = min(2 * wait_s[0], COMMAND_TIMEOUT_S)
            raise
        except (DlboxError, InfraError) as exc:
            if not failed:
                ui.warn(f"could not copy the checkpoint of run {run.run_id} off the box ({exc}); "
                        "trying again")
            failed.append(exc)
            return False
        return True

    return copy


def finish(project: Path, run, box, machine, code: int, ui: Ui, cancelled: bool = False):
    """Pull and record the results of a run that ended; then the box may end on its own."""
    from . import runs

    run = runs.finish(project, run, machine, code, ui.say, cancelled)
    release(project, run, box, machine, ui)
    return run


def release(project: Path, run, box, machine, ui: Ui) -> None:
    """run's results are here, verified: the box need not keep them (idempotent)."""
    from . import boxlock

    with boxlock.held(project, ui.say):
        box.release_results(project, machine, run.run_id)


# --- attach -------------------------------------------------------------------------------


def attach(project: Path, run_id: str, ui: Ui, recover: bool = True) -> int:
    """Follow a run again and pull its results when it ends. A run whose box was lost (or
    a cluster run stopped by a lost node) resumes on a new box, or its stopped box started
    again, from its checkpoint. Returns its exit status."""
    from . import runs

    with on_interrupt(f"`dlbox attach {run_id}` again resumes it (a box launched meanwhile "
                      "is recorded: `dlbox down` ends it)"):
        runs.load(project, run_id)  # one line for a run that does not exist
        crew = _take_back(project, run_id, ui, recover)
    runs.note(project, run_id, events.ATTACHED)
    try:
        with on_interrupt(f"run {run_id} goes on: " + attach_hint(run_id)):
            return follow(project, crew, ui, recover)
    finally:
        crew.close()


def _take_back(project: Path, run_id: str, ui: Ui, recover: bool) -> Crew:
    """The crew to follow the run on. Its lost boxes (noticed now, or before) are made
    again, a stopped one started again, and the run resumed on every node from its
    checkpoint; a run stopped on boxes that are still there (a node's worker killed,
    `dlbox cancel`) resumes where it is."""
    from . import boxes, boxlock, config, launch, recovery, runs
    from .errors import RunInterrupted

    cfg = config.load(project)
    with boxlock.run_held(project, run_id, ui.say):  # one dlbox carries a run on
        run = runs.load(project, run_id)  # as the last holder left it
        nodes = [boxes.named(project, w.box) for w in launch.workers(run)]
        need: list[int] | None = None  # the nodes to make again, once known
        if not recovery.waiting(run) and (run.finished_at is None or recovery.stopped(run)) \
                and None not in nodes:
            lost, up_again = _notice_losses(project, run, nodes, ui)
            for k, why in lost.items():
                ui.say(recovery.loss_line(run, nodes[k], why))
            run = recovery.record_losses(project, run, nodes, lost)
            need = [k for k in lost if k not in up_again]
        if not (recovery.waiting(run) or recovery.stopped(run)):
            return Crew(run, *crew_of(project, run, ui))
        if recovery.waiting(run) and not recover:
            raise RunInterrupted(f"run {run.run_id} lost its box; "
                                 + recovery.resumable_line(project, run))
        if need is None:
            if not recovery.waiting(run):  # stopped, a box no longer recorded: one line says
                return Crew(run, *crew_of(project, run, ui))  # what to do
            need = [k for k, n in enumerate(nodes)  # lost before: gone or forgotten
                    if n is None or recovery.gone(project, n) is not None]
        if len(nodes) > 1 and any(nodes[k] is None for k in need):
            k = next(k for k in need if nodes[k] is None)
            raise UsageError(f"node {k} of run {run.run_id} ({launch.workers(run)[k].box}) is not "
                             f"recorded; `dlbox up` makes the cluster whole, then `dlbox attach "
                             f"{run.run_id}`")
        nodes = [n if k in need else n.wake(project, ui.say) for k, n in enumerate(nodes)]
        machines = [n.machine(project) if n is not None else None for n in nodes]
        try:
            run = recovery.replace_and_resume(
                project, run, nodes, machines, need, ui.say,
                len(run.interruptions) + cfg.max_recoveries, cfg.pip_args,
                new_box=lambda: _box_to_resume_on(project, run, ui))
        except BaseException:
            _close(m for m in machines if m is not None)
            raise
        return Crew(run, nodes, machines)


def _notice_losses(project: Path, run, nodes, ui: Ui):
    """({node: BoxLost} for the boxes lost while nobody followed, {nodes up again}). A
    stopped box is started again (nodes updated); it counts as lost only if the run died
    with the stop, and the run then resumes there."""
    from . import launch, recovery, runs

    machines = [n.machine(project) for n in nodes]
    try:
        # A running run's spot notice is follow's to act on (it copies the checkpoint the
        # trainer saves as it stops); a stopped run's box that got one is lost already.
        lost = recovery.lost_nodes(project, run, nodes, machines,
                                   notices=recovery.stopped(run))
    finally:
        _close(machines)
    up_again = set()
    for k, why in list(lost.items()):
        if not why.stopped:
            continue
        nodes[k] = nodes[k].wake(project, ui.say)  # did the run end before the stop?
        machine = nodes[k].machine(project)
        try:
            here = replace(run, remote_dir=launch.workers(run)[k].remote_dir)
            died = runs.exit_status(machine, here)[1] == "gone"
        finally:
            machine.close()
        if died:
            up_again.add(k)
        else:
            del lost[k]
    return lost, up_again


def _box_to_resume_on(project: Path, run, ui: Ui):
    """For a run whose box is no longer recorded: the project's box, or a new one like its
    last (the flags recorded with the loss; dlbox.toml's if they are damaged). The caller
    holds the box lock."""
    from . import boxes, kinds

    current = boxes.current(project)
    if current is not None:
        return current.wake(project, ui.say)
    recorded = run.interruptions[-1].get("up_flags")
    flags = kinds.flags_from(recorded if isinstance(recorded, dict) else {})
    return boxes.kind_for_up(flags).up(project, flags, None, ui.say)


# --- pull, cancel, logs -------------------------------------------------------------------


def pull(project: Path, run_id: str, ui: Ui) -> Path:
    """Copy a run's results from its box into runs/<id>/ again (verified): a snapshot while
    it goes on; once it ended, recorded, and its boxes let it go. A cluster's other nodes
    give their logs after the chief's results are here. Returns the folder."""
    from . import boxes, cluster, runs

    run = runs.load(project, run_id)
    chief = boxes.named(project, run.box)
    if chief is None:
        raise not_recorded(project, run, f"box {run.box}", f"runs/{run.run_id}/")
    chief = chief.wake(project, ui.say)
    machine = chief.machine(project)
    try:
        code, _ = runs.exit_status(machine, run, ui.warn)
        if code is None:  # still going: a snapshot of what it has
            local = runs.pull(project, run, machine, ui.say)
        elif run.finished_at:  # recorded already: copy again (and let the box go, if it waits)
            local = runs.pull(project, run, machine, ui.say, ended=True)
            release(project, run, chief, machine, ui)
        else:  # ended: its results are final, and once here the box need not keep them
            finish(project, run, chief, machine, code, ui)
            local = project / runs.RUNS_DIR / run.run_id
    finally:
        machine.close()
    if len(run.nodes) > 1:  # the other nodes' logs; once the run ended, they may let it go
        run = runs.load(project, run_id)
        nodes, machines = crew_of(project, run, ui)
        try:
            cluster.pull_logs(project, run, machines)
            if code is not None:
                cluster.release(project, run, nodes, machines)
        finally:
            _close(machines)
    return local


def cancel(project: Path, run_id: str, ui: Ui):
    """Stop a run with SIGTERM on every node (they stop at the same step, checkpoint and
    exit 75), wait for the chief, pull and record what it had. Returns (run, exit status)."""
    from . import cluster, runs

    run = runs.load(project, run_id)
    nodes, machines = crew_of(project, run, ui)
    try:
        cluster.signal_workers(run, machines)
        # The end is logged as the signal leaves: a `train` following the run sees the
        # trainer exit too, and would log it as merely interrupted.
        code = runs.cancel(run, machines[0], ui.say, on_signalled=lambda: runs.note(
            project, run.run_id, events.CANCELLED))
        cluster.wait_for_workers(run, nodes, machines, time.sleep)
        cluster.pull_logs(project, run, machines)
        run = finish(project, run, nodes[0], machines[0], code, ui, cancelled=True)
        cluster.release(project, run, nodes, machines)
    finally:
        _close(machines)
    return run, code
