"""Clusters through the CLI: `up --local --nodes 2` and `up --ssh A --ssh B` (two loopback
sshds on 127.0.0.2 and 127.0.0.3), `train` with one TensorFlow worker per node, a node
killed mid-epoch, `attach` resuming on every node, per-node logs, `down`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import sshd as sshd_mod
from tests.cli import CLI_TIMEOUT_S, DLBOX, dlbox, up_local, up_ssh
from tests.journey import at_once, quick_python
from tests.test_spot import spot  # noqa: F401 (a fixture: EC2 instances as loopback sshds)

POLL_S = 0.1
KILL_WAIT_TIMEOUT_S = 300  # until the run is mid-epoch with a checkpoint
# From the kill to dlbox's exit: a node check (3 s), SIGTERM's grace (10 s), the pulls.
STOPPED_WITHIN_S = 45
# Trainer flags of every run here: short epochs on the small sample, no early stopping.
FLAGS = ("--img-size", "32", "--patience", "0")
LEARN = ("--epochs", "12")  # on the learnable sample: well above chance (tests/test_distributed.py)
RESUMED_RUN_EPOCHS = 5  # the cancelled run: stopped after its first, resumed to the end


def _only_run(project: Path) -> Path:
    [run] = [p for p in (project / "runs").iterdir() if p.is_dir()]
    return run


def _history_epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "history.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def _weights_of(status_path: Path) -> str:
    """The SHA-256 of a worker's final weights, as its status.json says."""
    return json.loads(status_path.read_text())["weights_sha256"]


def _single_box_accuracy(tmp_path: Path, data: Path, *args: str) -> float:
    project = tmp_path / "single"
    project.mkdir()
    assert up_local(project).returncode == 0
    train = dlbox(project, "train", "scratch", "--data", str(data), *args, *FLAGS)
    assert train.returncode == 0, train.stdout + train.stderr
    return json.loads((_only_run(project) / "metrics.json").read_text())["val_accuracy"]


