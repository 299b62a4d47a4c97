"""--data kaggle: the real kaggle client on the box, against a stand-in for api.kaggle.com."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest

from orchestrator import kaggle
from orchestrator.errors import UsageError
from tests import sshd as sshd_mod
from tests.cli import dlbox, up_local, up_ssh
from tests.kagglefake import FakeKaggle

USER, KEY = "alice", "0123456789abcdef"


def _competition_zip(sample: Path) -> bytes:
    """dogs-vs-cats.zip as Kaggle serves it: train.zip and test1.zip inside."""
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as zf:
        for folder in ("train", "test1"):
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as z:
                for f in sorted((sample / folder).iterdir()):
                    z.write(f, f"{folder}/{f.name}")
            zf.writestr(f"{folder}.zip", inner.getvalue())
    return outer.getvalue()


@pytest.fixture(scope="module")
def fake(tmp_path_factory, small_sample):
    server = FakeKaggle(tmp_path_factory.mktemp("kaggle"), USER, KEY,
                        {kaggle.COMPETITION: _competition_zip(small_sample)}).start()
    yield server
    server.stop()


@pytest.fixture()
def home(tmp_path, fake):
    """A user's home with ~/.kaggle/kaggle.json, and a box temp dir to watch for secrets."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    (home / ".kaggle" / "kaggle.json").chmod(0o600)
    (tmp_path / "boxtmp").mkdir()
    fake.rules_accepted, fake.on_download = True, None
    fake.downloads.clear()
    return home


def _where_the_key_is(fake: FakeKaggle) -> dict[str, list[str]]:
    """Record, while the file is served, which processes hold the key and how."""
    seen: dict[str, list[str]] = {"environ": [], "cmdline": []}

    def look():
        for proc in Path("/proc").glob("[0-9]*"):
            for kind in seen:
                try:
                    if KEY.encode() in (proc / kind).read_bytes():
                        seen[kind].append((proc / "comm").read_text().strip())
                except OSError:  # gone, or not ours to read
                    pass
    fake.on_download = look
    return seen


def _files_holding_the_key(*roots: Path) -> list[Path]:
    return [f for root in roots for f in root.rglob("*")
            if f.is_file() and KEY.encode() in f.read_bytes()]


# --- where the credentials come from ------------------------------------------------------


def test_credentials_are_found_where_the_kaggle_package_looks(tmp_path):
    legacy = (("KAGGLE_USERNAME", "u"), ("KAGGLE_KEY", "k"))
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    (tmp_path / ".kaggle" / "access_token").write_text("KGAT_home")
    assert kaggle.find_credentials({}, tmp_path).env == legacy  # read by every kaggle release
    env = kaggle.find_credentials({"KAGGLE_USERNAME": "v", "KAGGLE_KEY": "w"}, tmp_path)
    assert env.env == (("KAGGLE_USERNAME", "v"), ("KAGGLE_KEY", "w"))
    assert env.stdin() == b"KAGGLE_USERNAME=v\nKAGGLE_KEY=w\n"
    (tmp_path / "token").write_text("KGAT_file\n")
    assert kaggle.find_credentials({"KAGGLE_API_TOKEN": str(tmp_path / "token")}, tmp_path) == \
        kaggle.Credentials((("KAGGLE_API_TOKEN", "KGAT_file"),), str(tmp_path / "token"))
    assert kaggle.find_credentials({"KAGGLE_API_TOKEN": "KGAT_env"}, tmp_path).env == \
        (("KAGGLE_API_TOKEN", "KGAT_env"),)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "access_token").write_text("KGAT_dir")
    assert kaggle.find_credentials({"KAGGLE_CONFIG_DIR": str(other)}, tmp_path).env == \
        (("KAGGLE_API_TOKEN", "KGAT_dir"),)


def test_failed_downloads_are_told_apart():
    assert "rejected the credentials" in kaggle._why("401 Client Error: Unauthorized for url")
    assert "disk is full" in kaggle._why(" 401M/812M [00:04]\nOSError: [Errno 28] No space "
                                          "left on device")
    assert kaggle._why(" 401M/812M\nConnectionResetError: reset by peer") == \
        "Kaggle download failed on the box: ConnectionResetError: reset by peer"


def test_missing_or_broken_credentials_say_what_to_do(tmp_path):
    with pytest.raises(UsageError, match=r"kaggle\.com/settings/api"):
        kaggle.find_credentials({}, tmp_path)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"is not a Kaggle kaggle\.json"):
        kaggle.find_credentials({}, tmp_path)


# --- the local box ------------------------------------------------------------------------


