"""Shared fixtures: generated datasets and a helper that runs the trainer as users do."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from orchestrator.sample import generate

REPO = Path(__file__).resolve().parents[1]
CALLER_IP = "203.0.113.7"  # what the stand-in for checkip.amazonaws.com answers
TRAINER_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """Keep the developer's cloud credentials, TF noise and ~/.cache out of every test
    (the trainer extracts zips under $XDG_CACHE_HOME/dlbox/extracted by default)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "KAGGLE_", "DLBOX_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """1,000 labelled images, 30 test images, and every kind of bad file."""
    root = tmp_path_factory.mktemp("sample")
    generate(root, 1000, test_n=30, bad=True, seed=1)
    return root


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    """200 labelled images: enough to exercise a code path, not to learn."""
    root = tmp_path_factory.mktemp("small")
    generate(root, 200, test_n=5, seed=2)
    return root


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *map(str, args)]


def run_trainer(*args: str, env: dict | None = None, timeout: float = TRAINER_TIMEOUT_S):
    """Run `python -m trainer ARGS` from the repository root; return the CompletedProcess."""
    return subprocess.run(
        trainer_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )

# `make test` runs the suite on two workers (pytest -n 2), each module whole on one of them
# (a module's tests may share a fixed key or port), except that every test that plays an EC2
# box runs on one worker, one after another: they share this machine's /var/lib/dlbox (the
# boxes' run registry) and the loopback addresses 127.0.0.2-5. (xdist's own --dist loadgroup
# does not group on pytest 9.2: pytest-dev/pytest-xdist#1386.)
EC2_BOX_TESTS = ("tests/test_cli_ec2.py::", "tests/test_ec2_cluster.py::", "tests/test_spot.py::",
                 "tests/test_ec2_untrusted.py::",
                 "tests/test_cluster.py::test_an_ec2_", "tests/test_journeys.py::test_a_day_on_an_ec2_")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # another --dist asked for: xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        """LoadScopeScheduling whose unit of work is a module, or all of EC2_BOX_TESTS."""

        def _split_scope(self, nodeid: str) -> str:
            return "ec2-boxes" if nodeid.startswith(EC2_BOX_TESTS) else nodeid.split("::", 1)[0]

    return ByModule(config, log)


# moto: skip loading its thousands of default AMIs (≈1 s per test); set before moto loads.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


@pytest.fixture(scope="session")
def box_bin(tmp_path_factory) -> Path:
    """What an EC2 box's user data installs, for sessions of the loopback sshd: the watchdog
    (its power-off only logged) and a systemctl that reports its timer's state, "active"
    unless a test writes another into box_bin/timer-state."""
    from orchestrator.config import Config
    from orchestrator.ec2up import watchdog_script

    directory = tmp_path_factory.mktemp("box-bin")
    (directory / "dlbox-watchdog").write_text(watchdog_script(
        Config(), market_command="echo on-demand", poweroff_command="echo would power off"))
    (directory / "systemctl").write_text(
        "#!/bin/sh\n# A box's systemctl, as far as dlbox asks it: is the watchdog's timer active.\n"
        '[ "$1" = is-active ] && [ "$2" = dlbox-watchdog.timer ] || exit 0\n'
        'state=$(cat "$(dirname "$0")/timer-state" 2>/dev/null || echo active)\n'
        'echo "$state"; [ "$state" = active ]\n')
    for name in ("dlbox-watchdog", "systemctl"):
        (directory / name).chmod(0o755)
    return directory


@pytest.fixture(scope="session")
def sshd(tmp_path_factory, box_bin):
    """A real OpenSSH server on 127.0.0.1 (installed by .ci/run: openssh-server); its
    sessions find box_bin's commands first, as on an EC2 box dlbox made."""
    from tests import sshd as sshd_mod

    server = sshd_mod.start(tmp_path_factory.mktemp("sshd"),
                            env={"PATH": f"{box_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"})
    yield server
    sshd_mod.stop(server)


@pytest.fixture(scope="session")
def moto_url():
    import logging

    from moto.server import ThreadedMotoServer

    # One INFO line per request would fill every failure's report (and cost time to format).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ip_lookup_url():
    """A stand-in for checkip.amazonaws.com that answers the caller's public IP."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(f"{CALLER_IP}\n".encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture()
def aws(moto_url, monkeypatch):
    """A fresh moto account with a Deep Learning AMI, and boto3 clients on it."""
    import boto3

    from tests import awsfakes

    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"))
    awsfakes.install_dlami()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(key, value)
    return boto3.client("ec2", region_name=awsfakes.REGION)


@pytest.fixture(scope="session")
def box_settings(tmp_path_factory) -> str:
    """dlbox.toml lines shared by the EC2 tests: one work dir on the "box" whose venv is
    built once from offline stand-in wheels (tests/fakewheels.py), then reused."""
    from tests import fakewheels

    root = tmp_path_factory.mktemp("ec2box")
    wheels = fakewheels.build_all(root / "wheels")
    return (f"box_workdir = {str(root / 'remote')!r}\n"
            'box_requirements = ["tensorflow", "keras"]\n'
            f'pip_args = ["--no-index", "--find-links", {str(wheels)!r}]\n')
