"""The box's Python check: a refusal for one that cannot train; its answer kept per interpreter."""

from __future__ import annotations

import sys

import pytest

from orchestrator import environment
from orchestrator.errors import UsageError
from orchestrator.localmachine import LocalMachine


def test_the_check_is_kept_per_interpreter_and_a_python_without_tensorflow_is_refused(tmp_path):
    machine = LocalMachine()
    workdir = tmp_path / "dlbox"
    with pytest.raises(UsageError, match="cannot import TensorFlow"):
        environment.check_python(machine, "/usr/bin/python3", str(workdir))
    with pytest.raises(UsageError, match="cannot import TensorFlow"):
        environment.check_python(machine, str(tmp_path / "no-such-python"), str(workdir))
    checks = workdir / environment.CHECKS_DIR
    assert not checks.exists() or not any(checks.iterdir())  # nothing kept of a failure

    path, versions = environment.check_python(machine, sys.executable, str(workdir))
    assert path.startswith("/") and versions.startswith("TensorFlow 2.")
    [kept] = list(checks.iterdir())
    # The second check reads the kept answer (the file is what it says), without TensorFlow.
    kept.write_text(f"9.9.9 3.99.0 4\n{path}\n")
    assert environment.check_python(machine, sys.executable, str(workdir)) == (
        path, "TensorFlow 9.9.9, Keras 3.99.0, 4 GPU(s)")
    assert environment.check_python(machine, sys.executable) == (path, versions)  # no workdir
