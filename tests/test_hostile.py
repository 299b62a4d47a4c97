"""A hostile or broken world on an SSH box: a frozen sshd, odd and linked files, a port that
never speaks, shell syntax in paths. Real OpenSSH on loopback, real tar and ssh."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import sshd as sshd_mod
from tests.cli import DLBOX, dlbox, up_ssh
from tests.test_ssh_box import _target

ALIVE_INTERVAL_S = 1  # the tests' keepalive interval: a frozen box is lost within ~4 s
POLL_S = 0.05
WAIT_S = 120  # for anything that should happen much sooner
STOP_S = 10  # from SIGTERM to dlbox's exit


def _until(predicate, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll until predicate holds; fail if WAIT_S pass or proc (dlbox) ends first."""
    from infra import retry

    retry.poll(lambda: predicate() or (proc is not None and proc.poll() is not None), until=bool,
               deadline_s=WAIT_S, first_delay_s=POLL_S, max_delay_s=POLL_S)
    assert predicate(), f"no {what}: " + (str(proc.communicate()) if proc else f"{WAIT_S} s")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, session, ...)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _processes() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = fields
    return found


def _descendants(root: int) -> list[int]:
    procs, found, todo = _processes(), [], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, fields in procs.items() if int(fields[1]) == parent]
        found += children
        todo += children
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _up(project: Path, server, remote: Path, port: int | None = None, env=None):
    return up_ssh(project, server, workdir=remote, port=port, whole_env=env, timeout=WAIT_S)


@pytest.mark.slow
def test_a_frozen_sshd_is_one_line_within_the_bound_and_the_run_goes_on(tmp_path, small_sample):
    """sshd SIGSTOPped while a run is followed: dlbox says so in one line naming `dlbox
    attach` within the keepalive bound; the run itself finishes on the box."""
    server = sshd_mod.start(tmp_path / "sshd")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "DLBOX_SERVER_ALIVE_INTERVAL_S": str(ALIVE_INTERVAL_S)}
    project, remote = tmp_path / "proj", tmp_path / "remote"
    frozen: list[int] = []
    try:
        up = _up(project, server, remote, env=env)
        assert up.returncode == 0, up.stderr
        train = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(small_sample),
                                  "--epochs", "3", "--patience", "0", "--img-size", "32"],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        _until(lambda: list((remote / "runs").glob("*/status.json")), train, "the run started")
        frozen = [server.proc.pid, *(pid for pid in _descendants(server.proc.pid)
                                     if _comm(pid).startswith("sshd"))]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = train.communicate(timeout=WAIT_S)
        took = time.monotonic() - stopped
        [run] = [p.parent.name for p in (remote / "runs").glob("*/status.json")]
        assert train.returncode == 1, out + err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "stopped answering" in err and f"dlbox attach {run}" in err
        assert took < 4 * ALIVE_INTERVAL_S + 6, f"{took:.1f} s: {err}"
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        _until(lambda: (remote / "runs" / run / "exit_code").exists(), what="the run's end")
        assert (remote / "runs" / run / "exit_code").read_text().strip() == "0"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        sshd_mod.stop(server)


@pytest.mark.slow
def test_a_port_that_never_speaks_is_one_line_naming_host_and_port(tmp_path, sshd):
    """TCP accepted, no SSH banner ever: one line naming host, port and what was expected (no
    paramiko tracebacks), within one banner wait."""
    from orchestrator.sshtarget import SSH_CONNECT_TIMEOUT_S
    from tests.tcpproxy import Proxy

    proxy = Proxy(sshd.host, sshd.port)
    proxy.silent = True
    try:
        started = time.monotonic()
        up = _up(tmp_path / "proj", sshd, tmp_path / "remote", port=proxy.port)
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert up.returncode == 1, up.stdout + up.stderr
    [line] = up.stderr.splitlines()
    assert f"127.0.0.1:{proxy.port} accepted a TCP connection but sent no SSH banner" in line
    assert "is it an SSH server?" in line
    assert took < 2 * SSH_CONNECT_TIMEOUT_S, took


def _files_under(root: Path):
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                yield path


