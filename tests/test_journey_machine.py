"""Users' days on the local and the SSH box as a stateful property test: hypothesis picks
the order of the steps (train, a dlbox killed midway, attach, pull, changed data, lost
state, down and up, a new host key) and the invariants of tests/journey.py hold after each."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orchestrator import sample
from tests import journey
from tests import sshd as sshd_mod

pytestmark = pytest.mark.slow
ONE_EPOCH = ("--epochs", "1", "--img-size", "32")
# Deterministic (the same days on every CI run), few and short: each step trains for real.
DAYS = settings(max_examples=4, stateful_step_count=8, deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))

# Hypothesis derives the derandomized days from the source of the machines below: these two
# stand-ins let them stay as they were (the same days, step for step) while the days run
# quicker.


class Day(journey.Day):
    """journey.Day whose `up` checks TensorFlow with journey.quick_python(): ~0.1 s, not the
    ~3.5 s of importing it (the days' runs still train with the real TensorFlow)."""

    def __init__(self, root: Path, server=None) -> None:
        super().__init__(root, server=server, python=journey.quick_python())

    def dlbox(self, *args: str, **kwargs) -> journey.Outcome:
        if args == ("up", "--local"):
            args = (*args, "--python", self.python)
        return super().dlbox(*args, **kwargs)


def generate(root: Path, n: int, **kwargs) -> None:
    """orchestrator.sample.generate, made once for each set of arguments and copied."""
    shutil.copytree(_generated(n, tuple(sorted(kwargs.items()))), root)


@functools.cache
def _generated(n: int, kwargs: tuple) -> Path:
    root = Path(tempfile.mkdtemp(prefix="dlbox-day-data-"))
    atexit.register(shutil.rmtree, root, True)
    sample.generate(root / "data", n, **dict(kwargs))
    return root / "data"


class BoxDays(RuleBasedStateMachine):
    """One project and its box; self.box_up is what the user believes."""

    kind = "local"

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix=f"dlbox-day-{self.kind}-"))
        self.server = sshd_mod.start(self.root / "box") if self.kind == "ssh" else None
        self.day = Day(self.root, server=self.server)
        self.data = self.root / "data"
        generate(self.data, 60, test_n=0, seed=7)
        self.extra = 0
        self.host_key_changed = False
        self._up()

    def _up(self) -> None:
        if self.kind == "ssh":
            self.day.up_ssh()
        else:
            self.day.dlbox("up", "--local")
        self.box_up = True

    def _train_args(self) -> tuple[str, ...]:
        return ("train", "scratch", "--data", str(self.data), *ONE_EPOCH)

    @rule()
    def train(self) -> None:
        if self.host_key_changed:
            assert "CHANGED" in self.day.dlbox(*self._train_args(), ok=False).stderr
            return
        outcome = self.day.dlbox(*self._train_args(), ok=self.box_up)
        if self.box_up:
            run = self.day.runs()[-1]
            assert self.day.record(run)["status"] == "done" and (run / "model.keras").exists()
        else:
            assert "no box is up" in outcome.stderr

    @precondition(lambda self: self.box_up and not self.host_key_changed)
    @rule(delay=st.sampled_from([0.3, 1.0, 2.0, 3.5, 6.0]))
    def train_killed_midway(self, delay: float) -> None:
        self.day.dlbox(*self._train_args(), kill_after_s=delay)

    @precondition(lambda self: self.box_up and not self.host_key_changed and self.day.runs())
    @rule()
    def attach_latest(self) -> None:
        run = self.day.runs()[-1]
        outcome = self.day.dlbox("attach", run.name, ok=None)
        if outcome.code == 0:
            assert self.day.record(run)["finished_at"]

    @precondition(lambda self: self.box_up and not self.host_key_changed and self.day.runs())
    @rule()
    def pull_latest(self) -> None:
        self.day.dlbox("pull", self.day.runs()[-1].name, ok=None)

    @rule()
    def change_data(self) -> None:
        self.extra += 1
        shutil.copy(self.data / "train" / "cat.1.jpg", self.data / "train" / f"cat.{900 + self.extra}.jpg")

    @rule()
    def lose_state(self) -> None:
        shutil.rmtree(self.day.project / ".dlbox", ignore_errors=True)
        self.box_up = False
        self.host_key_changed = False  # the pinned key went with it

    @precondition(lambda self: not self.host_key_changed)
    @rule()
    def down_then_up(self) -> None:
        self.day.dlbox("down", ok=None)  # may say a run is in progress... or just do it
        self._up()

    @precondition(lambda self: not self.box_up)
    @rule()
    def up_again(self) -> None:
        self._up()

    @invariant()
    def holds(self) -> None:
        self.day.check_invariants()

    def teardown(self) -> None:
        self.day.close()
        self.day.kill_runs()
        if self.server is not None:
            sshd_mod.stop(self.day.server)
        shutil.rmtree(self.root, ignore_errors=True)


class SshBoxDays(BoxDays):
    kind = "ssh"

    @precondition(lambda self: self.box_up and not self.host_key_changed)
    @rule()
    def new_host_key(self) -> None:
        """The box comes back with another host key: refused until the user says otherwise."""
        self.day.new_host_key()
        self.host_key_changed = True

    @precondition(lambda self: self.host_key_changed)
    @rule()
    def trust_the_new_key(self) -> None:
        self.day.forget_host_key()
        self._up()
        self.host_key_changed = False


TestLocalBoxDays = BoxDays.TestCase
TestLocalBoxDays.settings = DAYS
TestSshBoxDays = SshBoxDays.TestCase
TestSshBoxDays.settings = DAYS
