"""User mistakes: one line on stderr naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TRAINER_TIMEOUT_S, run_trainer


def _assert_user_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainer: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Zips the trainer extracts land in a temporary XDG cache, not the developer's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["resnet"], ["invalid choice", "resnet"]),
        (["scratch", "--out", "o"], ["--data"]),
        (["scratch", "--data", "/nonexistent/train", "--out", "OUT"], ["no such file", "--data"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--epochs", "0"], ["--epochs"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--epochs", "many"], ["--epochs"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--val-split", "1.5"], ["--val-split"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--batch-size", "0"], ["--batch-size"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--img-size", "8"], ["--img-size"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--learning-rate", "-1"], ["--learning-rate"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--limit", "1"], ["--limit"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--patience", "-1"], ["--patience"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--fine-tune-epochs", "2"], ["vgg16 only"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--weights", "x.h5"], ["vgg16 only"]),
        (["vgg16", "--data", "SAMPLE", "--out", "OUT", "--weights", "/no/such.h5"], ["--weights"]),
        (["scratch", "--data", "SAMPLE", "--out", "OUT", "--test", "/no/test1"], ["--test"]),
    ],
)
def test_bad_flags(small_sample, out, args, needles):
    args = [str(small_sample) if a == "SAMPLE" else str(out) if a == "OUT" else a for a in args]
    _assert_user_error(run_trainer(*args), *needles)


def test_empty_data_folder(tmp_path, out):
    (tmp_path / "train").mkdir()
    _assert_user_error(run_trainer("scratch", "--data", tmp_path / "train", "--out", out),
                       "no labelled image")


def test_folder_without_labelled_files(tmp_path, out):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jpg").write_bytes(b"x")
    _assert_user_error(run_trainer("scratch", "--data", tmp_path / "d", "--out", out),
                       "cat.N.jpg")


def test_unreadable_zip(tmp_path, out):
    (tmp_path / "train.zip").write_bytes(b"PK\x03\x04 not really a zip")
    _assert_user_error(run_trainer("scratch", "--data", tmp_path / "train.zip", "--out", out),
                       "zip", "download it again")


def test_unwritable_extract_dir(tmp_path, out):
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        zf.writestr("train/cat.0.jpg", "x")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _assert_user_error(run_trainer("scratch", "--data", tmp_path / "train.zip", "--out", out,
                                   "--extract-dir", blocker / "x"),
                       f"--extract-dir {blocker / 'x'}", "pass --extract-dir")


def test_zip_without_labelled_images(tmp_path, out):
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    _assert_user_error(run_trainer("scratch", "--data", tmp_path / "train.zip", "--out", out),
                       "no labelled image")


def test_unwritable_out_dir(small_sample, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _assert_user_error(run_trainer("scratch", "--data", small_sample, "--out", blocker / "out"),
                       "not writable", "--out")


def test_out_dir_holding_another_run_needs_resume(small_sample, out):
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "state.json").write_text("{}")
    _assert_user_error(run_trainer("scratch", "--data", small_sample, "--out", out),
                       "--resume")


def test_help_and_user_errors_answer_before_importing_tensorflow(tmp_path):
    """Flags and data are checked before the ~4 s TensorFlow import."""
    for args in (["--help"], ["scratch", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer", *args],
                                cwd=REPO, capture_output=True, text=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "trainer.options" in imported
        assert not {"tensorflow", "keras", "numpy"} & imported


def _assert_error_after_logging(result, exit_code: int, *needles: str) -> str:
    """Log lines may come first; the last line is the error, and no traceback is anywhere."""
    assert result.returncode == exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in last
    return last


def test_resume_with_changed_flags_after_logging_started(small_sample, out):
    from trainer.checkpoint import ResumeState
    from trainer.options import parse

    first = ["scratch", "--data", str(small_sample), "--out", str(out), "--img-size", "32"]
    (out / "checkpoints").mkdir(parents=True)
    state = ResumeState(parse(first).as_dict(), completed=1, phase="training",
                        last="last-0001.keras")
    (out / "checkpoints" / "state.json").write_text(json.dumps(state.to_json()))
    result = run_trainer(*first[:-1], "48", "--resume")
    _assert_error_after_logging(result, 2, "--img-size 32", "choose another --out")
    assert "--img-size 32" in (out / "train.log").read_text()


def test_unexpected_error_has_its_traceback_in_train_log_only(small_sample, tmp_path, out):
    weights = tmp_path / "vgg16_notop.weights.h5"
    weights.write_text("not an HDF5 weights file")
    result = run_trainer("vgg16", "--data", small_sample, "--out", out, "--weights", weights,
                         "--img-size", "32", "--limit", "40", "--epochs", "1")
    _assert_error_after_logging(result, 1, "internal error", str(out / "train.log"))
    assert "Traceback" in (out / "train.log").read_text()
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def _patched_trainer(script: str, data: Path, out: Path, **env: str):
    """`python -m trainer scratch --data DATA --out OUT`, as script (which patches it) runs it."""
    return subprocess.run([sys.executable, "-c", script, "scratch", "--data", str(data), "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=TRAINER_TIMEOUT_S, env={**os.environ, **env})


# The trainer with a bug in finding the data (after logging began).
BROKEN_DATA = """\
import sys
from trainer import __main__ as entry, data

