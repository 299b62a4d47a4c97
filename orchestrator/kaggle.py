"""--data kaggle: the competition's zip, downloaded on the box with the kaggle package."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import DlboxError, UsageError
from .machines import Machine
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
Say = Callable[[str], None]


@dataclass(frozen=True)
class Credentials:
    """One Kaggle credential file, as the kaggle package reads it, and where it came from."""

    name: str  # "kaggle.json" (username + key) or "access_token" (API token)
    content: bytes
    source: str


def find_credentials(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Credentials:
    """The user's Kaggle credentials, looked up as the kaggle package looks them up."""
    home = home or Path.home()
    token = env.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        path = Path(token).expanduser()
        if path.is_file():
            return Credentials("access_token", path.read_bytes().strip(), str(path))
        return Credentials("access_token", token.encode(), "KAGGLE_API_TOKEN")
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return Credentials("kaggle.json", _legacy(env["KAGGLE_USERNAME"], env["KAGGLE_KEY"]),
                           "KAGGLE_USERNAME and KAGGLE_KEY")
    config_dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    config_dirs += [home / ".kaggle", home / ".config" / "kaggle"]
    for directory in config_dirs:
        if (directory / "access_token").is_file():
            path = directory / "access_token"
            return Credentials("access_token", path.read_bytes().strip(), str(path))
        if (directory / "kaggle.json").is_file():
            return _from_json(directory / "kaggle.json")
    raise UsageError("--data kaggle needs your Kaggle API credentials: create a token at "
                     f"{TOKEN_URL} and save it as ~/.kaggle/kaggle.json (or set "
                     "KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY)")


def _legacy(username: str, key: str) -> bytes:
    return json.dumps({"username": username, "key": key}).encode()


def _from_json(path: Path) -> Credentials:
    try:
        data = json.loads(path.read_text())
        return Credentials("kaggle.json", _legacy(data["username"], data["key"]), str(path))
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
                    competition=COMPETITION, secret_name=credentials.name)
    machine.write(f"{workdir}/kaggle_fetch.sh", script.encode(), 0o755)
    say(f"kaggle {COMPETITION}: downloading on the box (credentials from {credentials.source})")
    started = time.monotonic()
    # The credentials travel on the command's stdin, inside the SSH channel; never argv.
    done = machine.run(f"bash {shlex.quote(workdir)}/kaggle_fetch.sh",
                       timeout=DOWNLOAD_TIMEOUT_S, stdin=credentials.content)
    if done.exit_code != 0:
        raise DlboxError(_why(done.stdout + "\n" + done.stderr))
    size = int((machine.read(f"{dest}/{MARKER}") or b"0").strip() or 0)
    say(f"kaggle {COMPETITION}: {size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s, "
        "tested; credentials removed from the box")
    return archive


def _why(output: str) -> str:
    """One line for a failed download, with what to do about it."""
    text = output.lower()
    if "accept" in text and "rules" in text:
        return (f"Kaggle refused the download: accept the competition's rules at {RULES_URL} "
                "with the account of your API token, then run the command again")
    if "401" in text or "unauthenticated" in text or "kaggle auth login" in text:
        return f"Kaggle rejected the credentials; create a new API token at {TOKEN_URL}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return f"Kaggle download failed on the box: {lines[-1] if lines else 'no output'}"
