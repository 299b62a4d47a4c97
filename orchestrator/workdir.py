"""dlbox's folder on a box: the subfolders it makes there carry a marker, so `down --purge`
deletes what dlbox made and never a file of the user's (a --workdir may be ~)."""

from __future__ import annotations

import shlex

from . import environment
from .errors import DlboxError
from .machine import Machine, printable, shell_path

MARKER = ".dlbox-made"
# Every subfolder dlbox writes: venv, shipped code, dataset cache, runs, extracted zips, and
# the run registry with its unpulled-results markers.
PARTS = ("env", "code", "data", "runs", "extracted", "active", "unpulled")
ROOT_FILES = ("setup_env.sh",)  # written in the folder itself, when dlbox made the folder


def prepare(machine: Machine, workdir: str, where: str) -> str:
    """Make the folder and its parts, marking each one this call creates (not one the user
    had); the folder's absolute path on the box."""
    environment.check_plain(workdir, workdir)
    root = shell_path(workdir)
    parts = " ".join(f"mkdir -- {p} 2>/dev/null && : > {p}/{MARKER};" for p in PARTS)
    done = machine.run(f"if [ ! -e {root} ]; then mkdir -p -- {root} && : > {root}/{MARKER}; fi; "
                       f"cd -- {root} || exit 1; {parts} exit 0")
    if done.exit_code != 0:
        raise DlboxError(f"cannot create {printable(workdir)} on {where}: "
                         f"{done.stderr.strip() or 'mkdir failed'}; pass another --workdir")
    return environment.make_workdir(machine, workdir, where)


def purge(machine: Machine, workdir: str) -> list[str]:
    """Delete the parts dlbox made (and the folder, if dlbox made it and it is left empty);
    return what was kept because dlbox did not make it."""
    root = shlex.quote(workdir)
    parts = " ".join(f'if [ -f {p}/{MARKER} ]; then rm -rf -- {p}; elif [ -e {p} ]; then '
                     f'echo {p}; fi;' for p in PARTS)
    files = " ".join(ROOT_FILES)
    done = machine.run(
        f"cd {root} 2>/dev/null || exit 0; {parts} "
        f"if [ -f {MARKER} ]; then rm -f -- {files} {MARKER}; cd / && rmdir -- {root} 2>/dev/null "
        f"|| echo .; else echo .; fi; exit 0")
    return [line for line in done.stdout.splitlines() if line]
