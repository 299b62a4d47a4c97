"""CLI start-up: `dlbox --help` and `dlbox status` (a box in moto) vs `python -c "import typer"`.

Each command runs REPEATS times, interleaved; the median wall time is printed.
Usage: python benchmarks/cli_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
BIN = Path(sys.executable).parent
TARGET_HELP_RATIO = 1.5


def fake_ssh_server() -> int:
    """A port that answers with an SSH banner, enough for `dlbox up` to call the box ready."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-benchmark\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def box_in_moto(project: Path) -> dict:
    """Start moto's server, bring a box up in it with `dlbox up`; return the env to reach it."""
    from moto.server import ThreadedMotoServer

    from tests import awsfakes

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    awsfakes.install_dlami()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": awsfakes.REGION}
    (project / "dlbox.toml").write_text(f"ssh_port = {fake_ssh_server()}\nssh_cidr = '203.0.113.7/32'\n")
    with awsfakes.public_ip("127.0.0.1"):
        subprocess.run([str(BIN / "dlbox"), "up"], cwd=project, env=env, check=True,
                       capture_output=True)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        env = box_in_moto(project)
        commands = {
            "python -c 'import typer'": [sys.executable, "-c", "import typer"],
            "dlbox --help": [str(BIN / "dlbox"), "--help"],
            "dlbox status (box in moto)": [str(BIN / "dlbox"), "status"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                start = time.perf_counter()
                subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
        subprocess.run([str(BIN / "dlbox"), "down"], cwd=project, env=env, check=True,
                       capture_output=True)
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
