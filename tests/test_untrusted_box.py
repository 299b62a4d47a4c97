"""The box is not trusted (issue 17): what a hostile, broken or full box leaves in a run's
files never reaches this machine's disk or terminal unchecked, and no run is followed forever.

The runs here are a stand-in trainer (a shell script, no TensorFlow): it writes the files a
test gives it into the run's folder, as a hostile box could, and exits as told. Everything
else is real: the dlbox command, run.sh, OpenSSH on loopback, this machine's processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import sshd as sshd_mod
from tests.cli import DLBOX, dlbox, up_local, up_ssh
from tests.disks import needs_root, small_disk

WAIT_S = 120  # for anything that should happen much sooner
POLL_S = 0.05
ESC, BEL = "\x1b", "\x07"
RUN_FILE_NAMES = ("status.json", "history.csv", "metrics.json", "train.log", "stdout.log",
                  "model.keras")
GOOD_STATUS = {"state": "done", "phase": "evaluating", "epoch": 1, "epochs": 1}
GOOD_HISTORY = ("epoch,phase,loss,accuracy,val_loss,val_accuracy,learning_rate,seconds,"
                "images_per_second\n1,training,0.69,0.51,0.68,0.55,0.001,3.0,120\n")
GOOD_METRICS = {"val_accuracy": 0.55, "val_loss": 0.68, "best_epoch": 1, "epochs_run": 1}
# What a stand-in trainer does: copy its scene into --out, then exit (or wait for a signal).
STANDIN = """#!/bin/bash
out=; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
cd "$out" || exit 1
echo "{\\"state\\": \\"running\\", \\"phase\\": \\"starting\\", \\"pid\\": $$}" > status.json
cp -a {scene}/. . 2>/dev/null
[ -f fill.sh ] && exec bash fill.sh  # a scene that fills the disk and exits as it says
if [ -f .wait ]; then  # a live run: SIGTERM is a checkpoint and 75, as the real trainer
    trap 'echo stopped > stopped-by-signal; exit 75' TERM
    while :; do sleep 0.1; done
fi
exit "$(cat .code 2>/dev/null || echo 0)"
"""


def _until(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dlbox ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(POLL_S)


def _no_traceback(result) -> None:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text


def _set_python(project: Path, python: Path) -> None:
    """The box's interpreter (as `up` recorded it) replaced by the stand-in's wrapper."""
    state_file = project / ".dlbox" / "state.json"
    state = json.loads(state_file.read_text())
    for box in state["boxes"]:
        box["python"] = str(python)
    state_file.write_text(json.dumps(state))


class Scene:
    """A project whose box trains with the stand-in; scene() gives its next run's files."""

    def __init__(self, root: Path, workdir: Path | None = None) -> None:
        self.root, self.project = root, root / "proj"
        self.project.mkdir(parents=True)
        self.files = root / "scene"
        self.files.mkdir()
        self.data = root / "data"
        (self.data / "train").mkdir(parents=True)
        (self.data / "train" / "cat.0.jpg").write_bytes(b"x")
        self.workdir = workdir
        trainer = root / "standin.sh"
        trainer.write_text(STANDIN.replace("{scene}", shlex.quote(str(self.files))))
        self.python = root / "python"
        self.python.write_text(f"#!/bin/bash\nif [ \"$1\" = -m ] && [ \"$2\" = trainer ]; then "
                               # "-m trainer" stays in its command line, as the real one's
                               f"exec bash {shlex.quote(str(trainer))} \"$@\"; fi\n"
                               f'exec {shlex.quote(sys.executable)} "$@"\n')
        self.python.chmod(0o755)

    def scene(self, code: int = 0, wait: bool = False, **files: str | bytes) -> None:
        """The next run's files (name=content); code: its exit status; wait: it runs until
        SIGTERM (75) or a kill."""
        for old in self.files.iterdir():
            old.unlink()
        for name, content in files.items():
            path = self.files / name.replace("__", ".")
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        (self.files / ".code").write_text(str(code))
        if wait:
            (self.files / ".wait").write_text("")

    def good(self, code: int = 0, wait: bool = False, **files) -> None:
        """A run's usual files, with those given instead."""
        usual = {"status__json": json.dumps(GOOD_STATUS), "history__csv": GOOD_HISTORY,
                 "metrics__json": json.dumps(GOOD_METRICS), "model__keras": "a model",
                 "train__log": "2026-12-07 10:00:00 INFO started\n"}
        self.scene(code, wait, **{**usual, **files})

    def train(self, *args: str, env: dict | None = None):
        return dlbox(self.project, "train", "scratch", "--data", str(self.data), *args, env=env)

    def start_train(self, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([DLBOX, "train", "scratch", "--data", str(self.data)],
                                cwd=self.project, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})

    def runs(self) -> list[Path]:
        found = self.project / "runs"
        return sorted(p for p in found.iterdir() if p.is_dir()) if found.is_dir() else []

    def box_runs(self) -> list[Path]:
        found = self.box_workdir() / "runs"
        return sorted(p for p in found.iterdir() if p.is_dir()) if found.is_dir() else []

    def box_workdir(self) -> Path:
        return self.workdir or self.project / ".dlbox" / "local-box"

    def detached(self) -> str:
        """Start a waiting run with `train`, detach with Ctrl-C once it runs; its id."""
        train = self.start_train()
        _until(lambda: self.box_runs() and (self.box_runs()[-1] / "status.json").exists(),
               "the run's start", train)
        train.send_signal(signal.SIGINT)
        out, err = train.communicate(timeout=WAIT_S)
        run_id = self.box_runs()[-1].name
        # Detached while following, or just before: the same hint either way.
        assert train.returncode == 130 and f"`dlbox attach {run_id}`" in out + err, out + err
        return run_id

    def run_group(self, run_id: str) -> int:
        return int((self.box_workdir() / "runs" / run_id / "run.pid").read_text())

    def end_runs(self) -> None:
        """SIGKILL the groups of the stand-ins this scene started (detached runs outlive dlbox
        by design; a test that failed midway may leave one waiting)."""
        mine = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes()
                pgid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
            except (OSError, ValueError, IndexError):
                continue
            if b"standin.sh" in argv and mine in argv:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)


