"""A box reached over SSH: commands and files on one paramiko connection, bulk as tar streams.

Commands and small files go over one fabric/paramiko connection, bulk uploads as OpenSSH
tar streams; only the host key pinned in known_hosts is accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import debuglog, hostkeys, sshtarget, tarstream
from .errors import CommandTimedOut, DlboxError, LostContact, UsageError
from .machine import (
    COMMAND_TIMEOUT_S,
    MAX_OUTPUT_BYTES,
    MAX_READ_BYTES,
    Machine,
    Result,
    decode,
    local_error,
    too_big,
)
from .sshtarget import SshTarget

SSH_CONNECT_DEADLINE_S = 15  # a dropped handshake is tried again, for this long
SSH_CONNECT_FIRST_DELAY_S = 1.0
SSH_CONNECT_MAX_DELAY_S = 8.0
SFTP_TIMEOUT_S = 60  # one file operation; a silent peer is lost contact after this
UPLOAD_STREAMS = 4  # parallel tar streams (SSH connections) per upload on a far link
NEAR_LINK_STREAMS = 1
FAR_LINK_RTT_S = 0.02  # a command's round trip above this: a far link
MIN_STREAM_BYTES = 32 << 20  # below this a stream's own SSH handshake costs more than it saves
# AES-GCM first: with AES-NI it is ~2x faster than OpenSSH's default ChaCha20 for bulk data;
# a list, so a server without it falls back.
SSH_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"


class SshMachine:
    """A machine reached over SSH; its host key is pinned in the target's known_hosts."""

    same_filesystem = False

    @property
    def debug_name(self) -> str:
        return f"ssh {self.target.host}"

    def __init__(self, target: SshTarget, pin_new_host: bool = False,
                 expected_fingerprints: set[str] | None = None,
                 connect_deadline_s: float = SSH_CONNECT_DEADLINE_S) -> None:
        self.target = target
        self._pin_new_host, self._expected = pin_new_host, expected_fingerprints
        self._connect_deadline_s = connect_deadline_s
        self._conn = None
        self._heartbeat: _Heartbeat | None = None
        self._sftp_client = None
        self._ready: tuple[str, subprocess.Popen] | None = None  # a stream opened ahead

    @property
    def conn(self):
        """The fabric connection, opened on first use and watched by a heartbeat."""
        if self._conn is None:
            with debuglog.timed(f"{self.debug_name} connect", f"as {self.target.user} port "
                                f"{self.target.port}"):
                self._conn = _connect(self.target, self._pin_new_host, self._expected,
                                      self._connect_deadline_s)
            self._heartbeat = _Heartbeat(self._conn.transport, sshtarget.server_alive_interval_s(),
                                         sshtarget.alive_bound_s())
        return self._conn

    def _ssh_argv(self, *command: str) -> list[str]:
        """The OpenSSH client, held to the host key pinned in known_hosts."""
        if self._pin_new_host and self._conn is None:
            self.conn  # noqa: B018 - connecting pins a new host's key first
        return sshtarget.argv(self.target, *command, extra=("-c", SSH_CIPHERS))

    @contextlib.contextmanager
    def _link(self, doing: str) -> Iterator[None]:
        """Network and SSH failures while doing something become LostContact."""
        import paramiko

        try:
            yield
        except DlboxError:
            raise
        except Exception as exc:
            if self._heartbeat is not None and self._heartbeat.dead.is_set():
                raise LostContact(f"{self.target.address} stopped answering (no reply over SSH "
                                  f"for {self._heartbeat.bound_s} s) while {doing}") from exc
            if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
                raise DlboxError(f"{doing} on {self.target.host}: {exc.strerror or exc}; check "
                                 "the path and its permissions on the box") from exc
            if isinstance(exc, paramiko.SSHException | EOFError | OSError):
                raise LostContact(f"lost the SSH connection to {self.target.address} while "
                                  f"{doing} ({type(exc).__name__}: {exc or 'no answer'})") from exc
            raise

    @debuglog.traced(debuglog.command)
    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result:
        """One command on a fresh channel of the open connection: bytes in, bytes out.

        timeout bounds each wait for the box (silence longer than that is a timeout)."""
        with self._link(f"running {command.split()[0]}"):
            channel = self._channel(timeout)
            with contextlib.closing(channel):
                channel.settimeout(timeout)
                try:
                    _bounded(channel, lambda: channel.exec_command(command), timeout)
                    if stdin:
                        channel.sendall(stdin)
                    channel.shutdown_write()
                    out, err = _collect(channel, timeout)
                except TimeoutError:
                    raise CommandTimedOut(f"a command on {self.target.host} took over "
                                          f"{timeout:.0f} s: {command.split()[0]} ...") from None
                if channel.exit_status == -1 and not channel.get_transport().is_active():
                    raise EOFError("the connection closed before the command's exit status")
                return Result(channel.exit_status, decode(out), decode(err))

    def _channel(self, timeout: float):
        """A new channel of the connection, opened within timeout (CommandTimedOut)."""
        import paramiko

        transport = self.conn.client.get_transport()
        bound_s = min(timeout, sshtarget.SSH_CONNECT_TIMEOUT_S)
        try:  # a box that vanished never answers the channel's opening either
            return transport.open_session(timeout=bound_s)
        except paramiko.SSHException as exc:
            # paramiko says a timeout only in words; a closed transport is a lost link
            if "Timeout opening channel" not in str(exc) or not transport.is_active():
                raise
            raise CommandTimedOut(f"{self.target.host} did not open a channel within "
                                  f"{bound_s:.0f} s") from exc

    def _sftp(self, timeout: float = SFTP_TIMEOUT_S):
        """The connection's SFTP session (its own: one cut short by a timeout is dropped),
        opened within timeout."""
        import paramiko

        if self._sftp_client is None:
            channel = self._channel(timeout)
            try:
                channel.settimeout(timeout)
                _bounded(channel, lambda: channel.invoke_subsystem("sftp"), timeout)
                self._sftp_client = paramiko.SFTPClient(channel)  # its version: within timeout
            except BaseException:
                channel.close()
                raise
            channel.settimeout(SFTP_TIMEOUT_S)
        return self._sftp_client

    @debuglog.traced(debuglog.path)
    def read(self, path: str, max_bytes: int = MAX_READ_BYTES, tail: bool = False) -> bytes | None:
        with self._link(f"reading {path}"):
            try:
                with self._sftp().open(path, "rb") as f:
                    size = f.stat().st_size
                    if size > max_bytes:
                        if not tail:
                            raise too_big(path, max_bytes)
                        f.seek(size - max_bytes)
                    data = f.read(max_bytes + 1)  # a file still growing: bounded all the same
            except FileNotFoundError:
                return None
        if len(data) > max_bytes:
            if not tail:
                raise too_big(path, max_bytes)
            data = data[-max_bytes:]
        return data

    @debuglog.traced(debuglog.written)
    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write path in one rename, so a reader on the box never sees half of it."""
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
        with self._link(f"writing {path}"):
            sftp = self._sftp()
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)  # before the content: never readable wider than mode
                f.write(data)
            sftp.posix_rename(tmp, path)

    @debuglog.traced(debuglog.uploaded)
    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None:
        """root/<name> for each name as tar streams over parallel SSH connections.

        Each SSH channel is capped by sshd's flow-control window over the round trip time,
        so on a long link several streams go several times faster.
        """
        rtt = self._round_trip_s()
        sizes = sizes or {n: (root / n).stat().st_size for n in names}
        # A near link is CPU-bound (more streams only add handshakes and contention); a far
        # one is bound by each channel's window over the round trip, so more streams help.
        most = UPLOAD_STREAMS if rtt >= FAR_LINK_RTT_S else NEAR_LINK_STREAMS
        streams = max(1, min(most, len(names), sum(sizes.values()) // MIN_STREAM_BYTES))
        groups = tarstream.balanced(sizes, names, streams)
        lock = threading.Lock()

        def counted(n: int) -> None:
            if progress is not None:
                with lock:
                    progress(n)

        first = None
        if self._ready is not None and self._ready[0] == remote_dir:
            if self._ready[1].poll() is None:  # still connected: it carries the first group
                first, self._ready = self._ready[1], None
            else:  # it could not connect (or was dropped): open a fresh one instead
                self.discard_prepared()
        where = f"{self.target.host}:{remote_dir}"
        procs = tarstream.Processes()

        def stream(i: int, group: list[str]) -> None:
            remote = procs.add(first if (first is not None and i == 0) else tarstream.receiver(
                self._ssh_argv, remote_dir))
            tarstream.send(remote, root, group, where, counted, sum(sizes[n] for n in group),
                           procs)

        with ThreadPoolExecutor(len(groups)) as pool:
            futures = [pool.submit(stream, i, g) for i, g in enumerate(groups)]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # a failed stream, Ctrl-C, SIGTERM: every stream ends now
                procs.kill()  # (the pool would otherwise wait for them to finish sending)
                raise

    def _round_trip_s(self) -> float:
        """One round trip on the open connection: an SFTP stat starts no process on the box
        (a command would also time the user's shell start-up, .bashrc and all)."""
        with self._link("measuring the link"):
            sftp = self._sftp()
            started = time.monotonic()
            sftp.stat(".")
            return time.monotonic() - started

    @debuglog.traced(debuglog.tree)
    def upload_tree(self, local: Path, remote_dir: str) -> None:
        self.upload(local.parent, [local.name], remote_dir)

    def prepare_upload(self, remote_dir: str) -> None:
        """Open an upload stream to remote_dir now: its SSH handshake (several round trips,
        ~0.3 s even on loopback) then overlaps the manifest work instead of following it."""
        if self._ready is None and not (self._pin_new_host and self._conn is None):
            self._ready = (remote_dir, tarstream.receiver(self._ssh_argv, remote_dir))

    def discard_prepared(self) -> None:
        """Close a stream opened ahead that had nothing to carry."""
        if self._ready is not None:
            _, remote = self._ready
            self._ready = None
            tarstream.close_unused(remote)

    @debuglog.traced(debuglog.fetched)
    def fetch(self, path: str, local: Path, max_bytes: int,
              timeout: float | None = None) -> None:
        _quiet_prefetch_deaths()
        with open(local, "wb") as out, self._link(f"copying {path}"):
            try:
                sftp = self._sftp(SFTP_TIMEOUT_S if timeout is None else timeout)
                if timeout is not None:
                    sftp.get_channel().settimeout(timeout)
                if sftp.stat(path).st_size > max_bytes:
                    raise too_big(path, max_bytes)
                sftp.getfo(path, _Bounded(out, local, path, max_bytes))
            except TimeoutError:
                if timeout is None:
                    raise
                # Its answer may still come and would be read as the next one's: a new session.
                self._drop_sftp()
                raise CommandTimedOut(f"{self.target.host} sent nothing for {timeout:.0f} s "
                                      f"while {path} was copied") from None
            finally:
                if timeout is not None and self._sftp_client is not None:
                    self._sftp_client.get_channel().settimeout(SFTP_TIMEOUT_S)

    def _drop_sftp(self) -> None:
        if self._sftp_client is not None:
            with contextlib.suppress(Exception):  # a session cut short: any error is moot
                self._sftp_client.close()
            self._sftp_client = None

    def close(self) -> None:
        self.discard_prepared()
        self._drop_sftp()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _quiet_prefetch_deaths() -> None:
    """paramiko's SFTP get reads ahead in a thread of its own, which dies with the link and
    Python prints its traceback; the get itself fails too, and that is said in one line.
    Hook such deaths (only those), once per process; anything else goes where it went."""
    previous = threading.excepthook
    if getattr(previous, "dlbox_prefetch", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        import traceback

        import paramiko

        prefetching = any(f.f_code.co_name == "_prefetch_thread" and "paramiko" in
                          f.f_code.co_filename for f, _ in traceback.walk_tb(args.exc_traceback))
        if not (prefetching and isinstance(args.exc_value,
                                           paramiko.SSHException | EOFError | OSError)):
            previous(args)

    hook.dlbox_prefetch = True
    threading.excepthook = hook


class _Bounded:
    """A local file that takes at most max_bytes: a box must not fill this machine's disk.
    Its write errors (a full disk here) name the local file, never a lost link."""

    def __init__(self, out, local: Path, remote: str, max_bytes: int) -> None:
        self.out, self.local, self.remote, self.left = out, local, remote, max_bytes
        self.max_bytes = max_bytes

    def write(self, data: bytes) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise too_big(self.remote, self.max_bytes)
        try:
            return self.out.write(data)
        except OSError as exc:  # raised as a DlboxError: _link passes those through
            raise LocalWriteFailed(local_error(exc, self.local)) from exc


class LocalWriteFailed(DlboxError):
    """Writing a file on this machine failed (a full disk, a read-only folder)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"{exc.filename}: {exc.strerror}; free some space or fix the "
                         "permissions there, then run the command again")


class _Heartbeat:
    """Asks the box for an answer every interval_s (as OpenSSH's ServerAliveInterval does);
    none within bound_s: the transport is closed, which ends every wait on it.

    paramiko waits without a bound for a channel's exec and an SFTP session's start, and its
    own keepalive wants no reply, so it never notices a peer that stopped (a frozen sshd, a
    link that drops packets without a reset). Asking also keeps NAT from dropping an idle link.
    """

    def __init__(self, transport, interval_s: float, bound_s: float) -> None:
        self.transport, self.interval_s, self.bound_s = transport, interval_s, bound_s
        self.dead = threading.Event()  # set once the box missed its bound
        self._stopped = threading.Event()
        threading.Thread(target=self._beat, daemon=True, name="dlbox-heartbeat").start()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval_s) and self.transport.is_active():
            # A request sent interval_s after the last answer, so the whole silence stays
            # within bound_s. Any answer will do: sshd refuses this unknown request at once.
            timer = threading.Timer(max(self.bound_s - self.interval_s, self.interval_s),
                                    self._lost)
            timer.daemon = True
            timer.start()
            try:
                self.transport.global_request("keepalive@openssh.com", wait=True)
            except Exception:  # the transport already failed: its users hear why
                return
            finally:
                timer.cancel()

    def _lost(self) -> None:
        self.dead.set()
        self.transport.close()

    def stop(self) -> None:
        self._stopped.set()


def _bounded(channel, request: Callable[[], None], timeout: float) -> None:
    """request() (a channel request: exec, subsystem) within timeout, or TimeoutError with
    the channel closed: paramiko waits for the box's reply without a bound."""
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        channel.close()  # wakes the wait, which then raises

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    try:
        request()
    except Exception as exc:
        if fired.is_set():
            raise TimeoutError(f"no reply within {timeout:.0f} s") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():  # it came as the bound was reached: the channel is closed all the same
        raise TimeoutError(f"no reply within {timeout:.0f} s")


def _collect(channel, timeout: float) -> tuple[bytes, bytes]:
    """stdout and stderr to their end, both drained at once (neither fills and stalls the
    command), then the exit status; socket.timeout if the box falls silent for timeout."""
    err: list[bytes] = []
    errors: list[BaseException] = []

    def drain_stderr() -> None:
        try:
            err.append(_read_bounded(channel.makefile_stderr("rb"), "a command's stderr"))
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    reader = threading.Thread(target=drain_stderr, daemon=True)
    reader.start()
    out = _read_bounded(channel.makefile("rb"), "a command's output")
    reader.join(timeout)
    if errors:
        raise errors[0]
    if reader.is_alive() or not channel.status_event.wait(timeout):
        raise TimeoutError("no exit status")
    return out, err[0] if err else b""


def _read_bounded(stream, what: str) -> bytes:
    """A channel's stream to its end, MAX_OUTPUT_BYTES at most (a box may send without end)."""
    data = stream.read(MAX_OUTPUT_BYTES + 1)
    if len(data) > MAX_OUTPUT_BYTES:
        raise too_big(what, MAX_OUTPUT_BYTES)
    return data


def _connect(target: SshTarget, pin_new_host: bool, expected_fingerprints: set[str] | None,
             deadline_s: float):
    """A fabric Connection with our host-key policy, retried while the box may be booting."""
    import fabric
    import paramiko

    from infra import retry

    _quiet_paramiko()
    known_hosts = Path(target.known_hosts)
    if not Path(target.key_path).is_file():
        raise UsageError(f"the SSH key {target.key_path} is missing; put it back, or `dlbox down` "
                         "and `dlbox up` with another key")
    if not known_hosts.exists():  # made once: a read-only project still connects
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        known_hosts.touch(mode=0o600)
    config = fabric.Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})

    def attempt():
        sock = _speaking_socket(target)
        conn = fabric.Connection(
            target.host, user=target.user, port=target.port, config=config,
            connect_timeout=sshtarget.SSH_CONNECT_TIMEOUT_S,
            connect_kwargs={"key_filename": target.key_path, "look_for_keys": False,
                            "allow_agent": False, "banner_timeout": sshtarget.SSH_CONNECT_TIMEOUT_S,
                            "auth_timeout": sshtarget.SSH_CONNECT_TIMEOUT_S, "sock": sock},
        )
        client = paramiko.SSHClient()
        client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(
            hostkeys.pin_first_key_policy(known_hosts, expected_fingerprints) if pin_new_host
            else paramiko.RejectPolicy())
        conn.client = client  # replaces fabric's default policy, which trusts any key
        try:
            conn.open()
        except BaseException:
            conn.close()
            sock.close()
            raise
        return conn

    def transient(exc: BaseException) -> bool:
        """A box that is still booting: refused, reset, a handshake cut short, no answer."""
        if isinstance(exc, paramiko.AuthenticationException | paramiko.BadHostKeyException
                      | hostkeys.HostKeyMismatch):
            return False
        if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
            return False
        return isinstance(exc, paramiko.SSHException | EOFError | OSError | socket.timeout)

    try:
        return retry.call(attempt, retry_if=transient, deadline_s=deadline_s,
                          first_delay_s=SSH_CONNECT_FIRST_DELAY_S,
                          max_delay_s=SSH_CONNECT_MAX_DELAY_S)
    except hostkeys.HostKeyMismatch as exc:
        raise DlboxError(str(exc)) from exc
    except paramiko.BadHostKeyException as exc:
        raise DlboxError(
            f"the host key of {target.address} has CHANGED (now {hostkeys.fingerprint(exc.key)}); "
            f"refusing to connect. If the box was rebuilt, delete its line in {known_hosts}"
        ) from exc
    except paramiko.AuthenticationException as exc:
        raise DlboxError(f"{target.user}@{target.address} refused the key {target.key_path}") \
            from exc
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise DlboxError(f"{target.address} is not in {known_hosts}; run `dlbox up` "
                             "again to pin its key") from exc
        raise _unreachable(target, exc) from exc
    except (EOFError, OSError) as exc:
        raise _unreachable(target, exc) from exc


def _quiet_paramiko() -> None:
    """paramiko logs its transport thread's failures (tracebacks and all); with no handler,
    Python's last resort prints them on stderr. They reach the user as our one line instead."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _speaking_socket(target: SshTarget) -> socket.socket:
    """A TCP connection to the box once its server has begun to speak (the SSH banner).

    A port that accepts and never speaks (not an SSH server, a stuck proxy) is said in one
    line at once, not retried: a booting box refuses connections until its sshd listens."""
    sock = socket.create_connection((target.host, target.port),
                                    timeout=sshtarget.SSH_CONNECT_TIMEOUT_S)
    try:
        sock.recv(1, socket.MSG_PEEK)  # bounded by the timeout; paramiko reads the banner next
    except TimeoutError:
        sock.close()
        raise DlboxError(f"{target.address} accepted a TCP connection but sent no SSH banner "
                         f"within {sshtarget.SSH_CONNECT_TIMEOUT_S} s; is it an SSH server? "
                         "Check the host and port") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _unreachable(target: SshTarget, exc: BaseException) -> LostContact:
    return LostContact(f"cannot reach {target.address} over SSH ({type(exc).__name__}: "
                       f"{exc or 'connection closed'})", "check that the box is up and the "
                       "address and port are right")


def own_address(machine: Machine, name: str) -> str:
    """The address the box has on the network dlbox reached it by (sshd's end of this
    login): the other nodes of a cluster reach it there."""
    done = machine.run('printf "%s" "$SSH_CONNECTION"')
    fields = done.stdout.split()
    if done.exit_code != 0 or len(fields) != 4:
        raise DlboxError(f"{name}: could not tell the address it is reached at (SSH_CONNECTION "
                         f"is {done.stdout.strip()!r}); check that its sshd sets it")
    return fields[2]
