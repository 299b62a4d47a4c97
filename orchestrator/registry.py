"""A box's run registry: which runs are live, and which hold results nobody has pulled yet.

Each run's run.sh leaves its pid in the registry folder while it lives, and a marker in
the sibling folder "unpulled" from its start until dlbox has pulled its results, verified.
The EC2 watchdog reads both; `down` and `status` ask them.
"""

from __future__ import annotations

import posixpath
import shlex

from .errors import DlboxError
from .machine import Machine

UNPULLED_DIR = "unpulled"
STOP_TIMEOUT_S = 60  # SIGTERM -> the trainer's checkpoint -> exit; then SIGKILL
STOP_POLL_S = 0.5
# A pid counts while it lives and is still a run.sh (not a process that reused a dead run's pid).
LIVE_RUNS = ('cd {registry} 2>/dev/null || exit 0; for f in *.pid; do [ -f "$f" ] || continue; '
             'pid=$(cat "$f" 2>/dev/null); case "$pid" in ""|*[!0-9]*) continue ;; esac; '
             'tr "\\0" " " < "/proc/$pid/cmdline" 2>/dev/null | grep -q "run\\.sh" '
             '&& printf "%s %s\\n" "${{f%.pid}}" "$pid"; done; exit 0')


def unpulled_dir(registry: str) -> str:
    """Where runs holding unpulled results leave their marker (beside the registry)."""
    return posixpath.join(posixpath.dirname(registry.rstrip("/")), UNPULLED_DIR)


def live_runs(machine: Machine, registry: str) -> dict[str, int]:
    """The runs alive on the box: run id -> the pid of its run.sh (a session leader)."""
    done = machine.run(LIVE_RUNS.format(registry=shlex.quote(registry)))
    found = {}
    for line in done.stdout.splitlines():
        run_id, _, pid = line.rpartition(" ")
        if run_id and pid.isdigit():
            found[run_id] = int(pid)
    return found


def stop_live_runs(machine: Machine, registry: str, only: set[str] | None = None) -> list[str]:
    """End every live run's (or only those named) whole process group (run.sh and its
    trainer): SIGTERM, a bounded wait for the trainer's checkpoint, then SIGKILL. Their ids."""
    live = {run_id: pid for run_id, pid in live_runs(machine, registry).items()
            if only is None or run_id in only}
    if live:
        groups = " ".join(f"-{pid}" for pid in live.values())
        machine.run(f"kill -TERM -- {groups} 2>/dev/null; "
                    f"for i in $(seq {int(STOP_TIMEOUT_S / STOP_POLL_S)}); do "
                    f"left=; for g in {groups}; do kill -0 -- $g 2>/dev/null && left=1; done; "
                    f'[ -z "$left" ] && exit 0; sleep {STOP_POLL_S}; done; '
                    f"kill -KILL -- {groups} 2>/dev/null; exit 0", timeout=STOP_TIMEOUT_S * 2)
    return sorted(live)


def held_runs(machine: Machine, registry: str) -> list[str]:
    """The runs whose results are still on the box, not pulled."""
    done = machine.run(f"ls -1 {shlex.quote(unpulled_dir(registry))} 2>/dev/null; exit 0")
    return sorted(line for line in done.stdout.splitlines() if line and not line.startswith("."))


def mark_unpulled(machine: Machine, registry: str, run_id: str) -> None:
    """Mark run_id's results as held on the box (run.sh marks them too, as it starts)."""
    marker = shlex.quote(posixpath.join(unpulled_dir(registry), run_id))
    done = machine.run(f"mkdir -p -- {shlex.quote(unpulled_dir(registry))} && : > {marker}")
    if done.exit_code != 0:
        raise DlboxError(f"could not mark run {run_id}'s results as unpulled on the box "
                         f"({done.stderr.strip()[-200:] or done.exit_code})")


def release(machine: Machine, registry: str, run_id: str) -> list[str]:
    """Mark run_id's results as pulled; the runs still holding results afterwards."""
    machine.run(f"rm -f {shlex.quote(posixpath.join(unpulled_dir(registry), run_id))}")
    return held_runs(machine, registry)
