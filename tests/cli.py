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
