"""Bounded waits on the network: poll a TCP port until it answers with an SSH banner."""

from __future__ import annotations

import socket
import time

from .errors import DlboxError

SSH_WAIT_TIMEOUT_S = 300
BANNER_TIMEOUT_S = 5  # per try, for the connection and for the banner
SSH_POLL_FIRST_S = 0.5
SSH_POLL_MAX_S = 10
BANNER_MAX_BYTES = 256


def read_banner(host: str, port: int, timeout_s: float = BANNER_TIMEOUT_S) -> str | None:
    """The server's SSH identification line, or None if it does not answer with one in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            data = sock.recv(BANNER_MAX_BYTES)  # bounded: the socket's timeout applies
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line if line.startswith("SSH-") else None


def wait_for_ssh(host: str, port: int, timeout_s: float = SSH_WAIT_TIMEOUT_S,
                 sleep=time.sleep) -> str:
    """Poll with jittered exponential backoff until the SSH banner comes; else DlboxError."""
    from infra import retry

    banner = retry.poll(lambda: read_banner(host, port), until=bool, deadline_s=timeout_s,
                        first_delay_s=SSH_POLL_FIRST_S, max_delay_s=SSH_POLL_MAX_S, sleep=sleep)
    if not banner:
        raise DlboxError(f"{host}:{port} did not answer SSH within {timeout_s:.0f} s; check "
                         "the security group and `dlbox status`, then retry")
    return banner
