"""Off-box copies of a run's checkpoints: pulled as the trainer commits them, pushed to a new box.

The trainer's checkpoints/ on the box holds model files and state.json, its commit point
(every model file it names was complete before it was written). The copy in
runs/<id>/checkpoint/ keeps the same rule: model files are fetched and verified first,
then state.json replaces the previous one, then the files it no longer names go. A
dlbox killed at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import events, runs
from .atomic import write_atomic
from .errors import CommandTimedOut, DlboxError, LostContact
from .machine import COMMAND_TIMEOUT_S, Machine

LOCAL_DIR = "checkpoint"  # under runs/<id>/
REMOTE_DIR = "checkpoints"  # under the run's folder on the box (the trainer's)
STATE_FILE = "state.json"
SUMS_FILE = "sums.json"  # name -> SHA-256 of what this copy holds, to skip unchanged files
SNAPSHOT_PREFIX = ".dlbox-ckpt-"
SNAPSHOT_NAME = re.compile(r"\.dlbox-ckpt-[A-Za-z0-9]+")
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]+\.keras")
LISTING_END = "dlbox-checkpoint-end"
# The trainer may commit between reading state.json and linking what it names (and then
# delete an old file): read again, this many times at most.
SNAPSHOT_TRIES = 5


@dataclass(frozen=True)
class Copy:
    """The checkpoint held in runs/<id>/checkpoint/."""

    completed: int  # epochs finished, over all phases
    last: str | None  # the model file training resumes from
    partial: bool  # taken mid-epoch (a stop request): --resume redoes that epoch from it
    # A partial one's: the epochs of training done when the trainer stopped (4.4: 40 % into
    # epoch 5), which the resume redoes from the start of that epoch.
    stopped_at: float | None = None


def snapshot_command(remote_dir: str) -> str:
    """A command that hard-links state.json and the model files it names into a private
    folder (a consistent set, whatever the trainer commits meanwhile), then prints the
    folder's name, each file's SHA-256 and LISTING_END; exit 4: no checkpoint yet; exit 5:
    the trainer committed during every try (the next poll tries again)."""
    ck = shlex.quote(f"{remote_dir}/{REMOTE_DIR}")
    return (f"cd {ck} 2>/dev/null && [ -e {STATE_FILE} ] || exit 4; "
            f"find .. -maxdepth 1 -name '{SNAPSHOT_PREFIX}*' -mmin +{runs.STALE_SNAPSHOT_MIN} "
            "-exec rm -rf {} + 2>/dev/null; "
            f"for try in $(seq {SNAPSHOT_TRIES}); do "
            f"snap=$(mktemp -d ../{SNAPSHOT_PREFIX}XXXXXXXX) || exit 1; "
            # a link to a state.json replaced at that instant fails (its inode has no name
            # left): one more try
            f'ok=1; ln -- {STATE_FILE} "$snap"/ 2>/dev/null || ok=0; '
            f'[ $ok = 1 ] && '
            # the names the state holds: "last" and "best" (the trainer's own file names)
            f"for f in $(grep -oE '\"(last|best)\": \"[A-Za-z0-9_-]+\\.keras\"' \"$snap\"/{STATE_FILE}"
            " | cut -d'\"' -f4 | sort -u); do "
            'ln -- "$f" "$snap"/ 2>/dev/null || { ok=0; break; }; done; '
            '[ $ok = 1 ] && break; rm -rf "$snap"; snap=; done; '
            '[ -n "$snap" ] || exit 5; echo "${snap#../}"; cd "$snap" || exit 1; '
            f"sha256sum -- *; echo {LISTING_END}")


def local_dir(project_dir: Path, run_id: str) -> Path:
    return project_dir / runs.RUNS_DIR / run_id / LOCAL_DIR


def held(project_dir: Path, run_id: str) -> Copy | None:
    """The checkpoint copied off the box for run_id, or None."""
    state = runs.read_local_json(local_dir(project_dir, run_id) / STATE_FILE)
    completed, last = (state.get("completed"), state.get("last")) if isinstance(state, dict) \
        else (None, None)
    if not isinstance(completed, int) or not (last is None or isinstance(last, str)):
        return None  # none, or damaged: nothing to resume from
    partial = bool(last and last.startswith("partial-"))
    stopped_at = state.get("stopped_at")
    if not (partial and isinstance(stopped_at, int | float) and not isinstance(stopped_at, bool)
            and completed <= stopped_at <= completed + 1):
        stopped_at = None  # an epoch's end, an older trainer's, or not believable
    return Copy(completed=completed, last=last, partial=partial, stopped_at=stopped_at)


def epoch_seconds(project_dir: Path, run_id: str) -> float | None:
    """How long an epoch took on average, by the copy's history (None: no epoch yet)."""
    state = runs.read_local_json(local_dir(project_dir, run_id) / STATE_FILE)
    rows = state.get("history") if isinstance(state, dict) else None
    seconds = [r["seconds"] for r in rows or () if isinstance(r, dict)
               and isinstance(r.get("seconds"), int | float)]
    return sum(seconds) / len(seconds) if seconds else None


