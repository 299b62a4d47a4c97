"""CLI start-up: `dlbox --help` and `dlbox status` (a box in moto) vs `python -c "import typer"`.

Each command runs REPEATS times, interleaved; the median wall time is printed.
Usage: python benchmarks/cli_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
BIN = Path(sys.executable).parent
TARGET_HELP_RATIO = 1.5
CALLER_CIDR = "203.0.113.7/32"  # stands for the caller's public IP: no lookup over the network
SETUP_TIMEOUT_S = 120


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None = None) -> None:
    """Run cmd; if it fails, print its stderr and exit 1 (the finally blocks still clean up)."""
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{(stderr or '').rstrip()}")
    if result.returncode != 0:
        fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr.rstrip()}")


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(1)


def write_project(project: Path, box, workdir: Path) -> None:
    """dlbox.toml for a "box" that is the loopback sshd, which accepts the project's key (as
    cloud-init makes an EC2 instance accept its key pair); this interpreter has TensorFlow,
    so `up` builds no venv on it."""
    from orchestrator import keys

    (project / "dlbox.toml").write_text(
        f"python = {sys.executable!r}\nssh_port = {box.port}\nssh_user = {box.user!r}\n"
        f"ssh_cidr = {CALLER_CIDR!r}\nbox_workdir = {str(workdir)!r}\n")
    _, public = keys.ensure(project / ".dlbox" / "keys")
    authorized = box.client_key.parent / "authorized_keys"
    authorized.write_text(authorized.read_text() + public + "\n")


def measure(tmp: Path, repeats: int) -> dict[str, list[float]]:
    """Start moto's server and a loopback sshd, `dlbox up` a box (EC2 in moto, SSH to the
    sshd), time the commands, `dlbox down`; moto and sshd are stopped whatever happens."""
    from moto.server import ThreadedMotoServer

    from tests import awsfakes
    from tests import sshd as sshd_mod

    project = tmp / "project"
    project.mkdir()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        awsfakes.install_dlami()
        try:
            box = sshd_mod.start(tmp / "sshd")
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # no sshd, ssh-keygen
            fail(f"the loopback sshd did not start: {e}")
        try:
            write_project(project, box, tmp / "box")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DLBOX_"))}
            env.update({"HOME": str(tmp), "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": awsfakes.REGION,
                        "AWS_CONFIG_FILE": str(tmp / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")})
            with awsfakes.public_ip("127.0.0.1"):
                run([str(BIN / "dlbox"), "up"], project, env, SETUP_TIMEOUT_S)
            commands = {
                "python -c 'import typer'": [sys.executable, "-c", "import typer"],
                "dlbox --help": [str(BIN / "dlbox"), "--help"],
                "dlbox status (box in moto)": [str(BIN / "dlbox"), "status"],
            }
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(repeats):
                for name, cmd in commands.items():
                    start = time.perf_counter()
                    run(cmd, project, env, SETUP_TIMEOUT_S)
                    times[name].append(time.perf_counter() - start)
            run([str(BIN / "dlbox"), "down"], project, env, SETUP_TIMEOUT_S)
            return times
        finally:
            sshd_mod.stop(box)
    finally:
        moto.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = measure(Path(tmp), args.repeats)
    base = statistics.median(times["python -c 'import typer'"])
    print(f"median of {args.repeats} interleaved runs, {os.cpu_count()} CPUs")
    print(f"{'':30} {'ms':>7}  vs import typer")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30} {median * 1000:7.0f}  {median / base:.2f}x")
    ratio = statistics.median(times["dlbox --help"]) / base
    print(f"--help target <= {TARGET_HELP_RATIO}x: {'met' if ratio <= TARGET_HELP_RATIO else 'MISSED'}")


if __name__ == "__main__":
    main()
