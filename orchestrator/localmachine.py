"""This machine as a box: commands through bash, files through the file system."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import debuglog
from .atomic import write_atomic
from .errors import DlboxError
from .machine import COMMAND_TIMEOUT_S, MAX_READ_BYTES, Result, decode, local_error, too_big


class LocalMachine:
    """Commands run in their own process group, killed whole if they overrun or we stop."""

    same_filesystem = True
    debug_name = "local"  # how the debug log names it

    @debuglog.traced(debuglog.command)
    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S,
            stdin: bytes | None = None) -> Result:
        proc = subprocess.Popen(["bash", "-c", command], start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DlboxError(f"a command on the local box took over {timeout:.0f} s: "
                             f"{command.split()[0]} ...") from None
        except BaseException:  # Ctrl-C: nothing it started outlives us
            _kill_group(proc)
            raise
        return Result(proc.returncode, decode(out), decode(err))

    @debuglog.traced(debuglog.path)
    def read(self, path: str, max_bytes: int = MAX_READ_BYTES, tail: bool = False) -> bytes | None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    if not tail:
                        raise too_big(path, max_bytes)
                    f.seek(size - max_bytes)
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        if len(data) > max_bytes:
            if not tail:
                raise too_big(path, max_bytes)
            data = data[-max_bytes:]
        return data

    @debuglog.traced(debuglog.written)
    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), data, mode)

    @debuglog.traced(debuglog.uploaded)
    def upload(self, root: Path, names: list[str], remote_dir: str,
               progress: Callable[[int], None] | None = None,
               sizes: dict[str, int] | None = None) -> None:
        for name in names:
            target = Path(remote_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)  # copy2 keeps the mtime, as tar does
            if progress is not None:
                progress((root / name).stat().st_size)

    @debuglog.traced(debuglog.tree)
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

    @debuglog.traced(debuglog.fetched)
    def fetch(self, path: str, local: Path, max_bytes: int,
              timeout: float | None = None) -> None:
        with open(path, "rb") as source:
            if os.fstat(source.fileno()).st_size > max_bytes:
                raise too_big(path, max_bytes)
            with open(local, "wb") as out:
                left = max_bytes
                while block := source.read(1 << 20):
                    left -= len(block)
                    if left < 0:
                        raise too_big(path, max_bytes)
                    try:
                        out.write(block)
                    except OSError as exc:
                        raise local_error(exc, local) from exc

    def close(self) -> None:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
