"""Spot boxes lost under a run: warned (the metadata service announces it) or not, while
followed or not. moto's server plays EC2 over HTTP; each box is its own OpenSSH server on
its own loopback address (127.0.0.2, .3...) on one port, with a stand-in metadata service."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests import awsfakes
from tests import sshd as sshd_mod
from tests.imds import Imds
from tests.journey import at_once
from tests.tcpproxy import Proxy
from tests.test_cli_ec2 import CLI_TIMEOUT_S, DLBOX, _tagged, cli_env, dlbox

pytestmark = pytest.mark.slow
POLL_S = 0.05
RUN_TIMEOUT_S = 240
BOXES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# Long enough that a notice (polled every 5 s) lands mid-run: ~0.7 s per epoch here.
TRAIN = ("train", "scratch", "--epochs", "14", "--img-size", "64", "--batch-size", "4",
         "--patience", "0")
DETECTION_BOUND_S = 15  # the bound, from the instance leaving running


class Box:
    """One "EC2 instance": a loopback sshd behind its own link (a TCP proxy on the box's
    address and port: the network between dlbox and the box), and its metadata service."""

    def __init__(self, directory: Path, host: str, port: int, box_bin: Path, public_key: str):
        self.imds = Imds()
        env = {"PATH": f"{box_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds.url}
        self.env = env
        self.sshd = sshd_mod.start(directory, env=env, host=host)
        sshd_mod.authorize(self.sshd, public_key)
        self.link = Proxy(host, self.sshd.port, listen=(host, port))
        self.host = host

    def vanish(self) -> None:
        """The box goes without a word: its sshd stops, and its link relays nothing more
        without closing (stopping sshd alone keeps open sessions answering)."""
        self.link.stalled = True
        sshd_mod.stop(self.sshd)

    def close(self) -> None:
        self.link.close()
        if self.sshd.proc.poll() is None:
            sshd_mod.stop(self.sshd)
        self.imds.close()


@pytest.fixture()
def spot(tmp_path, aws, moto_url, ip_lookup_url, box_settings, box_bin):
    """(project, boxes): a project whose EC2 instances are, in launch order, the loopback
    boxes 127.0.0.2, .3, .4 and .5, all on one SSH port."""
    from orchestrator import ec2box, keys

    subprocess.run([box_bin / "dlbox-watchdog", "--boot"], check=True, timeout=CLI_TIMEOUT_S)
    for left in ("active", "unpulled"):
        shutil.rmtree(Path(ec2box.RUNS_REGISTRY_ON_BOX).parent / left, ignore_errors=True)
    directory = tmp_path / "proj"
    directory.mkdir()
    _, public = keys.ensure(directory / ".dlbox" / "keys")
    port = sshd_mod.free_port()
    boxes = [Box(tmp_path / f"box{n}", host, port, box_bin, public)
             for n, host in enumerate(BOXES)]
    (directory / "dlbox.toml").write_text(
        f"ssh_port = {port}\nssh_user = {boxes[0].sshd.user!r}\npython = {sys.executable!r}\n"
        + box_settings)
    env = cli_env(tmp_path, moto_url, ip_lookup_url)
    try:
        with awsfakes.public_ips(*BOXES):
            yield (directory, env), boxes
    finally:
        _end_runs_on_boxes()  # a failed test may have left a trainer paused (_pause_trainer)
        for box in boxes:
            box.close()


def _end_runs_on_boxes() -> None:
    """SIGKILL the process group of every run registered on the boxes (this machine)."""
    from orchestrator import ec2box

    for pid_file in Path(ec2box.RUNS_REGISTRY_ON_BOX).glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _wait(what: str, condition, proc: subprocess.Popen | None = None,
          timeout_s: float = RUN_TIMEOUT_S, timeline: Timeline | None = None):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            if timeline is not None:  # it reads stdout: stderr alone is left here
                said, err = timeline.text(), proc.stderr.read()
            else:
                said, err = proc.communicate()
            raise AssertionError(f"dlbox ended while waiting for {what}: {said}{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)
    return value


class Timeline:
    """dlbox's stdout line by line, each with the time it arrived (for the figures)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.time(), line))

    def text(self) -> str:
        self._thread.join(timeout=CLI_TIMEOUT_S)
        return "".join(line for _, line in self.lines)

    def first(self, needle: str, after: float = 0.0) -> float:
        return next(t for t, line in self.lines if needle in line and t >= after)


