"""A user's day on an SSH box and on an EC2 box, with faults between and inside the steps;
the invariants of tests/journey.py are checked after every step."""

from __future__ import annotations

import shutil
import signal
import sys
import zipfile
from pathlib import Path

import pytest

from orchestrator.sample import generate
from tests import awsfakes
from tests import sshd as sshd_mod
from tests.journey import Day, copy_dataset, quick_python

pytestmark = pytest.mark.slow
ONE_EPOCH = ("--epochs", "1", "--img-size", "32")
# of the big dataset's 150 files on the box when the link is cut (4 upload streams at most)
ARRIVED_BEFORE_CUT = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """80 labelled images and 2 test images: a run takes seconds."""
    root = tmp_path_factory.mktemp("tiny")
    generate(root, 80, test_n=2, seed=5)
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """150 labelled images (~3.5 MB, two seconds at the rate _drop_mid_sync allows): long
    enough to send that a link can drop midway."""
    root = tmp_path_factory.mktemp("big")
    generate(root, 150, test_n=0, seed=6)
    return root


def _zip_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    with zipfile.ZipFile(target / "train.zip", "w") as zf:
        for f in sorted((source / "train").iterdir()):
            zf.write(f, f"train/{f.name}")
    return target


def _detach_then_cancel(day: Day, data: Path) -> Path:
    """A long run: Ctrl-C detaches; cancel stops it (checkpointed); attach resumes it and a
    second cancel stops it again; pull twice."""
    proc = day.start("train", "scratch", "--data", str(data), "--epochs", "200", "--patience", "0",
                     "--img-size", "32")
    before = len(day.runs())

    def first_epoch() -> bool:
        runs = day.runs()
        return len(runs) > before and (Path(day.record(runs[-1])["remote_dir"]) / "history.csv").exists()

    day.until(first_epoch, proc, "the long run's first epoch")
    proc.send_signal(signal.SIGINT)
    detached = day.finish(proc, ("train", "..."))
    run = day.runs()[-1]
    assert detached.code == 130 and f"detached; run {run.name} goes on" in detached.stdout
    cancel = day.dlbox("cancel", run.name)
    assert "interrupted (exit 75)" in cancel.stdout
    # A cancelled run stopped resumable: attach resumes it where it is, cancel stops it again.
    resumes = day.start("attach", run.name)
    log = Path(day.record(run)["remote_dir"]) / "train.log"  # the same folder: resumed in place
    day.until(lambda: "resuming after epoch" in log.read_text(), resumes, "the run to resume")
    assert "interrupted (exit 75)" in day.dlbox("cancel", run.name).stdout
    again = day.finish(resumes, ("attach", "..."))
    assert again.code == 75 and f"run {run.name} resumed on" in again.stdout, again
    assert "from its checkpoint after" in again.stdout and "SIGTERM" in again.stderr, again
    for _ in range(2):
        assert "pulled into" in day.dlbox("pull", run.name).stdout
    assert day.record(run)["status"] == "interrupted"
    return run


def _drop_mid_sync(day: Day, data: Path) -> None:
    """The link goes down while the dataset is on its way; the next train sends the rest."""
    # ~7 s for its 3.5 MB: the cut lands mid-way, loaded machine or not
    day.proxy.rate_bytes_per_s = 500_000
    proc = day.start("train", "scratch", "--data", str(data), *ONE_EPOCH)
    arriving = day.remote / "data"
    # Files whole on the box (tar writes a file's bytes, then its time: the next sync skips
    # it), not merely begun: each stream has one file under way.
    day.until(lambda: len(list(arriving.glob(f"{data.name}-*/{data.name}/train/*.jpg")))
              >= ARRIVED_BEFORE_CUT, proc, "the first files")
    assert day.proxy.cut() > 0
    dropped = day.finish(proc, ("train", "(link dropped)"))
    assert dropped.code == 1 and "dropped" in dropped.stderr, str(dropped)
    day.proxy.rate_bytes_per_s = None
    day.check_invariants()
    resumed = day.dlbox("train", "scratch", "--data", str(data), *ONE_EPOCH)
    sent, total = _sent(resumed.stdout, data.name)
    assert 0 < sent < total, resumed.stdout


def _drop_mid_pull(day: Day, run: Path) -> None:
    """The link goes down while results come back: nothing partial stays; pull again."""
    day.proxy.rate_bytes_per_s = 200_000
    proc = day.start("pull", run.name)
    partial = day.project / ".dlbox" / "partial"  # downloads grow there until verified
    day.until(lambda: any(partial.glob("*.part")), proc, "the pull's first file")
    assert day.proxy.cut() > 0
    dropped = day.finish(proc, ("pull", "(link dropped)"))
    assert dropped.code == 1, str(dropped)
    day.proxy.rate_bytes_per_s = None
    day.check_invariants()
    day.dlbox("pull", run.name)


def _sent(stdout: str, name: str) -> tuple[int, int]:
    line = next(line for line in stdout.splitlines() if line.startswith(f"{name}: sent "))
    words = line.split()
    return int(words[2]), int(words[4])


def _kill_midway(day: Day, *args: str) -> None:
    """dlbox killed (SIGKILL) at points all through a command; afterwards it still works."""
    for delay in (0.3, 1.0, 2.5, 5.0):
        day.dlbox(*args, kill_after_s=delay)
        day.check_invariants()
    day.dlbox(*args)


