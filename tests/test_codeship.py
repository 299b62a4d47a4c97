"""The trainer's code on a box: published whole by one rename, trusted only when it names
its own hash (issue 9, item 6: concurrent first runs left a folder holding only a marker)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator import codeship
from orchestrator.sshmachine import SshMachine
from orchestrator.sshtarget import SshTarget

FIRST_RUNS_AT_ONCE = 6


def _machine(sshd, tmp_path: Path) -> SshMachine:
    known = tmp_path / "known_hosts"
    return SshMachine(SshTarget(sshd.host, sshd.port, sshd.user, str(sshd.client_key), str(known)),
                      pin_new_host=True)


def _whole(code: str) -> bool:
    package = Path(code) / "trainer"
    shipped = {p.name for p in package.glob("*.py")}
    return shipped == {p.name for p in codeship.trainer_dir().glob("*.py")} and \
        (Path(code) / codeship.HASH_FILE).read_bytes() == Path(code).name.encode()


def test_first_runs_at_once_publish_one_whole_package(tmp_path, sshd):
    workdir = tmp_path / "box"
    machines = [_machine(sshd, tmp_path) for _ in range(FIRST_RUNS_AT_ONCE)]
    machines[0].run("true")  # pin the host key once, before the race
    try:
        with ThreadPoolExecutor(FIRST_RUNS_AT_ONCE) as pool:
            codes = list(pool.map(lambda m: codeship.ship(m, str(workdir)), machines))
    finally:
        for machine in machines:
            machine.close()
    assert len(set(codes)) == 1 and _whole(codes[0])
    assert sorted(p.name for p in (workdir / codeship.CODE_DIR).iterdir()) == [Path(codes[0]).name]


def test_a_folder_left_half_shipped_is_replaced_not_trusted(tmp_path, sshd):
    """What an older dlbox (or a killed one) left: the folder under the right name, holding
    only a completion marker, or a package without its hash file."""
    workdir = tmp_path / "box"
    machine = _machine(sshd, tmp_path)
    try:
        code = codeship.ship(machine, str(workdir))
        for damage in ("only a marker", "no hash file"):
            if damage == "only a marker":
                machine.run(f"rm -rf {code} && mkdir -p {code} && touch {code}/.complete")
            else:
                machine.run(f"rm -f {code}/{codeship.HASH_FILE}")
            assert codeship.ship(machine, str(workdir)) == code and _whole(code), damage
    finally:
        machine.close()
