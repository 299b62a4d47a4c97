"""A user's day with dlbox, as the journey tests play it: commands run as a user runs them
(or killed midway), faults injected between and inside them, and the invariants that must
hold after every step."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.runs import RESULT_FILES
from tests import fakewheels
from tests import sshd as sshd_mod
from tests.cli import DLBOX
from tests.tcpproxy import Proxy

COMMAND_TIMEOUT_S = 300
POLL_S = 0.05
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# An error line names its fix: a command to run, or what to do.
NAMES_A_FIX = re.compile(r"`[^`]+`|\b(run|rerun|pass|check|choose|drop|install|free|create|move|"
                         r"restore|delete|add|give|set|upgrade|accept|use|try|see|retry|attach)\b")
# A run's exit status that `train`/`attach` hand on, with the trainer's own one line.
TRAINER_CODES = {2, 74, 75, 130}


@dataclass(frozen=True)
class Outcome:
    """One dlbox command as the user saw it (code None: it was killed)."""

    args: tuple[str, ...]
    code: int | None
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"dlbox {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


@functools.cache
def quick_python() -> str:
    """A --python for `up` that answers its TensorFlow check at once: this interpreter with
    the stand-in tensorflow and keras of tests/fakewheels.py first on its path (~0.1 s, not
    the ~3.5 s of importing TensorFlow). The check records the interpreter's own path
    (sys.executable), so every run on the box still trains with the real TensorFlow.

    For tests whose subject is not that check. The real one is still checked by
    test_local_box's two tests of --python, the journeys' first `up` (SSH and EC2) and the
    EC2 tests of test_cli_ec2 that set python."""
    directory = Path(tempfile.mkdtemp(prefix="dlbox-quick-python-"))
    atexit.register(shutil.rmtree, directory, True)
    for name, source in (("tensorflow", fakewheels.FAKE_TF), ("keras", fakewheels.FAKE_KERAS)):
        (directory / "path" / name).mkdir(parents=True)
        (directory / "path" / name / "__init__.py").write_text(source)
    python = directory / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(directory / 'path'))}"
                      "${PYTHONPATH:+:$PYTHONPATH}\nexport PYTHONPATH\n"
                      f'exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return str(python)


def at_once(args: list[str], cwd: Path, count: int = 2, env: dict[str, str] | None = None,
            timeout_s: float = COMMAND_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """The same dlbox command in count terminals at once, each run to its end (their output
    goes to files: none of them waits on a pipe nobody reads)."""
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile("w+")),
                    files.enter_context(tempfile.TemporaryFile("w+"))) for _ in range(count)]
        procs = [subprocess.Popen([DLBOX, *args], cwd=cwd, env=env, stdout=out, stderr=err,
                                  text=True) for out, err in outputs]
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        said = []
        for out, err in outputs:
            out.seek(0)
            err.seek(0)
            said.append((out.read(), err.read()))
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(procs, said, strict=True)]


class Day:
    """One project, its box, and the user typing dlbox commands."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, server=None,
                 ec2=None, python: str = sys.executable) -> None:
        self.root = root
        self.python = python  # what `up --ssh` passes as --python
        self.project = root / "proj"
        self.project.mkdir(parents=True, exist_ok=True)
        self.remote = root / "remote"
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.server = server
        self.proxy = Proxy(server.host, server.port) if server else None
        self.ec2 = ec2
        self.seen: list[Outcome] = []
        self.steps: list[str] = []

    @contextlib.contextmanager
    def step(self, name: str):
        """A named step of the journey: a failure in it says which step, and the commands
        the step ran, so that a red journey points at the step."""
        self.steps.append(name)
        first = len(self.seen)
        try:
            yield
        except BaseException as exc:
            ran = "; ".join("dlbox " + " ".join(o.args) for o in self.seen[first:])
            exc.add_note(f"journey step {len(self.steps)} failed: {name}"
                         + (f" (it ran: {ran})" if ran else ""))
            raise

    # --- commands -------------------------------------------------------------------------

    def start(self, *args: str) -> subprocess.Popen:
        """A dlbox command in the background (SIGINT at its default, as from a shell)."""
        return subprocess.Popen([DLBOX, *args], cwd=self.project, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def finish(self, proc: subprocess.Popen, args: tuple[str, ...], killed: bool = False) -> Outcome:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        outcome = Outcome(args, None if killed else proc.returncode, out, err)
        self.seen.append(outcome)
        self.check_output(outcome)
        return outcome

    def dlbox(self, *args: str, ok: bool | None = True, kill_after_s: float | None = None) -> Outcome:
        """Run a command to its end (ok: must succeed; False: must fail; None: either), or
        SIGKILL it after kill_after_s (if it is still running then)."""
        proc = self.start(*args)
        killed = False
        if kill_after_s is not None:
            try:
                proc.wait(timeout=kill_after_s)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
        outcome = self.finish(proc, args, killed)
        if ok is True and not killed:
            assert outcome.code == 0, str(outcome)
        if ok is False and not killed:
            assert outcome.code != 0, str(outcome)
        return outcome

    def until(self, predicate, proc: subprocess.Popen | None = None, what: str = "") -> None:
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while not predicate():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the command ended before {what}: {proc.communicate()}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(POLL_S)

    # --- what the user has -----------------------------------------------------------------

    def runs(self) -> list[Path]:
        found = self.project / "runs"
        return sorted(p for p in found.iterdir() if (p / "run.json").exists()) if found.is_dir() else []

    def record(self, run: Path) -> dict:
        return json.loads((run / "run.json").read_text())

    def up_ssh(self, **kwargs) -> Outcome:
        return self.dlbox("up", "--ssh", f"{self.server.user}@127.0.0.1:{self.proxy.port}", "--key",
                          str(self.server.client_key), "--python", self.python, "--workdir",
                          str(self.remote), **kwargs)

    def new_host_key(self) -> None:
        """The box's sshd comes back with another host key (rebuilt, or someone in between)."""
        self.server = sshd_mod.restart(self.server, new_host_key=True)

    def forget_host_key(self) -> None:
        """What the CHANGED message tells the user to do: delete the box's line."""
        known = self.project / ".dlbox" / "known_hosts"
        name = f"[127.0.0.1]:{self.proxy.port}"
        known.write_text("".join(line + "\n" for line in known.read_text().splitlines()
                                 if not line.startswith(name + " ")))

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()

    def kill_runs(self) -> None:
        """End the trainers this day left running (detached runs outlive dlbox by design)."""
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"trainer" in argv and any(str(self.root).encode() in arg for arg in argv):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(proc.name), signal.SIGKILL)

    # --- invariants ------------------------------------------------------------------------

    def check_output(self, outcome: Outcome) -> None:
        """No traceback, ever; a failure is one line on stderr that names its fix."""
        assert "Traceback" not in outcome.stdout + outcome.stderr, str(outcome)
        if outcome.code in (None, 0):
            return
        if outcome.code == 130 and "detached; run" in outcome.stdout:
            return  # Ctrl-C while following: the run goes on, as the line on stdout says
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1, str(outcome)
        if outcome.code not in TRAINER_CODES:
            assert NAMES_A_FIX.search(lines[0]), f"no fix named: {outcome}"

    def check_invariants(self) -> None:
        self.check_runs()
        if self.ec2 is not None:
            self.check_aws()

    def check_runs(self) -> None:
        """Every finished run's files in runs/ are whole copies of the box's (when the box
        still has them), and no partial download is left there."""
        for run in self.runs():
            record = self.record(run)
            assert not list(run.glob("*.part")) and not list(run.glob(".*.part")), \
                f"partial download left in {run}"
            if not record.get("finished_at"):
                continue
            remote = Path(record["remote_dir"])
            if not remote.is_dir():
                continue  # the box is gone (down --purge, local down): runs/ is what is left
            for name in RESULT_FILES:
                if (remote / name).exists():
                    assert (run / name).exists(), f"{run.name}: {name} not pulled"
                    assert _sha256(run / name) == _sha256(remote / name), f"{run.name}: {name}"

    def check_aws(self) -> None:
        """Nothing in the account that `dlbox down --all` would not find by its tags."""
        from infra.models import TAG_BOX, TAG_PROJECT

        pages = self.ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": LIVE_STATES}])
        for inst in (i for r in pages["Reservations"] for i in r["Instances"]):
            tags = {t["Key"] for t in inst.get("Tags", [])}
            assert {TAG_BOX, TAG_PROJECT} <= tags, f"untagged instance {inst['InstanceId']}"
        for group in self.ec2.describe_security_groups()["SecurityGroups"]:
            if group["GroupName"] != "default":
                assert TAG_PROJECT in {t["Key"] for t in group.get("Tags", [])}, group["GroupId"]
        for pair in self.ec2.describe_key_pairs()["KeyPairs"]:
            assert TAG_PROJECT in {t["Key"] for t in pair.get("Tags", [])}, pair["KeyName"]

    def live_instances(self) -> list[str]:
        pages = self.ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": LIVE_STATES}])
        return [i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]]


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
