"""Bounded waits on the network: poll a TCP port until it answers with an SSH banner."""

from __future__ import annotations

import random
import socket
import time

from .errors import DlboxError

SSH_WAIT_TIMEOUT_S = 300
SSH_CONNECT_TIMEOUT_S = 5
SSH_POLL_FIRST_S = 0.5
SSH_POLL_MAX_S = 10


def read_banner(host: str, port: int, timeout_s: float = SSH_CONNECT_TIMEOUT_S) -> str | None:
    """The server's SSH identification line, or None if it does not answer with one."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            data = sock.recv(256)
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line if line.startswith("SSH-") else None


def wait_for_ssh(host: str, port: int, timeout_s: float = SSH_WAIT_TIMEOUT_S,
                 sleep=time.sleep) -> str:
    """Poll with jittered exponential backoff until the SSH banner comes; else DlboxError."""
    deadline = time.monotonic() + timeout_s
    delay = SSH_POLL_FIRST_S
    while True:
        banner = read_banner(host, port)
        if banner:
            return banner
        left = deadline - time.monotonic()
        if left <= 0:
            raise DlboxError(f"{host}:{port} did not answer SSH within {timeout_s:.0f} s; check "
                             "the security group and `dlbox status`, then retry")
        sleep(min(left, delay * random.uniform(0.5, 1.5)))
        delay = min(delay * 2, SSH_POLL_MAX_S)