@pytest.mark.slow
def test_local_box_downloads_once_trains_and_never_writes_the_credentials(tmp_path, fake, home):
    box_tmp = tmp_path / "boxtmp"
    env = {**fake.env(), "HOME": str(home), "TMPDIR": str(box_tmp)}
    assert up_local(tmp_path, env=env).returncode == 0
    seen = _where_the_key_is(fake)
    train = dlbox(tmp_path, "train", "scratch", "--data", "kaggle", "--test", "kaggle",
                  "--epochs", "1", "--img-size", "32", env=env)
    assert train.returncode == 0, train.stdout + train.stderr
    assert fake.downloads == [kaggle.COMPETITION]  # once, though --data and --test both asked
    # While it downloaded, the key was in the downloader's environment only: in no command
    # line, and in no file on the box, then or after.
    assert seen["environ"] and seen["cmdline"] == []
    assert _files_holding_the_key(box_tmp, tmp_path / ".dlbox") == []
    assert KEY not in train.stdout + train.stderr
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len((run / "submission.csv").read_text().splitlines()) == 1 + 5  # test1 from the zip
    assert json.loads((run / "metrics.json").read_text())["train_images"] > 0

    (home / ".kaggle" / "kaggle.json").unlink()  # the box has the data: no credentials needed
    again = dlbox(tmp_path, "train", "scratch", "--data", "kaggle", "--epochs", "1",
                  "--img-size", "32", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"kaggle {kaggle.COMPETITION}: already on the box" in again.stdout
    assert fake.downloads == [kaggle.COMPETITION]
    assert dlbox(tmp_path, "down", env=env).returncode == 0


@pytest.mark.parametrize(("problem", "says"), [
    ("rules", "accept the competition's rules at https://www.kaggle.com/competitions/dogs-vs-cats/rules"),
    ("key", "Kaggle rejected the credentials"),
    ("none", "--data kaggle needs your Kaggle API credentials"),
])
def test_refused_downloads_are_one_clear_line_and_leave_nothing(tmp_path, fake, home, problem, says):
    box_tmp = tmp_path / "boxtmp"
    env = {**fake.env(), "HOME": str(home), "TMPDIR": str(box_tmp)}
    assert up_local(tmp_path, env=env).returncode == 0
    fake.rules_accepted = problem != "rules"
    if problem == "key":
        (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": "no"}))
    if problem == "none":
        (home / ".kaggle" / "kaggle.json").unlink()
    result = dlbox(tmp_path, "train", "scratch", "--data", "kaggle", env=env)
    assert result.returncode == (2 if problem == "none" else 1), result.stdout + result.stderr
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert _files_holding_the_key(box_tmp, tmp_path / ".dlbox") == []
    assert KEY not in result.stdout + result.stderr
    dest = tmp_path / ".dlbox" / "local-box" / "data" / f"kaggle-{kaggle.COMPETITION}"
    assert not (dest / kaggle.MARKER).exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert fake.downloads == []


# --- an SSH box ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ssh_box_gets_the_credentials_over_the_channel_and_keeps_them_off_its_disk(tmp_path, fake, home):
    box_tmp = tmp_path / "boxtmp"
    # The box's own environment reaches "Kaggle" through the proxy (as a box behind one would).
    server = sshd_mod.start(tmp_path / "sshd", env={**fake.env(), "TMPDIR": str(box_tmp)})
    try:
        project, remote = tmp_path / "proj", tmp_path / "remote"
        project.mkdir()
        env = {"HOME": str(home), "DLBOX_DEBUG": "1"}  # the debug log on: it must hold no secret
        up = up_ssh(project, server, workdir=remote, env=env)
        assert up.returncode == 0, up.stderr
        seen = _where_the_key_is(fake)
        train = dlbox(project, "train", "scratch", "--data", "kaggle", "--epochs", "1",
                      "--img-size", "32", env=env)
        assert train.returncode == 0, train.stdout + train.stderr
        assert seen["environ"] and seen["cmdline"] == []  # over the channel, into the env
        assert _files_holding_the_key(box_tmp, remote) == []
        assert (remote / "data" / f"kaggle-{kaggle.COMPETITION}" / kaggle.MARKER).exists()
        # Every remote command and transfer, timed, with its outcome; no secret among them.
        log = (project / ".dlbox" / "debug.log").read_text()
        assert re.search(r" ssh 127\.0\.0\.1 run \d+\.\d{3}s .*kaggle_fetch\.sh.* -> exit 0", log)
        assert re.search(r" ssh 127\.0\.0\.1 upload \d+\.\d{3}s \d+ file\(s\) from ", log)
        assert re.search(r" ssh 127\.0\.0\.1 fetch \d+\.\d{3}s .*model\.keras to ", log)
        assert "command train scratch --data kaggle" in log
        private = [line for line in server.client_key.read_text().splitlines()
                   if line and not line.startswith("-----")]
        assert KEY not in log and USER not in log.replace(str(tmp_path), "")
        assert not [line for line in private if line in log]
        assert _files_holding_the_key(project) == []
    finally:
        sshd_mod.stop(server)
