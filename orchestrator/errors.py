"""The orchestrator's error root; the CLI turns these into one-line messages and exit codes."""

from __future__ import annotations


class DlboxError(Exception):
    """Root of every error dlbox raises on purpose."""

    exit_code = 1


class UsageError(DlboxError, ValueError):
    """Bad input from the user: the message says what to do."""

    exit_code = 2