@pytest.mark.slow
def test_a_local_cluster_trains_survives_a_killed_node_and_resumes_on_every_node(
        tmp_path, small_sample):
    project = tmp_path / "cluster"
    project.mkdir()
    up = up_local(project, "--nodes", "2")
    assert up.returncode == 0, up.stderr
    status = dlbox(project, "status")
    assert "local node 0 of 2" in status.stdout and "local node 1 of 2" in status.stdout

    train = _train_six_epochs(project, small_sample)
    try:
        worker_dir, pid_file, _ = _mid_epoch_with_a_checkpoint(project)
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # node 1's run.sh and trainer
        killed_at = time.monotonic()
        out, err = train.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        train.kill()
    stopped_after = time.monotonic() - killed_at
    assert train.returncode == 75, out + err
    assert stopped_after < STOPPED_WITHIN_S, stopped_after
    [line] = err.strip().splitlines()
    assert "node 1 (local node 1)" in line and "killed" in line and "dlbox attach" in line
    run_dir = _only_run(project)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and len(record["nodes"]) == 2
    assert not _trainers_alive(project), "a worker outlived the stopped run"
    done_before = len(_history_epochs(run_dir))
    assert 1 <= done_before < 6

    # Resumed; then the chief's trainer is killed mid-epoch (run.sh lives on: exit 137).
    attach = subprocess.Popen([DLBOX, "attach", run_dir.name], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        chief_pid = _mid_epoch_with_a_checkpoint(project, after=done_before)[2]
        os.kill(chief_pid, signal.SIGKILL)
        out, err = attach.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        attach.kill()
    assert attach.returncode == 75, out + err
    assert f"run {run_dir.name} resumed on 2 nodes from its checkpoint after {done_before} " \
        "epoch(s)" in out
    [line] = err.strip().splitlines()
    assert "node 0 (local node 0)" in line and "exit status 137" in line, line
    assert not _trainers_alive(project), "a worker outlived the stopped run"

    attach = dlbox(project, "attach", run_dir.name)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert f"run {run_dir.name} resumed on 2 nodes from its checkpoint after" in attach.stdout
    assert _history_epochs(run_dir) == [1, 2, 3, 4, 5, 6]  # the same epochs, each once
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 6 and metrics["workers"] == 2
    # Node 1's log came back beside the chief's, and both say the run resumed.
    assert "resuming after epoch" in (run_dir / "nodes" / "1" / "train.log").read_text()
    assert "resuming after epoch" in (run_dir / "train.log").read_text()
    assert _weights_of(run_dir / "status.json") == _weights_of(run_dir / "nodes/1/status.json")
    assert not (worker_dir / "model.keras").exists()  # only the chief writes the outputs

    logs = dlbox(project, "logs", run_dir.name, "--node", "1")
    assert logs.returncode == 0 and "resuming after epoch" in logs.stdout
    wrong = dlbox(project, "logs", run_dir.name, "--node", "2")
    assert wrong.returncode == 2 and "0 to 1" in wrong.stderr
    assert "(+1 node(s))" in dlbox(project, "runs").stdout

    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert not list((project / ".dlbox").glob("local-box*"))


@pytest.mark.slow
def test_a_worker_that_fails_of_its_own_error_fails_the_run_on_every_node(tmp_path, small_sample):
    """Not a lost node: a worker that ends with an error of its own (exit 1) stops the run
    on every node, which is recorded failed (not resumable) and exits 1 with one line."""
    project = tmp_path / "cluster"
    project.mkdir()
    assert up_local(project, "--nodes", "2").returncode == 0
    train = _train_six_epochs(project, small_sample)
    try:
        worker_dir, pid_file, _ = _mid_epoch_with_a_checkpoint(project)
        (worker_dir / "exit_code.tmp").write_text("1\n")  # as run.sh writes a failure
        (worker_dir / "exit_code.tmp").rename(worker_dir / "exit_code")
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        out, err = train.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        train.kill()
    assert train.returncode == 1, out + err
    [line] = err.strip().splitlines()
    assert "node 1 (local node 1) had its worker fail (exit status 1)" in line, line
    assert "cannot go on as is" in line and "--node 1" in line, line
    run_dir = _only_run(project)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    ends = [json.loads(e)["kind"] for e in (run_dir / "events.jsonl").read_text().splitlines()]
    assert ends[-1] == "failed", ends
    assert not _trainers_alive(project), "a worker outlived the failed run"
    assert dlbox(project, "down").returncode == 0


def _train_six_epochs(project: Path, data: Path) -> subprocess.Popen:
    """`dlbox train` on the project's cluster, long enough to be caught mid-epoch."""
    return subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data), "--epochs", "6",
                             *FLAGS, "--img-size", "96", "--batch-size", "2"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mid_epoch_with_a_checkpoint(project: Path, after: int = 0) -> tuple[Path, Path, int]:
    """(node 1's run folder, its run.sh's pid file, the chief trainer's pid) once the chief
    has committed an epoch (more than after) and trains the next one."""
    deadline = time.monotonic() + KILL_WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        for state in (project / ".dlbox" / "local-box" / "runs").glob("*/checkpoints/state.json"):
            status_file = state.parent.parent / "status.json"
            completed = json.loads(state.read_text()).get("completed", 0)
            status = json.loads(status_file.read_text()) if status_file.exists() else {}
            if completed > after and status.get("epoch", 0) > completed and status.get("step") \
                    and status.get("state") == "running":
                run_id = state.parent.parent.name
                worker = project / ".dlbox" / "local-box-1" / "runs" / run_id
                return worker, worker / "run.pid", status["pid"]
        time.sleep(POLL_S)
    raise AssertionError("the run never got mid-epoch after a checkpoint")


