"""`dlbox down` never loses results or a user's files: runs going are ended only when asked,
ended runs are pulled first, and --purge deletes only what dlbox made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import CLI_TIMEOUT_S, DLBOX, dlbox, up_local, up_ssh

POLL_S = 0.1


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def _started_then_dlbox_killed(project: Path, remote_runs: Path, data: Path, *flags: str) -> Path:
    """A run started by `dlbox train`, whose dlbox then died (the run goes on); its remote folder."""
    before = set(remote_runs.glob("*")) if remote_runs.exists() else set()
    proc = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data), "--img-size", "32",
                             *flags], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _until(lambda: any((p / "status.json").exists() for p in
                           set(remote_runs.glob("*")) - before), "the run's start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [remote] = set(remote_runs.glob("*")) - before
    return remote


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: it only waits for its parent to read its status.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


@pytest.mark.slow
def test_down_pulls_ended_runs_and_ends_runs_going_only_when_asked(tmp_path, small_sample):
    """Three runs nobody followed to the end: one ended, one killed with its box's power (no
    exit status), one still going. `down` pulls the first two, then asks about the third;
    `train --down-after` asks the same; `down --yes` ends it."""
    project = tmp_path / "proj"
    project.mkdir()
    assert up_local(project).returncode == 0
    box = project / ".dlbox" / "local-box"
    ended = _started_then_dlbox_killed(project, box / "runs", small_sample, "--epochs", "1")
    killed = _started_then_dlbox_killed(project, box / "runs", small_sample, "--epochs", "500",
                                        "--patience", "0")
    os.killpg(int((box / "active" / f"{killed.name}.pid").read_text()), signal.SIGKILL)
    going = _started_then_dlbox_killed(project, box / "runs", small_sample, "--epochs", "500",
                                       "--patience", "0")
    trainer = json.loads((going / "status.json").read_text())["pid"]
    _until(lambda: (ended / "exit_code").exists(), "the short run's end")  # while the others start

    refused = dlbox(project, "down")  # no terminal to ask at: --yes is needed
    _one_line_error(refused, f"run(s) {going.name} still going", f"dlbox attach {going.name}",
                    "dlbox down --yes")
    assert f"run {ended.name} had ended (done); its results are pulled" in refused.stdout
    assert f"run {killed.name} was killed before it ended (failed)" in refused.stdout
    for run, status in ((ended, "done"), (killed, "failed")):
        record = json.loads((project / "runs" / run.name / "run.json").read_text())
        assert record["status"] == status and record["finished_at"]
    assert (project / "runs" / ended.name / "model.keras").exists()
    assert (project / "runs" / killed.name / "train.log").exists()  # what it had written
    assert _alive(trainer) and going.exists()  # nothing of the run going was touched

    after = dlbox(project, "train", "scratch", "--data", str(small_sample), "--epochs", "1",
                  "--img-size", "32", "--down-after")
    _one_line_error(after, f"run(s) {going.name} still going", "dlbox down --yes")
    assert _alive(trainer) and going.exists()

    down = dlbox(project, "down", "--yes")
    assert down.returncode == 0, down.stderr
    assert f"stopped run(s) {going.name}" in down.stdout
    assert not _alive(trainer) and not box.exists()
    assert "no box is up" in dlbox(project, "status").stdout
    assert json.loads((project / "runs" / going.name / "run.json").read_text())["status"] == "lost"
    assert "lost with its box" in dlbox(project, "runs").stdout


@pytest.mark.slow
def test_purge_deletes_only_what_dlbox_made_in_the_workdir(tmp_path, sshd, small_sample):
    """--workdir may be a folder of the user's (their home, say): their files stay."""
    project, remote = tmp_path / "proj", tmp_path / "home"
    project.mkdir()
    (remote / "data").mkdir(parents=True)
    (remote / "notes.txt").write_text("mine\n")
    (remote / "data" / "mine.csv").write_text("also mine\n")
    up = up_ssh(project, sshd, workdir=remote)
    assert up.returncode == 0, up.stderr
    train = dlbox(project, "train", "scratch", "--data", str(small_sample), "--epochs", "1",
                  "--img-size", "32")
    assert train.returncode == 0, train.stdout + train.stderr

    (remote / "unpulled" / "20261129-000000-theirs").touch()  # another project's results
    refused = dlbox(project, "down", "--purge")
    _one_line_error(refused, "also holds runs of other projects (20261129-000000-theirs)",
                    "`dlbox down` without --purge")
    (remote / "unpulled" / "20261129-000000-theirs").unlink()

    down = dlbox(project, "down", "--purge")
    assert down.returncode == 0, down.stderr
    assert "kept what it did not make: data, the folder" in down.stdout
    assert (remote / "notes.txt").read_text() == "mine\n"
    assert (remote / "data" / "mine.csv").read_text() == "also mine\n"
    assert sorted(p.name for p in remote.iterdir()) == ["data", "notes.txt"]  # runs, code... gone
    assert next((project / "runs").iterdir()).joinpath("model.keras").exists()


def test_purge_of_a_folder_dlbox_made_leaves_nothing(tmp_path, sshd):
    project, remote = tmp_path / "proj", tmp_path / "fresh" / "dlbox"
    project.mkdir()
    up = up_ssh(project, sshd, workdir=remote)
    assert up.returncode == 0, up.stderr
    down = dlbox(project, "down", "--purge")
    assert down.returncode == 0, down.stderr
    assert not remote.exists() and "kept" not in down.stdout
