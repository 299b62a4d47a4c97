"""infra's error root and its kinds; messages say what to do. The CLI maps them to exit codes."""

from __future__ import annotations


class InfraError(Exception):
    """Root of every error infra raises on purpose."""


class CredentialsError(InfraError):
    """No usable AWS credentials, an unknown profile or an expired token."""


class RegionError(InfraError):
    """The region is unknown or has no Deep Learning AMI."""


class CapacityError(InfraError):
    """No instance could be launched with any type, zone or market tried."""

    def __init__(self, message: str, attempts: tuple = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


class QuotaError(InfraError):
    """An account quota stops the launch; the message names it and how to raise it."""


class WaitTimeout(InfraError, TimeoutError):
    """A bounded wait ran out."""
