"""Issue 17 on an EC2 box (moto's server over HTTP, the box a loopback sshd): Ctrl-C right
after a run starts, `down` after runs/ was moved away, a stopped box counted as lost, an
unknown price, and checks that need no box made before anything is launched. The runs are
the stand-in trainer of tests/test_untrusted_box.py (a shell script)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_cli_ec2 import (
    CLI_TIMEOUT_S,
    DLBOX,
    _instances,
    _one_line_error,
    _shutdown_behaviour,
    _state,
    _tagged,
    dlbox,
    project,  # noqa: F401 - the fixture
)
from tests.test_untrusted_box import Scene, _set_python, _trainers, _until

DELAYS_S = (0.02, 0.05, 0.08)  # after "started on": where the review's Ctrl-C landed


@pytest.fixture(autouse=True)
def _no_run_left(tmp_path):
    """The stand-ins a test started (runs outlive dlbox) end with it, failed or not."""
    yield
    Scene.end_runs(SimpleNamespace(root=tmp_path))


def _scene(project_, tmp_path: Path, *up_args: str) -> Scene:
    """`up` on EC2, then the box trains with the stand-in."""
    directory, _ = project_
    up = dlbox(project_, "up", *up_args)
    assert up.returncode == 0, up.stdout + up.stderr
    scene = Scene(tmp_path / "scene", workdir=Path(_state(directory)["workdir"]))
    scene.project = directory  # the EC2 project, not the scene's own
    _set_python(directory, scene.python)
    return scene


def _start(project_, scene: Scene) -> subprocess.Popen:
    directory, env = project_
    return subprocess.Popen([DLBOX, "train", "scratch", "--data", str(scene.data)],
                            cwd=directory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _detached(project_, scene: Scene) -> str:
    """A waiting run, detached once it runs; its id."""
    proc = _start(project_, scene)
    run_id = _new_run(scene, proc, "status.json")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130 and f"`dlbox attach {run_id}`" in out + err, out + err
    return run_id


def _new_run(scene: Scene, proc: subprocess.Popen, file: str) -> str:
    """The id of the run proc starts, once its folder on the box has file (the box's runs/
    also holds other tests' runs)."""
    before = {p.name for p in scene.box_runs()}

    def started() -> list[Path]:
        return [p for p in scene.box_runs() if p.name not in before and (p / file).exists()]

    _until(started, "the run's start", proc)
    return started()[-1].name


def _end(scene: Scene, run_id: str) -> None:
    """The stand-in told to stop (75); run.sh writes that down."""
    for pid in _trainers(scene.run_group(run_id)):
        os.kill(pid, signal.SIGTERM)
    _until(lambda: (scene.workdir / "runs" / run_id / "exit_code").exists(), "the run's end")


def test_ctrl_c_just_after_the_start_never_leaves_results_unheld(project, aws, tmp_path):  # noqa: F811
    """SIGINT 0.02, 0.05 and 0.08 s after "started on": each time the box is set to stop (not
    terminate) on a power-off while the run holds results, and dlbox exits 130 naming
    `dlbox attach RUN`. Once every run is pulled, it is set to terminate again."""
    scene = _scene(project, tmp_path)
    instance = _state(project[0])["instance_id"]
    assert _shutdown_behaviour(aws, instance) == "terminate"
    started = []
    for delay in DELAYS_S:
        scene.good(wait=True)
        before = {p.name for p in scene.box_runs()}
        proc = _start(project, scene)
        for line in proc.stdout:
            if "started on" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        [run_id] = [p.name for p in scene.box_runs() if p.name not in before]
        assert proc.returncode == 130, out + err
        assert f"`dlbox attach {run_id}`" in out + err and "Traceback" not in err, out + err
        assert _shutdown_behaviour(aws, instance) == "stop", delay
        started.append(run_id)
    for run_id in started:
        cancel = dlbox(project, "cancel", run_id)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert _shutdown_behaviour(aws, instance) == "terminate"
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_down_pulls_runs_the_box_holds_after_runs_was_moved_away(project, aws, tmp_path):  # noqa: F811
    """Two runs that ended unpulled, then `mv runs elsewhere`: `down` records both again from
    the box and pulls them before it terminates the instance."""
    directory, _ = project
    scene = _scene(project, tmp_path)
    ids = []
    for _ in range(2):
        scene.good(wait=True)
        ids.append(_detached(project, scene))
        _end(scene, ids[-1])
    shutil.move(directory / "runs", tmp_path / "elsewhere")
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for run_id in ids:
        assert f"run {run_id} had ended (interrupted)" in down.stdout
        assert (directory / "runs" / run_id / "model.keras").read_text() == "a model"
    assert _tagged(aws) == []


def test_a_box_stopped_under_a_run_is_a_loss_and_attach_resumes_there(project, aws, tmp_path):  # noqa: F811
    """The instance stopped (the console) while `train` follows: one line, exit 75, the loss
    recorded (why, in EC2's words); `attach` starts the same instance again and the run
    goes on there to its end."""
    directory, _ = project
    scene = _scene(project, tmp_path)
    instance = _state(directory)["instance_id"]
    scene.good(wait=True)
    proc = _start(project, scene)
    run_id = _new_run(scene, proc, "run.pid")
    aws.stop_instances(InstanceIds=[instance])  # EC2 first, then the box powers off
    os.killpg(scene.run_group(run_id), signal.SIGKILL)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 75,
                    f"`dlbox attach {run_id}`")
    assert "is stopped" in out, out
    record = json.loads((directory / "runs" / run_id / "run.json").read_text())
    [lost] = record["interruptions"]
    assert lost["instance"] == instance and "stopped" in lost["reason"]
    assert lost["cost_usd"] is not None
    scene.good()  # the resumed run ends at once
    attach = dlbox(project, "attach", run_id)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert "starting it" in attach.stdout and "resumed on the EC2 box" in attach.stdout
    assert _state(directory)["instance_id"] == instance  # the same box, started again
    record = json.loads((directory / "runs" / run_id / "run.json").read_text())
    assert record["status"] == "done" and record["interruptions"][0]["downtime_s"] is not None
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_an_unpriced_instance_type_costs_unknown_not_nothing(project, aws, tmp_path):  # noqa: F811
    directory, _ = project
    scene = _scene(project, tmp_path, "-t", "p4d.24xlarge")
    scene.good()
    train = dlbox(project, "train", "scratch", "--data", str(scene.data))
    assert train.returncode == 0, train.stdout + train.stderr
    [run] = [p for p in (directory / "runs").iterdir() if p.is_dir()]
    report = (run / "report.html").read_text()
    assert "unknown (no price for its instance type)" in report
    assert "nothing (own machine)" not in report
    instance = _state(directory)["instance_id"]
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert f"{instance} terminated; its cost is unknown" in down.stdout


def test_checks_that_need_no_box_come_before_any_launch(project, aws):  # noqa: F811
    directory, _ = project
    settings = "".join(line + "\n" for line in (directory / "dlbox.toml").read_text().splitlines()
                       if not line.startswith("box_workdir"))
    for line, needle in (("idle_minutes = 10000000000", "idle_minutes must be 0 (off) to"),
                         ("max_lifetime_minutes = -1", "max_lifetime_minutes must be 0"),
                         ('box_workdir = "/tmp/a\\nb"', "a control character")):
        (directory / "dlbox.toml").write_text(settings + line + "\n")
        _one_line_error(dlbox(project, "up"), 2, needle)
    assert _instances(aws) == [] and _instances(aws, ["terminated"]) == []
