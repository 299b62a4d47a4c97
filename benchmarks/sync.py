"""Data sync benchmark: dlbox's sync vs `rsync -a` over the same loopback sshd, first sync and
no-op re-sync, directly and through a TCP proxy that delays traffic each way (a stand-in for
a real link: the kernel's netem is not available here); plus the orchestration overhead of
`dlbox train` on the local box.

Usage: python benchmarks/sync.py [--n 25000] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator import sync  # noqa: E402
from orchestrator.sample import generate  # noqa: E402
from orchestrator.sshmachine import SshMachine  # noqa: E402
from orchestrator.sshtarget import SshTarget  # noqa: E402
from tests import sshd as sshd_mod  # noqa: E402

CHUNK = 65536
OVERHEAD_TARGET_S = 3.0
AES_KEY = "rsync first, dlbox's cipher"
ROUNDS = 2


class DelayProxy:
    """Forwards TCP connections to a target port, delaying every chunk by delay_s each way."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                self._pipe(a, b)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        due: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                while data := src.recv(CHUNK):
                    due.put((time.monotonic() + self.delay_s, data))
            except OSError:
                pass  # a peer that reset the connection: the same end as a close
            due.put((time.monotonic() + self.delay_s, b""))

        def write() -> None:
            while True:
                at, data = due.get()
                time.sleep(max(0.0, at - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rsync(src: Path, dest: str, port: int, server, known_hosts: Path, cipher: str = "") -> None:
    ssh = (f"ssh -p {port} -i {server.client_key} -o BatchMode=yes -o IdentitiesOnly=yes "
           f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
           + (f" -c {cipher}" if cipher else ""))
    subprocess.run(["rsync", "-a", "-e", ssh, f"{src}/", f"{server.user}@127.0.0.1:{dest}/"],
                   check=True)


def compare(name: str, port: int, src: Path, work: Path, server, known_hosts: Path) -> dict:
    shutil.rmtree(work / "rsync", ignore_errors=True)
    shutil.rmtree(work / "dlbox", ignore_errors=True)
    dest = str(work / "rsync")
    dlbox_known_hosts = work / "dlbox_known_hosts"
    shutil.copyfile(known_hosts, dlbox_known_hosts)

    def dlbox_sync() -> None:  # connecting is part of the time, as it is for rsync
        machine = SshMachine(SshTarget("127.0.0.1", port, server.user, str(server.client_key),
                                       str(dlbox_known_hosts)))
        try:
            sync.sync(machine, src, str(work / "dlbox"))
        finally:
            machine.close()

    def first(fn, target) -> float:
        shutil.rmtree(target, ignore_errors=True)
        return timed(fn)

    figures: dict[str, float] = {}
    for _ in range(ROUNDS):  # interleaved, best of each: this VM's timings wander +-30 %
        for key, value in (
            ("rsync first", lambda: first(lambda: rsync(src, dest, port, server, known_hosts),
                                          dest)),
            ("rsync no-op", lambda: timed(lambda: rsync(src, dest, port, server, known_hosts))),
            ("dlbox first", lambda: first(dlbox_sync, work / "dlbox")),
            ("dlbox no-op", lambda: timed(dlbox_sync)),
            (AES_KEY, lambda: first(lambda: rsync(src, dest, port, server, known_hosts,
                                                  "aes128-gcm@openssh.com"), dest)),
        ):
            figures[key] = min(figures.get(key, float("inf")), value())
    print(f"{name:28} rsync first {figures['rsync first']:6.2f} s   dlbox first "
          f"{figures['dlbox first']:6.2f} s = {figures['dlbox first'] / figures['rsync first']:.2f}x"
          f"   rsync no-op {figures['rsync no-op']:5.2f} s   dlbox no-op "
          f"{figures['dlbox no-op']:5.2f} s = {figures['dlbox no-op'] / figures['rsync no-op']:.2f}x"
          f"   (rsync first with AES-GCM {figures[AES_KEY]:.2f} s)")
    return figures


def train_overhead(work: Path) -> tuple[float, float]:
    """(dlbox train's wall time, the trainer process's own) on the local box, 1 small epoch."""
    data, project = work / "overhead-data", work / "overhead-project"
    if not (data / "train").exists():
        generate(data, 200, test_n=0, seed=5)
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    dlbox = str(Path(sys.executable).parent / "dlbox")
    subprocess.run([dlbox, "up", "--local"], cwd=project, check=True, capture_output=True)
    total = timed(lambda: subprocess.run(
        [dlbox, "train", "scratch", "--data", str(data), "--epochs", "1", "--img-size", "32"],
        cwd=project, check=True, capture_output=True))
    [run] = [p for p in (project / "runs").iterdir() if p.is_dir()]
    remote = Path(json.loads((run / "run.json").read_text())["remote_dir"])
    own = float((remote / "trainer_ended_at").read_text()) - \
        float((remote / "trainer_started_at").read_text())
    subprocess.run([dlbox, "down"], cwd=project, check=True, capture_output=True)
    return total, own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25_000, help="files in the dataset")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="proxy delay, each way")
    ap.add_argument("--work", type=Path, default=REPO / ".bench")
    args = ap.parse_args()
    src = args.work / f"sync-{args.n}" / "train"
    if not src.is_dir() or len(os.listdir(src)) != args.n:
        shutil.rmtree(src.parent, ignore_errors=True)
        generate(src.parent, args.n, test_n=0, seed=13)
    sizes = [p.stat().st_size for p in src.iterdir()]
    print(f"{len(sizes)} files, mean {sum(sizes) / len(sizes) / 1024:.1f} KB, "
          f"{sum(sizes) / 1e6:.0f} MB, {os.cpu_count()} CPUs")
    # The "box" side writes to tmpfs when there is one: the figures are the link's and the
    # tools', not this VM's disk write-back (which would penalise whoever runs second).
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else args.work) as tmp:
        work = Path(tmp)
        if shm.is_dir():  # the sending side too: this VM's page cache is reclaimed within
            # seconds, and reading 25,000 files back from its slow disk would swamp both tools
            src = Path(shutil.copytree(src, work / "source" / "train"))
        server = sshd_mod.start(work / "sshd")
        proxy = DelayProxy(server.port, args.delay_ms / 1000)
        known_hosts = work / "known_hosts"
        known_hosts.write_text("".join(f"[127.0.0.1]:{p} {server.host_public_key}\n"
                                       for p in (server.port, proxy.port)))
        try:
            loop = compare("loopback", server.port, src, work, server, known_hosts)
            slow = compare(f"proxy, {args.delay_ms:.0f} ms each way", proxy.port, src, work,
                           server, known_hosts)
        finally:
            sshd_mod.stop(server)
        total, own = train_overhead(work)
    print(f"dlbox train on the local box: {total:.2f} s in all, trainer process {own:.2f} s, "
          f"overhead {total - own:.2f} s (target <= {OVERHEAD_TARGET_S:.0f} s)")
    checks = [loop["dlbox first"] <= loop["rsync first"], loop["dlbox no-op"] <= loop["rsync no-op"],
              slow["dlbox first"] <= slow["rsync first"], slow["dlbox no-op"] <= slow["rsync no-op"],
              total - own <= OVERHEAD_TARGET_S]
    stretch = slow["dlbox first"] <= 0.5 * slow["rsync first"]
    print(("all targets met" if all(checks) else "TARGETS MISSED")
          + ("; stretch (proxy first sync <= 0.5x rsync) met" if stretch else "; stretch missed"))


if __name__ == "__main__":
    main()
