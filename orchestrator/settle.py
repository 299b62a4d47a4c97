"""What a box holds, settled before it ends: the runs `status` says are unpulled, and
`down`'s pulls (and questions) before each box is ended, verified."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from .errors import DlboxError
from .ui import Ui


def status(project: Path, ui: Ui) -> list[tuple[str, str]] | None:
    """`dlbox status`'s rows for every node of the project's box and its unpulled runs;
    None when no box is up."""
    from . import boxes

    box = boxes.current(project)
    if box is None:
        return None
    rows = [row for node in boxes.cluster(project, box) for row in node.status(project)]
    unpulled = [r.run_id for r in unpulled_runs(project, box, ui)]
    if unpulled:
        rows.append(("results", f"run(s) {', '.join(unpulled)} not pulled yet: they are on "
                                f"the box; `dlbox pull {unpulled[0]}` fetches them"))
    return rows


def unpulled_runs(project: Path, box, ui: Ui) -> list:
    """This box's runs whose results were never pulled (still going, or ended unpulled)."""
    from . import runs

    return [r for r in runs.all_runs(project, ui.warn)
            if r.box == box.name and r.status == "running"]


def down(project: Path, flags, yes: bool, ui: Ui, region: str | None = None) -> None:
    """End every box the project records (a cluster's chief first: its runs are settled
    first), each after its runs are settled; with none recorded, what its kinds still find
    of it (EC2 instances by their tag, in region)."""
    from . import boxes, boxlock

    with boxlock.held(project, ui.say):
        found = boxes.recorded(project)
        if not found:
            if not any(kind.down_unrecorded(project, region, flags.profile, yes, ui)
                       for kind in boxes.classes()):
                ui.say("no box is up in this project")
            return
        found.sort(key=lambda b: b.node)
        for box in found:
            boxes.check_down_flags(box, flags)
        for box in found:
            end_box(project, box, flags, yes, ui)


def down_all(project: Path, region: str | None, profile: str | None, yes: bool,
             ui: Ui) -> None:
    """`down --all`: each kind's boxes of every project (EC2's in region), listed, asked
    about, ended."""
    from . import boxes

    if not any(kind.down_every_project(project, region, profile, yes, ui)
               for kind in boxes.classes()):
        ui.say("no kind of box has boxes of other projects to end")


def end_box(project: Path, box, flags, yes: bool, ui: Ui) -> None:
    """What `down` does to one box (the caller holds the box lock): pull the results of its
    runs that ended, ask before ending runs still going, end the box."""
    ends_runs = box.ends_runs(flags)
    box = settle_runs(project, box, yes, ends_runs, ui)
    box.down(project, flags, ui.say)
    if ends_runs:
        _record_lost(project, box, ui)


def _record_lost(project: Path, box, ui: Ui) -> None:
    """Runs of a box that ended with their results still there (stopped with --yes, or never
    pulled): recorded as lost, so nothing claims they wait to be pulled."""
    from . import runs

    for run in unpulled_runs(project, box, ui):
        run = replace(run, status=runs.LOST)
        runs.save(project, run)
        runs.ended(project, run, runs.LOST)


def settle_runs(project: Path, box, yes: bool, ends_runs: bool, ui: Ui):
    """Before a box ends: every run the box knows of (its registry: runs alive, runs holding
    unpulled results) or this project records as unpulled on it. Those that ended (or were
    killed) are pulled; one the box holds with no record here, or a damaged one, is recorded
    again from the box first. Runs still going, and results that could not be pulled, are
    given up only with --yes (or a yes at the prompt) when ending the box would end them.
    Returns the box (maybe woken)."""
    from . import registry, runs

    pending = unpulled_runs(project, box, ui)
    if not pending and not (ends_runs and box.python):
        return box  # nothing recorded, and ending the box ends nothing it holds (or it never
        # became ready to run anything)
    names = ", ".join(r.run_id for r in pending)
    try:
        box = box.wake(project, ui.say)
        machine = box.machine(project)
        going = set(registry.live_runs(machine, box.runs_registry()))
        held = set(registry.held_runs(machine, box.runs_registry()))
    except (DlboxError, InfraError) as exc:
        if ends_runs and pending:
            ui.confirm(f"Cannot reach {box.label} ({exc}); end it without the results of run(s) "
                       f"{names}?", yes, f"cannot reach {box.label} to pull run(s) {names} "
                       f"({exc}); `dlbox down --yes` ends it without them")
        elif ends_runs:  # nothing recorded here says it holds results: it is not kept for a maybe
            ui.warn(f"could not look for runs on {box.label} ({exc}); ending it all the same")
        return box
    failed = []
    try:
        if not box.shared_workdir:  # every run there is this project's
            pending += _recorded_again(project, box, machine,
                                       (going | held) - _recorded_ids(project), ui)
        for run in pending:
            if run.run_id in going:
                continue
            try:
                code, life = runs.exit_status(machine, run, ui.warn)
                run = runs.finish(project, run, machine,
                                  code if code is not None else runs.EXIT_KILLED, ui.say)
                box.release_results(project, machine, run.run_id)  # the caller holds the lock
            except (DlboxError, InfraError) as exc:
                failed.append(run.run_id)
                ui.warn(f"could not pull run {run.run_id}: {exc}")
                continue
            how = "was killed before it ended" if life in ("gone", "starting") else "had ended"
            ui.say(f"run {run.run_id} {how} ({run.status}); its results are pulled into "
                   f"{runs.RUNS_DIR}/{run.run_id}/")
    finally:
        machine.close()
    still = [r.run_id for r in pending if r.run_id in going]
    if ends_runs and still:
        listed = ", ".join(still)
        ui.confirm(f"Run(s) {listed} still going on {box.label}; end them with the box?", yes,
                   f"run(s) {listed} still going on {box.label}: `dlbox attach {still[0]}` "
                   "waits for the results, `dlbox down --yes` ends the box anyway")
    if ends_runs and failed:
        listed = ", ".join(failed)
        ui.confirm(f"End {box.label} without the results of run(s) {listed}?", yes,
                   f"could not pull run(s) {listed} from {box.label}: `dlbox pull {failed[0]}` "
                   "tries again, `dlbox down --yes` ends the box without them")
    return box


def _recorded_ids(project: Path) -> set[str]:
    """The runs this project has a readable record of."""
    from . import runs

    return {r.run_id for r in runs.all_runs(project, lambda _: None)}


def _recorded_again(project: Path, box, machine, run_ids: set[str], ui: Ui) -> list:
    """Runs the box holds that this project has no (readable) record of: recorded again
    from their folders there, so that their results can be pulled or waited for."""
    from . import boxfiles, runs

    found = []
    for run_id in sorted(boxfiles.run_ids(list(run_ids))):
        run = runs.adopt(project, box, machine, run_id)
        if run is not None:
            ui.say(f"run {run_id} is on {box.label} but had no readable record in "
                   f"{runs.RUNS_DIR}/{run_id}/; recorded it again from the box")
            found.append(run)
    return found
