"""Ctrl-C and SIGTERM held back while a short step that must not be cut in half runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that come during the block are acted on once it is done.

    A handler records them, and the one in force before is called after the block. A signal
    mask would not do: it binds only the thread that sets it, the kernel hands the signal to
    another (paramiko's), and Python then runs its handler in the main thread anyway. Only
    the main thread can set handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
                for sig in DEFERRED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # raises KeyboardInterrupt, SystemExit... here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])
