"""This machine as a box: commands through bash, files through the file system."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from .atomic import write_atomic
from .errors import DlboxError
from .machine import COMMAND_TIMEOUT_S, Result, decode


class LocalMachine:
    """Commands run in their own process group, killed whole if they overrun or we stop."""

    same_filesystem = True

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

    def read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), data, mode)

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


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