def pull(project_dir: Path, run: runs.Run, machine: Machine,
         wait_s: float = COMMAND_TIMEOUT_S) -> Copy | None:
    """Copy the run's latest committed checkpoint off the box (None: it has none yet). The box
    silent for wait_s at any point is CommandTimedOut (the copy then stands as it was)."""
    listing = machine.run(snapshot_command(run.remote_dir), timeout=wait_s)
    if listing.exit_code == 4:
        return None
    if listing.exit_code == 5:  # committing faster than we can look: this copy stands for now
        return held(project_dir, run.run_id)
    lines = listing.stdout.splitlines()
    if (listing.exit_code != 0 or len(lines) < 3 or lines[-1] != LISTING_END
            or not SNAPSHOT_NAME.fullmatch(lines[0])):
        why = listing.stderr.strip().splitlines()[-1:] or [f"exit status {listing.exit_code}"]
        raise DlboxError(f"could not copy the checkpoint of run {run.run_id} off the box "
                         f"({why[0]})")
    snapshot = f"{run.remote_dir}/{lines[0]}"
    before = held(project_dir, run.run_id)
    try:
        pairs = [line.split(maxsplit=1) for line in lines[1:-1]]
        sums = {pair[1]: pair[0] for pair in pairs if len(pair) == 2}
        if STATE_FILE not in sums or not all(MODEL_NAME.fullmatch(n) for n in sums
                                             if n != STATE_FILE):
            raise DlboxError(f"the checkpoint of run {run.run_id} on the box lists unexpected "
                             f"files ({', '.join(sorted(sums))})")
        _take(project_dir, run, machine, snapshot, sums, wait_s)
    except (CommandTimedOut, LostContact):
        raise  # a silent box is not asked again: the next pull removes the snapshot
    except BaseException:
        _remove(machine, snapshot, wait_s)
        raise
    _remove(machine, snapshot, wait_s)
    copy = held(project_dir, run.run_id)
    if copy is not None and copy != before:  # a new one (two copiers may take the same)
        runs.note(project_dir, run.run_id, events.CHECKPOINT, epochs=copy.completed,
                  partial=copy.partial)
    return copy


def _remove(machine: Machine, snapshot: str, wait_s: float) -> None:
    """The snapshot's folder gone from the box (or left to the next pull's clean-up); a box
    silent meanwhile is still said (CommandTimedOut)."""
    with contextlib.suppress(LostContact):
        machine.run(f"rm -rf -- {shlex.quote(snapshot)}", timeout=wait_s)


def _take(project_dir: Path, run: runs.Run, machine: Machine, snapshot: str,
          sums: dict[str, str], wait_s: float) -> None:
    """Fetch the snapshot's files that differ, verified; commit with state.json; tidy."""
    here = local_dir(project_dir, run.run_id)
    here.mkdir(parents=True, exist_ok=True)
    have = runs.read_local_json(here / SUMS_FILE)
    partial = runs.partial_dir(project_dir)
    for name, digest in sums.items():
        if name != STATE_FILE and not (have.get(name) == digest and (here / name).exists()):
            runs.fetch_verified(machine, f"{snapshot}/{name}", here / name, digest, run.run_id,
                                partial, timeout=wait_s)
    # The commit point: from here on the new checkpoint is the one a resume uses.
    runs.fetch_verified(machine, f"{snapshot}/{STATE_FILE}", here / STATE_FILE,
                        sums[STATE_FILE], run.run_id, partial, timeout=wait_s)
    write_atomic(here / SUMS_FILE, json.dumps(sums, indent=2) + "\n")
    for old in here.glob("*.keras"):
        if old.name not in sums:
            old.unlink(missing_ok=True)


def push(project_dir: Path, run: runs.Run, machine: Machine, remote_dir: str,
         data_on_box: str) -> Copy:
    """Put the run's off-box checkpoint into remote_dir/checkpoints/ for --resume.

    The dataset may sit elsewhere on the new box: the state names the new path (the same
    data, synced and verified), so that --resume accepts it."""
    here = local_dir(project_dir, run.run_id)
    copy = held(project_dir, run.run_id)
    if copy is None:
        raise DlboxError(f"run {run.run_id} has no checkpoint in {here}; it cannot resume")
    state = runs.read_local_json(here / STATE_FILE)
    if not isinstance(state.get("options"), dict):
        raise DlboxError(f"{here / STATE_FILE} is damaged; the run cannot resume from it")
    state["options"]["data"] = data_on_box
    names = sorted({n for n in (state.get("last"), state.get("best")) if n})
    if not all(isinstance(n, str) and MODEL_NAME.fullmatch(n) for n in names):
        raise DlboxError(f"{here / STATE_FILE} names unexpected files ({names}); it is damaged")
    target = f"{remote_dir}/{REMOTE_DIR}"
    made = machine.run(f"mkdir -p -- {shlex.quote(target)}")
    if made.exit_code != 0:
        raise DlboxError(f"could not make {target} on the box ({made.stderr.strip()})")
    machine.upload(here, names, target)
    sums = runs.read_local_json(here / SUMS_FILE)
    listed = machine.run(f"cd {shlex.quote(target)} && sha256sum -- "
                         + " ".join(shlex.quote(n) for n in names))
    pairs = [line.split(maxsplit=1) for line in listed.stdout.splitlines()]
    there = {pair[1]: pair[0] for pair in pairs if len(pair) == 2}
    if listed.exit_code != 0 or any(there.get(n) != sums.get(n) for n in names):
        raise DlboxError(f"the checkpoint of run {run.run_id} did not arrive whole on the box; "
                         f"`dlbox attach {run.run_id}` tries again")
    # Last, as the trainer does it: a state.json on the box always names whole files.
    machine.write(f"{target}/{STATE_FILE}", (json.dumps(state, indent=2) + "\n").encode())
    return copy
