"""The spot watcher and run.sh run for real against a stand-in metadata service: a notice becomes
a checkpoint (SIGTERM, exit 75), and no watcher outlives its run."""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.render import render
from orchestrator.spotwatch import CURL_TIMEOUT_S, NOTICE_FILE, POLL_S, SCRIPT_FILE, script
from tests.imds import INSTANCE_ACTION, REBALANCE, TOKEN_PATH, Imds

LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)$")  # as orchestrator/follow.py
# The watcher as rendered with a 1 s poll: what the tests wait for is the same, sooner
# (test_the_watcher_script_is_valid_and_wants_a_pid checks the real POLL_S is rendered).
WATCH_POLL_S = 1
# From the notice to the trainer's SIGTERM: the rest of the poll under way and the next
# one, each with its requests (a token renewal is one more); generous for a loaded machine.
NOTICE_BOUND_S = 2 * WATCH_POLL_S + 2 * CURL_TIMEOUT_S + 2
TAG = "SPOTWATCH_TEST_TAG"  # in the environment of every process a test starts, to find them
# The trainer as far as the watcher sees it: SIGTERM -> a checkpoint (here a marker) -> exit 75.
TRAINER = """\
import os, signal, sys, time
from pathlib import Path

def stop(signum, frame):
    Path("trainer-got-sigterm").write_text(repr(time.time()))
    sys.exit(75)

signal.signal(signal.SIGTERM, stop)
Path("trainer-ready.tmp").write_text(str(os.getpid()))
os.replace("trainer-ready.tmp", "trainer-ready")  # whole: the test reads it once it exists
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end and not os.path.exists("trainer-release"):  # or the test ends it
    time.sleep(0.05)
"""


def _wait_for(check, timeout: float, what: str):
    """check()'s first truthy value, polled until timeout."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)
    return value


def _tagged(tag: str) -> set[int]:
    """The live processes (not zombies) whose environment holds tag."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.add(int(proc.name))
            except OSError:
                continue  # gone, or not ours
    return found


def _warnings(run: Path) -> list[str]:
    path = run / "train.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [m[2] for line in lines if (m := LOG_LINE.match(line)) and m[1] == "WARNING"]


class Box:
    """A run's folder and the processes a test starts in it, all tagged, all ended afterwards."""

    def __init__(self, tmp_path: Path, endpoint: str) -> None:
        self.run = tmp_path / "run"
        self.run.mkdir()
        (self.run / SCRIPT_FILE).write_text(script(WATCH_POLL_S))
        (tmp_path / "trainer.py").write_text(TRAINER)
        self.trainer_py = tmp_path / "trainer.py"
        self.tag = f"{TAG}={uuid.uuid4().hex}"
        self.env = {**os.environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT": endpoint,
                    TAG: self.tag.partition("=")[2]}
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=self.run, env=self.env, stdin=subprocess.DEVNULL,
                                **kwargs)
        self.procs.append(proc)
        return proc

    def trainer(self, seconds: float = 60) -> subprocess.Popen:
        proc = self.start([sys.executable, str(self.trainer_py), str(seconds)])
        _wait_for(lambda: (self.run / "trainer-ready").exists(), 10, "trainer")
        return proc

    def release(self) -> None:
        """The trainer ends now, with exit status 0."""
        (self.run / "trainer-release").touch()

    def watcher(self, trainer_pid: int) -> subprocess.Popen:
        return self.start(["bash", SCRIPT_FILE, str(trainer_pid)])

    def left(self) -> set[int]:
        """The processes started here still alive."""
        return _tagged(self.tag)

    def close(self) -> None:
        for pid in self.left():
            os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture()
def imds():
    with Imds() as server:
        yield server


@pytest.fixture()
def box(tmp_path, imds):
    made = Box(tmp_path, imds.url + "/")  # a trailing slash, as a user may write it
    yield made
    made.close()


