"""The box's watchdog script, rendered from its template and run here with a fake power-off."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from orchestrator.config import Config
from orchestrator.ec2up import user_data
from orchestrator.render import render

UNUSED_PORT = 1  # no SSH session can be established on it here


def _watchdog(tmp_path, idle_s: int, lifetime_s: int, market: str = "on-demand"):
    script = tmp_path / "dlbox-watchdog"
    script.write_text(render(
        "watchdog.sh.j2", state_dir=str(tmp_path / "state"), registry=str(tmp_path / "active"),
        idle_seconds=idle_s,
        max_lifetime_seconds=lifetime_s, ssh_port=UNUSED_PORT,
        poweroff_command=f"touch {tmp_path / 'powered-off'}",
        market_command=f"echo {market}" if market else "false",
    ))
    script.chmod(0o755)

    def run(born_ago: int | None = None, active_ago: int | None = None) -> bool:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        now = int(time.time())
        if born_ago is not None:
            (state / "born").write_text(f"{now - born_ago}\n")
        if active_ago is not None:
            (state / "last-active").write_text(f"{now - active_ago}\n")
        (tmp_path / "powered-off").unlink(missing_ok=True)
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "powered-off").exists()

    return run


def test_idle_box_powers_off_after_the_limit(tmp_path):
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=0)
    assert not run(born_ago=10)  # fresh box, idle 10 s
    assert not run(born_ago=3600, active_ago=30)
    assert run(born_ago=3600, active_ago=61)
    assert "idle for" in (tmp_path / "state" / "poweroff.log").read_text()


@pytest.fixture()
def registered_run(tmp_path):
    """A live run.sh announced in the run registry, as run.sh announces itself."""
    proc = subprocess.Popen(["bash", "-c", "sleep 60; :", "run.sh"])
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / "20261129-120000-scratch.pid").write_text(f"{proc.pid}\n")
    yield proc
    proc.kill()
    proc.wait()


def test_a_trainer_elsewhere_on_the_machine_does_not_count(tmp_path):
    """Only runs in the registry count: a `python -m trainer` of someone else (or of another
    test) does not keep the box up, and a registered run that ended does not either."""
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m",
                                  "trainer"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / "old.pid").write_text(f"{ended.pid}\n")
    (tmp_path / "active" / "junk.pid").write_text("not a pid; rm -rf /\n")
    (tmp_path / "active" / "reused.pid").write_text(f"{elsewhere.pid}\n")  # alive, not a run
    try:
        run = _watchdog(tmp_path, idle_s=60, lifetime_s=0)
        assert run(born_ago=3600, active_ago=61)
    finally:
        elsewhere.kill()
        elsewhere.wait()


def test_a_running_training_keeps_the_box_alive(tmp_path, registered_run):
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=0)
    assert not run(born_ago=3600, active_ago=600)
    last = int((tmp_path / "state" / "last-active").read_text())
    assert abs(last - time.time()) < 5  # activity moved the idle clock


def test_maximum_lifetime_wins_even_when_busy(tmp_path, registered_run):
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=120)
    assert not run(born_ago=100)
    assert run(born_ago=121)
    assert "maximum lifetime" in (tmp_path / "state" / "poweroff.log").read_text()


def test_zero_disables_both_limits(tmp_path):
    run = _watchdog(tmp_path, idle_s=0, lifetime_s=0)
    assert not run(born_ago=10**6, active_ago=10**6)


def test_user_data_installs_the_rendered_watchdog_and_timer():
    text = user_data(Config(idle_minutes=45, max_lifetime_minutes=90, ssh_port=2222))
    assert text.startswith("#!/bin/bash")
    assert "IDLE_LIMIT_S=2700" in text and "LIFETIME_LIMIT_S=5400" in text
    assert "SSH_PORT=2222" in text
    assert "systemctl enable --now dlbox-watchdog.timer" in text
    assert "OnUnitActiveSec=1min" in text
    assert "chmod 1777 /var/lib/dlbox/active /var/lib/dlbox/unpulled" in text
    assert "REGISTRY=/var/lib/dlbox/active" in text
    result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _hold_results(tmp_path, run_id: str = "20261129-120000-scratch") -> None:
    """A run that ended and was never pulled, as run.sh marks it."""
    (tmp_path / "unpulled").mkdir(exist_ok=True)
    (tmp_path / "unpulled" / run_id).touch()


@pytest.mark.parametrize("market", ["spot", ""])
def test_unpulled_results_keep_a_box_that_cannot_stop_past_the_idle_limit(tmp_path, market):
    """A spot box (or one whose market the metadata does not say) would terminate on
    power-off and take the results with it: it waits for the pull instead."""
    _hold_results(tmp_path)
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=0, market=market)
    assert not run(born_ago=3600, active_ago=600)
    (tmp_path / "unpulled" / "20261129-120000-scratch").unlink()  # pulled: now it may go
    assert run(born_ago=3600, active_ago=600)


def test_unpulled_results_on_an_on_demand_box_power_off_into_a_stop(tmp_path):
    """dlbox set an on-demand box holding results to stop on power-off: powering off keeps
    the disk, so the idle limit applies as usual."""
    _hold_results(tmp_path)
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=0, market="on-demand")
    assert run(born_ago=3600, active_ago=600)


def test_a_restarted_box_counts_both_limits_from_its_start(tmp_path):
    """Started again to pull its results, a box must not power off at once for a lifetime
    or an idle time counted before it stopped."""
    run = _watchdog(tmp_path, idle_s=60, lifetime_s=120)
    assert run(born_ago=10_000, active_ago=10_000)
    boot = subprocess.run(["bash", str(tmp_path / "dlbox-watchdog"), "--boot"],
                          capture_output=True, text=True, timeout=30)
    assert boot.returncode == 0, boot.stderr
    assert not run()


def test_status_reports_the_clocks_the_limits_use(tmp_path, registered_run):
    _hold_results(tmp_path)
    _watchdog(tmp_path, idle_s=60, lifetime_s=120)(born_ago=100, active_ago=50)
    done = subprocess.run(["bash", str(tmp_path / "dlbox-watchdog"), "--status"],
                          capture_output=True, text=True, timeout=30)
    values = dict(line.split("=", 1) for line in done.stdout.split())
    assert values["busy"] == "1" and values["held"] == "1"
    assert values["idle_limit_s"] == "60" and values["lifetime_limit_s"] == "120"
    assert int(values["now"]) - int(values["born"]) in range(100, 106)
