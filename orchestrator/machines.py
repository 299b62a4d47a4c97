"""Where runs happen, behind one small interface: this machine, or one reached over SSH.

A machine runs shell commands, reads small files, writes files and streams folders in,
and fetches results out. Commands are data (strings from templates); the machine only
carries them, so run logic is the same on every kind of box.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import DISK_FULL_FIX, DlboxError

SSH_CONNECT_TIMEOUT_S = 10
SSH_CONNECT_ATTEMPTS = 4  # with jittered backoff: about 30 s before giving up
SSH_CONNECT_FIRST_DELAY_S = 1.0
COMMAND_TIMEOUT_S = 600
UPLOAD_STREAMS = 4  # parallel tar streams (SSH connections) per upload on a far link
NEAR_LINK_STREAMS = 1
FAR_LINK_RTT_S = 0.02  # a command's round trip above this: a far link
STREAM_CHUNK_BYTES = 1 << 20
CHECKPOINT_RECORDS = 100  # GNU tar reports progress every 100 records of 10 KiB
CHECKPOINT_TAG = "dlbox-sent"
CHECKPOINT_LINE = re.compile(rf"^tar: {CHECKPOINT_TAG} (\d+) ")
MAX_ERROR_LINES = 20  # of the box's complaints kept for the message
# AES-GCM first: with AES-NI it is ~2x faster than OpenSSH's default ChaCha20 for bulk data;
# a list, so a server without it falls back.
SSH_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"
EMPTY_TAR = bytes(1024)  # two zero blocks: a valid archive with nothing in it
MIN_STREAM_BYTES = 32 << 20  # below this a stream's own SSH handshake costs more than it saves


@dataclass(frozen=True)
class Result:
    """What a command left behind."""

    exit_code: int
    stdout: str
    stderr: str


class Machine(Protocol):
    """The operations a run needs from its box."""

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result: ...

    def read(self, path: str) -> bytes | None: ...

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None: ...

    def upload_tree(self, local: Path, remote_dir: str) -> None: ...

    def prepare_upload(self, remote_dir: str) -> None: ...

    def discard_prepared(self) -> None: ...

    def fetch(self, path: str, local: Path) -> None: ...

    def close(self) -> None: ...


class LocalMachine:
    """This machine: commands through bash, files through the file system."""

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result:
        feed = {"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin.decode()}
        try:
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                  timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            raise DlboxError(f"a command on the local box took over {timeout:.0f} s: "
                             f"{command.split()[0]} ...") from None
        return Result(done.returncode, done.stdout, done.stderr)


    def read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)  # before the content: never readable wider than mode
            f.write(data)

    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None:
        for name in names:
            target = Path(remote_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)  # copy2 keeps the mtime, as tar does
            if progress is not None:
                progress((root / name).stat().st_size)

    def upload_tree(self, local: Path, remote_dir: str) -> None:
        Path(remote_dir).mkdir(parents=True, exist_ok=True)
        target = Path(remote_dir) / local.name
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, target)

    def prepare_upload(self, remote_dir: str) -> None:
        pass  # nothing to connect

    def discard_prepared(self) -> None:
        pass

    def fetch(self, path: str, local: Path) -> None:
        shutil.copyfile(path, local)

    def close(self) -> None:
        pass


class SshMachine:
    """A machine reached over SSH with fabric; its host key is pinned in known_hosts."""

    def __init__(self, host: str, port: int, user: str, key_path: str, known_hosts: Path,
                 pin_new_host: bool = False, expected_fingerprints: set[str] | None = None) -> None:
        self.host, self.port, self.user = host, port, user
        self.key_path, self.known_hosts = key_path, known_hosts
        self._pin_new_host, self._expected = pin_new_host, expected_fingerprints
        self._conn = None
        self._ready: tuple[str, subprocess.Popen] | None = None  # a stream opened ahead

    @property
    def conn(self):
        """The paramiko/fabric connection, opened on first use."""
        if self._conn is None:
            self._conn = _connect(self.host, self.port, self.user, self.key_path,
                                  self.known_hosts, self._pin_new_host, self._expected)
        return self._conn

    def _ssh_argv(self, command: str) -> list[str]:
        """The OpenSSH client, held to the host key pinned in known_hosts."""
        if self._pin_new_host and self._conn is None:
            self.conn  # noqa: B018 - connecting pins a new host's key first
        return ["ssh", "-c", SSH_CIPHERS, "-p", str(self.port), "-i", self.key_path,
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", f"{self.user}@{self.host}",
                command]

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result:
        from invoke.exceptions import CommandTimedOut

        feed = False if stdin is None else io.StringIO(stdin.decode())  # EOF closes its stdin
        try:
            done = self.conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=feed)
        except CommandTimedOut:
            raise DlboxError(f"a command on {self.host} took over {timeout:.0f} s: "
                             f"{command.split()[0]} ...") from None
        return Result(done.exited, done.stdout, done.stderr)

    def read(self, path: str) -> bytes | None:
        try:
            with self.conn.sftp().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        with self.conn.sftp().open(path, "wb") as f:
            f.chmod(mode)  # before the content: never readable wider than mode
            f.write(data)

    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None:
        """root/<name> for each name as tar streams over parallel SSH connections.

        No round trip per file; tar keeps each file's mtime, so a later manifest check
        recognises it. Each SSH channel is capped by sshd's flow-control window over the
        round trip time, so on a long link several streams go several times faster.
        """
        started = time.monotonic()
        self.run(f"mkdir -p {shlex.quote(remote_dir)}")
        rtt = time.monotonic() - started
        sizes = sizes or {n: (root / n).stat().st_size for n in names}
        # A near link is CPU-bound (more streams only add handshakes and contention); a far
        # one is bound by each channel's window over the round trip, so more streams help.
        most = UPLOAD_STREAMS if rtt >= FAR_LINK_RTT_S else NEAR_LINK_STREAMS
        streams = max(1, min(most, len(names), sum(sizes.values()) // MIN_STREAM_BYTES))
        groups = _balanced(sizes, names, streams)
        lock = threading.Lock()

        def counted(n: int) -> None:
            if progress is not None:
                with lock:
                    progress(n)

        opened = []
        if self._ready is not None and self._ready[0] == remote_dir:
            if self._ready[1].poll() is None:  # still connected: it carries the first group
                opened.append(self._ready[1])
                self._ready = None
            else:  # it could not connect (or was dropped): open a fresh one instead
                self.discard_prepared()
        with ThreadPoolExecutor(len(groups)) as pool:
            for future in [pool.submit(self._tar_stream, root, g, remote_dir, counted,
                                       sum(sizes[n] for n in g),
                                       opened[0] if opened and i == 0 else None)
                           for i, g in enumerate(groups)]:
                future.result()

    def _tar_stream(self, root: Path, names: list[str], remote_dir: str,
                    progress: Callable[[int], None], size: int,
                    receiver: subprocess.Popen | None = None) -> None:
        """`tar -c | ssh HOST tar -x` with the OpenSSH client: its C crypto moves bulk data
        several times faster than paramiko's; the host key must match the pinned one."""
        remote = receiver or self._receiver(remote_dir)
        # -h: a symlinked image goes as its content, as the manifest (which follows links) says.
        argv = ["tar", "-c", "-h", "-f", "-", "-C", str(root), "--null", "-T", "-"]
        if _gnu_tar():  # tar writes into ssh itself and reports its progress on stderr
            tar = subprocess.Popen([*argv, f"--checkpoint={CHECKPOINT_RECORDS}",
                                    f"--checkpoint-action=echo={CHECKPOINT_TAG} %{{w}}T"],
                                   stdin=subprocess.PIPE, stdout=remote.stdin,
                                   stderr=subprocess.PIPE)
        else:  # bsdtar (macOS): no checkpoints, so the bytes pass through here to be counted
            tar = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def feed_names() -> None:
            with contextlib.suppress(BrokenPipeError):
                tar.stdin.write(b"".join(name.encode() + b"\0" for name in names))
                tar.stdin.close()

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
        except BrokenPipeError:
            pass  # ssh ended early: its exit status and stderr say why
        except BaseException:  # a failure here (or Ctrl-C): neither process outlives it
            for proc in (tar, remote):
                proc.kill()
            raise
        finally:
            tar.wait()
            remote.wait()
            for thread in threads:
                thread.join(timeout=COMMAND_TIMEOUT_S)
        error = b"".join(remote_errors).decode(errors="replace").strip()
        if remote.returncode != 0 or tar.returncode != 0:
            if "No space left on device" in error:
                raise DlboxError(f"the box's disk is full: {self.host}:{remote_dir} has no space "
                                 f"left; {DISK_FULL_FIX}. What arrived is kept: the next sync "
                                 "sends only the rest")
            # tar repeats its complaint for every file: the first line says it.
            first = (error or "\n".join(tar_errors) or "tar failed").splitlines()[0]
            raise DlboxError(f"upload to {self.host}:{remote_dir} failed: {first}")
        if tar.stderr is not None and sent < size:
            progress(size - sent)  # the bytes since tar's last checkpoint

    def upload_tree(self, local: Path, remote_dir: str) -> None:
        self.upload(local.parent, [local.name], remote_dir)

    def prepare_upload(self, remote_dir: str) -> None:
        """Open an upload stream to remote_dir now: its SSH handshake (several round trips,
        ~0.3 s even on loopback) then overlaps the manifest work instead of following it."""
        if self._ready is None and not (self._pin_new_host and self._conn is None):
            self._ready = (remote_dir, self._receiver(remote_dir))

    def discard_prepared(self) -> None:
        """Close a stream opened ahead that had nothing to carry (an empty tar archive)."""
        if self._ready is not None:
            _, receiver = self._ready
            self._ready = None
            with contextlib.suppress(OSError):  # BrokenPipe: it already ended
                receiver.stdin.write(EMPTY_TAR)
                receiver.stdin.close()
            try:
                receiver.wait(timeout=SSH_CONNECT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
            receiver.stderr.close()

    def _receiver(self, remote_dir: str) -> subprocess.Popen:
        """`ssh HOST tar -x` into remote_dir (made if missing), reading the archive on stdin."""
        quoted = shlex.quote(remote_dir)
        return subprocess.Popen(self._ssh_argv(f"mkdir -p {quoted} && tar -x -f - -C {quoted}"),
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def fetch(self, path: str, local: Path) -> None:
        self.conn.sftp().get(path, str(local))

    def close(self) -> None:
        self.discard_prepared()
        if self._conn is not None:
            self._conn.close()


def fingerprint(key) -> str:
    """OpenSSH's SHA256:... fingerprint of a paramiko key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _connect(host: str, port: int, user: str, key_path: str, known_hosts: Path,
             pin_new_host: bool, expected_fingerprints: set[str] | None = None):
    """A fabric Connection with our host-key policy, retried a few times with jitter."""
    import fabric
    import paramiko

    class PinFirstKey(paramiko.MissingHostKeyPolicy):
        """Record the key of a host met for the first time (at `up`); later: known_hosts.

        With expected fingerprints (an EC2 box's console prints them), a key not among
        them is refused instead of pinned.
        """

        def missing_host_key(self, client, hostname, key):
            if expected_fingerprints and fingerprint(key) not in expected_fingerprints:
                raise HostKeyMismatch(f"{host}:{port} presented host key {fingerprint(key)}, "
                                      "which the box's console output does not list; refusing "
                                      "to connect (someone may be in the middle)")
            client.get_host_keys().add(hostname, key.get_name(), key)
            client.save_host_keys(str(known_hosts))

    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.touch(mode=0o600, exist_ok=True)
    config = fabric.Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
    delay = SSH_CONNECT_FIRST_DELAY_S
    for attempt in range(SSH_CONNECT_ATTEMPTS):
        conn = fabric.Connection(
            host, user=user, port=port, config=config, connect_timeout=SSH_CONNECT_TIMEOUT_S,
            connect_kwargs={"key_filename": key_path, "look_for_keys": False,
                            "allow_agent": False},
        )
        client = paramiko.SSHClient()
        client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(PinFirstKey() if pin_new_host
                                           else paramiko.RejectPolicy())
        conn.client = client  # replaces fabric's default policy, which trusts any key
        try:
            conn.open()
            return conn
        except HostKeyMismatch as exc:
            raise DlboxError(str(exc)) from exc
        except paramiko.BadHostKeyException as exc:
            raise DlboxError(
                f"the host key of {host}:{port} has CHANGED (now {exc.key.get_fingerprint().hex()}"
                f"); refusing to connect. If the box was rebuilt, delete its line in {known_hosts}"
            ) from exc
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise DlboxError(f"{host}:{port} is not in {known_hosts}; run `dlbox up` "
                                 "again to pin its key") from exc
            if isinstance(exc, paramiko.AuthenticationException):
                raise DlboxError(f"{user}@{host}:{port} refused the key {key_path}") from exc
            last = exc
        except (TimeoutError, OSError) as exc:
            last = exc
        if attempt < SSH_CONNECT_ATTEMPTS - 1:
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2
    raise DlboxError(f"cannot reach {host}:{port} over SSH ({last}); check that the box is up "
                     "and the address and port are right")


def _balanced(sizes: dict[str, int], names: list[str], parts: int) -> list[list[str]]:
    """names split into parts of about equal bytes (largest first into the lightest part)."""
    sized = sorted(((sizes[n], n) for n in names), reverse=True)
    groups: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for size, name in sized:
        k = loads.index(min(loads))
        groups[k].append(name)
        loads[k] += size
    return [g for g in groups if g]


class HostKeyMismatch(Exception):
    """Raised inside paramiko's handshake: the key is not the one the box announced."""


def console_fingerprints(console: str) -> set[str]:
    """The SHA256 host-key fingerprints cloud-init prints to an EC2 console, if any yet."""
    inside, found = False, set()
    for line in console.splitlines():
        if "BEGIN SSH HOST KEY FINGERPRINTS" in line:
            inside = True
        elif "END SSH HOST KEY FINGERPRINTS" in line:
            inside = False
        elif inside:
            found.update(word for word in line.split() if word.startswith("SHA256:"))
    return found


def content_hash(paths: list[Path], root: Path) -> str:
    """A short hash of files' names and bytes: the identity of shipped code."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _gnu_tar() -> bool:
    """Whether this machine's tar is GNU tar (Linux), which can report its own progress."""
    try:
        done = subprocess.run(["tar", "--version"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except OSError:
        return False
    return "GNU tar" in done.stdout