def test_links_out_of_the_dataset_are_never_followed_and_named(tmp_path, sshd):
    """A link to a secret outside the dataset and a link to a folder: neither is sent, the
    warnings name both; a link to an image inside goes as that image; the rest arrives."""
    from orchestrator import runs
    from orchestrator.sample import generate
    from orchestrator.sshmachine import SshMachine

    data = tmp_path / "data"
    generate(data, 20, test_n=0, seed=3)
    secret = b"-----BEGIN OPENSSH PRIVATE KEY----- dlbox-test-" + os.urandom(16).hex().encode()
    (tmp_path / "id_ed25519").write_bytes(secret)
    (data / "train" / "cat.9001.jpg").symlink_to(tmp_path / "id_ed25519")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "dog.9002.jpg").write_bytes((data / "train" / "dog.0.jpg").read_bytes())
    (data / "train" / "more").symlink_to(tmp_path / "more")
    (data / "train" / "cat.9003.jpg").symlink_to("cat.0.jpg")  # inside: sent as that image
    os.symlink(tmp_path / "id_ed25519", os.fsencode(data / "train") + b"/odd\nname-\xe9.jpg")
    remote, said = tmp_path / "remote", []
    machine = SshMachine(_target(sshd, tmp_path / "known_hosts"), pin_new_host=True)
    try:
        copy = Path(runs.ship_data(machine, str(remote), data, said.append))
    finally:
        machine.close()
    warned = [line for line in said if line.startswith("warning: skipped")]
    assert any("data/train/cat.9001.jpg: a link to a file outside the dataset" in w
               for w in warned), said
    assert any("data/train/more: a link to a folder outside the dataset" in w for w in warned), said
    assert any("data/train/odd\\nname-\\xe9.jpg: a link to a file outside" in w for w in warned)
    assert len(warned) == 3 and "data: sent 21 of 21 files" in said[-1], said  # 20 + the inside link
    assert all("\n" not in line for line in said), said  # every name said on one line
    for path in _files_under(remote):
        assert secret not in path.read_bytes(), path
    assert (copy / "train" / "cat.9003.jpg").read_bytes() == (data / "train" / "cat.0.jpg").read_bytes()
    assert (copy / "train" / "dog.9.jpg").read_bytes() == (data / "train" / "dog.9.jpg").read_bytes()
    assert not (copy / "train" / "cat.9001.jpg").exists() and not (copy / "train" / "more").exists()


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session sid."""
    return [pid for pid, fields in _processes().items() if int(fields[3]) == sid
            and fields[0] != "Z"]


@pytest.mark.slow
def test_sigterm_mid_upload_leaves_no_tar_or_ssh_behind(tmp_path, sshd):
    """dlbox SIGTERMed while a slow link carries the dataset: it ends at once (not when the
    upload does), and no process it started (tar, ssh) outlives it."""
    from tests.tcpproxy import Proxy

    data = tmp_path / "big" / "train"
    data.mkdir(parents=True)
    for n in range(4):  # 16 MB: half a minute at the proxy's rate
        (data / f"cat.{n}.jpg").write_bytes(os.urandom(4 << 20))
    proxy = Proxy(sshd.host, sshd.port)
    project, remote = tmp_path / "proj", tmp_path / "remote"
    train = None
    try:
        up = _up(project, sshd, remote, port=proxy.port)
        assert up.returncode == 0, up.stderr
        proxy.rate_bytes_per_s = 500_000
        train = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data.parent)],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        _until(lambda: "tar" in map(_comm, _session(train.pid)) and (remote / "data").exists(),
               train, "the upload")
        train.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = train.communicate(timeout=WAIT_S)
        assert time.monotonic() - sent < STOP_S, "dlbox went on uploading after SIGTERM"
        assert train.returncode == 128 + signal.SIGTERM, out + err
        assert "Traceback" not in err, err
        survivors = {pid: _comm(pid) for pid in _session(train.pid)}
        assert not survivors, survivors
    finally:
        if train is not None:
            for pid in _session(train.pid):
                os.kill(pid, signal.SIGKILL)
        proxy.close()


@pytest.mark.slow
def test_shell_syntax_in_the_workdir_is_taken_literally_and_a_newline_refused(tmp_path, sshd):
    """`;`, `$(...)` and backquotes in --workdir run nothing through up, train and down; a
    newline (its last line named another folder, which runs and `down --purge` then used) is
    refused in one line."""
    from orchestrator.sample import generate

    data = tmp_path / "data"
    generate(data, 20, test_n=0, seed=4)
    odd = (tmp_path / f"w;touch {tmp_path}/PWNED1;echo $(touch {tmp_path}/PWNED2) "
           f"`touch {tmp_path}/PWNED3` -x 'q\"")
    project = tmp_path / "proj"
    up = _up(project, sshd, odd)
    assert up.returncode == 0, up.stderr
    train = dlbox(project, "train", "scratch", "--data", str(data), "--epochs", "1",
                  "--img-size", "32")
    assert train.returncode == 0, train.stdout + train.stderr
    assert list((odd / "runs").glob("*/model.keras"))  # the odd folder itself was used
    down = dlbox(project, "down", "--purge")
    assert down.returncode == 0, down.stderr
    assert not odd.exists() and not list(tmp_path.glob("PWNED*"))

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(b"mine")
    refused = _up(tmp_path / "proj2", sshd, Path(f"{tmp_path}/nl\n{victim}"))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    [line] = refused.stderr.splitlines()
    assert "a control character" in line and "nl\\n" in line
    assert (victim / "keep").read_bytes() == b"mine"
