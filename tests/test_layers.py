"""The design card's layer rules, checked on the source: what each package may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = {"trainer", "orchestrator", "infra", "tests", "benchmarks"}
TRAINER_MAY_IMPORT = {"numpy", "tensorflow", "keras", "PIL"}  # and the standard library
HEAVY = ("boto3", "botocore", "tensorflow", "keras", "paramiko", "fabric", "numpy", "PIL")


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of a package imports (relative imports as itself)."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_trainer_imports_only_the_stdlib_numpy_tensorflow_keras_and_pillow():
    for path, names in _imports("trainer").items():
        others = names - set(sys.stdlib_module_names) - TRAINER_MAY_IMPORT - {"trainer"}
        assert not others, f"{path} imports {sorted(others)}"


def test_infra_imports_nothing_of_ours():
    for path, names in _imports("infra").items():
        assert not (names & OURS) - {"infra"}, f"{path} imports {sorted(names & OURS)}"


def test_trainer_runs_on_the_dlami_python_3_10():
    """vermin finds the oldest Python each construct and stdlib API needs."""
    done = subprocess.run([str(Path(sys.executable).parent / "vermin"), "--target=3.10-",
                           "--violations", "--no-tips", "--no-parse-comments", str(REPO / "trainer")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cli_imports_no_heavy_library_at_start():
    done = subprocess.run([sys.executable, "-c", "import sys, orchestrator.cli; print(' '.join("
                           f"m for m in {HEAVY!r} if m in sys.modules))"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == ""
