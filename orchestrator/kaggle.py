"""--data kaggle: the competition's zip, downloaded on the box with the kaggle package."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import debuglog
from .errors import DISK_FULL_FIX, DlboxError, UsageError
from .humanize import Say
from .machine import Machine
from .render import render

SOURCE = "kaggle"  # what --data and --test take to mean "download it on the box"
COMPETITION = "dogs-vs-cats"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
TOKEN_URL = "https://www.kaggle.com/settings/api"
# kaggle 1.7 is the last line for the DLAMI's Python 3.10; kaggle 2.2 imports six without
# requiring it (python-dateutil 4 no longer brings it along).
REQUIREMENTS = ("kaggle>=1.7,<3", "six")
DOWNLOAD_TIMEOUT_S = 3600  # ~800 MB; minutes in an AWS region, longer on a home line
MARKER = ".dlbox-complete"  # written (with the zip's size) only after a whole, tested download


@dataclass(frozen=True)
class Credentials:
    """The user's Kaggle credentials as the kaggle package's variables, and their source."""

    env: tuple[tuple[str, str], ...]  # (KAGGLE_USERNAME, ...), (KAGGLE_KEY, ...) or the token
    source: str

    def stdin(self) -> bytes:
        return "".join(f"{name}={value}\n" for name, value in self.env).encode()


def find_credentials(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Credentials:
    """The user's Kaggle credentials, looked up where the kaggle package looks.

    Where a folder has both, kaggle.json (username and key) wins over access_token: every
    kaggle release reads it, while tokens need kaggle 1.8+ (not on Python 3.10 boxes).
    """
    home = home or Path.home()
    token = env.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        path = Path(token).expanduser()
        if path.is_file():
            return _token(path.read_text().strip(), str(path))
        return _token(token, "KAGGLE_API_TOKEN")
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return _legacy(env["KAGGLE_USERNAME"], env["KAGGLE_KEY"], "KAGGLE_USERNAME and KAGGLE_KEY")
    config_dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    config_dirs += [home / ".kaggle", home / ".config" / "kaggle"]
    for directory in config_dirs:
        if (directory / "kaggle.json").is_file():
            return _from_json(directory / "kaggle.json")
        if (directory / "access_token").is_file():
            path = directory / "access_token"
            return _token(path.read_text().strip(), str(path))
    raise UsageError("--data kaggle needs your Kaggle API credentials: create a token at "
                     f"{TOKEN_URL} and save it as ~/.kaggle/kaggle.json (or set "
                     "KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY)")


def _token(token: str, source: str) -> Credentials:
    return Credentials((("KAGGLE_API_TOKEN", _one_line(token, source)),), source)


def _legacy(username: str, key: str, source: str) -> Credentials:
    return Credentials((("KAGGLE_USERNAME", _one_line(username, source)),
                        ("KAGGLE_KEY", _one_line(key, source))), source)


def _one_line(value: str, source: str) -> str:
    if not value or "\n" in value or "\r" in value:
        raise UsageError(f"{source}: not a Kaggle credential (empty or several lines); "
                         f"create a new token at {TOKEN_URL}")
    debuglog.secret(value)  # travels on stdin, never logged; masked should it show anyway
    return value


def _from_json(path: Path) -> Credentials:
    try:
        data = json.loads(path.read_text())
        return _legacy(str(data["username"]), str(data["key"]), str(path))
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a Kaggle kaggle.json (it needs \"username\" and "
                         f"\"key\"); download a new one from {TOKEN_URL}") from None


def fetch(machine: Machine, workdir: str, python: str, say: Say,
          pip_args: tuple[str, ...] = (), env: Mapping[str, str] = os.environ) -> str:
    """The competition's zip on the box (downloaded once, then reused); its path there."""
    dest = f"{workdir}/data/kaggle-{COMPETITION}"
    archive = f"{dest}/{COMPETITION}.zip"
    if machine.read(f"{dest}/{MARKER}") is not None:
        say(f"kaggle {COMPETITION}: already on the box")
        return archive
    credentials = find_credentials(env)
    script = render("kaggle_fetch.sh.j2", python=python, tools_dir=f"{workdir}/kaggle-env",
                    requirements=list(REQUIREMENTS), pip_args=list(pip_args), dest=dest, marker=MARKER,
                    competition=COMPETITION)
    machine.write(f"{workdir}/kaggle_fetch.sh", script.encode(), 0o755)
    say(f"kaggle {COMPETITION}: downloading on the box (credentials from {credentials.source})")
    started = time.monotonic()
    # The credentials travel on the command's stdin, inside the SSH channel: never in argv,
    # never in a file on the box.
    done = machine.run(f"bash {shlex.quote(f'{workdir}/kaggle_fetch.sh')}",
                       timeout=DOWNLOAD_TIMEOUT_S, stdin=credentials.stdin())
    if done.exit_code != 0:
        raise DlboxError(_why(done.stdout + "\n" + done.stderr))
    marked = (machine.read(f"{dest}/{MARKER}", 64) or b"").strip()  # the zip's size
    size = int(marked) if marked.isdigit() else 0
    say(f"kaggle {COMPETITION}: {size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s, "
        "tested; the credentials were never written on the box")
    return archive


def _why(output: str) -> str:
    """One line for a failed download, with what to do about it."""
    text = output.lower()
    if "accept" in text and "rules" in text:
        return (f"Kaggle refused the download: accept the competition's rules at {RULES_URL} "
                "with the account of your API token, then run the command again")
    if "no space left on device" in text:
        return f"the box's disk is full: {DISK_FULL_FIX}; then run the command again"
    if re.search(r"\b401\b.*unauthorized|unauthenticated|kaggle auth login|"
                 r"could not find kaggle\.json", text):
        return f"Kaggle rejected the credentials; create a new API token at {TOKEN_URL}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return f"Kaggle download failed on the box: {lines[-1] if lines else 'no output'}"
