"""dlbox's laptop side: the typer CLI, config, state, boxes, sync, runs and reports."""

__version__ = "0.1.0"