def test_a_notice_checkpoints_the_trainer_and_is_recorded(box, imds):
    trainer = box.trainer()
    watcher = box.watcher(trainer.pid)
    _wait_for(lambda: imds.count(REBALANCE), 10, "first poll")
    assert imds.refused == 0  # every GET carried the token of a PUT before it
    imds.expire_tokens()  # the next GET is refused: the watcher must get a new token
    announced = time.time()
    imds.announce("terminate", "2026-12-04T19:32:00Z")

    assert trainer.wait(timeout=NOTICE_BOUND_S + 2) == 75
    got_sigterm = float((box.run / "trainer-got-sigterm").read_text())
    assert got_sigterm - announced < NOTICE_BOUND_S
    assert watcher.wait(timeout=5) == 0
    notice = json.loads((box.run / NOTICE_FILE).read_text())
    assert notice.keys() == {"action", "time", "noticed_at"}
    assert (notice["action"], notice["time"]) == ("terminate", "2026-12-04T19:32:00Z")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", notice["noticed_at"])
    noticed_at = calendar.timegm(time.strptime(notice["noticed_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert -1 <= noticed_at - announced < NOTICE_BOUND_S
    assert _warnings(box.run) == ["EC2 spot interruption notice (terminate at "
                                  "2026-12-04T19:32:00Z): checkpointing now"]
    assert (imds.count(TOKEN_PATH), imds.refused) == (2, 1)  # renewed once, when refused
    assert not [p.name for p in box.run.iterdir() if p.name.endswith(".tmp")]
    assert box.left() == set()


def test_a_hostile_notice_cannot_reach_the_shell_json_or_log(box, imds):
    imds.announce('stop"; $(touch pwned) `touch pwned`\\', 'soon\n2026-12-04 WARNING "}<x>')
    trainer = box.trainer()
    watcher = box.watcher(trainer.pid)
    assert trainer.wait(timeout=NOTICE_BOUND_S) == 75
    assert watcher.wait(timeout=5) == 0
    notice = json.loads((box.run / NOTICE_FILE).read_text())
    for value in (notice["action"], notice["time"]):
        assert re.fullmatch(r"[A-Za-z0-9:.T Z-]*", value), value
    assert notice["action"].startswith("stop")
    assert not (box.run / "pwned").exists()
    assert len(_warnings(box.run)) == 1
    assert len((box.run / "train.log").read_text().splitlines()) == 1


def test_a_rebalance_recommendation_is_logged_once_and_watching_goes_on(box, imds):
    imds.recommend_rebalance()
    trainer = box.trainer()
    watcher = box.watcher(trainer.pid)
    # A third poll has begun: the second has seen the recommendation again, and is done.
    _wait_for(lambda: imds.count(INSTANCE_ACTION) >= 3, 2 * WATCH_POLL_S + 5, "third poll")
    assert imds.count(REBALANCE) >= 2
    assert _warnings(box.run) == [
        "EC2 rebalance recommendation: this spot box is at elevated risk of interruption"]
    assert watcher.poll() is None and trainer.poll() is None
    assert not (box.run / NOTICE_FILE).exists()

    watcher.send_signal(signal.SIGTERM)  # it ends at once, its child processes with it
    assert watcher.wait(timeout=CURL_TIMEOUT_S + 1) == 0
    assert box.left() == {trainer.pid}


def test_the_watcher_ends_with_the_trainer(box, imds):
    trainer = box.trainer()
    watcher = box.watcher(trainer.pid)
    _wait_for(lambda: imds.count(INSTANCE_ACTION) >= 1, 2 * WATCH_POLL_S + 5, "first poll")
    box.release()
    assert trainer.wait(timeout=10) == 0
    ended = time.monotonic()
    watcher.wait(timeout=WATCH_POLL_S + 2 * CURL_TIMEOUT_S + 2)
    assert time.monotonic() - ended < WATCH_POLL_S + 2 * CURL_TIMEOUT_S + 2
    assert watcher.returncode == 0
    assert box.left() == set()
    assert not (box.run / "train.log").exists()


@pytest.fixture()
def silent_endpoint():
    """A server that accepts connections and never answers a byte; yields its connection count."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return  # closed

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", held
    server.close()
    for conn in held:
        conn.close()


def test_a_metadata_service_that_never_answers_does_not_hang_the_watcher(box, silent_endpoint):
    url, held = silent_endpoint
    box.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = url
    trainer = box.trainer()
    watcher = box.watcher(trainer.pid)
    _wait_for(lambda: held, 2 * WATCH_POLL_S + 5, "request")
    box.release()
    assert trainer.wait(timeout=10) == 0
    ended = time.monotonic()
    watcher.wait(timeout=WATCH_POLL_S + CURL_TIMEOUT_S + 3)  # one request at most was hanging
    assert time.monotonic() - ended < WATCH_POLL_S + CURL_TIMEOUT_S + 3
    assert watcher.returncode == 0
    assert box.left() == set()


def _run_sh(tmp_path: Path, box: Box, spot_watch: bool) -> subprocess.Popen:
    """run.sh as launch.start() renders and starts it, its trainer package the stand-in above."""
    code = tmp_path / "code"
    (code / "trainer").mkdir(parents=True)
    (code / "trainer" / "__main__.py").write_text(TRAINER)
    (box.run / "run.sh").write_text(render(
        "run.sh.j2", run_id="20261204-193000-scratch", out=str(box.run), code_dir=str(code),
        python=sys.executable, args=["60"], registry=str(tmp_path / "active"),
        spot_watch=spot_watch))
    run_sh = box.start(["bash", "run.sh"], start_new_session=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (box.run / "trainer-ready").exists(), 10, "trainer")
    return run_sh


def test_run_sh_with_spot_watch_checkpoints_on_a_notice(tmp_path, box, imds):
    run_sh = _run_sh(tmp_path, box, spot_watch=True)
    _wait_for(lambda: imds.count(REBALANCE), 10, "first poll")
    imds.announce()
    code = _wait_for(lambda: (box.run / "exit_code").exists() and (box.run / "exit_code"),
                     NOTICE_BOUND_S + 2, "exit_code")
    assert code.read_text() == "75\n"
    assert run_sh.wait(timeout=5) == 0
    assert json.loads((box.run / NOTICE_FILE).read_text())["action"] == "terminate"
    assert (box.run / "trainer-got-sigterm").exists()
    assert (box.run / "trainer_ended_at").exists()
    assert not (tmp_path / "active" / "20261204-193000-scratch.pid").exists()
    assert box.left() == set()


def test_a_sigterm_to_run_sh_ends_its_watcher(tmp_path, box, imds):
    run_sh = _run_sh(tmp_path, box, spot_watch=True)
    trainer_pid = int((box.run / "trainer-ready").read_text())
    _wait_for(lambda: imds.count(REBALANCE), 10, "first poll")
    run_sh.send_signal(signal.SIGTERM)
    assert run_sh.wait(timeout=5) == -signal.SIGTERM  # it dies of it, as without a watcher
    _wait_for(lambda: box.left() == {trainer_pid}, CURL_TIMEOUT_S + 1, "watcher's end")


def test_run_sh_without_spot_watch_is_as_before():
    values = dict(run_id="r1", out="/w/runs/r 1", code_dir="/w/code", python="/usr/bin/python3",
                  args=["scratch", "--data", "/w/d"], registry="/w/active")
    script_sh = render("run.sh.j2", spot_watch=False, **values)
    assert script_sh == render("run.sh.j2", **values)  # callers that do not say are unchanged
    assert "spotwatch" not in script_sh and "wait" not in script_sh
    assert ("/usr/bin/python3 -m trainer scratch --data /w/d > stdout.log 2>&1\nstatus=$?\n"
            in script_sh)
    with_watch = render("run.sh.j2", spot_watch=True, **values)
    assert f'bash {SCRIPT_FILE} "$trainer_pid"' in with_watch
    for text in (script_sh, with_watch):
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_the_watcher_script_is_valid_and_wants_a_pid(tmp_path):
    text = script()
    assert f"-m {CURL_TIMEOUT_S} " in text and f"read -r -t {POLL_S} " in text
    assert not re.search(r"^\s*sleep\b", text, re.M)  # no child left waiting when killed
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    (tmp_path / SCRIPT_FILE).write_text(text)
    done = subprocess.run(["bash", SCRIPT_FILE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=10)
    assert done.returncode == 2 and "usage" in done.stderr
