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


def _module_graph() -> dict[str, set[str]]:
    """Our modules (orchestrator.runs...) and the modules of ours each imports, lazy imports
    inside functions included: a cycle through one is a cycle all the same."""
    paths = {}
    for package in ("orchestrator", "infra", "trainer", "templates"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else node.module
                for alias in node.names:
                    target = f"{module}.{alias.name}"
                    found.add(target if target in paths else module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if (found := visit(imported)) is not None:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (found := visit(module)) is not None:
            return found
    return None


def test_no_module_imports_itself_through_others():
    graph = _module_graph()
    assert {"orchestrator.boxes", "orchestrator.cli", "infra.network"} <= set(graph)
    assert "orchestrator.boxes" in graph["orchestrator.cli.boxcmds"]  # in functions only: seen
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
