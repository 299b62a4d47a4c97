"""The local box and the SSH box: `up` checks the box can train, `down` forgets it."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from . import state
from .errors import DlboxError, UsageError
from .machines import LocalMachine, Machine, SshMachine

LOCAL_WORKDIR = "local-box"
TF_CHECK_TIMEOUT_S = 180
TF_CHECK = ("import tensorflow as tf, keras; "
            "print(tf.__version__, keras.__version__, len(tf.config.list_physical_devices('GPU')))")
SSH_TARGET = re.compile(r"^(?P<user>[^@\s]+)@(?P<host>[^:\s]+)(:(?P<port>\d+))?$")
Say = Callable[[str], None]


def machine_for(project_dir: Path, box: state.AnyBox, pin_new_host: bool = False) -> Machine:
    """The machine behind a box record."""
    if isinstance(box, state.LocalBox):
        return LocalMachine()
    if isinstance(box, state.SshBox):
        return SshMachine(box.host, box.port, box.user, box.key_path,
                          state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE, pin_new_host)
    if box.python is None or box.workdir is None or box.host is None:
        raise UsageError("this EC2 box has no TensorFlow environment yet: set python = "
                         "\"/path/to/python\" in dlbox.toml and run `dlbox up` again")
    return SshMachine(box.host, box.ssh_port, box.ssh_user, box.key_path,
                      state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE)


def check_python(machine: Machine, python: str) -> str:
    """A line naming TensorFlow, Keras and the GPUs python sees; UsageError if it cannot train."""
    done = machine.run(f"{shlex.quote(python)} -c {shlex.quote(TF_CHECK)}", timeout=TF_CHECK_TIMEOUT_S)
    if done.exit_code != 0:
        raise UsageError(f"{python} cannot import TensorFlow and Keras on the box; install "
                         "them (pip install 'dlbox[gpu]') or pass another --python")
    tf_version, keras_version, gpus = done.stdout.split()[-3:]
    return f"TensorFlow {tf_version}, Keras {keras_version}, {gpus} GPU(s)"


def ready_python(machine: Machine, workdir: str, python: str | None, say: Say,
                 requirements: tuple[str, ...] | None, pip_args: tuple[str, ...]) -> tuple[str, str]:
    """(python, versions line): the one given, or the box's dlbox venv (built if needed)."""
    from . import environment

    if python is None:
        python = environment.prepare(machine, workdir, say,
                                     requirements or environment.REQUIREMENTS, pip_args)
    versions = check_python(machine, python)
    if versions.endswith(" 0 GPU(s)"):
        say("warning: TensorFlow sees no GPU on this box; training will run on its CPU")
    return python, versions


def _refuse_other_kind(existing: state.AnyBox | None, kind: str) -> None:
    if existing is not None and existing.kind != kind:
        raise UsageError(f"this project already has a {existing.kind} box ({existing.name}); "
                         "run `dlbox down` first")


def up_local(project_dir: Path, python: str | None, say: Say) -> state.LocalBox:
    """Use this machine as the box; check its Python can train."""
    existing = state.load_box(project_dir)
    _refuse_other_kind(existing, "local")
    interpreter = python or (existing.python if existing else sys.executable)
    versions = check_python(LocalMachine(), interpreter)
    workdir = state.state_dir(project_dir).resolve() / LOCAL_WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)
    box = state.LocalBox(kind="local", name="local", workdir=str(workdir), python=interpreter)
    state.save_box(project_dir, box)
    say(f"local box ready: {interpreter} ({versions}); runs in {workdir}")
    return box


def up_ssh(project_dir: Path, target: str, key: str | None, python: str | None, workdir: str,
           say: Say, requirements: tuple[str, ...] | None = None,
           pip_args: tuple[str, ...] = ()) -> state.SshBox:
    """Use a machine the user already has: pin its host key, check its Python can train."""
    match = SSH_TARGET.match(target)
    if not match:
        raise UsageError(f"--ssh {target}: expected USER@HOST or USER@HOST:PORT")
    if key is None:
        raise UsageError("--ssh needs --key PATH (the private key that logs you in)")
    key_path = Path(key).expanduser().resolve()
    if not key_path.is_file():
        raise UsageError(f"--key {key}: no such file")
    existing = state.load_box(project_dir)
    _refuse_other_kind(existing, "ssh")
    host, port, user = match["host"], int(match["port"] or 22), match["user"]
    machine = SshMachine(host, port, user, str(key_path),
                         state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE, pin_new_host=True)
    try:
        made = machine.run(f"mkdir -p {workdir} && cd {workdir} && pwd")
        if made.exit_code != 0:
            raise DlboxError(f"cannot create {workdir} on {host}: {made.stderr.strip()}")
        python, versions = ready_python(machine, made.stdout.strip(), python, say, requirements,
                                        pip_args)
    finally:
        machine.close()
    box = state.SshBox(kind="ssh", name=f"{user}@{host}:{port}", host=host, port=port, user=user,
                       key_path=str(key_path), workdir=made.stdout.strip(), python=python)
    state.save_box(project_dir, box)
    say(f"ssh box {box.name} ready ({versions}); runs in {box.workdir}; host key pinned in "
        f"{state.state_dir(project_dir) / state.KNOWN_HOSTS_FILE}")
    return box


def down(project_dir: Path, box: state.LocalBox | state.SshBox, purge: bool, say: Say) -> None:
    """Forget the box; the local box's work dir always goes, an SSH box's with --purge."""
    if isinstance(box, state.LocalBox):
        LocalMachine().run(f"rm -rf {shlex.quote(box.workdir)}")
        say(f"local box removed ({box.workdir})")
    elif purge:
        machine = machine_for(project_dir, box)
        try:
            machine.run(f"rm -rf {shlex.quote(box.workdir)}")
        finally:
            machine.close()
        say(f"removed {box.workdir} on {box.name}")
    state.save_box(project_dir, None)
    if isinstance(box, state.SshBox):
        say(f"forgot ssh box {box.name}" + ("" if purge else f" (its {box.workdir} stays)"))
