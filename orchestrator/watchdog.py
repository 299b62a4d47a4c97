"""The EC2 box's watchdog as the box itself reports it: is its timer active, when does it act."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from .humanize import duration
from .machine import Machine

TIMER = "dlbox-watchdog.timer"
# The timer's state on the first line, then the watchdog's own clocks (key=value lines).
CHECK = (f"systemctl is-active {TIMER} 2>&1 | head -n 1; "
         "PATH=\"$PATH:/usr/local/sbin\" dlbox-watchdog --status 2>/dev/null; exit 0")
CHECK_TIMEOUT_S = 30


@dataclass(frozen=True)
class Watchdog:
    """What the box said: the timer's state and the watchdog's clocks (epoch seconds)."""

    timer: str  # "active", "inactive", or what systemctl answered
    clocks: dict[str, int] = field(default_factory=dict)

    @property
    def protecting(self) -> bool:
        """The timer runs and the watchdog keeps its state: the box will end on its own."""
        return self.timer == "active" and "born" in self.clocks

    @property
    def held(self) -> int:
        return self.clocks.get("held", 0)

    def line(self) -> str:
        """For `dlbox status`: the real deadlines, from the box's clocks."""
        if not self.protecting:
            why = f"timer {self.timer}" if self.timer != "active" else "no watchdog state"
            return (f"NOT running on the box ({why}): it will not power off by itself; "
                    "`dlbox down` when you are done")
        now, parts = self.clocks["now"], []
        idle, lifetime = self.clocks.get("idle_limit_s", 0), self.clocks.get("lifetime_limit_s", 0)
        if idle:
            if self.clocks.get("busy"):
                parts.append(f"powers off after {idle // 60} idle minutes (busy now)")
            else:
                at = self.clocks.get("last_active", now) + idle
                parts.append(f"powers off when idle at {_utc(at)} (in {duration(max(0, at - now))}) "
                             "unless used")
        if lifetime:
            at = self.clocks["born"] + lifetime
            parts.append(f"at the latest at {_utc(at)} (in {duration(max(0, at - now))})")
        if self.held:
            parts.append(f"{self.held} run(s) hold results not pulled yet (`dlbox pull`)")
        return "on (checked on the box): " + ("; ".join(parts) or "no limits set")


def _utc(epoch: int) -> str:
    return f"{datetime.fromtimestamp(epoch, timezone.utc):%Y-%m-%d %H:%M} UTC"


def check(machine: Machine) -> Watchdog:
    """Ask the box (one command)."""
    done = machine.run(CHECK, timeout=CHECK_TIMEOUT_S)
    lines = done.stdout.splitlines()
    timer = lines[0].strip() if lines else "unknown"
    if "not found" in timer:
        timer = "missing (no systemctl)"
    clocks = {}
    for line in lines[1:]:
        key, _, value = line.partition("=")
        if value.strip().isdigit():
            clocks[key.strip()] = int(value)
    return Watchdog(timer or "unknown", clocks)
