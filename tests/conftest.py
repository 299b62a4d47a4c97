"""Shared fixtures: generated datasets and a helper that runs the trainer as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.sample import generate

REPO = Path(__file__).resolve().parents[1]
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

# moto: skip loading its thousands of default AMIs (≈1 s per test); set before moto loads.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 (installed by .ci/run: openssh-server)."""
    from tests import sshd as sshd_mod

    server = sshd_mod.start(tmp_path_factory.mktemp("sshd"))
    yield server
    sshd_mod.stop(server)