def _reap(proc: subprocess.Popen) -> None:
    """A dlbox a failed assertion left running is ended, never left behind."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _record(directory: Path) -> dict | None:
    found = list((directory / "runs").glob("*/run.json")) if (directory / "runs").exists() else []
    return json.loads(found[0].read_text()) if found else None


def _status(record: dict) -> dict:
    """The trainer's status.json in the run's folder on its box (the boxes are this machine)."""
    try:
        return json.loads((Path(record["remote_dir"]) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _copied(directory: Path, run_id: str) -> dict:
    """The checkpoint dlbox copied off the box so far ({} until one is)."""
    try:
        return json.loads((directory / "runs" / run_id / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _instance_at(aws, host: str) -> str:
    [inst] = [i for r in aws.describe_instances()["Reservations"] for i in r["Instances"]
              if i.get("PublicIpAddress") == host]
    return inst["InstanceId"]


def _run_group(run_id: str) -> int:
    """The process group of a run on the boxes: run.sh's pid in the box's run registry."""
    from orchestrator import ec2box

    return int((Path(ec2box.RUNS_REGISTRY_ON_BOX) / f"{run_id}.pid").read_text())


def _pause_trainer(run_id: str) -> int:
    """SIGSTOP the run's trainer on its box, so that the test, not this machine's speed,
    decides whether the run ends before the next step of the journey. Returns its pid."""
    found = subprocess.run(["pgrep", "-g", str(_run_group(run_id)), "-f", "--", "-m trainer"],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT_S).stdout.split()
    assert len(found) == 1, found
    os.kill(int(found[0]), signal.SIGSTOP)
    return int(found[0])


def _kill_box(box: Box, instance: str, run_id: str) -> float:
    """The box dies without a word: its instance, its processes, its sshd. Returns when."""
    # EC2 says the instance is going before its processes die, as it does for a reclaim: dlbox,
    # seeing the run die, asks whether the box is gone and must hear yes
    at = time.time()
    awsfakes.reclaim(instance)
    box.vanish()  # the link first: dlbox hears nothing more, not even the run's end
    # run.sh leads its group (setsid): the trainer and the watcher go with it
    os.killpg(_run_group(run_id), signal.SIGKILL)
    return at


def _history(run_dir: Path) -> list[tuple[str, int]]:
    with open(run_dir / "history.csv", newline="") as f:
        return [(row["phase"], int(row["epoch"])) for row in csv.DictReader(f)]


def test_a_spot_run_goes_on_through_a_warned_and_an_unwarned_loss(spot, aws, small_sample):
    """A notice mid-run: the trainer checkpoints at once, dlbox copies it, replaces the box
    and resumes; then that box dies without warning: resumed from the last copied epoch.
    The run ends with the epochs of an uninterrupted one, and --down-after leaves nothing
    running."""
    from orchestrator import spotwatch

    project, boxes = spot
    directory, env = project
    up = dlbox(project, "up", "--spot")
    assert up.returncode == 0, up.stdout + up.stderr
    first_box = _instance_at(aws, boxes[0].host)
    proc = subprocess.Popen([DLBOX, *TRAIN, "--data", str(small_sample), "--down-after"],
                            cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    timeline = Timeline(proc)
    try:
        record = _wait("the run to train", lambda: (r := _record(directory)) and
                       _status(r).get("epoch", 0) >= 2 and r, proc)
        run_id = record["run_id"]
        trainer = _pause_trainer(run_id)  # no epoch ends until the notice has landed
        boxes[0].imds.announce()  # two minutes' notice
        _wait("the watcher to take the notice", lambda: (
            Path(record["remote_dir"]) / spotwatch.NOTICE_FILE).exists(), proc)
        os.kill(trainer, signal.SIGCONT)
        _wait("the loss to be recorded", lambda: (_record(directory) or {}).get("interruptions"),
              proc, timeline=timeline)
        warned = _copied(directory, run_id)
        assert warned["last"].startswith(("partial-", "last-")), warned
        # then AWS takes the box back
        awsfakes.reclaim(first_box)
        sshd_mod.stop(boxes[0].sshd)

        resumed = _wait("the run to go on on the second box", lambda: (r := _record(directory))
                        and r["status"] == "running" and r["remote_dir"] != record["remote_dir"]
                        and r, proc)
        _wait("the first resumed step", lambda: _status(resumed).get("step", 0) > 0, proc)
        stepped = time.time()
        on_box = Path(resumed["remote_dir"]) / "checkpoints" / "state.json"
        _wait("a checkpoint on the second box", lambda: json.loads(on_box.read_text()).get(
            "completed", 0) > warned["completed"] if on_box.exists() else False, proc,
            timeline=timeline)
        _pause_trainer(run_id)  # the run stays unfinished until its box is killed
        _wait("a checkpoint of the second box", lambda: _copied(directory, run_id).get(
            "completed", 0) > warned["completed"], proc, timeline=timeline)
        before = _copied(directory, run_id)["completed"]
        killed_at = _kill_box(boxes[1], _instance_at(aws, boxes[1].host), run_id)
        on_box = json.loads(on_box.read_text())["completed"]  # its last commit: nothing after
        proc.wait(timeout=RUN_TIMEOUT_S)
        out, err = timeline.text(), proc.stderr.read()
    finally:
        _reap(proc)
    assert proc.returncode == 0, out + err
    assert "EC2 interruption notice: terminate at" in out and "was lost at" in out
    assert out.count("resumed on the EC2 box") == 2 and "after 2 lost box(es)" in out

    run_dir = directory / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    first, second = record["interruptions"]
    assert first["warned"] and first["spot"] and first["zone"] and first["instance"] == first_box
    # Measured, not assumed: the trainer's last step seen against the step its partial
    # checkpoint was saved at, where the resume goes on; at most the batch in flight (40
    # steps an epoch here).
    if warned["last"].startswith("partial-"):
        assert warned["completed"] < warned["stopped_at"] <= warned["completed"] + 1, warned
    else:  # the stop came with an epoch's last batch: that epoch's whole checkpoint
        assert "stopped_at" not in warned, warned
    assert 0 <= first["work_lost_epochs"] <= 1 / 40 and first["downtime_s"] is not None
    assert not second["warned"] and "Server.SpotInstanceTermination" in second["reason"]
    # the copy it resumed from: taken before the kill, or from what the box had committed
    assert before <= second["checkpoint_epochs"] <= on_box
    assert 0 <= second["work_lost_epochs"] <= 1  # at most the epoch it was killed in
    noticed = datetime.fromisoformat(second["at"]).timestamp()
    assert noticed - killed_at <= DETECTION_BOUND_S + 1  # "at" is to the second
    assert record["status"] == "done" and len({first["box"], second["box"], record["box"]}) == 3
    # The epochs of an uninterrupted run, each once, in order; the model and report pulled.
    assert _history(run_dir) == [("training", e) for e in range(1, 15)]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 14
    assert "Interruptions" in (run_dir / "report.html").read_text()
    # The event log tells the same story, and the report's timeline and `dlbox runs` read it.
    log = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in log]
    assert kinds[0] == "started" and kinds[-2:] == ["pulled", "done"]
    assert [k for k in kinds if k in ("notice", "box-lost", "replaced", "resumed")] == [
        "notice", "box-lost", "replaced", "resumed", "box-lost", "replaced", "resumed"]
    assert [e["box"] for e in log if e["kind"] == "box-lost"] == [first["box"], second["box"]]
    report = (run_dir / "report.html").read_text()
    assert "Timeline" in report and report.count("lost dlbox-") == 2
    listing = dlbox(project, "runs")
    assert listing.returncode == 0 and "done (2 lost box(es))" in listing.stdout
    # The first box's stretch of the log, kept while it still answered after its warning.
    assert "EC2 spot interruption notice" in (run_dir / "train.1.log").read_text()
    assert not (run_dir / "train.2.log").exists()  # the second box went without a word
    # The figures of BENCHMARKS.md (benchmarks/recovery.py prints them from this run).
    lost_at = timeline.first("was lost at")
    figures = {
        "warned_work_lost_s": first["work_lost_s"],
        "warned_work_lost_epochs": first["work_lost_epochs"],
        "warned_noticed_to_first_resumed_step_s": round(stepped - lost_at, 1),
        "warned_noticed_to_relaunch_s": first["downtime_s"],
        "unwarned_work_lost_s": second["work_lost_s"],
        "unwarned_work_lost_epochs": second["work_lost_epochs"],
        "unwarned_detection_s": round(timeline.first("was lost at", killed_at) - killed_at, 1),
        "unwarned_noticed_to_relaunch_s": second["downtime_s"],
    }
    print(f"\nrecovery figures: {json.dumps(figures)}")
    assert figures["unwarned_detection_s"] <= DETECTION_BOUND_S

    assert _tagged(aws) == [] and "terminated; it cost about $" in out  # --down-after


def _one_line(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_run_whose_box_is_lost_waits_for_attach_which_resumes_it(spot, aws, small_sample):
    """--no-recover: the loss is one line, the run recorded as interrupted, nothing running.
    `attach` with no capacity anywhere: one line, the checkpoint kept, nothing running.
    `attach` again: a new box reclaimed while it is set up is replaced, the run resumes;
    detached, its box dies: two `attach` at once notice it, one resumes it on one new box,
    the other follows it there; it ends whole."""
    project, boxes = spot
    directory, env = project
    assert dlbox(project, "up", "--spot").returncode == 0
    first_box = _instance_at(aws, boxes[0].host)
    proc = subprocess.Popen([DLBOX, *TRAIN, "--data", str(small_sample), "--no-recover"],
                            cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        record = _wait("a first checkpoint copied", lambda: (r := _record(directory)) and
                       _copied(directory, r["run_id"]).get("completed", 0) >= 1 and r, proc)
        run_id = record["run_id"]
        _kill_box(boxes[0], first_box, run_id)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        _reap(proc)
    assert proc.returncode == 75 and "was lost at" in out, out + err
    _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 75,
              "stopped with its box (--no-recover)", f"runs/{run_id}/checkpoint/",
              f"`dlbox attach {run_id}` resumes it on a new box")
    kept = _copied(directory, run_id)
    assert _record(directory)["status"] == "interrupted" and _tagged(aws) == []
    listing = dlbox(project, "runs").stdout
    assert "interrupted (1 lost box(es))" in listing and f"`dlbox attach {run_id}` resumes" in listing

    with awsfakes.ec2_errors(lambda kw: "InsufficientInstanceCapacity"):
        starved = dlbox(project, "attach", run_id)
    _one_line(starved, 75, "no new box for run", "no capacity", "nothing of it is left running",
              f"`dlbox attach {run_id}` resumes it")
    assert _tagged(aws) == [] and aws.describe_key_pairs()["KeyPairs"] == []
    assert _copied(directory, run_id) == kept
    # A failure no retry helps (not capacity: a denied launch) is one line, tried once.
    with awsfakes.ec2_errors(lambda kw: "UnauthorizedOperation") as launches:
        denied = dlbox(project, "attach", run_id)
    _one_line(denied, 1, "UnauthorizedOperation", f"run {run_id} waits",
              f"`dlbox attach {run_id}` tries again")
    assert len(launches) == 1 and _tagged(aws) == []
    assert _copied(directory, run_id) == kept and _record(directory)["status"] == "interrupted"

    with awsfakes.reclaimed_at_launch(1):  # the next box (127.0.0.3) is taken back at once
        proc = subprocess.Popen([DLBOX, "attach", run_id], cwd=directory, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            resumed = _wait("the run to go on on a new box", lambda: (r := _record(directory))
                            and r["status"] == "running" and _status(r).get("step", 0) > 0
                            and _copied(directory, run_id)["completed"] > kept["completed"]
                            and r, proc)
            _pause_trainer(run_id)  # unfinished until its box is killed below
            proc.send_signal(signal.SIGINT)  # detach
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            _reap(proc)
    assert proc.returncode == 130 and "detached" in out, out + err
    assert "did not become usable" in out and "trying another" in out
    assert "resumed on the EC2 box" in out and f"after {kept['completed']} epoch(s)" in out
    _kill_box(boxes[2], _instance_at(aws, boxes[2].host), run_id)  # nobody follows

    # Two terminals attach at once: one carries the run on, the other follows it there.
    both = at_once(["attach", run_id], directory, env=env, timeout_s=RUN_TIMEOUT_S)
    assert [p.returncode for p in both] == [0, 0], both
    joined = "".join(p.stdout for p in both)
    assert joined.count("was lost at") == 1 and joined.count("resumed on the EC2 box") == 1
    run_dir = directory / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done" and len(record["interruptions"]) == 2
    assert [i["warned"] for i in record["interruptions"]] == [False, False]
    assert _history(run_dir) == [("training", e) for e in range(1, 15)]
    assert resumed["remote_dir"] != record["remote_dir"]
    assert _tagged(aws) == [_instance_at(aws, boxes[3].host)]
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_a_box_lost_while_the_data_crosses_is_replaced_before_the_run_starts(spot, aws,
                                                                           tmp_path):
    """The first box is reclaimed while `train` sends it the dataset (a slow link, cut):
    one line, a new box, the data sent there, the run trains to its end on it."""
    from orchestrator.sample import generate

    project, boxes = spot
    directory, env = project
    data = tmp_path / "fresh"  # never sent to any box: it has to cross the link
    generate(data, 200, test_n=0, seed=7)
    first = boxes[0]
    link = first.link  # the first box's link, which the test slows and cuts
    assert dlbox(project, "up", "--spot").returncode == 0
    instance = _instance_at(aws, first.host)
    link.rate_bytes_per_s = 400_000
    before = link.relayed_bytes
    proc = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data), "--epochs", "2",
                             "--img-size", "32"], cwd=directory, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait("the dataset to be crossing", lambda: link.relayed_bytes - before > 1_000_000,
              proc)
        assert _record(directory) is None  # no run yet: the data is still on its way
        awsfakes.reclaim(instance)  # first, as EC2 does: dlbox asks once the link fails
        link.refuse = True
        link.cut()
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        _reap(proc)
    assert proc.returncode == 0, out + err
    assert "was lost before the run started" in out and "terminated" in out
    record = _record(directory)
    assert record["status"] == "done" and record["interruptions"] == []
    assert json.loads((directory / "runs" / record["run_id"] / "metrics.json").read_text())[
        "epochs_run"] == 2
    assert _tagged(aws) == [_instance_at(aws, boxes[1].host)]
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_a_box_ended_on_purpose_is_not_replaced(spot, aws, small_sample):
    """Terminated by a person (the console, `dlbox down` elsewhere) or by its own watchdog,
    not taken back by AWS: the run stops with it in one line and no box is launched."""
    project, boxes = spot
    directory, env = project
    assert dlbox(project, "up", "--spot").returncode == 0
    first_box = _instance_at(aws, boxes[0].host)
    proc = subprocess.Popen([DLBOX, *TRAIN, "--data", str(small_sample)], cwd=directory,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record = _wait("a first checkpoint copied", lambda: (r := _record(directory)) and
                       _copied(directory, r["run_id"]).get("completed", 0) >= 1 and r, proc)
        os.killpg(_run_group(record["run_id"]), signal.SIGKILL)
        aws.terminate_instances(InstanceIds=[first_box])  # Client.UserInitiatedShutdown
        sshd_mod.stop(boxes[0].sshd)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        _reap(proc)
    _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 75,
              "was ended on purpose, not taken back by AWS", "stopped with it",
              f"`dlbox attach {record['run_id']}` resumes it")
    assert "Client.UserInitiatedShutdown" in out.split("was lost at", 1)[1]
    assert "launched" not in out.split("was lost at", 1)[1]  # nothing launched after the loss
    assert _tagged(aws) == [] and _record(directory)["status"] == "interrupted"


def test_a_replacement_box_is_made_as_the_first_was(spot, aws, tmp_path):
    """`up --spot --ssh-cidr 10.1.2.3/32`, then the box is reclaimed before a run starts: its
    replacement opens SSH to the recorded CIDR, never looking the caller's IP up (no lookup
    service answers here), and so does `up` again after the next loss."""
    from orchestrator.sample import generate

    project, boxes = spot
    directory, _ = project
    nowhere = {"DLBOX_IP_LOOKUP_URL": "http://127.0.0.1:9/"}  # a lookup would fail: none is made
    data = tmp_path / "tiny"
    generate(data, 40, test_n=0, seed=3)
    up = dlbox(project, "up", "--spot", "--ssh-cidr", "10.1.2.3/32", env_set=nowhere)
    assert up.returncode == 0, up.stdout + up.stderr

    def ssh_rules() -> list:
        [box] = json.loads((directory / ".dlbox" / "state.json").read_text())["boxes"]
        [group] = aws.describe_security_groups(GroupIds=[box["security_group_id"]])[
            "SecurityGroups"]
        assert box["settings"]["ssh_cidr"] == "10.1.2.3/32" and box["settings"]["spot"]
        return [r["CidrIp"] for p in group["IpPermissions"] for r in p["IpRanges"]]

    assert ssh_rules() == ["10.1.2.3/32"]
    awsfakes.reclaim(_instance_at(aws, boxes[0].host))
    boxes[0].vanish()
    train = dlbox(project, "train", "scratch", "--data", str(data), "--epochs", "1",
                  "--img-size", "32", env_set=nowhere)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "was lost before the run started" in train.stdout
    assert _instance_at(aws, boxes[1].host) in train.stdout and ssh_rules() == ["10.1.2.3/32"]
    awsfakes.reclaim(_instance_at(aws, boxes[1].host))
    boxes[1].vanish()
    again = dlbox(project, "up", env_set=nowhere)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is gone; launching a new one" in again.stdout and "spot" in again.stdout
    assert ssh_rules() == ["10.1.2.3/32"]
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []
