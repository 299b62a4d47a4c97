"""A box's run registry: which runs are live, and which hold results nobody has pulled yet.

Each run's run.sh leaves its pid in the registry folder while it lives, and a marker in
the sibling folder "unpulled" from its start until dlbox has pulled its results, verified.
The EC2 watchdog reads both; `down` and `status` ask them.
"""

from __future__ import annotations

import posixpath
import shlex

from .machine import Machine

UNPULLED_DIR = "unpulled"
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


def stop_live_runs(machine: Machine, registry: str) -> list[str]:
    """SIGTERM every live run's whole session (run.sh and its trainer); their ids."""
    live = live_runs(machine, registry)
    if live:
        machine.run("; ".join(f"kill -TERM -- -{pid} 2>/dev/null" for pid in live.values())
                    + "; exit 0")
    return sorted(live)


def held_runs(machine: Machine, registry: str) -> list[str]:
    """The runs whose results are still on the box, not pulled."""
    done = machine.run(f"ls -1 {shlex.quote(unpulled_dir(registry))} 2>/dev/null; exit 0")
    return sorted(line for line in done.stdout.splitlines() if line and not line.startswith("."))


def release(machine: Machine, registry: str, run_id: str) -> list[str]:
    """Mark run_id's results as pulled; the runs still holding results afterwards."""
    machine.run(f"rm -f {shlex.quote(posixpath.join(unpulled_dir(registry), run_id))}")
    return held_runs(machine, registry)
