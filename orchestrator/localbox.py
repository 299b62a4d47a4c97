"""The local box: this machine, its own Python with TensorFlow, runs under .dlbox/local-box/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import state
from .errors import DlboxError, UsageError

LOCAL_WORKDIR = "local-box"
TF_CHECK_TIMEOUT_S = 120
TF_CHECK = "import tensorflow as tf, keras; print(tf.__version__, keras.__version__)"


def up(project_dir: Path, python: str | None, say: Callable[[str], None]) -> state.LocalBox:
    """Use this machine as the box; check its Python can train."""
    existing = state.load_box(project_dir)
    if existing is not None and existing.kind != "local":
        raise UsageError(f"this project already has a {existing.kind} box ({existing.name}); "
                         "run `dlbox down` first")
    interpreter = python or (existing.python if existing else sys.executable)
    if shutil.which(interpreter) is None and not Path(interpreter).is_file():
        raise UsageError(f"--python {interpreter}: no such interpreter")
    try:
        check = subprocess.run([interpreter, "-c", TF_CHECK], capture_output=True, text=True,
                               timeout=TF_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise DlboxError(f"{interpreter} took over {TF_CHECK_TIMEOUT_S} s to import TensorFlow") \
            from exc
    if check.returncode != 0:
        raise UsageError(f"{interpreter} cannot import TensorFlow and Keras; run "
                         "pip install 'dlbox[train]' or pass --python PATH")
    tf_version, keras_version = check.stdout.split()[-2:]
    workdir = state.state_dir(project_dir).resolve() / LOCAL_WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)
    box = state.LocalBox(kind="local", name="local", workdir=str(workdir), python=interpreter)
    state.save_box(project_dir, box)
    say(f"local box ready: {interpreter} (TensorFlow {tf_version}, Keras {keras_version}), "
        f"runs in {workdir}")
    return box


def down(project_dir: Path, box: state.LocalBox, say: Callable[[str], None]) -> None:
    """Forget the local box and remove its work dir (results pulled to runs/ stay)."""
    shutil.rmtree(box.workdir, ignore_errors=True)
    state.save_box(project_dir, None)
    say(f"local box removed ({box.workdir})")
