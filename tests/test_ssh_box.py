"""An SSH box end to end against a real OpenSSH server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cli import CLI_TIMEOUT_S, DLBOX, dlbox, up_ssh
from tests.disks import needs_root
from tests.sshd import free_port


def _target(sshd, known_hosts: Path):
    from orchestrator.sshtarget import SshTarget

    return SshTarget(sshd.host, sshd.port, sshd.user, str(sshd.client_key), str(known_hosts))


@pytest.fixture()
def ssh_up(tmp_path, sshd):
    """An SSH box whose `up` checked TensorFlow with a stand-in (quick_python, ~3 s sooner);
    its runs train with the real one. The real check over SSH: the SSH journey's first `up`
    (tests/test_journeys.py) and the EC2 tests that set python (tests/test_cli_ec2.py)."""
    project, remote = tmp_path / "proj", tmp_path / "remote"
    project.mkdir()
    up = up_ssh(project, sshd, workdir=remote)
    assert up.returncode == 0, up.stderr
    return project, remote


@pytest.mark.slow
def test_up_ssh_train_pull_down(ssh_up, sshd, small_sample):
    project, remote = ssh_up
    known = (project / ".dlbox" / "known_hosts").read_text()
    assert sshd.host_public_key.split()[1] in known  # pinned at `up`
    train = dlbox(project, "train", "scratch", "--data", str(small_sample), "--test",
                  str(small_sample), "--epochs", "2", "--img-size", "32")
    assert train.returncode == 0, train.stdout + train.stderr
    assert f"{small_sample.name}: sent 205 of 205 files" in train.stdout  # train/ and test1/
    [run] = [p for p in (project / "runs").iterdir() if p.is_dir()]
    for name in ("model.keras", "history.csv", "metrics.json", "train.log", "submission.csv"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert metrics["arguments"]["data"].startswith(str(remote / "data"))  # trained on the copy
    assert "dog.99.jpg" in os.listdir(Path(metrics["arguments"]["data"]) / "train")
    [code] = [p for p in (remote / "code").iterdir() if p.is_dir()]  # beside dlbox's marker
    assert (code / "trainer" / "__main__.py").exists()

    again = dlbox(project, "train", "scratch", "--data", str(small_sample), "--epochs", "1",
                  "--img-size", "32")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{small_sample.name}: already on the box (205 files, verified)" in again.stdout

    assert (run / "report.html").stat().st_size > 0
    listing = dlbox(project, "runs")
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    assert rows[0][:3] == ["run", "model", "status"]
    assert [r[:3] for r in rows[1:]] == [[p.name, "scratch", "done"] for p in _runs(project)]

    down = dlbox(project, "down", "--purge")
    assert down.returncode == 0, down.stderr
    assert not remote.exists()
    assert (run / "model.keras").exists()


def _runs(project: Path) -> list[Path]:
    return sorted(p for p in (project / "runs").iterdir() if p.is_dir())


def _kaggle_sized_zip(path: Path, entries: int) -> None:
    """train.zip with Kaggle's 20,000-ish entries: tiny JPEGs (two looks), cat.N and dog.N."""
    import io
    import zipfile

    from PIL import Image

    looks = []
    for colour in ((200, 120, 40), (40, 90, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buf, "JPEG")
        looks.append(buf.getvalue())
    with zipfile.ZipFile(path, "w") as zf:
        for n in range(entries):
            label = ("cat", "dog")[n % 2]
            zf.writestr(f"train/{label}.{n // 2}.jpg", looks[n % 2])


@pytest.mark.slow
def test_a_second_run_on_a_zip_folder_sends_nothing_and_trains(ssh_up, tmp_path):
    """The trainer never writes inside the synced copy: the next sync finds it exact."""
    project, remote = ssh_up
    data = tmp_path / "kaggle"
    data.mkdir()
    _kaggle_sized_zip(data / "train.zip", 20_000)
    args = ["train", "scratch", "--data", str(data), "--epochs", "1", "--img-size", "32",
            "--limit", "200"]
    first = dlbox(project, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{data.name}: sent 1 of 1 files" in first.stdout
    [copy] = [p for p in (remote / "data").iterdir() if p.is_dir()]
    assert sorted(p.name for p in copy.rglob("*")) == ["kaggle", "train.zip"]  # untouched
    [extracted] = [p for p in (remote / "extracted").iterdir() if p.is_dir()]
    assert len(list((extracted / "train").iterdir())) == 20_000

    second = dlbox(project, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{data.name}: already on the box (1 files, verified)" in second.stdout
    assert [p.name for p in (remote / "extracted").iterdir() if p.is_dir()] == [extracted.name]
    assert "Traceback" not in first.stderr + second.stderr


@pytest.mark.slow
def test_a_dropped_link_while_following_is_one_line_and_attach_finishes(tmp_path, sshd,
                                                                        small_sample):
    """The SSH link goes down mid-run: `train` says so in one line and exits; the run goes
    on on the box; `attach` follows it again and pulls the results."""
    from tests.tcpproxy import Proxy

    proxy = Proxy(sshd.host, sshd.port)
    project, remote = tmp_path / "proj", tmp_path / "remote"
    project.mkdir()
    try:
        up = up_ssh(project, sshd, workdir=remote, port=proxy.port)
        assert up.returncode == 0, up.stderr
        train = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(small_sample),
                                  "--epochs", "6", "--patience", "0", "--img-size", "32"],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not list((remote / "runs").glob("*/history.csv")):
            assert train.poll() is None and time.monotonic() < deadline, train.communicate()
            time.sleep(0.1)
        assert proxy.cut() > 0  # the link goes down; the box and its run do not
        out, err = train.communicate(timeout=CLI_TIMEOUT_S)
        assert train.returncode == 1, out + err
        [run] = _runs(project)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "lost the SSH connection" in err and f"dlbox attach {run.name}" in err

        attach = dlbox(project, "attach", run.name)
        assert attach.returncode == 0, attach.stdout + attach.stderr
        assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 6
    finally:
        proxy.close()


def test_changed_host_key_is_refused(ssh_up, sshd, tmp_path):
    project, _ = ssh_up
    known = project / ".dlbox" / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    known.write_text(known.read_text().replace(sshd.host_public_key.split()[1],
                                               (tmp_path / "k.pub").read_text().split()[1]))
    result = dlbox(project, "train", "scratch", "--data", str(tmp_path))
    assert result.returncode == 1
    assert "host key of 127.0.0.1" in result.stderr and "CHANGED" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_box_names_host_and_port(tmp_path, sshd):
    port = free_port()
    result = dlbox(tmp_path, "up", "--ssh", f"root@127.0.0.1:{port}", "--key",
                   str(sshd.client_key), "--python", sys.executable)
    assert result.returncode == 1
    assert f"cannot reach 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_ssh_user_errors(tmp_path, sshd):
    for args, needle in [
        (["--ssh", "nohost"], "USER@HOST"),
        (["--ssh", "root@127.0.0.1"], "--key"),
        (["--ssh", "root@127.0.0.1", "--key", "/no/key"], "no such file"),
        (["--local", "--ssh", "root@h"], "exclude"),
    ]:
        result = dlbox(tmp_path, "up", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_console_fingerprints_decide_whether_a_new_host_key_is_pinned(tmp_path, sshd):
    """EC2 prints its host keys' fingerprints on the console: a different key is refused."""
    from orchestrator.errors import DlboxError
    from orchestrator.hostkeys import console_fingerprints
    from orchestrator.sshmachine import SshMachine

    keygen = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                             str(sshd.client_key.parent / "host_ed25519.pub")],
                            capture_output=True, text=True, check=True)
    real = keygen.stdout.split()[1]
    console = ("cloud-init: ...\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
               f"256 {real} root@box (ED25519)\n-----END SSH HOST KEY FINGERPRINTS-----\n")
    assert console_fingerprints(console) == {real}
    assert console_fingerprints("booting...\n") == set()
    forged = {"SHA256:" + "A" * 43}
    with pytest.raises(DlboxError, match="does not list"):
        SshMachine(_target(sshd, tmp_path / "kh1"), pin_new_host=True,
                   expected_fingerprints=forged).run("true")
    assert (tmp_path / "kh1").read_text() == ""  # nothing pinned
    machine = SshMachine(_target(sshd, tmp_path / "kh2"), pin_new_host=True,
                         expected_fingerprints={real})
    assert machine.run("echo ok").stdout.strip() == "ok"
    machine.close()
    assert sshd.host_public_key.split()[1] in (tmp_path / "kh2").read_text()


def test_up_ssh_builds_the_box_venv_once_then_reuses_it(tmp_path, sshd):
    from tests import fakewheels

    wheels = fakewheels.build_all(tmp_path / "wheels")
    project, remote = tmp_path / "proj", tmp_path / "remote"
    project.mkdir()
    (project / "dlbox.toml").write_text(
        'box_requirements = ["tensorflow", "keras"]\n'
        f'pip_args = ["--no-index", "--find-links", {str(wheels)!r}]\n')
    args = ["up", "--ssh", f"{sshd.user}@{sshd.host}:{sshd.port}", "--key", str(sshd.client_key),
            "--workdir", str(remote)]
    first = dlbox(project, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"dlbox-env: built {remote}/env" in first.stdout
    assert "0 GPU(s)" in first.stdout and "warning: TensorFlow sees no GPU" in first.stdout
    [box] = json.loads((project / ".dlbox" / "state.json").read_text())["boxes"]
    assert box["python"] == f"{remote}/env/bin/python"
    again = dlbox(project, *args)
    assert again.returncode == 0, again.stderr
    assert f"dlbox-env: reused {remote}/env" in again.stdout
    (project / "dlbox.toml").write_text('box_requirements = ["no-such-package-xyz"]\n'
                                         'pip_args = ["--no-index"]\n')
    broken = dlbox(project, *args)
    assert broken.returncode == 1
    assert "could not build the Python environment" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_sync_sends_only_what_differs_and_resumes_a_half_sent_copy(tmp_path, sshd, small_sample):
    import shutil

    from orchestrator import sync
    from orchestrator.sshmachine import SshMachine

    data = tmp_path / "data"
    shutil.copytree(small_sample, data)
    machine = SshMachine(_target(sshd, tmp_path / "known_hosts"), pin_new_host=True)
    workdir = str(tmp_path / "box")
    try:
        first = sync.sync(machine, data, workdir)
        assert (first.files, first.sent_files) == (205, 205)
        assert first.sent_bytes == sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        assert sync.sync(machine, data, workdir).sent_files == 0  # unchanged: nothing sent

        copy = Path(first.remote_path)
        arrived = sorted((copy / "train").iterdir())
        for path in arrived[:100]:  # as if the first sync had been killed halfway
            path.unlink()
        arrived[150].write_bytes(arrived[150].read_bytes()[:100])  # and one file cut short
        changed = arrived[120].name
        (data / "train" / changed).write_bytes(b"changed")  # one changed here
        (data / "test1" / "2.jpg").unlink()  # one deleted here
        seen = []
        resumed = sync.sync(machine, data, workdir, progress=lambda done, total: seen.append(done))
        assert resumed.sent_files == 100 + 1 + 1  # the missing, the cut short, the changed
        assert resumed.removed_files == 1 and not (copy / "test1" / "2.jpg").exists()
        assert seen and seen[-1] == resumed.sent_bytes
        assert (copy / "train" / changed).read_bytes() == b"changed"
        assert sync.sync(machine, data, workdir).sent_files == 0
    finally:
        machine.close()


@needs_root
def test_a_full_disk_on_the_box_is_one_clear_line(tmp_path, sshd, small_sample):
    from tests.disks import small_disk

    project = tmp_path / "proj"
    project.mkdir()
    with small_disk(tmp_path / "remote", "1m") as remote:  # the sample is ~4 MB
        up = up_ssh(project, sshd, workdir=remote)
        assert up.returncode == 0, up.stderr
        result = dlbox(project, "train", "scratch", "--data", str(small_sample))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the box's disk is full" in result.stderr and str(remote) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (project / "runs").exists() or not any((project / "runs").iterdir())


@needs_root
@pytest.mark.slow
def test_a_disk_that_fills_while_training_is_exit_74_and_one_line(tmp_path, sshd, small_sample):
    from tests.disks import small_disk

    project = tmp_path / "proj"
    project.mkdir()
    # Room for the ~4 MB sample and the run's files, not for a 13.5 MB image cache.
    with small_disk(tmp_path / "remote", "8m") as remote:
        up = up_ssh(project, sshd, workdir=remote)
        assert up.returncode == 0, up.stderr
        result = dlbox(project, "train", "scratch", "--data", str(small_sample), "--cache", "disk",
                       "--img-size", "150", "--epochs", "1")
    assert result.returncode == 74, result.stdout + result.stderr
    assert "no space left on the device" in result.stderr and "--resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    [run] = [p for p in (project / "runs").iterdir() if p.is_dir()]
    assert json.loads((run / "run.json").read_text())["status"] == "failed"  # recorded, logs pulled
    assert "no space left" in (run / "train.log").read_text()


def test_sync_deletes_20000_files_without_one_long_command(tmp_path, sshd):
    """Files deleted here are deleted there with their names on stdin: no command line,
    however many (one `rm` with 20,000 names broke the SSH channel)."""
    from orchestrator import sync
    from orchestrator.sshmachine import SshMachine

    data = tmp_path / "many"
    (data / "train").mkdir(parents=True)
    for n in range(20_000):
        (data / "train" / f"cat.{n}.jpg").write_bytes(b"x")
    machine = SshMachine(_target(sshd, tmp_path / "known_hosts"), pin_new_host=True)
    try:
        first = sync.sync(machine, data, str(tmp_path / "box"))
        assert first.sent_files == 20_000
        for n in range(1, 20_000):
            (data / "train" / f"cat.{n}.jpg").unlink()
        second = sync.sync(machine, data, str(tmp_path / "box"))
        assert (second.removed_files, second.sent_files) == (19_999, 0)
        assert os.listdir(Path(second.remote_path) / "train") == ["cat.0.jpg"]
    finally:
        machine.close()


ODD_NAMES = ["new\nline.jpg", "tab\there.jpg", "space d.jpg", "-leading-dash.jpg", "quote'\".jpg",
             "$(touch PWNED).jpg", "; rm -rf x.jpg", "ünïcødé.jpg", "\\back.jpg", "*.jpg"]


def test_sync_keeps_names_with_odd_bytes_exact(tmp_path, sshd):
    """Names with newlines, shell syntax, non-UTF-8 bytes: copied exactly, nothing executed,
    and a second sync sends nothing."""
    from orchestrator import sync
    from orchestrator.sshmachine import SshMachine

    data = tmp_path / "odd"
    (data / "train").mkdir(parents=True)
    names = [*ODD_NAMES, os.fsdecode(b"latin1-\xe9t\xe9.jpg")]
    for i, name in enumerate(names):
        (data / "train" / name).write_bytes(f"image {i}".encode())
    machine = SshMachine(_target(sshd, tmp_path / "known_hosts"), pin_new_host=True)
    workdir = tmp_path / "box"
    try:
        first = sync.sync(machine, data, str(workdir))
        assert first.sent_files == len(names)
        copy = Path(first.remote_path) / "train"
        assert sorted(os.listdir(os.fsencode(copy))) == sorted(os.fsencode(n) for n in names)
        for i, name in enumerate(names):
            assert (copy / name).read_bytes() == f"image {i}".encode()
        assert sync.sync(machine, data, str(workdir)).sent_files == 0
        (data / "train" / names[0]).unlink()
        assert sync.sync(machine, data, str(workdir)).removed_files == 1
        assert not (copy / names[0]).exists()
    finally:
        machine.close()
    assert not list(tmp_path.rglob("PWNED"))


def test_a_link_dropped_during_a_command_is_lost_contact(tmp_path, sshd):
    """Not a command that "exited -1" with half its output: the caller must know."""
    from orchestrator.errors import LostContact
    from orchestrator.sshmachine import SshMachine
    from tests.tcpproxy import Proxy

    proxy = Proxy(sshd.host, sshd.port)
    target = _target(sshd, tmp_path / "known_hosts")
    machine = SshMachine(type(target)(target.host, proxy.port, target.user, target.key_path,
                                      target.known_hosts), pin_new_host=True)
    try:
        assert machine.run("echo ok").stdout == "ok\n"
        timer = threading.Timer(1.0, proxy.cut)
        timer.start()
        with pytest.raises(LostContact, match=r"lost the SSH connection .* run the command again"):
            machine.run("echo partial; sleep 5")
        timer.join()
    finally:
        machine.close()
        proxy.close()


def test_a_link_gone_silent_ends_each_wait_within_its_bound(tmp_path, sshd):
    """A box that vanished without a word (its link relays nothing and never closes): a
    command, a bounded fetch on the open SFTP session and one on a new session each end as
    CommandTimedOut within their bound, not when the heartbeat gives up (paramiko waits for
    a channel's reply without end)."""
    from orchestrator.errors import CommandTimedOut
    from orchestrator.sshmachine import SshMachine
    from tests.tcpproxy import Proxy

    bound_s = 2
    proxy = Proxy(sshd.host, sshd.port)
    target = _target(sshd, tmp_path / "known_hosts")
    machine = SshMachine(type(target)(target.host, proxy.port, target.user, target.key_path,
                                      target.known_hosts), pin_new_host=True)
    remote = tmp_path / "remote.bin"
    remote.write_bytes(os.urandom(1 << 20))
    try:
        machine.fetch(str(remote), tmp_path / "got", 2 << 20)  # the SFTP session is open
        assert (tmp_path / "got").read_bytes() == remote.read_bytes()
        proxy.stalled = True
        for what, call in (
                ("a command", lambda: machine.run("true", timeout=bound_s)),
                ("a fetch", lambda: machine.fetch(str(remote), tmp_path / "a", 2 << 20,
                                                  timeout=bound_s)),
                ("a fetch on a new session", lambda: machine.fetch(
                    str(remote), tmp_path / "b", 2 << 20, timeout=bound_s))):
            started = time.monotonic()
            with pytest.raises(CommandTimedOut):
                call()
            took = time.monotonic() - started
            assert bound_s <= took < bound_s + 1.5, (what, took)
    finally:
        machine.close()
        proxy.close()


def test_a_missing_key_is_one_line_at_once(ssh_up, sshd, tmp_path):
    project, _ = ssh_up
    [box] = json.loads((project / ".dlbox" / "state.json").read_text())["boxes"]
    moved = tmp_path / "moved-key"
    Path(box["key_path"]).rename(moved)
    try:
        started = time.monotonic()
        result = dlbox(project, "train", "scratch", "--data", str(tmp_path))
        assert time.monotonic() - started < 20  # not retried as if the box were booting
        assert result.returncode == 2 and "the SSH key" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    finally:
        moved.rename(box["key_path"])


# A fetch of a big (sparse) file whose connection is closed while paramiko's read-ahead
# thread still sends requests; prints the fetch's error class and whether that thread was
# alive at the cut. argv: host port user key known_hosts remote_file local_file.
FETCH_CUT = """\
import sys, threading, time
from pathlib import Path
from orchestrator.errors import DlboxError
from orchestrator.sshmachine import SshMachine
from orchestrator.sshtarget import SshTarget

host, port, user, key, known, remote, local = sys.argv[1:]
machine = SshMachine(SshTarget(host, int(port), user, key, known), pin_new_host=True)
machine.run("true")
failed = []

def fetch():
    try:
        machine.fetch(remote, Path(local), 8 << 30)
    except DlboxError as exc:
        failed.append(type(exc).__name__)

worker = threading.Thread(target=fetch)
worker.start()
deadline = time.monotonic() + 60
while not (Path(local).exists() and Path(local).stat().st_size > 0):
    assert time.monotonic() < deadline, "the fetch never began"
    time.sleep(0.01)
reading_ahead = any("_prefetch_thread" in t.name for t in threading.enumerate())
machine.conn.client.get_transport().close()
worker.join(60)
time.sleep(0.5)  # the read-ahead thread's death, reported or not
print(failed, reading_ahead)
"""


def test_a_link_lost_mid_fetch_is_one_error_without_a_thread_traceback(tmp_path, sshd):
    big = tmp_path / "remote" / "big.bin"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # sparse: ~130,000 read requests, far more than a link's window
    result = subprocess.run(
        [sys.executable, "-c", FETCH_CUT, sshd.host, str(sshd.port), sshd.user,
         str(sshd.client_key), str(tmp_path / "known_hosts"), str(big), str(tmp_path / "got")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['LostContact']", "True"], result.stdout
    assert "Traceback" not in result.stderr, result.stderr