@pytest.fixture()
def local(tmp_path):
    scene = Scene(tmp_path)
    up = up_local(scene.project)
    assert up.returncode == 0, up.stderr
    _set_python(scene.project, scene.python)
    try:
        yield scene
    finally:
        scene.end_runs()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _trainers(pgid: int) -> list[int]:
    """The stand-in trainers in a run's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[2]) == pgid and b"standin.sh" in argv:
                found.append(int(entry.name))
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _until(lambda: not _group_alive(pgid), "the run's processes to end")


# --- item 1: a pull writes only inside its run ------------------------------------------------

HOSTILE_STAT = """#!/bin/bash
# A compromised box: its stat adds lines naming files dlbox never asked for to the listing of
# a pull (in the listing's own format), then answers as usual.
[ "$*" = "-c %s -- model.keras" ] && printf '5 %s %s\\n' {digest} {secret} {digest} ../../evil.txt
exec /usr/bin/stat "$@"
"""


def test_a_hostile_box_listing_paths_cannot_write_outside_the_run(tmp_path):
    """The box's stat adds an absolute path (the laptop's authorized_keys) and a ../ name to
    the listing of a pull: both are refused in one line each, neither file is written, a
    link in the run's folder is not followed, and the real results arrive."""
    import hashlib

    laptop = tmp_path / "laptop-home" / ".ssh"
    laptop.mkdir(parents=True)
    keys = laptop / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAA mine\n")
    tools = tmp_path / "hostile-bin"
    tools.mkdir()
    digest = hashlib.sha256(b"evil\n").hexdigest()
    (tools / "stat").write_text(HOSTILE_STAT.format(digest=digest,
                                                    secret=shlex.quote(str(keys))))
    (tools / "stat").chmod(0o755)
    server = sshd_mod.start(tmp_path / "sshd",
                            env={"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin"})
    try:
        scene = Scene(tmp_path / "s", workdir=tmp_path / "remote")
        up = up_ssh(scene.project, server, workdir=scene.workdir)
        assert up.returncode == 0, up.stderr
        _set_python(scene.project, scene.python)
        secret_on_box = tmp_path / "box-secret"
        secret_on_box.write_text("the box's own secret\n")
        (tmp_path / "evil.txt").write_text("evil\n")  # what the listing's names point at
        scene.good()
        os.symlink(secret_on_box, scene.files / "val_predictions.csv")  # a link: not followed
        train = scene.train()
        _no_traceback(train)
        assert train.returncode == 0, train.stdout + train.stderr
        [run] = scene.runs()
        assert keys.read_text() == "ssh-ed25519 AAAA mine\n"
        assert not (scene.project / "evil.txt").exists() and not (run / "evil.txt").exists()
        refusals = [line for line in (train.stdout + train.stderr).splitlines()
                    if "refused" in line]
        assert any(str(keys) in line for line in refusals), refusals
        assert any("../../evil.txt" in line for line in refusals), refusals
        assert (run / "model.keras").read_text() == "a model"
        assert not (run / "val_predictions.csv").exists()
        assert sorted(p.name for p in run.iterdir()) == sorted(
            ["model.keras", "history.csv", "metrics.json", "train.log", "status.json",
             "stdout.log", "run.json", "report.html", "events.jsonl"])
        pull = dlbox(scene.project, "pull", run.name)  # `dlbox pull` goes the same way
        assert pull.returncode == 0 and keys.read_text().endswith("mine\n"), pull.stderr
        assert not (scene.project / "evil.txt").exists()
    finally:
        sshd_mod.stop(server)