def _pending(pid: int) -> int:
    """The signals pending for a process (a stopped one keeps them until SIGCONT)."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":\t" in line)
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def _trainers_alive(project: Path) -> list[str]:
    """The trainers of this project's runs still alive (other tests may train meanwhile)."""
    found = subprocess.run(["pgrep", "-af", "--", "-m trainer"], capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr  # 1: none at all
    return [line for line in found.stdout.splitlines()
            if " -m trainer " in line and str(project) in line]


@pytest.fixture
def two_sshds(tmp_path):
    """Two "machines": sshds on 127.0.0.2 and 127.0.0.3, one port, each its own home (a run
    registry of its own) and its own client key."""
    port = sshd_mod.free_port()
    servers = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            home = tmp_path / f"home-{host}"
            home.mkdir()
            servers.append(sshd_mod.start(tmp_path / f"sshd-{host}", env={"HOME": str(home)},
                                          port=port, host=host))
        yield servers
    finally:
        for server in servers:
            sshd_mod.stop(server)


@pytest.mark.slow
def test_an_ssh_cluster_trains_like_one_box_and_its_workers_agree(tmp_path, sample, two_sshds):
    project = tmp_path / "ssh-cluster"
    project.mkdir()
    a, b = two_sshds
    up = up_ssh(project, a, b)
    assert up.returncode == 0, up.stderr
    nodes = json.loads((project / ".dlbox" / "state.json").read_text())["boxes"]
    assert [(n["node"], n["nodes"], n["address"]) for n in nodes] == [
        (0, 2, "127.0.0.2"), (1, 2, "127.0.0.3")]

    # The learnable sample; a global batch of 32 (16 a node), as the single box's below.
    train = dlbox(project, "train", "scratch", "--data", str(sample), *LEARN, "--batch-size",
                  "16", *FLAGS)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "on 2 nodes" in train.stdout
    run_dir = _only_run(project)
    for name in ("model.keras", "metrics.json", "history.csv", "report.html"):
        assert (run_dir / name).stat().st_size > 0, name
    record = json.loads((run_dir / "run.json").read_text())
    assert [n["address"].rsplit(":", 1)[0] for n in record["nodes"]] == ["127.0.0.2", "127.0.0.3"]
    assert _weights_of(run_dir / "status.json") == _weights_of(run_dir / "nodes/1/status.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2
    shards = []
    for status_file in (run_dir / "status.json", run_dir / "nodes" / "1" / "status.json"):
        status = json.loads(status_file.read_text())
        assert status["images_per_second"] > 0, status
        shards.append(status["shard_images"])
    assert sum(shards) == metrics["train_images"] and abs(shards[0] - shards[1]) <= 1
    report = (run_dir / "report.html").read_text()
    assert "<h2>Nodes</h2>" in report and "127.0.0.3:" in report and "images/s" in report
    # It learns, as one box does on the same data and global batch: a gradient reduction
    # that failed (each node on its own shard, a sum where a mean belongs) would not agree.
    single = _single_box_accuracy(tmp_path, sample, *LEARN, "--batch-size", "32")
    assert metrics["val_accuracy"] >= 0.75 and single >= 0.75, (metrics["val_accuracy"], single)
    assert abs(metrics["val_accuracy"] - single) <= 0.1, (metrics["val_accuracy"], single)

    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert json.loads((project / ".dlbox" / "state.json").read_text())["boxes"] == []


def test_cluster_flags_that_cannot_work_are_one_line(tmp_path):
    for args, needle in [
        (["--local", "--nodes", "0"], "--nodes 0: expected 1 to"),
        (["--ssh", "u@h1", "--ssh", "u@h2", "--key", "k1", "--key", "k2", "--key", "k3"],
         "3 --key for 2 --ssh"),
        (["--ssh", "u@h1", "--ssh", "u@h1", "--key", "/etc/hostname"], "the same --ssh"),
        (["--ssh", "u@h1", "--ssh", "u@h2", "--key", "/etc/hostname", "--nodes", "3"],
         "one node per --ssh"),
        (["--ssh", "u@h1", "--ssh", "u@h2", "--key", "/etc/hostname", "--node-address",
          "10.0.0.1"], "1 --node-address for 2 --ssh"),
        (["--ssh", "u@h1", "--ssh", "u@h2", "--key", "/etc/hostname", "--node-address",
          "10.0.0.1", "--node-address", "$(reboot)"], "expected an IP address or a host name"),
        (["--local", "--node-address", "10.0.0.1"], "--node-address is for SSH boxes"),
    ]:
        result = dlbox(tmp_path, "up", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (args, result.stderr)
    assert not (tmp_path / ".dlbox" / "state.json").exists()


def test_ssh_nodes_reach_each_other_at_the_addresses_given(tmp_path, two_sshds):
    """--node-address: a private network the nodes share, not the address dlbox logs in by."""
    a, b = two_sshds
    up = up_ssh(tmp_path, a, b, more=("--node-address", "10.1.0.7", "--node-address", "fd00::8"))
    assert up.returncode == 0, up.stderr
    nodes = json.loads((tmp_path / ".dlbox" / "state.json").read_text())["boxes"]
    assert [n["address"] for n in nodes] == ["10.1.0.7", "fd00::8"]
    moved = dlbox(tmp_path, "up", "--ssh", f"{a.user}@{a.host}:{a.port}", "--ssh",
                  f"{a.user}@127.0.0.4:{a.port}", "--key", str(a.client_key))
    assert moved.returncode == 2 and "`dlbox down` first" in moved.stderr
    assert dlbox(tmp_path, "down").returncode == 0


def test_a_local_cluster_is_taken_up_again_as_is_and_not_resized_silently(tmp_path):
    python = quick_python()
    assert up_local(tmp_path, "--nodes", "2", python=python).returncode == 0
    again = up_local(tmp_path, python=python)
    assert again.returncode == 0 and "2 nodes" in again.stdout
    resized = up_local(tmp_path, "--nodes", "3", python=python)
    assert resized.returncode == 2 and "`dlbox down` first" in resized.stderr
    records = json.loads((tmp_path / ".dlbox" / "state.json").read_text())["boxes"]
    assert sorted(r["name"] for r in records) == ["local", "local-1"]
    assert dlbox(tmp_path, "down").returncode == 0
    assert json.loads((tmp_path / ".dlbox" / "state.json").read_text())["boxes"] == []


def _ec2_cluster_training(directory: Path, env: dict, data: Path, epochs: int):
    """`up --spot --nodes 2`, then `train` (running, its output piped)."""
    up = subprocess.run([DLBOX, "up", "--spot", "--nodes", "2"], cwd=directory, env=env,
                        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    return subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data), "--epochs",
                             str(epochs), "--img-size", "64", "--batch-size", "2", "--patience",
                             "0"], cwd=directory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _node_1_reclaimed_mid_epoch(aws, boxes, directory: Path, proc) -> dict:
    """Once node 1 is mid-epoch after a checkpoint, EC2 takes it back without a word: the
    instance terminated first (dlbox, seeing the node fail, asks which nodes are gone and
    must hear this one), then its worker and sshd die. Returns the run's record then."""
    from tests import awsfakes
    from tests.test_spot import _instance_at, _wait

    record = _wait("node 1 to be mid-epoch after a checkpoint",
                   lambda: _ec2_mid_epoch(directory), proc)
    worker = Path(record["nodes"][1]["remote_dir"])
    awsfakes.reclaim(_instance_at(aws, boxes[1].host))
    os.killpg(int((worker / "run.pid").read_text()), signal.SIGKILL)
    sshd_mod.stop(boxes[1].sshd)
    return record


def _ec2_mid_epoch(directory: Path) -> dict | None:
    """The run's record once its chief is mid-epoch after a first checkpoint (else None)."""
    found = list((directory / "runs").glob("*/run.json"))
    if not found:
        return None
    record = json.loads(found[0].read_text())
    chief = Path(record["remote_dir"])
    try:
        state = json.loads((chief / "checkpoints" / "state.json").read_text())
        status = json.loads((chief / "status.json").read_text())
    except (OSError, ValueError):
        return None
    going = status.get("epoch", 0) > state.get("completed", 0) >= 1 and status.get("step")
    return record if going and record.get("nodes") else None


@pytest.mark.slow
def test_an_ec2_spot_cluster_replaces_a_reclaimed_node_and_finishes_on_every_node(
        spot, aws, small_sample):  # noqa: F811 (the fixture imported above)
    """EC2 through moto's server, each instance a loopback sshd (127.0.0.2, .3, then .4 for
    the replacement): node 1 dies without a word mid-epoch; dlbox replaces it in the same
    zone and placement group, resumes every node from the chief's checkpoint, and the run
    ends with every epoch once and the workers' weights equal. `down` leaves nothing."""
    from tests.test_spot import _reap

    project, boxes = spot
    directory, env = project
    proc = _ec2_cluster_training(directory, env, small_sample, 6)
    try:
        record = _node_1_reclaimed_mid_epoch(aws, boxes, directory, proc)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        _reap(proc)
    assert proc.returncode == 0, out + err
    assert "was lost at" in out and "replacing" in out and "resumed on 2 nodes" in out, out
    run_dir = _only_run(directory)
    for name in ("model.keras", "report.html", "metrics.json", "nodes/1/train.log"):
        assert (run_dir / name).stat().st_size > 0, name
    assert _history_epochs(run_dir) == [1, 2, 3, 4, 5, 6]
    final = json.loads((run_dir / "run.json").read_text())
    assert final["status"] == "done"
    assert final["nodes"][1]["box"] != record["nodes"][1]["box"]  # the new node took over
    # The node's loss is recorded as a single box's is: why, the work redone, what it cost.
    [lost] = final["interruptions"]
    assert lost["box"] == record["nodes"][1]["box"] and lost["spot"]
    assert "Server.SpotInstanceTermination" in lost["reason"]
    assert 0 < lost["work_lost_epochs"] <= 1 and lost["checkpoint_epochs"] >= 1
    assert lost["cost_usd"] is not None and lost["downtime_s"] is not None
    log = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    changes = [(e["kind"], e["node"], e.get("box")) for e in log
               if e["kind"] in ("started", "box-lost", "replaced", "resumed", "done")]
    assert changes == [("started", None, record["box"]), ("box-lost", 1, lost["box"]),
                       ("replaced", 1, final["nodes"][1]["box"]),
                       ("resumed", None, record["box"]), ("done", None, None)], changes
    assert "Timeline" in (run_dir / "report.html").read_text()
    assert final["nodes"][1]["address"].startswith("127.0.0.4:")
    assert _weights_of(run_dir / "status.json") == _weights_of(run_dir / "nodes/1/status.json")
    groups = aws.describe_placement_groups()["PlacementGroups"]
    instances = [i for r in aws.describe_instances()["Reservations"] for i in r["Instances"]
                 if i["State"]["Name"] == "running"]
    assert len(instances) == 2 and {i["Placement"].get("GroupName") for i in instances} == \
        {groups[0]["GroupName"]}  # the replacement joined the cluster's placement group

    down = subprocess.run([DLBOX, "down"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [i for r in aws.describe_instances()["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] not in ("terminated", "shutting-down")]
    assert aws.describe_placement_groups()["PlacementGroups"] == []


@pytest.mark.slow
def test_an_ec2_cluster_node_that_cannot_be_replaced_now_waits_for_attach(
        spot, aws, small_sample):  # noqa: F811 (the fixture imported above)
    """Node 1 is reclaimed mid-epoch and EC2 has no capacity for another: one line, exit 75,
    the chief's worker stopped, the loss recorded and the run waiting. `attach`: the next new
    node is taken back while it is set up and replaced again (the same recovery step as a
    single box's), every node resumes, and the run ends with every epoch once."""
    from tests import awsfakes
    from tests.test_spot import _reap

    project, boxes = spot
    directory, env = project
    proc = _ec2_cluster_training(directory, env, small_sample, 5)
    try:
        with awsfakes.ec2_errors(lambda kw: "InsufficientInstanceCapacity"):  # at replacement
            record = _node_1_reclaimed_mid_epoch(aws, boxes, directory, proc)
            out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        _reap(proc)
    assert proc.returncode == 75, out + err
    assert "was lost at" in out and "Server.SpotInstanceTermination" in out, out
    [line] = err.strip().splitlines()
    assert "no new box for run" in line and f"`dlbox attach {record['run_id']}` resumes" in line
    assert not _trainers_alive(directory.parent), "the chief's worker outlived the stopped run"
    run_dir = directory / "runs" / record["run_id"]
    waiting = json.loads((run_dir / "run.json").read_text())
    assert waiting["status"] == "interrupted" and len(waiting["interruptions"]) == 1
    assert waiting["interruptions"][0]["downtime_s"] is None  # it waits for a box
    chief_state = Path(record["remote_dir"]) / "checkpoints" / "state.json"
    done_before = json.loads(chief_state.read_text())["completed"]  # the chief keeps its own

    with awsfakes.reclaimed_at_launch(1):  # 127.0.0.4 is taken back as it is set up
        attach = subprocess.run([DLBOX, "attach", record["run_id"]], cwd=directory, env=env,
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert "did not become usable" in attach.stdout and "trying another" in attach.stdout
    assert f"resumed on 2 nodes from its checkpoint after {done_before} epoch(s)" \
        in attach.stdout, attach.stdout
    assert _history_epochs(run_dir) == [1, 2, 3, 4, 5]  # each epoch once
    final = json.loads((run_dir / "run.json").read_text())
    assert final["status"] == "done" and final["nodes"][1]["address"].startswith("127.0.0.5:")
    [lost] = final["interruptions"]
    assert lost["box"] == record["nodes"][1]["box"] and lost["downtime_s"] is not None
    assert _weights_of(run_dir / "status.json") == _weights_of(run_dir / "nodes/1/status.json")

    down = subprocess.run([DLBOX, "down"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [i for r in aws.describe_instances()["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] not in ("terminated", "shutting-down")]


def _bare_run(folder: Path):
    """A cluster run of one node whose folder is folder (for the worker commands alone)."""
    from orchestrator import runs

    node = {"node": 0, "box": "local", "remote_dir": str(folder), "address": "127.0.0.1:1",
            "code": "", "data": "", "test": None}
    return runs.Run(run_id="r", model="scratch", box="local", remote_dir=str(folder), args=[],
                    started_at=runs.now(), nodes=(node,))


def _state(machine, folder: Path) -> str:
    from orchestrator import cluster

    return machine.run(cluster.state_command(str(folder))).stdout.strip()


def test_a_worker_that_ignores_sigterm_is_killed_with_its_whole_group(tmp_path, monkeypatch):
    """run.sh dies at the first SIGTERM; a trainer blocked in an all-reduce does not: stop
    waits for the whole group, SIGKILLs what is left, and only then writes exit status 137."""
    from orchestrator import launch, runs
    from orchestrator.localbox import LocalBox
    from orchestrator.localmachine import LocalMachine

    monkeypatch.setattr(launch, "STOP_GRACE_S", 1)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.sh").write_text(
        f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); open(\"child\", \"w\").close(); time.sleep(600)' &\nwait\n")
    machine, box = LocalMachine(), LocalBox(name="local", workdir=str(tmp_path), python="")
    assert _state(machine, folder) == "starting"
    runs.start_script(box, machine, str(folder))
    deadline = time.monotonic() + 30
    while not (folder / "child").exists():
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    pgid = int((folder / "run.pid").read_text())
    assert _state(machine, folder) == "running"
    launch.stop(_bare_run(folder), [box], [machine])
    assert (folder / "exit_code").read_text().strip() == "137"
    assert _state(machine, folder) == "ended 137"
    listed = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True)
    alive = [line for line in listed.stdout.splitlines()
             if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]
    assert alive == []  # zombies wait for a reaper: nothing of the group runs


def _run_folder(tmp_path: Path, monkeypatch, setsid: str) -> Path:
    """A run's folder whose run.sh sleeps; setsid, on PATH, is the given sh script."""
    bin_dir, folder = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "setsid").write_text(f"#!/bin/sh\n{setsid}\n")
    (bin_dir / "setsid").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    folder.mkdir()
    (folder / "run.sh").write_text("sleep 600\n")
    return folder


def test_a_worker_killed_without_an_exit_status_is_gone_not_running(tmp_path, monkeypatch):
    """Running from the moment its start returns, however slowly its session begins (a starved
    box: setsid execs a second late here); gone once killed without an exit status."""
    from orchestrator import runs
    from orchestrator.localbox import LocalBox
    from orchestrator.localmachine import LocalMachine

    folder = _run_folder(tmp_path, monkeypatch,
                         f"sleep 1\nexec {shutil.which('setsid')} \"$@\"")
    machine, box = LocalMachine(), LocalBox(name="local", workdir=str(tmp_path), python="")
    runs.start_script(box, machine, str(folder))
    assert _state(machine, folder) == "running"
    os.killpg(int((folder / "run.pid").read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _state(machine, folder) != "gone":
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    assert _state(machine, tmp_path / "nothing") == "missing"


def test_a_run_whose_session_cannot_begin_is_gone_at_once(tmp_path, monkeypatch):
    """setsid fails: the start does not wait out its bound for a session that never comes."""
    from orchestrator import runs
    from orchestrator.localbox import LocalBox
    from orchestrator.localmachine import LocalMachine

    folder = _run_folder(tmp_path, monkeypatch, "exit 1")
    machine, box = LocalMachine(), LocalBox(name="local", workdir=str(tmp_path), python="")
    began = time.monotonic()
    runs.start_script(box, machine, str(folder))
    assert time.monotonic() - began < runs.SESSION_WAIT_TRIES * runs.SESSION_WAIT_POLL_S / 2
    assert _state(machine, folder) == "gone"


@pytest.mark.slow
def test_a_cancelled_cluster_run_outlives_lost_state_and_two_attach_at_once_resume_it_once(
        tmp_path, small_sample):
    """cancel stops every worker with a checkpoint; .dlbox/state.json is lost; `up` finds
    the nodes again; two `attach` at once: one resumes the run on both nodes, the other
    follows it; both end with it, every epoch once; a second `train` then runs whole."""
    project = tmp_path / "cluster"
    project.mkdir()
    python = quick_python()
    assert up_local(project, "--nodes", "2", python=python).returncode == 0
    scratch = ("train", "scratch", "--data", str(small_sample), *FLAGS)
    # Epochs of ~2 s (one image per replica and step): mid-epoch is seen between heartbeats.
    train = subprocess.Popen([DLBOX, *scratch, "--epochs", str(RESUMED_RUN_EPOCHS), "--batch-size", "1"],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        chief = _mid_epoch_with_a_checkpoint(project)[2]
        run_dir = _only_run(project)
        os.kill(chief, signal.SIGSTOP)  # the run cannot end before cancel's SIGTERM is there
        cancel = subprocess.Popen([DLBOX, "cancel", run_dir.name], cwd=project,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + KILL_WAIT_TIMEOUT_S
        while not _pending(chief) & (1 << (signal.SIGTERM - 1)):
            assert time.monotonic() < deadline and cancel.poll() is None, cancel.communicate()
            time.sleep(POLL_S)
        os.kill(chief, signal.SIGCONT)
        cancelled = cancel.communicate(timeout=CLI_TIMEOUT_S)
        out, err = train.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        train.kill()
    assert cancel.returncode == 0 and "interrupted on 2 nodes (exit 75)" in cancelled[0], \
        (cancelled, out, err)
    assert train.returncode == 75, out + err
    assert not _trainers_alive(project), "a worker outlived the cancelled run"
    done_before = len(_history_epochs(run_dir))
    assert 1 <= done_before < RESUMED_RUN_EPOCHS

    (project / ".dlbox" / "state.json").unlink()  # lost; the nodes' folders are not
    assert "no box is up" in dlbox(project, "status").stdout
    lost = dlbox(project, "attach", run_dir.name)
    assert lost.returncode != 0 and len(lost.stderr.strip().splitlines()) == 1, lost.stderr
    assert "`dlbox up`" in lost.stderr and "Traceback" not in lost.stderr
    assert up_local(project, "--nodes", "2", python=python).returncode == 0

    both = at_once(["attach", run_dir.name], project, timeout_s=CLI_TIMEOUT_S)
    assert [p.returncode for p in both] == [0, 0], both
    said = "".join(p.stdout for p in both)
    assert said.count(f"run {run_dir.name} resumed on 2 nodes") == 1, said
    assert _history_epochs(run_dir) == list(range(1, RESUMED_RUN_EPOCHS + 1))  # each epoch once
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    assert _weights_of(run_dir / "status.json") == _weights_of(run_dir / "nodes/1/status.json")

    again = dlbox(project, *scratch, "--epochs", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len([p for p in (project / "runs").iterdir() if p.is_dir()]) == 2
    assert dlbox(project, "down").returncode == 0 and not _trainers_alive(project)


def test_ctrl_c_before_every_worker_started_stops_the_run_and_lets_its_boxes_go(tmp_path,
                                                                                monkeypatch):
    """Ctrl-C while the run's results are being held, before any worker starts: the run is
    recorded failed (not "running" with nothing behind it), the boxes hold nothing of it,
    no worker is started, and the interrupt says which run it was."""
    from orchestrator import launch, registry, runs
    from orchestrator.localbox import LocalBox
    from orchestrator.localmachine import LocalMachine

    real_hold = runs.hold

    def hold_then_ctrl_c(*args, **kwargs):
        real_hold(*args, **kwargs)
        raise KeyboardInterrupt  # as a Ctrl-C held back through the step is acted on

    def never(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(runs, "hold", hold_then_ctrl_c)
    monkeypatch.setattr(runs, "start_script", never)
    project, folder = tmp_path / "proj", tmp_path / "box" / "runs" / "r"
    project.mkdir()
    folder.mkdir(parents=True)
    box = LocalBox(name="local", workdir=str(tmp_path / "box"), python=sys.executable)
    machine = LocalMachine()
    run = runs.Run(run_id="r", model="scratch", box="local", remote_dir=str(folder), args=[],
                   started_at=runs.now())
    team = [launch.Worker(0, "local", str(folder), "", str(tmp_path), str(tmp_path), None)]
    with pytest.raises(KeyboardInterrupt) as caught:
        launch.launch(project, run, [box], [machine], team, lambda line: None)
    assert caught.value.run.status == "failed"
    recorded = runs.load(project, "r")
    assert (recorded.status, recorded.exit_code, len(recorded.nodes)) == ("failed", 1, 1)
    assert registry.held_runs(machine, box.runs_registry()) == []
    assert [e.kind for e in runs.events_of(project, "r")] == ["failed"]
    assert not (folder / "run.pid").exists()
