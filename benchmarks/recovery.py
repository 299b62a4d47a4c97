"""Spot recovery: work lost per interruption, detection latency and recovery overhead.

The figures are those of the spot journey test (tests/test_spot.py): moto's server as EC2,
each box a loopback OpenSSH server, a stand-in metadata service announcing the interruption
of the first box, the second box killed mid-epoch without a word. Each run prints one JSON
line of figures; this script runs it ROUNDS times and prints them side by side with the
issue's targets.
Usage: python benchmarks/recovery.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/test_spot.py::test_a_spot_run_goes_on_through_a_warned_and_an_unwarned_loss"
MARK = "recovery figures: "
ROUND_TIMEOUT_S = 600
# (figure, what it is, target: the largest value that meets it, or None)
ROWS = (
    ("warned_work_lost_epochs", "warned: work lost (epochs)", 0.0),
    ("warned_work_lost_s", "warned: work lost (s)", None),
    ("warned_noticed_to_relaunch_s", "warned: noticed -> run started on the new box (s)", None),
    ("warned_noticed_to_first_resumed_step_s", "warned: noticed -> first resumed step (s)", 10.0),
    ("unwarned_detection_s", "unwarned: instance terminated -> noticed (s)", 15.0),
    ("unwarned_work_lost_epochs", "unwarned: work lost (epochs)", 1.0),
    ("unwarned_work_lost_s", "unwarned: work lost (s)", None),
    ("unwarned_noticed_to_relaunch_s", "unwarned: noticed -> run started on the new box (s)", None),
)


def one_round() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-s", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=ROUND_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.exit(f"the spot journey failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = [one_round() for _ in range(parser.parse_args().rounds)]
    print(f"{'figure':<54} {'rounds':<24} target")
    for key, label, target in ROWS:
        values = [r[key] for r in rounds]
        shown = " / ".join(f"{v:g}" for v in values)
        verdict = "" if target is None else (
            f"<= {target:g} " + ("met" if max(values) <= target else
                                 f"met in {sum(v <= target for v in values)} of {len(values)}"))
        print(f"{label:<54} {shown:<24} {verdict}")


if __name__ == "__main__":
    main()
