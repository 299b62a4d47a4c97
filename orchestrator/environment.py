"""The box's folder and the trainer's Python there: a venv with TensorFlow, built once."""

from __future__ import annotations

import hashlib
import shlex

from .errors import DlboxError, UsageError
from .humanize import Say
from .machine import Machine, printable, shell_path
from .render import render

# What the trainer is tested with (TensorFlow exactly; Keras as new as the box's Python allows).
REQUIREMENTS = ("tensorflow[and-cuda]==2.21.0", "keras>=3.10,<4", "numpy", "pillow")
BASE_PYTHON = "python3"
ENV_SETUP_TIMEOUT_S = 1800  # ~3 GB of wheels on a fresh box
TF_CHECK_TIMEOUT_S = 180
# Versions and GPUs on one line, then the interpreter's own absolute path (what runs record).
TF_CHECK = ("import sys, tensorflow as tf, keras; "
            "print(tf.__version__, keras.__version__, len(tf.config.list_physical_devices('GPU'))); "
            "print(sys.executable)")
# What the check's answer depends on, read without importing TensorFlow (~5 s on a small
# CPU): the interpreter, its TensorFlow and Keras files, and the GPUs the driver lists.
CHECK_KEY = ("import sys, os, importlib.util as u; print(sys.executable); "
             "[print(n, s.origin, os.stat(s.origin).st_mtime_ns) for n in ('tensorflow', 'keras') "
             "for s in [u.find_spec(n)] if s and s.origin]")
CHECKS_DIR = "env/.dlbox-checks"  # under the workdir: answers of TF_CHECK by CHECK_KEY


def requirements_hash(requirements: tuple[str, ...], pip_args: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join((*requirements, "--", *pip_args)).encode()).hexdigest()[:16]


def make_workdir(machine: Machine, workdir: str, where: str) -> str:
    """Create dlbox's folder on the box (a leading ~ is the box user's home); its absolute path.

    Any shell syntax in the path is taken literally. A control character or a byte that is not
    UTF-8 is refused: with a newline, the answer's last line named another folder, which runs
    and `down --purge` then used."""
    check_plain(workdir, workdir)
    path = shell_path(workdir)
    # The path between NULs: whatever the user's shell start-up prints comes before it.
    made = machine.run(f"mkdir -p -- {path} && cd -P -- {path} && printf '\\0%s\\0' \"$PWD\"")
    parts = made.stdout.split("\0")
    if made.exit_code != 0 or len(parts) < 3 or not parts[-2].startswith("/"):
        raise DlboxError(f"cannot create {printable(workdir)} on {where}: "
                         f"{made.stderr.strip() or 'mkdir failed'}; pass another --workdir")
    check_plain(parts[-2], f"{workdir} (on the box: {parts[-2]})")
    return parts[-2]


def check_plain(path: str, named: str) -> None:
    """UsageError for a workdir OpenSSH, shells and messages cannot carry as plain text."""
    if printable(path) != path:
        raise UsageError(f"--workdir {printable(named)}: a control character (a newline, a tab) "
                         "or a byte that is not UTF-8 in the path; pass a plainer one (--workdir, "
                         "or box_workdir in dlbox.toml)")


def prepare(machine: Machine, workdir: str, say: Say, requirements: tuple[str, ...] = REQUIREMENTS,
            pip_args: tuple[str, ...] = ()) -> str:
    """Find or build {workdir}/env; return its python (the caller checks it can train)."""
    env_dir = f"{workdir}/env"
    script = render("setup_env.sh.j2", env_dir=env_dir, base_python=BASE_PYTHON,
                    lock_timeout_s=ENV_SETUP_TIMEOUT_S,
                    requirements=list(requirements), pip_args=list(pip_args),
                    requirements_hash=requirements_hash(requirements, pip_args))
    path = f"{workdir}/setup_env.sh"
    machine.write(path, script.encode(), 0o755)
    say("preparing the box's Python environment (the first time: several minutes)...")
    done = machine.run(f"bash {shlex.quote(path)}", timeout=ENV_SETUP_TIMEOUT_S)
    if done.exit_code != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DlboxError("could not build the Python environment on the box: "
                         + " | ".join(tail) + (" (the box's disk is full)" if
                                               "No space left" in done.stderr else ""))
    say(done.stdout.strip().splitlines()[-1])
    return f"{env_dir}/bin/python"


def check_command(python: str, workdir: str | None) -> str:
    """TF_CHECK for python; with a workdir, its answer is kept there and given again while
    nothing it depends on changed (a box taken up again, a replacement on the same disk)."""
    py = shell_path(python)
    check = f"{py} -c {shlex.quote(TF_CHECK)}"
    if workdir is None:
        return check
    checks = f"{shell_path(workdir)}/{CHECKS_DIR}"
    return (f"set -o pipefail; key=$({{ {py} -c {shlex.quote(CHECK_KEY)} && "
            "{ nvidia-smi -L 2>/dev/null || :; }; } | sha256sum | cut -c1-32) && "
            "[ ${#key} = 32 ] || exit 1; "
            f'mkdir -p -- {checks} && f={checks}/"$key" || exit 1; '
            'if [ -s "$f" ]; then cat -- "$f"; exit 0; fi; '
            f'{check} > "$f.$$" || {{ rm -f -- "$f.$$"; exit 1; }}; '
            'mv -- "$f.$$" "$f" && cat -- "$f"')


def check_python(machine: Machine, python: str, workdir: str | None = None) -> tuple[str, str]:
    """(python's absolute path, a line naming TensorFlow, Keras and the GPUs it sees);
    UsageError if it cannot train. The path is what runs use: `~/venv/bin/python` becomes
    the box user's /home/... once, here."""
    done = machine.run(check_command(python, workdir), timeout=TF_CHECK_TIMEOUT_S)
    lines = done.stdout.strip().splitlines()
    words = lines[-2].split() if len(lines) >= 2 else []
    if done.exit_code != 0 or len(words) != 3 or not lines[-1].startswith("/"):
        raise UsageError(f"{python} cannot import TensorFlow and Keras on the box; install "
                         "them (pip install 'dlbox[gpu]') or pass another --python")
    tf_version, keras_version, gpus = words
    return lines[-1], f"TensorFlow {tf_version}, Keras {keras_version}, {gpus} GPU(s)"


def ready_python(machine: Machine, workdir: str, python: str | None, say: Say,
                 requirements: tuple[str, ...] | None, pip_args: tuple[str, ...]) -> tuple[str, str]:
    """(python, versions line): the one given, or the box's dlbox venv (built if needed)."""
    if python is None:
        python = prepare(machine, workdir, say, requirements or REQUIREMENTS, pip_args)
    python, versions = check_python(machine, python, workdir)
    if versions.endswith(" 0 GPU(s)"):
        say("warning: TensorFlow sees no GPU on this box; training will run on its CPU")
    return python, versions
