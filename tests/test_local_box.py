"""The local box end to end: `dlbox up --local`, `train`, `attach`, `pull`, `down` as a user runs them."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.cli import CLI_TIMEOUT_S, DLBOX, dlbox, up_local

POLL_S = 0.1
ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; .ci/run installs
# Headless, and quiet: no background connections (this machine has no internet).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


# `up` checks the real TensorFlow in the two tests of --python below; the others check it
# with a stand-in (quick_python, ~3 s sooner), and their runs train with the real one.


def _events(run: Path) -> list[dict]:
    """runs/<id>/events.jsonl, each line parsed (a torn one would fail the test)."""
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _run_dirs(project: Path) -> list[Path]:
    return sorted(p for p in (project / "runs").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, small_sample):
    """up --local, train scratch with a test set, pull; (project dir, run dir, train output)."""
    project = tmp_path_factory.mktemp("local")
    up = up_local(project)
    assert up.returncode == 0, up.stderr
    train = dlbox(project, "train", "scratch", "--data", str(small_sample), "--test",
                  str(small_sample), "--epochs", "2", "--img-size", "32")
    assert train.returncode == 0, train.stdout + train.stderr
    [run] = _run_dirs(project)
    return project, run, train


@pytest.mark.slow
def test_up_local_train_down(local_run):
    project, run, train = local_run
    assert f"run {run.name} done: val_accuracy" in train.stdout
    for name in ("model.keras", "history.csv", "metrics.json", "train.log", "submission.csv",
                 "report.html"):
        assert (run / name).stat().st_size > 0, name
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "done" and record["exit_code"] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert record["val_accuracy"] == metrics["val_accuracy"]
    assert metrics["epochs_run"] == 2

    again = dlbox(project, "pull", run.name)
    assert again.returncode == 0 and "pulled into" in again.stdout
    log = _events(run)
    assert [e["kind"] for e in log] == ["started", "epoch", "epoch", "pulled", "done", "pulled"]
    assert [e["epoch"] for e in log if e["kind"] == "epoch"] == [1, 2]
    assert log[4]["val_accuracy"] == metrics["val_accuracy"] and log[3]["final"] is True
    assert "Timeline" in (run / "report.html").read_text()
    down = dlbox(project, "down")
    assert down.returncode == 0
    assert not (project / ".dlbox" / "local-box").exists()
    assert (run / "model.keras").exists()  # results pulled to runs/ stay


@pytest.mark.slow
def test_report_loads_in_a_real_browser_with_its_images_and_charts(local_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, run, _ = local_run
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((run / "report.html").as_uri())
        assert driver.title == f"dlbox run {run.name}"
        images = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert images and all(done and width > 0 for _, done, width in images), images
        assert [src for src, _, _ in images] == ["misclassified.jpg"]
        charts = driver.execute_script(
            "return [...document.querySelectorAll('svg.chart')].map("
            "s => [s.getAttribute('aria-label'), s.querySelectorAll('polyline.series').length,"
            " s.getBoundingClientRect().width])")
        assert [(label, lines) for label, lines, _ in charts] == [("Loss", 2), ("Accuracy", 2)]
        assert all(width > 100 for _, _, width in charts)
        text = driver.find_element("tag name", "body").text
        assert "validation accuracy" in text and "predicted dog" in text
    finally:
        driver.quit()


@pytest.mark.slow
def test_killed_dlbox_leaves_the_run_going_and_attach_gets_the_results(tmp_path, small_sample):
    assert up_local(tmp_path).returncode == 0
    proc = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(small_sample), "--epochs",
                             "3", "--img-size", "32"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not list((tmp_path / ".dlbox" / "local-box" / "runs").glob("*/status.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)  # the laptop side dies mid-run
    proc.wait()
    [run] = _run_dirs(tmp_path)
    attach = dlbox(tmp_path, "attach", run.name)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    log = [e["kind"] for e in _events(run)]  # kept through the kill, then added to by attach
    assert log[0] == "started" and "attached" in log and log[-2:] == ["pulled", "done"]
    assert log.count("epoch") == 3  # an epoch shown again by attach is logged once
    assert dlbox(tmp_path, "down").returncode == 0


def test_train_user_errors(tmp_path, small_sample):
    no_box = dlbox(tmp_path, "train", "scratch", "--data", str(small_sample))
    assert no_box.returncode == 2 and "dlbox up --local" in no_box.stderr
    bad_model = dlbox(tmp_path, "train", "resnet", "--data", str(small_sample))
    assert bad_model.returncode == 2 and "unknown model" in bad_model.stderr
    unknown = dlbox(tmp_path, "attach", "nope")
    assert unknown.returncode == 2 and "no run 'nope'" in unknown.stderr
    for result in (no_box, bad_model, unknown):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_trainer_user_error_comes_back_as_exit_2(tmp_path, small_sample):
    assert up_local(tmp_path).returncode == 0
    missing = dlbox(tmp_path, "train", "scratch", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_flag = dlbox(tmp_path, "train", "scratch", "--data", str(small_sample), "--epochs", "0")
    assert bad_flag.returncode == 2
    assert "--epochs must be at least 1" in bad_flag.stderr
    assert dlbox(tmp_path, "down").returncode == 0


class Terminal:
    """A command run on a pseudo-terminal (as a user's shell runs it); its output collected."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        main, child = pty.openpty()
        # A wide terminal, so rich draws the whole bar on one line.
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        # Its own process group, SIGINT at its default: Ctrl-C reaches it as from a shell.
        self.proc = subprocess.Popen(args, cwd=cwd, stdin=child, stdout=child, stderr=child,
                                     env={**os.environ, "TERM": "xterm", "COLUMNS": "200"},
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(child)
        self._main, self._chunks = main, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._main, 65536)
            except OSError:  # EIO: the command and everything it started closed the terminal
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        """What was written so far, less colours and cursor movements."""
        return ANSI_CONTROL.sub("", b"".join(self._chunks).decode(errors="replace"))

    def ctrl_c(self) -> None:
        """What the terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_for(self, pattern: str, deadline_s: float = CLI_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + deadline_s
        while not (match := re.search(pattern, self.text)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {pattern!r} in: {self.text}")
            time.sleep(POLL_S)
        return match

    def wait(self) -> int:
        code = self.proc.wait(timeout=CLI_TIMEOUT_S)
        self._reader.join(timeout=CLI_TIMEOUT_S)
        os.close(self._main)
        return code


@pytest.mark.slow
def test_cancel_checkpoints_then_logs_and_runs_show_it(tmp_path, small_sample):
    assert up_local(tmp_path).returncode == 0
    term = Terminal([DLBOX, "train", "scratch", "--data", str(small_sample), "--epochs", "200",
                     "--patience", "0", "--img-size", "64"], cwd=tmp_path)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    # On a terminal, a live bar: the epoch, its steps, the running metrics, the run's ETA
    # (known once an epoch has finished).
    live_bar = re.compile(r"training epoch (\d+)/200 .* \d+/\d+ +loss \d\.\d{4} acc \d\.\d{4} +"
                          r"ETA \d+:\d\d:\d\d")
    try:
        while not live_bar.search(term.text):
            assert term.proc.poll() is None and time.monotonic() < deadline, term.text
            time.sleep(POLL_S)
    except AssertionError:
        term.proc.kill()  # and the detached run with it, through cancel below when it exists
        for run in _run_dirs(tmp_path) if (tmp_path / "runs").is_dir() else []:
            dlbox(tmp_path, "cancel", run.name)
        raise
    [run] = _run_dirs(tmp_path)
    assert re.search(r"training epoch 1/200: loss .* val_acc", term.text)  # scrolled above it
    cancel = dlbox(tmp_path, "cancel", run.name)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "interrupted (exit 75)" in cancel.stdout
    assert term.wait() == 75  # `dlbox train` hands on the trainer's status
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    ends = [e["kind"] for e in _events(run) if e["kind"] in ("done", "failed", "cancelled",
                                                              "interrupted", "lost")]
    assert ends == ["cancelled"]  # once, though `train` following it saw it end too

    logs = dlbox(tmp_path, "logs", run.name)
    assert logs.returncode == 0 and "stopped by SIGTERM" in logs.stdout
    listing = dlbox(tmp_path, "runs")
    assert listing.returncode == 0
    assert run.name in listing.stdout and "interrupted" in listing.stdout
    again = dlbox(tmp_path, "cancel", run.name)
    assert again.returncode == 2 and "not running" in again.stderr
    assert dlbox(tmp_path, "down").returncode == 0
    # Stopped resumable, but its box is gone: attach cannot resume it there, and says so.
    orphan = dlbox(tmp_path, "attach", run.name)
    assert orphan.returncode == 2 and "not this project's box any more" in orphan.stderr, \
        orphan.stdout + orphan.stderr
    assert len(orphan.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_corrupt_zip_comes_back_as_one_clear_line(tmp_path):
    assert up_local(tmp_path).returncode == 0
    (tmp_path / "train.zip").write_bytes(b"PK\x03\x04 this is not a whole zip")
    result = dlbox(tmp_path, "train", "scratch", "--data", str(tmp_path / "train.zip"))
    assert result.returncode == 2
    assert "corrupt zip archive" in result.stderr or "not a readable zip" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert dlbox(tmp_path, "down").returncode == 0


@pytest.mark.slow
def test_warnings_live_then_ctrl_c_detaches_then_logs_follow_and_attach(tmp_path, small_sample):
    """The trainer's warnings appear while it runs; Ctrl-C on a terminal detaches (the run
    goes on); `logs -f` prints the whole log to its last line; `attach` pulls the results."""
    from orchestrator.sample import generate

    data = tmp_path / "data"
    generate(data, 0, test_n=0, bad=True, seed=3)  # seven odd files, four cannot be decoded
    for image in (small_sample / "train").iterdir():  # and 200 good ones, linked, not made
        os.link(image, data / "train" / image.name)
    project = tmp_path / "proj"
    project.mkdir()
    assert up_local(project).returncode == 0
    term = Terminal([DLBOX, "train", "scratch", "--data", str(data), "--epochs", "8",
                     "--patience", "0", "--img-size", "32"], cwd=project)
    term.wait_for(r"training epoch 1/8: loss")
    text = term.text
    assert text.count("warning: skipped") == 4, text
    assert text.index("warning: skipped") < text.index("training epoch 1/8: loss")  # live
    term.ctrl_c()
    assert term.wait() == 130  # as shells expect of Ctrl-C; the run goes on
    [run] = _run_dirs(project)
    assert f"detached; run {run.name} goes on" in term.text
    assert "Traceback" not in term.text

    logs = subprocess.run([DLBOX, "logs", "-f", run.name], cwd=project, capture_output=True,
                          timeout=CLI_TIMEOUT_S)
    assert logs.returncode == 0, logs.stderr
    on_box = (project / ".dlbox" / "local-box" / "runs" / run.name / "train.log").read_bytes()
    assert logs.stdout == on_box  # every line, the last ones too
    assert b"done: val_accuracy" in on_box.splitlines()[-1]

    attach = dlbox(project, "attach", run.name)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 8
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    assert dlbox(project, "down").returncode == 0


def test_the_box_python_is_recorded_absolute_and_a_vanished_run_is_one_line(tmp_path):
    """`--python ~/...` is resolved once at `up` (runs quote it, so a ~ would never expand);
    following a run whose folder is gone from the box is one line, not a traceback."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "py").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # a wrapper in ~
    (home / "py").chmod(0o755)
    project = tmp_path / "proj"
    project.mkdir()
    env = {**os.environ, "HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    up = subprocess.run([DLBOX, "up", "--local", "--python", "~/py"], cwd=project, env=env,
                        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert up.returncode == 0, up.stderr
    assert "TensorFlow 2." in up.stdout  # the real one, checked through the wrapper
    [box] = json.loads((project / ".dlbox" / "state.json").read_text())["boxes"]
    assert box["python"] == sys.executable  # the interpreter itself, by its absolute path
    run = project / "runs" / "20261129-000000-scratch"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "run_id": run.name, "model": "scratch", "box": "local", "args": [],
        "remote_dir": str(tmp_path / "nowhere"), "started_at": "2026-11-29T00:00:00+00:00"}))
    for command in ("attach", "logs"):
        result = dlbox(project, command, run.name)
        assert result.returncode == 1 and "is gone from the box" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_relative_python_is_recorded_by_its_absolute_path(tmp_path):
    """`up --local --python ../py`: every later `train` runs from another folder, so a
    relative path recorded as given would not be found there (exit 127)."""
    (tmp_path / "py").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (tmp_path / "py").chmod(0o755)
    project = tmp_path / "proj"
    project.mkdir()
    up = dlbox(project, "up", "--local", "--python", "../py")
    assert up.returncode == 0, up.stderr
    [box] = json.loads((project / ".dlbox" / "state.json").read_text())["boxes"]
    assert box["python"] == sys.executable
