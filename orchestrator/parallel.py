"""Work on several boxes at once: one daemon thread per item, results in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def each(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """fn(item) for every item at once; the results in order, or the first error.

    Daemon threads: an interrupt, or a node that failed, need not wait for the others'
    bounded waits to end (ending the instances ends their SSH sessions too)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    results: dict[int, R] = {}
    errors: list[BaseException] = []
    finished = threading.Semaphore(0)

    def work(i: int, item: T) -> None:
        try:
            results[i] = fn(item)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)
        finally:
            finished.release()

    for i, item in enumerate(items):
        threading.Thread(target=work, args=(i, item), daemon=True, name=f"dlbox-node-{i}").start()
    for _ in items:
        finished.acquire()
        if errors:
            raise errors[0]
    return [results[i] for i in range(len(items))]