def find_labelled(*args, **kwargs):
    raise RuntimeError("a bug in\\ndataset discovery")

data.find_labelled = find_labelled
sys.exit(entry.main(sys.argv[1:]))
"""


def test_an_unexpected_error_finding_the_data_names_its_traceback_file(small_sample, out):
    result = _patched_trainer(BROKEN_DATA, small_sample, out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("trainer: error: internal error, RuntimeError: a bug in "
                                    "dataset")
    assert str(out / "train.log") in result.stderr
    assert "Traceback" in (out / "train.log").read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "a bug in" in status["error"]


# The trainer with a bug before train.log can exist (its folder not made yet).
BROKEN_OUT = """\
import sys
from trainer import __main__ as entry, options

def prepare_out(opts):
    raise RuntimeError("a bug making the output folder")

options.prepare_out = prepare_out
sys.exit(entry.main(sys.argv[1:]))
"""


def test_an_unexpected_error_before_logging_names_a_file_of_its_own(small_sample, out):
    result = _patched_trainer(BROKEN_OUT, small_sample, out)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "internal error, RuntimeError: a bug making the output folder" in result.stderr
    where = Path(result.stderr.split("traceback in ")[1].strip())
    try:
        assert where.name.startswith("trainer-") and "Traceback" in where.read_text()
    finally:
        where.unlink(missing_ok=True)
    assert not out.exists()


# The trainer with data.find_labelled slowed until status.json is there (as while a big zip
# is unpacked), which it then copies aside and fails with a user error.
SLOW_DATA = """\
import os, shutil, sys, time
from pathlib import Path
from trainer import __main__ as entry, data
from trainer.errors import DataError

def find_labelled(path, extract_dir=None):
    status = Path(os.environ["OUT"]) / "status.json"
    deadline = time.monotonic() + 60
    while not status.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no status.json while the data was being found")
        time.sleep(0.05)
    shutil.copy(status, os.environ["SEEN"])
    raise DataError(f"--data {path}: a broken zip; download it again")

data.find_labelled = find_labelled
sys.exit(entry.main(sys.argv[1:]))
"""


def test_the_heartbeat_begins_before_the_data_is_found_and_ends_with_its_error(tmp_path,
                                                                              small_sample):
    """dlbox waits a bounded time for the first status.json: unpacking a big zip must not
    count against it; a data error still ends stderr with its one line, and status.json says
    failed."""
    out, seen = tmp_path / "out", tmp_path / "seen.json"
    result = _patched_trainer(SLOW_DATA, small_sample, out, OUT=str(out), SEEN=str(seen))
    _assert_user_error(result, "a broken zip", "download it again")
    during = json.loads(seen.read_text())
    assert during["state"] == "running" and during["phase"] == "starting"
    after = json.loads((out / "status.json").read_text())
    assert after["state"] == "failed" and "a broken zip" in after["error"]
    assert "a broken zip" in (out / "train.log").read_text()


# The trainer told to stop (dlbox cancel: SIGTERM) while it finds the data; at exit it notes
# whether TensorFlow was ever imported.
STOPPED_IN_DATA = """\
import atexit, os, signal, sys
from pathlib import Path
from trainer import __main__ as entry, data

found = data.find_labelled

def find_labelled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return found(*args, **kwargs)

atexit.register(lambda: Path(os.environ["SEEN"]).write_text(str("tensorflow" in sys.modules)))
data.find_labelled = find_labelled
sys.exit(entry.main(sys.argv[1:]))
"""


def test_a_cancel_while_the_data_is_found_stops_before_tensorflow_starts(tmp_path, small_sample):
    out, seen = tmp_path / "out", tmp_path / "tf-imported"
    result = _patched_trainer(STOPPED_IN_DATA, small_sample, out, SEEN=str(seen))
    assert result.returncode == 75, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], result.stderr
    assert seen.read_text() == "False"
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
