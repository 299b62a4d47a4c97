"""`python -m orchestrator.cli`: the dlbox command line."""

from . import app

app()
