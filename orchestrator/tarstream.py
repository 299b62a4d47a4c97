"""Files to a box as `tar -c | ssh tar -x` streams: no round trip per file, mtimes kept.

The OpenSSH client's C crypto moves bulk data several times faster than paramiko; each
stream is its own SSH connection, so several run in parallel on a long link.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import DISK_FULL_FIX, DlboxError, LostContact
from .machine import COMMAND_TIMEOUT_S

STREAM_CHUNK_BYTES = 1 << 20
CHECKPOINT_RECORDS = 100  # GNU tar reports progress every 100 records of 10 KiB
CHECKPOINT_TAG = "dlbox-sent"
CHECKPOINT_LINE = re.compile(rf"^tar: {CHECKPOINT_TAG} (\d+) ")
MAX_ERROR_LINES = 20  # of the box's complaints kept for the message
EMPTY_TAR = bytes(1024)  # two zero blocks: a valid archive with nothing in it
CLOSE_TIMEOUT_S = 10
SSH_EXIT_DISCONNECTED = 255  # what the ssh client exits with when the connection failed

SshArgv = Callable[..., list[str]]  # ssh argv for a remote command


class Processes:
    """An upload's tar and ssh processes, so that one thread can end them all at once (the
    caller's, on Ctrl-C, SIGTERM or a failed stream): none outlives dlbox's command."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._ended = False

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        """proc, now ended with the others (at once, if they already were)."""
        with self._lock:
            self._procs.append(proc)
            if self._ended:
                _kill(proc)
        return proc

    def kill(self) -> None:
        with self._lock:
            self._ended = True
            for proc in self._procs:
                _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it already ended
        proc.kill()


def receiver(ssh_argv: SshArgv, remote_dir: str) -> subprocess.Popen:
    """`ssh HOST tar -x` into remote_dir (made if missing), reading the archive on stdin."""
    quoted = shlex.quote(remote_dir)
    return subprocess.Popen(ssh_argv(f"mkdir -p {quoted} && tar -x -f - -C {quoted}"),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def close_unused(remote: subprocess.Popen) -> None:
    """End a receiver that had nothing to carry with an empty archive."""
    with contextlib.suppress(OSError):  # BrokenPipe: it already ended
        remote.stdin.write(EMPTY_TAR)
        remote.stdin.close()
    try:
        remote.wait(timeout=CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        remote.kill()
        remote.wait()
    remote.stderr.close()


def balanced(sizes: dict[str, int], names: list[str], parts: int) -> list[list[str]]:
    """names split into parts of about equal bytes (largest first into the lightest part)."""
    sized = sorted(((sizes[n], n) for n in names), reverse=True)
    groups: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for size, name in sized:
        k = loads.index(min(loads))
        groups[k].append(name)
        loads[k] += size
    return [g for g in groups if g]


def send(remote: subprocess.Popen, root: Path, names: list[str], where: str,
         progress: Callable[[int], None], size: int, procs: Processes) -> None:
    """Stream root/<names> into the receiver remote; where names the destination in errors;
    tar joins procs (remote is there already)."""
    # -h: a link among names goes as its target's content. The manifest lets through only
    # links to files inside the dataset (sync._unfollowed); nothing else is ever named here.
    argv = ["tar", "-c", "-h", "-f", "-", "-C", str(root), "--null", "-T", "-"]
    if _gnu_tar():  # tar writes into ssh itself and reports its progress on stderr
        tar = procs.add(subprocess.Popen([*argv, f"--checkpoint={CHECKPOINT_RECORDS}",
                                          f"--checkpoint-action=echo={CHECKPOINT_TAG} %{{w}}T"],
                                         stdin=subprocess.PIPE, stdout=remote.stdin,
                                         stderr=subprocess.PIPE))
    else:  # bsdtar (macOS): no checkpoints, so the bytes pass through here to be counted
        tar = procs.add(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    feed_errors: list[BaseException] = []

    def feed_names() -> None:
        try:  # names as bytes, NUL-terminated: any byte a name holds but NUL goes through
            tar.stdin.write(b"".join(os.fsencode(name) + b"\0" for name in names))
        except BrokenPipeError:
            pass  # tar ended early: its exit status says why
        except BaseException as exc:  # handed to the caller's thread, never printed here
            feed_errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                tar.stdin.close()  # tar never waits for names that will not come

    remote_errors: list[bytes] = []

    def drain_remote_errors() -> None:  # a full pipe here would stall ssh, then tar
        for line in remote.stderr:
            if len(remote_errors) < MAX_ERROR_LINES:
                remote_errors.append(line)

    threads = [threading.Thread(target=f, daemon=True) for f in (feed_names, drain_remote_errors)]
    for thread in threads:
        thread.start()
    tar_errors: list[str] = []
    sent = 0
    try:
        if tar.stderr is not None:
            remote.stdin.close()  # tar holds the pipe now: ssh sees EOF when tar exits
            for line in tar.stderr:
                text = line.decode(errors="replace")
                if checkpoint := CHECKPOINT_LINE.match(text):
                    progress(int(checkpoint[1]) - sent)
                    sent = int(checkpoint[1])
                else:
                    tar_errors.append(text.strip())
        else:
            while chunk := tar.stdout.read(STREAM_CHUNK_BYTES):
                remote.stdin.write(chunk)
                progress(len(chunk))
            remote.stdin.close()
    except BrokenPipeError:  # ssh ended early: its exit status and stderr say why
        tar.kill()  # it may be blocked writing to a pipe nobody reads any more
    except BaseException:  # a failure here (or Ctrl-C): neither process outlives it
        for proc in (tar, remote):
            proc.kill()
        raise
    finally:
        tar.wait()
        remote.wait()
        for thread in threads:
            thread.join(timeout=COMMAND_TIMEOUT_S)
    if feed_errors:
        raise feed_errors[0]
    error = b"".join(remote_errors).decode(errors="replace").strip()
    if remote.returncode != 0 or tar.returncode != 0:
        if "No space left on device" in error:
            raise DlboxError(f"the box's disk is full: {where} has no space left; {DISK_FULL_FIX}. "
                             "What arrived is kept: the next sync sends only the rest")
        # tar repeats its complaint for every file: the first line says it.
        first = (error or "\n".join(tar_errors) or "tar failed").splitlines()[0]
        if remote.returncode == SSH_EXIT_DISCONNECTED:
            raise LostContact(f"the connection dropped while sending to {where} ({first})",
                              "what arrived is kept: run the command again to send the rest")
        raise DlboxError(f"upload to {where} failed: {first}")
    if tar.stderr is not None and sent < size:
        progress(size - sent)  # the bytes since tar's last checkpoint


@functools.cache
def _gnu_tar() -> bool:
    """Whether this machine's tar is GNU tar (Linux), which can report its own progress."""
    try:
        done = subprocess.run(["tar", "--version"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except OSError:
        return False
    return "GNU tar" in done.stdout