def test_a_day_on_an_ssh_box(tmp_path, tiny, big):
    server = sshd_mod.start(tmp_path / "box")
    day = Day(tmp_path, server=server)
    data = copy_dataset(tiny, tmp_path / "data")
    train = ("train", "scratch", "--data", str(data), *ONE_EPOCH)
    try:
        with day.step("up on an SSH box"):
            day.up_ssh()
        with day.step("train: new data, the same again, changed, a zip"):
            first = day.dlbox(*train)
            assert _sent(first.stdout, "data") == (82, 82)
            assert "data: already on the box (82 files, verified)" in day.dlbox(*train).stdout
            (data / "train" / "cat.0.jpg").unlink()
            shutil.copy(data / "train" / "dog.1.jpg", data / "train" / "dog.1000.jpg")
            assert _sent(day.dlbox(*train).stdout, "data") == (1, 82)
            zipped = _zip_folder(data, tmp_path / "zipped")
            day.dlbox("train", "scratch", "--data", str(zipped), *ONE_EPOCH)
            day.check_invariants()
        with day.step("Ctrl-C detaches, cancel, attach"):
            run = _detach_then_cancel(day, data)
            day.check_invariants()
        with day.step("the box's host key changes"):
            day.new_host_key()
            refused = day.dlbox("pull", run.name, ok=False)
            assert "CHANGED" in refused.stderr and "known_hosts" in refused.stderr
            day.forget_host_key()  # what the message says to do, once the user trusts the box
            day.up_ssh()
            day.dlbox("pull", run.name)
        with day.step("the link drops mid-sync, then mid-pull"):
            _drop_mid_sync(day, copy_dataset(big, tmp_path / "big"))
            _drop_mid_pull(day, day.runs()[-1])
        with day.step(".dlbox/ is lost while the box and its runs are not"):
            shutil.rmtree(day.project / ".dlbox")
            assert "no box is up" in day.dlbox("status").stdout
            assert "no box is up" in day.dlbox(*train, ok=False).stderr
            day.up_ssh()
            day.dlbox("attach", run.name, ok=None)
            day.check_invariants()
        with day.step("dlbox SIGKILLed all through train and pull"):
            _kill_midway(day, *train)
            _kill_midway(day, "pull", day.runs()[-1].name)
        with day.step("down --purge, then the local box"):
            day.dlbox("down", "--purge")
            assert not day.remote.exists()
            day.dlbox("up", "--local", "--python", quick_python())  # the real check: test_local_box
            day.dlbox(*train)
            day.dlbox("down")
            day.check_invariants()
    finally:
        day.close()
        day.kill_runs()
        sshd_mod.stop(day.server)


def test_a_day_on_an_ec2_box(tmp_path, aws, moto_url, ip_lookup_url, tiny):
    from orchestrator import keys

    server = sshd_mod.start(tmp_path / "box")
    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": awsfakes.REGION,
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE":
           str(tmp_path / "none"), "DLBOX_IP_LOOKUP_URL": ip_lookup_url}
    day = Day(tmp_path, env=env, server=server, ec2=aws)
    sshd_mod.authorize(server, keys.ensure(day.project / ".dlbox" / "keys")[1])
    (day.project / "dlbox.toml").write_text(
        f"ssh_port = {day.proxy.port}\nssh_user = {server.user!r}\npython = {sys.executable!r}\n"
        f"box_workdir = {str(day.remote)!r}\n")
    data = copy_dataset(tiny, tmp_path / "data")
    train = ("train", "scratch", "--data", str(data), *ONE_EPOCH)
    try:
        with awsfakes.public_ip("127.0.0.1"):
            with day.step("up on EC2, train, the same data again, up again"):
                day.dlbox("up")
                day.check_invariants()
                day.dlbox(*train)
                assert "already on the box" in day.dlbox(*train).stdout
                assert "reusing box" in day.dlbox("up").stdout
            with day.step("Ctrl-C detaches, cancel, attach"):
                run = _detach_then_cancel(day, data)
                day.check_invariants()
            with day.step("the box's host key changes"):
                day.new_host_key()
                assert "CHANGED" in day.dlbox("pull", run.name, ok=False).stderr
                day.forget_host_key()
                day.dlbox("up")  # reuses the box and pins its new key
                day.dlbox("pull", run.name)
            with day.step("up SIGKILLed, then .dlbox/state.json lost while the box runs"):
                _kill_midway(day, "up")
                [instance] = day.live_instances()
                (day.project / ".dlbox" / "state.json").unlink()  # lost while the box runs
                day.check_invariants()  # still found by its tags
                assert "no box is up" in day.dlbox("status").stdout
                assert "found" in day.dlbox("up").stdout  # the project's instance, by its tag
                assert day.live_instances() == [instance]
                (day.project / ".dlbox" / "state.json").unlink()
                assert "did not record: terminated" in day.dlbox("down").stdout
                assert day.live_instances() == []
            with day.step("up SIGKILLed during the launch, the wait, the login; then down"):
                for delay in (0.5, 1.5, 3.0):
                    day.dlbox("up", kill_after_s=delay)
                    day.check_invariants()
                    day.dlbox("down")  # recorded or not (killed before the id was): by its tag
                    assert day.live_instances() == []
            with day.step("the local box after EC2"):
                day.dlbox("up", "--local", "--python", quick_python())
                day.dlbox(*train)
                day.dlbox("down")
                day.check_invariants()
                assert day.live_instances() == []
    finally:
        day.close()
        day.kill_runs()
        sshd_mod.stop(day.server)


def test_a_failed_journey_step_names_itself_and_what_it_ran(tmp_path):
    day = Day(tmp_path)
    with day.step("first"):
        pass
    with pytest.raises(AssertionError) as caught, day.step("second"):
        day.dlbox("--version")
        raise AssertionError("the box said no")
    assert caught.value.__notes__ == ["journey step 2 failed: second (it ran: dlbox --version)"]