def test_a_fetch_stops_at_its_bound_and_a_local_write_error_names_the_local_file(
        tmp_path, sshd):
    """A box file larger than the bound (or than its listing said) is refused before or as
    it comes, leaving nothing; a file this machine cannot write is an OSError naming the
    local path, not a lost SSH link."""
    from orchestrator.machine import TooBig
    from orchestrator.sshmachine import SshMachine
    from orchestrator.sshtarget import SshTarget

    remote = tmp_path / "remote.bin"
    remote.write_bytes(b"x" * 100_000)
    machine = SshMachine(SshTarget(sshd.host, sshd.port, sshd.user, str(sshd.client_key),
                                   str(tmp_path / "known_hosts")), pin_new_host=True)
    try:
        with pytest.raises(TooBig, match="more than dlbox takes"):
            machine.fetch(str(remote), tmp_path / "got", max_bytes=50_000)
        machine.fetch(str(remote), tmp_path / "got", max_bytes=100_000)
        assert (tmp_path / "got").read_bytes() == remote.read_bytes()
        with pytest.raises(TooBig):
            machine.read(str(remote), max_bytes=10)
        assert machine.read(str(remote), max_bytes=10, tail=True) == b"x" * 10
        (tmp_path / "here").mkdir()
        with pytest.raises(OSError) as raised:  # a folder where the file should go
            machine.fetch(str(remote), tmp_path / "here", max_bytes=100_000)
        assert raised.value.filename == str(tmp_path / "here")
        known = tmp_path / "known_hosts"
        before = known.stat().st_mtime_ns
    finally:
        machine.close()
    again = SshMachine(SshTarget(sshd.host, sshd.port, sshd.user, str(sshd.client_key),
                                 str(known)))
    try:
        again.run("true")  # a later connection leaves known_hosts as it is (read-only is fine)
    finally:
        again.close()
    assert known.stat().st_mtime_ns == before


# --- item 2: lines from the box reach the terminal escaped -------------------------------------

FAKE_DONE = f"{ESC}]0;pwned{BEL}{ESC}[2J{ESC}[32mrun done: val_accuracy 0.9990{ESC}[0m"


def test_terminal_escapes_from_the_box_are_shown_escaped_never_obeyed(local):
    """A WARNING line in train.log and the trainer's last words carrying escapes (window
    title, clear screen, a fake green line): train, attach and logs print them escaped;
    logs --raw gives the bytes as they are."""
    local.good(code=1, train__log=f"2026-12-07 10:00:00 WARNING {FAKE_DONE}\n",
               stdout__log=f"error: {FAKE_DONE}\r\n")
    train = local.train()
    _no_traceback(train)
    assert train.returncode == 1
    said = train.stdout + train.stderr
    assert ESC not in said and BEL not in said and "\r" not in said, repr(said)
    assert "\\x1b[2J" in train.stdout and "\\x1b[2J" in train.stderr
    [run] = local.runs()
    logs = dlbox(local.project, "logs", run.name)
    assert ESC not in logs.stdout and "\\x1b]0;pwned\\x07" in logs.stdout, repr(logs.stdout)
    raw = dlbox(local.project, "logs", run.name, "--raw")
    assert FAKE_DONE in raw.stdout


