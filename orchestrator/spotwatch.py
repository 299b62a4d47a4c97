"""The spot watcher run beside the trainer on an EC2 spot box: an interruption notice -> SIGTERM."""

from __future__ import annotations

from .render import render

POLL_S = 5  # AWS advises checking for an interruption notice every 5 s
NOTICE_FILE = "interruption.json"  # in the run's folder: {"action", "time", "noticed_at"}
SCRIPT_FILE = "spotwatch.sh"  # in the run's folder; run.sh starts it as `bash spotwatch.sh PID`
CURL_TIMEOUT_S = 2  # each request to the instance metadata service


def reason(notice: dict) -> str:
    """A loss's reason from a (checked: boxfiles.notice) interruption notice."""
    return f"EC2 interruption notice: {notice.get('action', '?')} at {notice.get('time', '?')}"


def script(poll_s: int = POLL_S) -> str:
    """The watcher's bash script (templates/spotwatch.sh.j2), asking every poll_s seconds."""
    return render("spotwatch.sh.j2", poll_s=poll_s, notice_file=NOTICE_FILE,
                  curl_timeout_s=CURL_TIMEOUT_S)
