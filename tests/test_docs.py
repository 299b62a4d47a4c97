"""README.md and docs/ cannot drift from the CLI: every `dlbox ...` line in their code
blocks parses against the real command line (the command exists, its options and
arguments are accepted), and every document they link to exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer import _click as click  # typer vendors click: the parser the CLI really uses

from orchestrator.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_README_BYTES = 10_500  # "at most ~10 KB": what it is, the quick start, commands, links


def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `dlbox`) for each dlbox line inside a fenced code block."""
    found = []
    for path in DOCUMENTS:
        inside = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = not inside
                continue
            shown = line.strip().removeprefix("$ ")
            if inside and shown.startswith(("dlbox ", ".venv/bin/dlbox ")):
                words = shlex.split(shown, comments=True)
                found.append((f"{path.relative_to(REPO)}:{n}", words[1:]))
    return found


def _parse(argv: list[str]) -> None:
    """Parse argv as `dlbox` would, down to the last subcommand, without running it."""
    command = typer.main.get_command(app)
    context = command.make_context("dlbox", list(argv), resilient_parsing=False)
    while hasattr(command, "resolve_command"):  # a group: its subcommand takes the rest
        rest = [*context._protected_args, *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)


LINES = _command_lines()


def test_the_documents_show_commands():
    assert len(LINES) >= 20
    assert {argv[0] for _, argv in LINES if argv} >= {"up", "train", "down", "attach", "runs"}


@pytest.mark.parametrize(("where", "argv"), LINES, ids=[where for where, _ in LINES])
def test_each_documented_command_line_parses(where, argv):
    try:
        _parse(argv)
    except typer.Exit:
        pass  # --version prints and leaves: it parsed
    except (click.ClickException, ValueError) as exc:  # ValueError: typer's type checks
        pytest.fail(f"{where}: dlbox {' '.join(argv)}: {exc}")


def test_a_line_the_cli_does_not_take_fails_to_parse():
    for argv in (["traim", "scratch"], ["up", "--spot-price", "1"], ["train", "scratch"],
                 ["down", "--all", "extra"], ["up", "--nodes", "N"]):
        with pytest.raises((click.ClickException, ValueError)):
            _parse(argv)


def test_links_between_the_documents_lead_somewhere():
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (path.parent / target).exists(), f"{path.name} links to {target}"


def test_the_readme_is_short():
    assert (REPO / "README.md").stat().st_size <= MAX_README_BYTES
