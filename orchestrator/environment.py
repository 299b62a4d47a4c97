"""The trainer's Python environment on a box: a venv with TensorFlow for the GPU, built once."""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable

from .errors import DlboxError
from .machines import Machine
from .render import render

# What the trainer is tested with (TensorFlow exactly; Keras as new as the box's Python allows).
REQUIREMENTS = ("tensorflow[and-cuda]==2.21.0", "keras>=3.10,<4", "numpy", "pillow")
BASE_PYTHON = "python3"
ENV_SETUP_TIMEOUT_S = 1800  # ~3 GB of wheels on a fresh box


def requirements_hash(requirements: tuple[str, ...], pip_args: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join((*requirements, "--", *pip_args)).encode()).hexdigest()[:16]


def prepare(machine: Machine, workdir: str, say: Callable[[str], None],
            requirements: tuple[str, ...] = REQUIREMENTS, pip_args: tuple[str, ...] = ()) -> str:
    """Find or build {workdir}/env; return its python (the caller checks it can train)."""
    env_dir = f"{workdir}/env"
    script = render("setup_env.sh.j2", env_dir=env_dir, base_python=BASE_PYTHON,
                    requirements=list(requirements), pip_args=list(pip_args),
                    requirements_hash=requirements_hash(requirements, pip_args))
    path = f"{workdir}/setup_env.sh"
    machine.write(path, script.encode(), 0o755)
    say("preparing the box's Python environment (the first time: several minutes)...")
    done = machine.run(f"bash {shlex.quote(path)}", timeout=ENV_SETUP_TIMEOUT_S)
    if done.exit_code != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DlboxError("could not build the Python environment on the box: "
                         + " | ".join(tail) + (" (the box's disk is full)" if
                                               "No space left" in done.stderr else ""))
    say(done.stdout.strip().splitlines()[-1])
    return f"{env_dir}/bin/python"
