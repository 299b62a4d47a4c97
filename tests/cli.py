"""The one way the tests run the `dlbox` command line: as a user does, the entry point of
this environment in a subprocess, bounded in time, its output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DLBOX = str(Path(sys.executable).parent / "dlbox")
# A bound against a hang, not a speed target: a command that trains on the loaded 2-core
# machine takes far less.
CLI_TIMEOUT_S = 400
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}  # TensorFlow's C++ start-up lines off stderr


def dlbox(cwd: Path, *args: str, env: dict[str, str] | None = None,
          whole_env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S,
          stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """`dlbox ARGS` in cwd. env: variables over this process's environment; whole_env: the
    environment itself (the EC2 tests give one that holds nothing but what they set)."""
    environ = whole_env if whole_env is not None else {**os.environ, **QUIET, **(env or {})}
    return subprocess.run([DLBOX, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environ, stdin=stdin)


def up_ssh(project: Path, *servers, workdir: Path | None = None, port: int | None = None,
           python: str | None = None, more: tuple[str, ...] = (), env: dict[str, str] | None = None,
           whole_env: dict[str, str] | None = None,
           timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The one way the tests make an SSH box: `dlbox up --ssh` on loopback sshds (tests/sshd.py;
    two or more make a cluster), each with its user, address (port: a proxy's in front of it)
    and key; python: a stand-in that answers the TensorFlow check at once
    (journey.quick_python) unless given; more: further flags of `up`."""
    from tests.journey import quick_python

    project.mkdir(parents=True, exist_ok=True)
    args = [a for s in servers for a in ("--ssh", f"{s.user}@{s.host}:{port or s.port}")]
    args += [a for s in servers for a in ("--key", str(s.client_key))]
    args += ["--python", python or quick_python()]
    if workdir is not None:
        args += ["--workdir", str(workdir)]
    return dlbox(project, "up", *args, *more, env=env, whole_env=whole_env, timeout=timeout)


def up_local(project: Path, *more: str, python: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The one way the tests make a local box: `dlbox up --local` with more (further flags)
    and python a stand-in that answers the TensorFlow check at once unless given."""
    from tests.journey import quick_python

    return dlbox(project, "up", "--local", *more, "--python", python or quick_python(), env=env)