# --- item 8: box files parsed defensively -------------------------------------------------------

BAD_FILES = [
    ("status.json", {"status__json": '{"state": "running", "epoch": "x"}'}),
    ("status.json", {"status__json": "[1, 2, 3]"}),
    ("history.csv", {"history__csv": GOOD_HISTORY.replace("0.69", "abc")}),
    ("history.csv", {"history__csv": "epoch,loss\n1,0.5\n"}),
    ("metrics.json", {"metrics__json": "[0.9]"}),
    ("metrics.json", {"metrics__json": '{"val_accuracy": "0.9", "best_epoch": 1}'}),
]


@pytest.mark.parametrize(("name", "files"), BAD_FILES,
                         ids=[f"{n}:{next(iter(f.values()))[:18]}" for n, f in BAD_FILES])
def test_a_box_file_that_is_not_valid_is_one_line_and_never_corrupts_records(local, name,
                                                                            files):
    """The file named, with the run, in one warning; the run recorded (run.json stays valid
    and `dlbox runs` lists it), its report written, no traceback."""
    local.good(**files)
    train = local.train()
    _no_traceback(train)
    [run] = local.runs()
    warnings = [line for line in (train.stdout + train.stderr).splitlines()
                if f"run {run.name}'s {name} on the box is not valid" in line]
    assert warnings, train.stdout + train.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["val_accuracy"] is None or isinstance(record["val_accuracy"], float)
    listed = dlbox(local.project, "runs")
    assert listed.returncode == 0 and run.name in listed.stdout, listed.stderr
    assert "skipped" not in listed.stderr
    assert (run / "report.html").exists()
    if name == "metrics.json":
        assert record["val_accuracy"] is None
    if name == "metrics.json" and "best_epoch" in files["metrics__json"]:
        assert train.returncode == 0


def test_a_metrics_file_without_best_epoch_still_reports(local):
    local.good(metrics__json='{"val_accuracy": 0.75, "val_loss": 0.5}')
    train = local.train()
    _no_traceback(train)
    assert train.returncode == 0 and "val_accuracy 0.7500" in train.stdout, train.stdout
    [run] = local.runs()
    assert "best epoch ? of ?" in (run / "report.html").read_text()


