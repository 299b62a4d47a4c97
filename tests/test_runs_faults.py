"""Runs under faults: ids taken on a shared box, flags dlbox owns, pulls during a run, damaged
records. Each drives the `dlbox` command as users do, against a real loopback sshd."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.runs import OWNED_FLAGS, SNAPSHOT_PREFIX
from orchestrator.sample import generate
from tests.cli import CLI_TIMEOUT_S, DLBOX, dlbox, up_ssh

POLL_S = 0.1
TAKEN_WINDOW_S = 300  # ids pre-taken on the box: well past when the runs reserve theirs
PULLS = 10
TINY_SET_IMAGES = 40
TRAIN_OPTIONS = ("--data", "--test")  # `dlbox train`'s own: never reach the trainer whole


def _up_ssh(project: Path, sshd, remote: Path) -> None:
    up = up_ssh(project, sshd, workdir=remote)
    assert up.returncode == 0, up.stdout + up.stderr


def _run_dirs(project: Path) -> list[Path]:
    runs = project / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def _one_line(result) -> str:
    """The one stderr line of a result (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _one_image(data: Path) -> Path:
    """A dataset folder in the Kaggle layout with one (unreadable) image: quick to ship."""
    (data / "train").mkdir(parents=True)
    (data / "train" / "cat.0.jpg").write_bytes(b"x")
    return data


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- issue 9, item 5: run ids unique on a box shared by several projects -------------------------

@pytest.mark.slow
def test_two_projects_on_one_ssh_box_each_get_their_own_run_folder(tmp_path, sshd):
    """Every id of the next minutes is already taken on the box (by another project's runs);
    two projects start `train` together: each reserves a folder of its own there, and pulls
    its own results, never the other's or the old runs'."""
    remote = tmp_path / "remote"
    projects = [tmp_path / "a", tmp_path / "b"]
    for seed, project in enumerate(projects):
        _up_ssh(project, sshd, remote)
        generate(project / "data", TINY_SET_IMAGES, test_n=0, seed=seed)  # a cache each
    now = datetime.now(timezone.utc)
    taken = []
    for second in range(-1, TAKEN_WINDOW_S):
        old = remote / "runs" / f"{now + timedelta(seconds=second):%Y%m%d-%H%M%S}-scratch"
        old.mkdir(parents=True)
        (old / "metrics.json").write_text('{"epochs_run": 99, "val_accuracy": 0.99}')
        (old / "exit_code").write_text("0\n")  # an old dlbox would "follow" this one
        taken.append(old)
    trains = [subprocess.Popen([DLBOX, "train", "scratch", "--data", str(project / "data"),
                                "--epochs", "1", "--img-size", "32"], cwd=project,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for project in projects]
    outputs = [train.communicate(timeout=CLI_TIMEOUT_S) for train in trains]
    for train, (out, err) in zip(trains, outputs, strict=True):
        assert train.returncode == 0, out + err

    folders = []
    for project in projects:
        [run] = _run_dirs(project)  # the id skipped here left no folder behind
        record = json.loads((run / "run.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs_run"] == 1 and metrics["arguments"]["out"] == record["remote_dir"]
        assert metrics["arguments"]["data"].startswith(str(remote / "data" / "data-"))
        assert Path(record["remote_dir"]).parent == remote / "runs"
        folders.append(record["remote_dir"])
    assert folders[0] != folders[1] and not set(folders) & {str(p) for p in taken}
    for old in taken:  # nobody wrote into another project's run
        assert sorted(p.name for p in old.iterdir()) == ["exit_code", "metrics.json"], old


def test_a_run_folder_the_box_cannot_make_is_one_line_and_leaves_nothing_here(tmp_path, sshd):
    project, remote = tmp_path / "proj", tmp_path / "remote"
    _up_ssh(project, sshd, remote)
    data = _one_image(tmp_path / "data")
    shutil.rmtree(remote / "runs", ignore_errors=True)
    (remote / "runs").write_text("a file where dlbox's runs folder belongs")
    result = dlbox(project, "train", "scratch", "--data", str(data), "--epochs", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    line = _one_line(result)
    assert "could not make the run's folder" in line and str(remote / "runs") in line, line
    assert _run_dirs(project) == []  # the id reserved here is given back


# --- issue 9, item 7: flags dlbox owns -----------------------------------------------------------

def test_trainer_flags_dlbox_owns_are_refused_before_anything_is_reserved(tmp_path, sshd):
    """--out X, --out=X and an abbreviation argparse would take (--ou X) for each owned flag
    (--data and --test whole are `train`'s own): exit 2, one line; nothing on the box changes
    and no runs/<id>/ is left here."""
    project, remote = tmp_path / "proj", tmp_path / "remote"
    _up_ssh(project, sshd, remote)
    data = _one_image(tmp_path / "data")
    before = _tree(remote)
    for flag in OWNED_FLAGS:
        whole = [] if flag in TRAIN_OPTIONS else [[flag, "/tmp/x"], [f"{flag}=/tmp/x"]]
        for given in [*whole, [flag[:-1], "/tmp/x"], [f"{flag[:-1]}=/tmp/x"]]:
            result = dlbox(project, "train", "scratch", "--data", str(data), "--epochs", "1",
                           *given)
            assert result.returncode == 2, (given, result.stdout, result.stderr)
            line = _one_line(result)
            assert f"{flag} is set by dlbox" in line or f"means {flag} to the trainer" in line
            assert f"drop {given[0].split('=')[0]} from the trainer flags" in line, line
            assert result.stdout == "", result.stdout  # nothing said: nothing started
    assert _tree(remote) == before  # no code, data or run folder shipped or reserved
    assert _run_dirs(project) == []


# --- issue 9, item 9: a pull while the run goes on -----------------------------------------------

@pytest.mark.slow
def test_pulls_while_a_run_trains_are_consistent_snapshots(tmp_path, sshd, small_sample):
    """`dlbox pull` ten times while the trainer rewrites its files: each pull succeeds, says
    the run is still going, and brings files that are whole; no snapshot stays on the box."""
    project, remote = tmp_path / "proj", tmp_path / "remote"
    _up_ssh(project, sshd, remote)
    # Tiny epochs: history.csv and train.log change several times a second, as pulls read them.
    train = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(small_sample),
                              "--epochs", "2000", "--patience", "0", "--img-size", "32",
                              "--batch-size", "8", "--limit", "48"], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not list((remote / "runs").glob("*/history.csv")):  # an epoch has finished
        assert train.poll() is None and time.monotonic() < deadline, train.communicate()
        time.sleep(POLL_S)
    train.send_signal(signal.SIGINT)  # detach: the run goes on, pulled by hand below
    out, err = train.communicate(timeout=CLI_TIMEOUT_S)
    assert "goes on" in out, out + err
    [run] = _run_dirs(project)
    box_dir = remote / "runs" / run.name
    try:
        for n in range(PULLS):
            pull = dlbox(project, "pull", run.name)
            assert pull.returncode == 0, (n, pull.stdout, pull.stderr)
            assert f"run {run.name} is still going; pulled a snapshot" in pull.stdout, pull.stdout
            rows = list(csv.DictReader(io.StringIO((run / "history.csv").read_text())))
            assert rows and all(float(row["val_loss"]) >= 0 for row in rows), rows
            json.loads((run / "status.json").read_text())  # whole JSON
            assert not list(box_dir.glob(f"{SNAPSHOT_PREFIX}*")), n
    finally:
        cancel = dlbox(project, "cancel", run.name)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "still going" not in cancel.stdout  # its final pull is the run's last word
    assert not list(box_dir.glob(f"{SNAPSHOT_PREFIX}*"))
    assert not list(run.glob(".*.part"))


def test_a_pull_sweeps_stale_snapshots_and_a_vanished_folder_is_one_line(tmp_path, sshd):
    """A snapshot left by a pull cut off long ago is removed by the next pull; one of a pull
    going on now stays; the same for part files here. A run whose folder is gone from the box:
    exit 1, one line."""
    project, remote = tmp_path / "proj", tmp_path / "remote"
    _up_ssh(project, sshd, remote)
    box_dir = remote / "runs" / GOOD_RUN["run_id"]
    box_dir.mkdir(parents=True)
    (box_dir / "history.csv").write_text("epoch,loss\n1,0.5\n")
    (box_dir / "exit_code").write_text("0\n")
    stale, live = box_dir / f"{SNAPSHOT_PREFIX}stale1", box_dir / f"{SNAPSHOT_PREFIX}live1"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "history.csv").write_text("old")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    run = project / "runs" / GOOD_RUN["run_id"]
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({  # pulled once already: a pull copies it again
        **GOOD_RUN, "remote_dir": str(box_dir), "box": f"{sshd.user}@{sshd.host}:{sshd.port}",
        "status": "done", "exit_code": 0, "finished_at": "2026-12-01T00:01:00+00:00"}))
    partial = project / ".dlbox" / "partial"  # downloads grow here, never in runs/
    partial.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = partial / f"{dead.pid}.{run.name}.model.keras.x1.part"  # a SIGKILLed pull's
    going = partial / f"{os.getpid()}.{run.name}.model.keras.x2.part"  # a pull going on now
    for part in (killed, going):
        part.write_bytes(b"half a model")
    pull = dlbox(project, "pull", run.name)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert "still going" not in pull.stdout  # it has ended: what was pulled is final
    assert not killed.exists() and going.exists()
    assert (run / "history.csv").read_text() == "epoch,loss\n1,0.5\n"
    assert sorted(p.name for p in box_dir.iterdir()) == sorted(["exit_code", "history.csv", live.name])

    shutil.rmtree(box_dir)
    gone = dlbox(project, "pull", run.name)
    assert gone.returncode == 1 and "is gone from the box" in _one_line(gone), gone.stderr
    assert (run / "history.csv").exists()  # what was pulled stays


# --- issue 9, item 15: damaged records -----------------------------------------------------------

@dataclass(frozen=True)
class Checked:
    """A record with one field of each kind records checks."""

    name: str
    count: int
    rate: float
    on: bool
    tags: list[str]
    types: tuple[str, ...]
    note: str | None = None
    sizes: dict[str, int] | None = None


CHECKED = {"name": "n", "count": 1, "rate": 2, "on": False, "tags": ["a"], "types": ["t", "u"]}


def test_records_checks_each_field_against_its_type():
    """JSON's shapes where Python's are meant: an int is a float, a list a tuple, never a
    bool an int; unknown keys (a newer dlbox's) are ignored; the message names the field."""
    from orchestrator import records

    built = records.build(Checked, {**CHECKED, "newer": 1, "sizes": {"a": 1}})
    assert built == Checked("n", 1, 2, False, ["a"], ("t", "u"), None, {"a": 1})
    for damage, message in [
        ({"count": True}, "field 'count': expected int, got bool True"),
        ({"count": 1.5}, "field 'count': expected int, got float 1.5"),
        ({"rate": "2"}, "field 'rate': expected float, got str '2'"),
        ({"on": 0}, "field 'on': expected bool, got int 0"),
        ({"tags": ["a", 1]}, "field 'tags': expected list of str, got list ['a', 1]"),
        ({"types": "tu"}, "field 'types': expected list of str, got str 'tu'"),
        ({"note": 3}, "field 'note': expected str or null, got int 3"),
        ({"sizes": {"a": "1"}}, "field 'sizes': expected object of int or null"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            records.build(Checked, {**CHECKED, **damage})
    with pytest.raises(ValueError, match="field 'count' is missing"):
        records.build(Checked, {k: v for k, v in CHECKED.items() if k != "count"})
    with pytest.raises(ValueError, match=r"expected an object with Checked's fields, got list"):
        records.build(Checked, [CHECKED])


SSH_RECORD = {"kind": "ssh", "name": "u@h:22", "host": "h", "port": 22, "user": "u",
              "key_path": "/k", "workdir": "/w", "python": "/p"}
EC2_RECORD = {"kind": "ec2", "name": "box", "region": "us-east-1", "profile": None,
              "key_name": "k", "key_path": "/k", "security_group_id": "sg-1",
              "ssh_user": "ubuntu", "ssh_port": 22, "idle_minutes": 30,
              "max_lifetime_minutes": 0}
GOOD_RUN = {"run_id": "20261201-000000-scratch", "model": "scratch", "box": "u@h:22",
            "remote_dir": "/w/runs/20261201-000000-scratch", "args": ["scratch"],
            "started_at": "2026-12-01T00:00:00+00:00"}


@pytest.mark.parametrize(("state", "named"), [
    ({"version": 2, "boxes": [{**SSH_RECORD, "port": "22x"}]}, "'port': expected int, got str"),
    ({"version": 2, "boxes": [{**EC2_RECORD, "ssh_port": "22x"}]}, "'ssh_port': expected int"),
    ({"version": 2, "boxes": [{**SSH_RECORD, "python": None}]}, "'python': expected str, got null"),
    ({"version": 2, "boxes": [{**EC2_RECORD, "spot": "yes"}]}, "'spot': expected bool"),
    ({"version": 2, "boxes": [{k: v for k, v in SSH_RECORD.items() if k != "host"}]},
     "'host' is missing"),
    ({"version": 2, "boxes": {}}, '"boxes": expected a list, got {}'),
    ({"version": 2, "boxes": [["ssh", "u@h:22"]]}, 'a box record is ["ssh"'),
], ids=["port", "ssh_port", "null", "bool", "missing", "boxes-dict", "record-list"])
def test_a_damaged_state_file_is_one_line_naming_the_field_and_the_fix(tmp_path, state, named):
    """status, down, attach and train: exit 2, one line naming what is wrong and the fix
    (not `down --all`, which would end every project's instances in the region)."""
    (tmp_path / ".dlbox").mkdir()
    (tmp_path / ".dlbox" / "state.json").write_text(json.dumps(state))
    run = tmp_path / "runs" / GOOD_RUN["run_id"]
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(GOOD_RUN))
    for command in (["status"], ["down"], ["attach", run.name], ["train", "scratch", "--data",
                                                                 str(tmp_path)]):
        result = dlbox(tmp_path, *command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        line = _one_line(result)
        assert named in line and "state.json" in line, (command, line)
        assert "restore it, or move" in line and "run `dlbox down`" in line, line
        assert "--all" not in line, line


@pytest.mark.parametrize(("damage", "named"), [
    ({"started_at": 5}, "'started_at': expected str, got int 5"),
    ({"args": "x"}, "'args': expected list of str, got str 'x'"),
    ({"exit_code": True}, "'exit_code': expected int or null, got bool"),
    ({"run_id": None}, "'run_id': expected str, got null"),
], ids=["started_at", "args", "exit_code", "run_id"])
def test_a_damaged_run_record_is_skipped_by_runs_and_one_line_elsewhere(tmp_path, damage, named):
    """`dlbox runs` lists the others and warns in one line; attach and pull of it: exit 2,
    one line naming the field."""
    good = tmp_path / "runs" / GOOD_RUN["run_id"]
    bad = tmp_path / "runs" / "20261202-000000-scratch"
    for folder, record in ((good, GOOD_RUN), (bad, {**GOOD_RUN, "run_id": bad.name,
                                                    "started_at": "2026-12-02T00:00:00+00:00",
                                                    **damage})):
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(record))
    listing = dlbox(tmp_path, "runs")
    assert listing.returncode == 0, listing.stderr
    warning = _one_line(listing)
    assert warning.startswith("dlbox: warning: skipped") and str(bad) in warning, warning
    assert named in warning, warning
    rows = [line.split("\t")[0] for line in listing.stdout.splitlines()]
    assert rows == ["run", good.name]
    for command in ("attach", "pull"):
        result = dlbox(tmp_path, command, bad.name)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        line = _one_line(result)
        assert named in line and str(bad / "run.json") in line, line


def test_a_run_record_that_is_not_an_object_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "runs" / "20261202-000000-scratch"
    run.mkdir(parents=True)
    for raw in (b"[1, 2]", b"{not json", b"\xff"):
        (run / "run.json").write_bytes(raw)
        listing = dlbox(tmp_path, "runs")
        assert listing.returncode == 0 and listing.stdout.splitlines()[1:] == [], listing.stdout
        assert str(run) in _one_line(listing)
