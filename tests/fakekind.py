"""A fourth box kind for tests/test_layers.py: a local box under another name, whose up()
only records the flags it was given."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.localbox import LocalBox

MADE: list = []  # the flags of each up(), in order


@dataclass(frozen=True)
class FakeBox(LocalBox):
    kind: str = "fake"

    @classmethod
    def up(cls, project_dir, flags, existing, say):
        MADE.append(flags)