def test_an_exit_code_that_is_not_a_number_is_a_failed_run_everywhere(local):
    """exit_code "abc" (the run's processes gone): pull, attach and down each say it in one
    line and record the run as failed; nothing raises."""
    local.good(wait=True)
    run_id = local.detached()
    folder = local.box_workdir() / "runs" / run_id
    _kill_group(local.run_group(run_id))
    (folder / "exit_code").write_text("abc\n")
    pull = dlbox(local.project, "pull", run_id)
    _no_traceback(pull)
    assert pull.returncode == 0, pull.stderr
    assert f"run {run_id}'s exit_code on the box is not valid" in pull.stderr
    record = json.loads((local.project / "runs" / run_id / "run.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 1
    down = dlbox(local.project, "down")
    _no_traceback(down)
    assert down.returncode == 0, down.stderr


# --- item 6: a run that ends without an exit status ---------------------------------------------

def test_a_run_killed_without_an_exit_status_ends_train_and_logs_in_one_line(local):
    """The run's process group SIGKILLed while `train` and `logs -f` follow it (run.sh
    cannot write exit_code): both end within seconds; train says so in one line, exit 137,
    the run recorded as failed with what it left pulled."""
    local.good(wait=True)
    train = local.start_train()
    _until(lambda: local.box_runs() and (local.box_runs()[-1] / "run.pid").exists()
           and (local.box_runs()[-1] / "status.json").exists(), "the run's start", train)
    run_id = local.box_runs()[-1].name
    logs = subprocess.Popen([DLBOX, "logs", run_id, "-f"], cwd=local.project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # both are following now (each polls every second)
    assert train.poll() is None and logs.poll() is None
    _kill_group(local.run_group(run_id))
    out, err = train.communicate(timeout=30)
    logs.communicate(timeout=30)
    assert logs.returncode == 0
    assert train.returncode == 137, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "ended without an exit status" in err
    assert "still going" not in out + err
    record = json.loads((local.project / "runs" / run_id / "run.json").read_text())
    assert (record["status"], record["exit_code"]) == ("failed", 137)
    assert (local.project / "runs" / run_id / "status.json").exists()


@needs_root
def test_a_full_disk_on_the_box_ends_the_run_in_bounded_time(local):
    """The box's disk fills up (a real tmpfs): the trainer exits 74 and run.sh cannot write
    exit_code. `train` ends within seconds with one line saying so and what to free, never
    following the run forever."""
    local.scene(status__json=json.dumps({"state": "running", "phase": "training"}),
                **{"fill__sh": "dd if=/dev/zero of=filler bs=64k 2>/dev/null; exit 74\n"})
    # the stand-in runs its scene's fill.sh when there is one
    runs_dir = local.box_workdir() / "runs"
    with small_disk(runs_dir, "2m"):
        started = time.monotonic()
        train = local.train()
        took = time.monotonic() - started
        run_id = next(p.name for p in runs_dir.iterdir() if p.is_dir())
        assert not (runs_dir / run_id / "exit_code").exists()  # run.sh could not write it
    _no_traceback(train)
    assert train.returncode != 0 and took < WAIT_S, (took, train.stdout + train.stderr)
    assert f"run {run_id} ended without an exit status" in train.stderr
    assert "disk is full" in train.stderr and "free some space" in train.stderr
    record = json.loads((local.project / "runs" / run_id / "run.json").read_text())
    assert record["finished_at"] is None  # nothing pulled: `dlbox pull` once there is room


# --- item 7: cancel signals only the run's own trainer ------------------------------------------

def test_cancel_never_signals_a_process_status_json_names(local):
    """status.json names an unrelated process (a reused pid): cancel stops the run's own
    trainer, which checkpoints (75), and the unrelated process lives on. Then cancel of a
    run that is gone is one line, without the shell's `kill` complaints."""
    local.good(wait=True)
    run_id = local.detached()
    folder = local.box_workdir() / "runs" / run_id
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (folder / "status.json").write_text(json.dumps({"state": "running",
                                                        "pid": bystander.pid}))
        # COLUMNS as a box's shell may set it: ps must still show the whole command line
        cancel = dlbox(local.project, "cancel", run_id, env={"COLUMNS": "40"})
        _no_traceback(cancel)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert "interrupted (exit 75)" in cancel.stdout
        assert (folder / "stopped-by-signal").exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    again = dlbox(local.project, "cancel", run_id)
    assert again.returncode == 2 and "is not running" in again.stderr, again.stderr
    assert "kill:" not in again.stderr and len(again.stderr.strip().splitlines()) == 1


# --- item 4: down asks the box, not only its records ------------------------------------------

def test_down_asks_about_a_live_run_whose_record_was_deleted(local):
    """A detached run, then `rm -rf runs`: `down` (no terminal) refuses in one line naming
    the run, which goes on; `attach` then follows it again (its record made again from the
    box), and once it is stopped `down` pulls what it left and removes the box."""
    import shutil

    local.good(wait=True)
    run_id = local.detached()
    group = local.run_group(run_id)
    shutil.rmtree(local.project / "runs")
    down = dlbox(local.project, "down")
    _no_traceback(down)
    assert down.returncode == 2, down.stdout + down.stderr
    assert f"run(s) {run_id} still going" in down.stderr and "dlbox down --yes" in down.stderr
    assert _group_alive(group) and local.box_workdir().is_dir()
    assert json.loads((local.project / "runs" / run_id / "run.json").read_text())["box"] \
        == "local"
    _kill_group(group)
    down = dlbox(local.project, "down")
    _no_traceback(down)
    assert down.returncode == 0, down.stderr
    assert f"run {run_id} was killed before it ended" in down.stdout
    assert (local.project / "runs" / run_id / "model.keras").read_text() == "a model"
    assert not local.box_workdir().exists()


def test_down_pulls_an_ended_run_whose_record_is_damaged(local):
    """A run that ended while detached, its run.json damaged: `down` records it again from
    the box (the damaged file kept beside), pulls its results, then removes the box."""
    local.good(wait=True)
    run_id = local.detached()
    for pid in _trainers(local.run_group(run_id)):
        os.kill(pid, signal.SIGTERM)  # the stand-in exits 75, run.sh writes it down
    _until(lambda: (local.box_workdir() / "runs" / run_id / "exit_code").exists(),
           "the run's end")
    record = local.project / "runs" / run_id / "run.json"
    record.write_text("{damaged")
    down = dlbox(local.project, "down")
    _no_traceback(down)
    assert down.returncode == 0, down.stderr
    assert f"run {run_id} had ended (interrupted)" in down.stdout
    assert json.loads(record.read_text())["exit_code"] == 75
    assert [p.name for p in record.parent.glob("run.json.damaged-*")]
    assert (record.parent / "model.keras").read_text() == "a model"
    assert not local.box_workdir().exists()


# --- item 12: smaller ones ------------------------------------------------------------------------

def test_inputs_that_are_not_files_or_folders_are_refused_before_anything_is_sent(local,
                                                                                 tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for data in ("/dev/zero", str(fifo)):
        result = dlbox(local.project, "train", "scratch", "--data", data)
        assert result.returncode == 2, result.stderr
        assert "not a folder or a regular file" in result.stderr
    assert local.runs() == []


@pytest.mark.parametrize("flag", ["-h", "--help", "--he"])
def test_a_help_flag_for_the_trainer_is_no_run(local, flag):
    result = dlbox(local.project, "train", "scratch", "--data", str(local.data), "--", flag)
    assert result.returncode == 2 and "asks the trainer for its help" in result.stderr
    assert local.runs() == []


def test_a_run_that_ends_well_without_a_model_is_failed(local):
    local.scene(status__json=json.dumps(GOOD_STATUS))
    train = local.train()
    _no_traceback(train)
    [run] = local.runs()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert "left no model.keras" in train.stdout + train.stderr


def test_an_interrupted_pull_leaves_no_snapshot_on_the_box(local):
    """SIGINT while `pull` copies (a model slow to copy): the snapshot folder it made on the
    box is removed at once, not left for an hour."""
    local.good(wait=True, model__keras=b"m" * (256 << 20))
    run_id = local.detached()
    folder = local.box_workdir() / "runs" / run_id
    pull = subprocess.Popen([DLBOX, "pull", run_id], cwd=local.project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _until(lambda: list(folder.glob(".dlbox-pull-*")), "the pull's snapshot", pull)
    pull.send_signal(signal.SIGINT)
    out, err = pull.communicate(timeout=WAIT_S)
    assert pull.returncode == 130 and "Traceback" not in err, out + err
    assert not list(folder.glob(".dlbox-pull-*"))
    _kill_group(local.run_group(run_id))


def test_ctrl_c_in_the_final_pull_of_down_after_says_what_was_not_done(local):
    """SIGINT while `train --down-after` pulls the results: one line says the results were
    not pulled and the box was not ended, naming `dlbox pull RUN` and `dlbox down`; the box
    and its results are still there."""
    local.good(model__keras=b"m" * (256 << 20))
    train = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(local.data),
                              "--down-after"], cwd=local.project, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _until(lambda: local.box_runs() and list(local.box_runs()[-1].glob(".dlbox-pull-*")),
           "the final pull", train)
    train.send_signal(signal.SIGINT)
    out, err = train.communicate(timeout=WAIT_S)
    run_id = local.box_runs()[-1].name
    assert train.returncode == 130 and "Traceback" not in err, out + err
    [line] = err.strip().splitlines()
    assert "pulling its results was cut short; the box was not ended" in line, line
    assert f"`dlbox pull {run_id}`" in line and "`dlbox down`" in line, line
    assert (local.box_workdir() / "runs" / run_id / "model.keras").exists()
    pull = dlbox(local.project, "pull", run_id)
    assert pull.returncode == 0, pull.stderr
    assert (local.project / "runs" / run_id / "model.keras").stat().st_size == 256 << 20


@needs_root
def test_a_full_disk_here_while_fetching_names_the_local_file(tmp_path, sshd):
    """This machine's disk fills up mid-copy: the error names the local file and says to free
    space there, never "lost the SSH connection"."""
    from orchestrator.sshmachine import LocalWriteFailed, SshMachine
    from orchestrator.sshtarget import SshTarget

    remote = tmp_path / "remote.bin"
    remote.write_bytes(os.urandom(4 << 20))
    machine = SshMachine(SshTarget(sshd.host, sshd.port, sshd.user, str(sshd.client_key),
                                   str(tmp_path / "known_hosts")), pin_new_host=True)
    with small_disk(tmp_path / "full", "1m") as full:
        try:
            with pytest.raises(LocalWriteFailed) as raised:
                machine.fetch(str(remote), full / "got", max_bytes=8 << 20)
        finally:
            machine.close()
    assert str(full / "got") in str(raised.value) and "free some space" in str(raised.value)


def test_signals_are_deferred_even_when_another_thread_takes_them(tmp_path):
    """SIGINT sent to the process while the main thread is in a deferred block and another
    thread is busy: the block finishes, then KeyboardInterrupt comes; a signal mask in the
    main thread alone would not have held it back."""
    script = tmp_path / "deferred.py"
    script.write_text(
        "import os, signal, threading, time\n"
        "from orchestrator import signals\n"
        "threading.Thread(target=lambda: [time.sleep(0.001) for _ in range(10**6)],"
        " daemon=True).start()\n"
        "done = []\n"
        "try:\n"
        "    with signals.deferred():\n"
        "        for _ in range(20):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            time.sleep(0.01)\n"
        "        done.append('block')\n"
        "except KeyboardInterrupt:\n"
        "    print('after', done)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "after ['block']", result.stdout + result.stderr



def test_a_notice_and_a_heartbeat_from_a_box_are_checked_before_they_name_a_loss(tmp_path):
    """When attach or a failed node asks which nodes are lost, a spot notice that is not the
    watcher's (a field not text) is no loss; a valid one is, its reason bounded; the chief's
    heartbeat gives the epoch only if its fields are valid."""
    from orchestrator import boxfiles, recovery, runs
    from orchestrator.localbox import LocalBox

    class SpotLocal(LocalBox):  # this machine, as a box its owner may take back
        interruptible = True

    folders = [tmp_path / "chief", tmp_path / "worker"]
    for folder in folders:
        folder.mkdir()
    team = tuple({"node": k, "box": f"b{k}", "remote_dir": str(f), "address": "", "code": "",
                  "data": "", "test": None} for k, f in enumerate(folders))
    run = runs.Run(run_id="r", model="scratch", box="b0", remote_dir=str(folders[0]), args=[],
                   started_at=runs.now(), nodes=team)
    nodes = [SpotLocal(f"b{k}", str(tmp_path), sys.executable, node=k, nodes=2) for k in (0, 1)]
    machines = [n.machine(tmp_path) for n in nodes]
    notice = folders[1] / "interruption.json"

    notice.write_text(json.dumps({"action": {"\x1b[2J": 1}, "time": "now"}))
    assert recovery.lost_nodes(tmp_path, run, nodes, machines) == {}
    (folders[0] / "status.json").write_text(json.dumps({"phase": "training", "epoch": "3"}))
    notice.write_text(json.dumps({"action": "terminate" + "x" * 10_000, "time": "t"}))
    [(k, lost)] = recovery.lost_nodes(tmp_path, run, nodes, machines).items()
    assert k == 1 and lost.reclaimed and lost.epoch is None  # "3" is no epoch count
    assert lost.reason.startswith("EC2 interruption notice: terminatexx")
    assert len(lost.reason) < boxfiles.MAX_TEXT_CHARS + 60
    (folders[0] / "status.json").write_text(json.dumps({"phase": "training", "epoch": 3,
                                                        "step": 5, "steps": 10}))
    [lost] = recovery.lost_nodes(tmp_path, run, nodes, machines).values()
    assert (lost.epoch, lost.progress) == (3, 2.5)
    assert recovery.lost_nodes(tmp_path, run, nodes, machines, notices=False) == {}
