"""The `dlbox` command line: thin typer commands, each one call into the lifecycle or a box.

app.py holds the app, output.py what is printed (and the one place errors become exit
codes); boxcmds.py, runcmds.py and datacmds.py the commands.
"""

from __future__ import annotations

from . import boxcmds, datacmds, runcmds  # noqa: F401 - each registers its commands on app
from .app import app

__all__ = ["app"]
