"""Bounded retries, the one way dlbox waits: a deadline, jittered exponential backoff.

Only errors the caller names are retried; anything else ends the wait at once. Imports
no AWS library, so the orchestrator's SSH waits use it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


def _policy(deadline_s: float, first_delay_s: float, max_delay_s: float, sleep) -> dict:
    return {
        # Never start a sleep that would end past the deadline.
        "stop": tenacity.stop_before_delay(deadline_s),
        "wait": (tenacity.wait_exponential(multiplier=first_delay_s, max=max_delay_s)
                 + tenacity.wait_random(0, first_delay_s)),
        "sleep": sleep,
    }


def call(fn: Callable[[], T], *, retry_if: Callable[[BaseException], bool], deadline_s: float,
         first_delay_s: float, max_delay_s: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """fn(), again while it raises an error retry_if accepts and time is left; else its error."""
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(retry_if), reraise=True,
                                 **_policy(deadline_s, first_delay_s, max_delay_s, sleep))
    return retrying(fn)


def poll(fn: Callable[[], T], *, until: Callable[[T], bool], deadline_s: float,
         first_delay_s: float, max_delay_s: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """fn() again until until(result) holds or the deadline passes; the last result either way.

    Errors from fn are not retried: they end the poll.
    """
    retrying = tenacity.Retrying(retry=tenacity.retry_if_result(lambda result: not until(result)),
                                 retry_error_callback=lambda state: state.outcome.result(),
                                 **_policy(deadline_s, first_delay_s, max_delay_s, sleep))
    return retrying(fn)
