"""The design card's layer rules, checked on the source: what each package may import."""

from __future__ import annotations

import ast
import json
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


def test_a_new_box_kind_brings_its_own_up_flags(monkeypatch, tmp_path):
    """A new kind is one module and its entry in kinds.KINDS: its flags appear on `up` (help
    and parsing) and reach its up(); the other kinds refuse them in one line, and it refuses
    theirs."""
    import typer
    from typer.testing import CliRunner

    from orchestrator import kinds
    from orchestrator.cli import boxcmds
    from tests import fakekind

    fake = kinds.Kind("fake", "tests.fakekind", "FakeBox", "fake boxes", "fake", (
        kinds.UpOption("fake", "Use a fake box.", "switch"),
        kinds.UpOption("fake_size", "How big the fake box is.", "int"),
        kinds.UpOption("fake_tag", "A tag (repeat).", "texts", ("--fake-tag", "-F"))))
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, fake))
    monkeypatch.setattr(fakekind, "MADE", [])
    monkeypatch.chdir(tmp_path)
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command("up")(boxcmds.up_command())
    app.command("other")(lambda: None)  # a group: `up` is a subcommand, as in dlbox
    runner = CliRunner()

    shown = runner.invoke(app, ["up", "--help"])
    assert shown.exit_code == 0 and "--fake-size" in shown.output and "--spot" in shown.output
    made = runner.invoke(app, ["up", "--fake", "--fake-size", "3", "-F", "a", "-F", "b"])
    assert made.exit_code == 0, made.output
    [flags] = fakekind.MADE
    assert (flags.fake, flags.fake_size, flags.fake_tag, flags.region) == (True, 3, ("a", "b"),
                                                                          None)
    assert flags.given() == ["fake", "fake_size", "fake_tag"]
    theirs = runner.invoke(app, ["up", "--fake", "--spot"])
    assert theirs.exit_code == 2 and "--spot is for EC2 boxes, not fake boxes" in theirs.output
    ours = runner.invoke(app, ["up", "--local", "--fake-size", "3"])
    assert ours.exit_code == 2 and "--fake-size is for fake boxes, not the local box" in \
        ours.output
    assert len(fakekind.MADE) == 1


def test_a_flag_several_kinds_take_is_declared_once():
    """`up`'s flags are the union of the kinds' own: one name, one declaration."""
    from orchestrator import kinds

    for name, option in kinds.up_options().items():
        assert all(o == option for k in kinds.KINDS for o in k.up_options if o.name == name)


def test_up_flags_read_back_from_a_record_keep_only_what_is_valid():
    """A loss record's flags (run.json: the box to make again) round-trip; a damaged value,
    a name no kind takes and a switch left off are not flags given; --on-demand is."""
    from orchestrator import kinds

    flags = kinds.flags_from({"region": "eu-west-1", "spot": False, "nodes": "two",
                              "local": False, "bogus": 1, "instance_type": ["g5.xlarge"]})
    assert flags.given() == ["instance_type", "region", "spot"]
    assert (flags.spot, flags.nodes, flags.instance_type) == (False, None, ("g5.xlarge",))
    assert kinds.flags_from(flags.as_dict()) == flags
    assert kinds.for_up(flags).name == "ec2"


def test_the_cli_starts_without_importing_any_box_kind():
    """`up`'s flags come from the kinds' registration, not their modules (start-up time)."""
    done = subprocess.run([sys.executable, "-c", "import json, sys, orchestrator.cli; print("
                           "json.dumps([m for m in sys.modules if m.startswith('orchestrator.')]))"],
                          capture_output=True, text=True, check=True, cwd=REPO)
    loaded = json.loads(done.stdout)
    assert "orchestrator.kinds" in loaded
    assert not {"orchestrator.boxes", "orchestrator.boxkind", "orchestrator.localbox",
                "orchestrator.sshbox", "orchestrator.ec2box"} & set(loaded), loaded
