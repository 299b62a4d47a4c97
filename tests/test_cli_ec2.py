"""`dlbox up/status/down` run as a subprocess against moto's server over HTTP, SSH on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import awsfakes, cli
from tests import sshd as sshd_mod
from tests.cli import CLI_TIMEOUT_S, DLBOX
from tests.conftest import CALLER_IP
from tests.sshd import free_port
from tests.tcpproxy import Proxy

POLL_S = 0.05


@pytest.fixture()
def project(tmp_path, sshd, aws, moto_url, ip_lookup_url, box_settings, box_bin):
    """A project folder whose boxes are the loopback sshd, which accepts the project's key
    (as cloud-init makes an EC2 instance accept its key pair) and runs a watchdog that has
    just booted."""
    from orchestrator import ec2box, keys

    subprocess.run([box_bin / "dlbox-watchdog", "--boot"], check=True, timeout=CLI_TIMEOUT_S)
    for left in ("active", "unpulled"):  # a new box's registry is empty
        shutil.rmtree(Path(ec2box.RUNS_REGISTRY_ON_BOX).parent / left, ignore_errors=True)
    (box_bin / "timer-state").unlink(missing_ok=True)

    directory = tmp_path / "proj"
    directory.mkdir()
    (directory / "dlbox.toml").write_text(f"ssh_port = {sshd.port}\nssh_user = {sshd.user!r}\n"
                                          + box_settings)
    _, public = keys.ensure(directory / ".dlbox" / "keys")
    authorized = sshd.client_key.parent / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + public + "\n")
    env = cli_env(tmp_path, moto_url, ip_lookup_url)
    try:
        with awsfakes.public_ip("127.0.0.1"):
            yield directory, env
    finally:
        authorized.write_text(original)


def cli_env(home: Path, moto_url: str, ip_lookup_url: str) -> dict[str, str]:
    """The environment of a `dlbox` run as a subprocess: AWS is moto's server, nothing else."""
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": awsfakes.REGION, "AWS_CONFIG_FILE": str(home / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "DLBOX_IP_LOOKUP_URL": ip_lookup_url,
    }


def dlbox(project, *args: str, env_drop: tuple = (), env_set: dict | None = None):
    """`dlbox ARGS` in a project of (folder, its whole environment: moto's AWS, nothing else)."""
    directory, env = project
    env = {k: v for k, v in env.items() if k not in env_drop} | (env_set or {})
    return cli.dlbox(directory, *args, whole_env=env)


def _state(directory: Path) -> dict | None:
    """The project's one recorded box, or None."""
    boxes = json.loads((directory / ".dlbox" / "state.json").read_text())["boxes"]
    assert len(boxes) <= 1, boxes
    return boxes[0] if boxes else None


def _instances(ec2, states=("pending", "running")) -> list[dict]:
    pages = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_up_status_down(project, aws, sshd):
    directory, _ = project
    up = dlbox(project, "--verbose", "up")
    assert up.returncode == 0, up.stderr
    box = _state(directory)
    assert f"launched {box['instance_id']}: on-demand g4dn.xlarge" in up.stdout
    assert "$0.526/h" in up.stdout
    assert f"is up at 127.0.0.1:{sshd.port}" in up.stdout
    assert stat.S_IMODE(os.stat(box["key_path"]).st_mode) == 0o600
    ssh_config = (directory / ".dlbox" / "ssh_config").read_text()
    assert "HostName 127.0.0.1" in ssh_config and "StrictHostKeyChecking yes" in ssh_config
    group = aws.describe_security_groups(GroupIds=[box["security_group_id"]])["SecurityGroups"][0]
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"]] \
        == [(sshd.port, [f"{CALLER_IP}/32"])]

    status = dlbox(project, "status")
    assert status.returncode == 0, status.stderr
    for needle in (box["instance_id"], "running", "g4dn.xlarge (on-demand)", "$0.00 at $0.526/h",
                   "watchdog\ton (checked on the box): powers off when idle at", "(in 29 min)",
                   "at the latest at", "(in 11 h 59 min)"):
        assert needle in status.stdout

    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert f"{box['instance_id']} terminated" in down.stdout and "it cost about $" in down.stdout
    assert _instances(aws) == []
    assert [i["State"]["Name"] for i in _instances(aws, ["terminated"])] == ["terminated"]
    assert _state(directory) is None
    assert aws.describe_key_pairs()["KeyPairs"] == []
    assert [g["GroupName"] for g in aws.describe_security_groups()["SecurityGroups"]] == ["default"]
    assert Path(box["key_path"]).exists()  # kept for the next `up`, never overwritten
    # --verbose: every AWS call and remote command, timed, with its outcome; never the key.
    log = (directory / ".dlbox" / "debug.log").read_text()
    assert re.search(r" aws \d+\.\d{3}s ec2\.RunInstances -> HTTP 200$", log, re.M)
    assert re.search(r" ssh 127\.0\.0\.1 connect \d+\.\d{3}s as \S+ port \d+ -> ok$", log,
                     re.M)
    assert re.search(r" ssh 127\.0\.0\.1 run \d+\.\d{3}s .* -> exit 0$", log, re.M)
    private = [line for line in Path(box["key_path"]).read_text().splitlines()
               if line and not line.startswith("-----")]
    assert private and not [line for line in private if line in log]
    assert "TerminateInstances" not in log  # `down` ran without --verbose: not logged

    again = dlbox(project, "down")
    assert again.returncode == 0 and "no box is up" in again.stdout


def test_ssh_config_logs_in_and_pins_the_host_key(project, sshd):
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    ssh = ["ssh", "-F", str(directory / ".dlbox/ssh_config"), "-o", "BatchMode=yes", "dlbox"]
    try:
        first = subprocess.run([*ssh, "echo", "hello"], capture_output=True, text=True, timeout=30)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "hello"
        known = (directory / ".dlbox/known_hosts").read_text()
        assert sshd.host_public_key.split()[1] in known
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(directory / "other")], check=True)
        forged = known.replace(sshd.host_public_key.split()[1],
                               (directory / "other.pub").read_text().split()[1])
        (directory / ".dlbox/known_hosts").write_text(forged)
        refused = subprocess.run([*ssh, "true"], capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0
        assert "HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    finally:
        assert dlbox(project, "down").returncode == 0


def test_up_with_the_users_own_key_imports_its_public_half(project, aws, sshd):
    result = dlbox(project, "up", "--ssh-key", str(sshd.client_key))
    assert result.returncode == 0, result.stderr
    public = sshd.client_key.with_suffix(".pub").read_text().split()[1]
    pairs = aws.describe_key_pairs(IncludePublicKey=True)["KeyPairs"]
    assert [p["PublicKey"].split()[1] for p in pairs] == [public]
    assert _state(project[0])["key_path"] == str(sshd.client_key.resolve())
    assert dlbox(project, "down").returncode == 0
    assert sshd.client_key.exists()  # the user's key is never touched
    _one_line_error(dlbox(project, "up", "--ssh-key", "/no/such/key"), 2, "ssh_key")


def test_up_twice_reuses_the_box_and_follows_a_new_address(project, aws, sshd):
    first = dlbox(project, "up")
    assert first.returncode == 0, first.stderr
    second = dlbox(project, "up", "--ssh-cidr", "198.51.100.9/32")  # moved to another network
    assert second.returncode == 0, second.stderr
    assert "reusing box" in second.stdout
    assert len(_instances(aws)) == 1
    group = aws.describe_security_groups(
        GroupIds=[_state(project[0])["security_group_id"]])["SecurityGroups"][0]
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"]] \
        == [(sshd.port, ["198.51.100.9/32"])]
    assert dlbox(project, "down").returncode == 0


def _other_project(project, tmp_path: Path):
    """A second project folder with the same settings and key (another checkout)."""
    directory, env = project
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(directory / "dlbox.toml", other / "dlbox.toml")
    shutil.copytree(directory / ".dlbox" / "keys", other / ".dlbox" / "keys")
    return other, env


def _tagged(aws, project_tag: str | None = None) -> list[str]:
    """Ids of the live instances, of one project (by its tag) or all."""
    return sorted(i["InstanceId"] for i in _instances(aws, ("pending", "running", "stopping",
                                                            "stopped"))
                  if project_tag is None or {"Key": "dlbox:project", "Value": project_tag}
                  in i.get("Tags", []))


def test_down_all_lists_every_projects_boxes_and_asks_first(project, aws, tmp_path):
    """--all reaches other projects' boxes: it says which (project, age, cost) and ends them
    only with --yes; plain `down` ends only this project's, even with .dlbox/ gone."""
    directory, _ = project
    other = _other_project(project, tmp_path)
    assert dlbox(project, "up").returncode == 0
    assert dlbox(other, "up").returncode == 0
    assert len(_tagged(aws)) == 2
    shutil.rmtree(directory / ".dlbox")

    asked = dlbox(project, "down", "--all")
    _one_line_error(asked, 2, "2 instance(s) of every project", "dlbox down --all --yes")
    assert asked.stdout.count("about $0.00 so far") == 2 and "project proj-" in asked.stdout
    assert "project other-" in asked.stdout and len(_tagged(aws)) == 2  # nothing ended

    mine = dlbox(project, "down")  # no state at all: found by the project's tag
    assert mine.returncode == 0, mine.stderr
    assert "1 instance(s) of this project that .dlbox/state.json did not record" in mine.stdout
    assert len(_tagged(aws)) == 1  # the other project's box runs on

    every = dlbox(project, "down", "--all", "--yes")
    assert every.returncode == 0, every.stderr
    assert "1 dlbox instance(s) terminated" in every.stdout
    assert _tagged(aws) == [] and aws.describe_key_pairs()["KeyPairs"] == []
    assert [g["GroupName"] for g in aws.describe_security_groups()["SecurityGroups"]] == ["default"]


def test_up_after_the_state_file_was_lost_reuses_the_projects_instance(project, aws):
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    first = _state(directory)["instance_id"]
    (directory / ".dlbox" / "state.json").unlink()
    again = dlbox(project, "up")
    assert again.returncode == 0, again.stderr
    assert f"found {first} (running) of this project" in again.stdout
    assert _tagged(aws) == [first] and _state(directory)["instance_id"] == first
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert _tagged(aws) == [] and aws.describe_key_pairs()["KeyPairs"] == []


def test_two_ups_at_once_start_one_instance(project, aws):
    directory, env = project
    procs = [subprocess.Popen([DLBOX, "up"], cwd=directory, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=CLI_TIMEOUT_S) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert len(_tagged(aws)) == 1
    assert sum("reusing box" in out for out, _ in outs) == 1
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_a_stopped_instance_is_started_again_not_forgotten(project, aws):
    """Stopped from the console (its disk still billed): `up` starts it again."""
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    first = _state(directory)["instance_id"]
    aws.stop_instances(InstanceIds=[first])
    again = dlbox(project, "up")
    assert again.returncode == 0, again.stderr
    assert f"{first} is stopped (its disk kept); starting it" in again.stdout
    assert [i["InstanceId"] for i in _instances(aws)] == [first]
    assert dlbox(project, "down").returncode == 0 and _tagged(aws) == []


def test_an_instance_the_state_does_not_know_is_named_and_down_ends_it_too(project, aws):
    """A second instance of the project (left by an older dlbox, say): `up` refuses in one
    line; `down` ends both; the group and key pair go only once neither uses them."""
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    box = _state(directory)
    tags = {t["Key"]: t["Value"] for t in aws.describe_instances(InstanceIds=[box["instance_id"]])
            ["Reservations"][0]["Instances"][0]["Tags"]}
    stray = aws.run_instances(
        ImageId=awsfakes.DLAMI_ID, MinCount=1, MaxCount=1, KeyName=box["key_name"],
        SecurityGroupIds=[box["security_group_id"]],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": k, "Value": v} for k, v in (tags | {"dlbox:box": "stray"}).items()]}],
    )["Instances"][0]["InstanceId"]
    refused = dlbox(project, "up")
    _one_line_error(refused, 2, stray, "`dlbox down` ends all of them")
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert stray in down.stdout and box["instance_id"] in down.stdout
    assert _tagged(aws) == [] and aws.describe_key_pairs()["KeyPairs"] == []


def test_up_refuses_to_call_a_box_protected_when_its_watchdog_does_not_run(project, box_bin):
    (box_bin / "timer-state").write_text("inactive\n")
    up = dlbox(project, "up")
    assert up.returncode == 0, up.stderr
    assert "warning: the watchdog is NOT running on the box (timer inactive)" in up.stdout
    status = dlbox(project, "status")
    assert "watchdog\tNOT running on the box (timer inactive)" in status.stdout
    (box_bin / "timer-state").write_text("active\n")
    assert "watchdog\ton (checked on the box)" in dlbox(project, "status").stdout
    assert dlbox(project, "down").returncode == 0


def test_ctrl_c_while_waiting_leaves_the_instance_recorded_for_down(project, aws):
    directory, env = project
    (directory / "dlbox.toml").write_text(f"ssh_port = {free_port()}\n")  # nothing answers there
    # SIG_DFL: a shell's background job would otherwise pass SIGINT down as ignored.
    proc = subprocess.Popen([DLBOX, "up"], cwd=directory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state_file = directory / ".dlbox" / "state.json"
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (state_file.exists() and (_state(directory) or {}).get("host")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130
    assert "dlbox down" in err and "Traceback" not in err
    recorded = _state(directory)["instance_id"]
    assert [i["InstanceId"] for i in _instances(aws)] == [recorded]
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert _instances(aws) == []


def test_capacity_error_falls_back_and_says_so(project, aws):
    first_zone = sorted(o["Location"] for o in aws.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": ["g4dn.xlarge"]}])["InstanceTypeOfferings"])[0]
    with awsfakes.ec2_errors(lambda kw: "InsufficientInstanceCapacity"
                             if kw["placement"] == first_zone else None):
        result = dlbox(project, "up")
    assert result.returncode == 0, result.stderr
    assert (f"no on-demand g4dn.xlarge in {first_zone} (InsufficientInstanceCapacity); "
            "trying the next") in result.stdout
    assert len(_instances(aws)) == 1
    assert dlbox(project, "down").returncode == 0


def test_quota_error_is_one_clear_line_and_leaves_nothing(project, aws):
    directory, _ = project
    with awsfakes.ec2_errors(lambda kw: "VcpuLimitExceeded"):
        result = dlbox(project, "up")
    _one_line_error(result, 1, "Service Quotas", "Running On-Demand G and VT instances")
    assert _instances(aws) == []
    assert aws.describe_key_pairs()["KeyPairs"] == []
    assert [g["GroupName"] for g in aws.describe_security_groups()["SecurityGroups"]] == ["default"]
    assert _state(directory) is None


def test_spot_unavailable_falls_back_to_on_demand(project, aws):
    with awsfakes.ec2_errors(lambda kw: "InsufficientInstanceCapacity"
                             if kw["instance_market_options"] == "spot" else None):
        result = dlbox(project, "up", "--spot")
    assert result.returncode == 0, result.stderr
    assert "no spot g5.xlarge" in result.stdout and ": on-demand g4dn.xlarge" in result.stdout
    assert dlbox(project, "down").returncode == 0


def test_user_errors_are_one_line(project, aws):
    directory, _ = project
    _one_line_error(dlbox(project, "up", env_drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
                    1, "no AWS credentials")
    _one_line_error(dlbox(project, "down", "--all", env_drop=("AWS_SECRET_ACCESS_KEY",)), 1,
                    "incomplete")
    _one_line_error(dlbox(project, "up", "--region", "xx-nowhere-9"), 1, "unknown AWS region")
    _one_line_error(dlbox(project, "up", "--ssh-cidr", "0.0.0.0/0"), 1, "whole internet")
    (directory / "dlbox.toml").write_text("regoin = 'us-east-1'\n")
    _one_line_error(dlbox(project, "up"), 2, "unknown key 'regoin'")
    (directory / "dlbox.toml").write_text("disk_gb = 'big'\n")
    _one_line_error(dlbox(project, "up"), 2, "disk_gb must be a whole number")
    assert _instances(aws) == []


def test_init_writes_a_config_that_loads(project):
    directory, _ = project
    (directory / "dlbox.toml").unlink()
    result = dlbox(project, "init")
    assert result.returncode == 0, result.stderr
    text = (directory / "dlbox.toml").read_text()
    assert "idle_minutes = 30" in text and "# ami" in text
    _one_line_error(dlbox(project, "init"), 2, "--force")
    from orchestrator import config

    assert config.load(directory) == config.Config()


@pytest.mark.slow
def test_train_through_ec2_then_down_after(project, aws, small_sample):
    """up on EC2 (moto; the instance is the loopback sshd), train scratch, --down-after."""
    directory, _ = project
    with open(directory / "dlbox.toml", "a") as f:
        f.write(f"python = {sys.executable!r}\n")
    up = dlbox(project, "up")
    assert up.returncode == 0, up.stderr
    assert "box Python: TensorFlow 2." in up.stdout and "pinned in .dlbox/known_hosts" in up.stdout
    train = dlbox(project, "train", "scratch", "--data", str(small_sample), "--epochs", "1",
                  "--img-size", "32", "--down-after")
    assert train.returncode == 0, train.stdout + train.stderr
    [run] = [p for p in (directory / "runs").iterdir() if p.is_dir()]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
    assert (run / "report.html").exists()
    record = json.loads((run / "run.json").read_text())
    assert record["box"].startswith("dlbox-") and record["usd_per_hour"] == 0.526
    assert "terminated; it cost about $" in train.stdout
    assert _instances(aws) == []  # --down-after stopped the bill once the results were safe
    assert _state(directory) is None


def _use_port(directory: Path, port: int) -> None:
    """Point the project's EC2 boxes (moto's instances are 127.0.0.1) at another SSH port."""
    toml = directory / "dlbox.toml"
    toml.write_text("\n".join(f"ssh_port = {port}" if line.startswith("ssh_port") else line
                              for line in toml.read_text().splitlines()) + "\n")


def test_a_dropped_first_handshake_is_tried_again(project, aws, sshd):
    """sshd answers before the box is ready and drops the first handshakes: `up` goes on."""
    directory, _ = project
    proxy = Proxy(sshd.host, sshd.port)
    proxy.drop_handshakes = 3  # the banner wait, then two logins cut after the banner
    _use_port(directory, proxy.port)
    try:
        up = dlbox(project, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert proxy.drop_handshakes == 0 and proxy.connections > 3
        box = _state(directory)
        assert box["python"] and [i["InstanceId"] for i in _instances(aws)] == [box["instance_id"]]
    finally:
        assert dlbox(project, "down").returncode == 0
        proxy.close()
    assert _instances(aws) == []


def test_a_box_that_never_becomes_usable_is_terminated_and_says_so(project, aws, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                   check=True)  # a key the box does not accept
    result = dlbox(project, "up", "--ssh-key", str(tmp_path / "other"))
    _one_line_error(result, 1, "never became usable", "refused the key", "terminated (verified)")
    assert _instances(aws) == []
    assert len(_instances(aws, ["terminated"])) == 1
    assert _state(project[0]) is None
    assert aws.describe_key_pairs()["KeyPairs"] == []
    assert [g["GroupName"] for g in aws.describe_security_groups()["SecurityGroups"]] == ["default"]


@pytest.mark.slow
def test_a_handshake_that_always_drops_ends_in_a_terminated_box(project, aws, sshd):
    """Every login cut short (EOF in the handshake): one line, and nothing left running."""
    directory, _ = project
    proxy = Proxy(sshd.host, sshd.port)
    proxy.drop_handshakes = 10**6
    _use_port(directory, proxy.port)
    with open(directory / "dlbox.toml", "a") as f:
        f.write("login_timeout_seconds = 8\n")  # the bound, not its default of a minute
    try:
        result = dlbox(project, "up")
    finally:
        proxy.close()
    _one_line_error(result, 1, "never became usable", f"127.0.0.1:{proxy.port}",
                    "terminated (verified)")
    assert "Aborted" not in result.stdout + result.stderr
    assert _instances(aws) == [] and _state(directory) is None


def test_local_checks_come_before_the_network(project, aws):
    """Offline and without credentials: the message is about the credentials."""
    dead = f"http://127.0.0.1:{free_port()}/"
    result = dlbox(project, "up", env_drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
                   env_set={"DLBOX_IP_LOOKUP_URL": dead})
    _one_line_error(result, 1, "no AWS credentials")
    bad_region = dlbox(project, "up", "--region", "xx-nowhere-9", env_set={"DLBOX_IP_LOOKUP_URL": dead})
    _one_line_error(bad_region, 1, "unknown AWS region")
    assert _instances(aws) == []


def test_ssh_logins_accept_only_the_key_dlbox_pinned(project, aws, tmp_path):
    """ssh -F .dlbox/ssh_config, `dlbox ssh` and dlbox's own commands all refuse a box that
    now shows another host key (rebuilt, or someone in the middle)."""
    from orchestrator import keys

    directory, _ = project
    server = sshd_mod.start(tmp_path / "box")
    try:
        sshd_mod.authorize(server, keys.ensure(directory / ".dlbox" / "keys")[1])
        _use_port(directory, server.port)
        assert dlbox(project, "up").returncode == 0
        config = directory / ".dlbox" / "ssh_config"
        ssh = ["ssh", "-F", str(config), "-o", "BatchMode=yes", "dlbox"]
        first = subprocess.run([*ssh, "echo", "hello"], capture_output=True, text=True, timeout=30)
        assert (first.returncode, first.stdout.strip()) == (0, "hello"), first.stderr
        own = dlbox(project, "ssh", "--", "echo", "from dlbox ssh")
        assert (own.returncode, own.stdout.strip()) == (0, "from dlbox ssh"), own.stderr
        pinned = (directory / ".dlbox" / "known_hosts").read_text()

        server = sshd_mod.restart(server, new_host_key=True)
        again = subprocess.run([*ssh, "true"], capture_output=True, text=True, timeout=30)
        assert again.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in again.stderr
        refused = dlbox(project, "ssh", "--", "true")
        assert refused.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in refused.stderr
        _one_line_error(dlbox(project, "train", "scratch", "--data", str(tmp_path)), 1, "CHANGED")
        assert (directory / ".dlbox" / "known_hosts").read_text() == pinned  # nothing trusted
    finally:
        sshd_mod.stop(server)
        assert dlbox(project, "down").returncode == 0


def test_every_command_on_every_kind_does_its_job_or_says_one_line(project, aws, sshd, tmp_path):
    directory, _ = project
    on_ssh = ["up", "--ssh", f"{sshd.user}@{sshd.host}:{sshd.port}", "--key",
              str(sshd.client_key), "--python", sys.executable, "--workdir", str(tmp_path / "remote")]
    _one_line_error(dlbox(project, "up", "--local", "--spot"), 2, "--spot is for EC2 boxes")
    _one_line_error(dlbox(project, "up", "--local", "--on-demand"), 2, "--on-demand is for EC2")
    _one_line_error(dlbox(project, "up", *on_ssh[1:], "--region", "eu-west-1"), 2,
                    "--region is for EC2 boxes")
    _one_line_error(dlbox(project, "up", "--local", "--key", "k"), 2, "--key is for SSH boxes")
    _one_line_error(dlbox(project, "ssh"), 2, "no box is up")
    _one_line_error(dlbox(project, "train", "scratch", "--data", "."), 2, "no box is up")

    assert dlbox(project, "up", "--local").returncode == 0
    _one_line_error(dlbox(project, "up"), 2, "the local box", "dlbox down")
    _one_line_error(dlbox(project, *on_ssh), 2, "the local box", "dlbox down")
    _one_line_error(dlbox(project, "ssh"), 2, "this machine")
    _one_line_error(dlbox(project, "down", "--purge"), 2, "--purge does not apply to the local box")
    local = dlbox(project, "status")
    assert local.returncode == 0 and "local (this machine)" in local.stdout
    assert dlbox(project, "down").returncode == 0

    assert dlbox(project, *on_ssh).returncode == 0
    _one_line_error(dlbox(project, "up"), 2, "the SSH box", "dlbox down")
    _one_line_error(dlbox(project, "up", "--local"), 2, "the SSH box")
    hello = dlbox(project, "ssh", "echo", "hello")
    assert (hello.returncode, hello.stdout.strip()) == (0, "hello"), hello.stderr
    remote = dlbox(project, "status")
    assert remote.returncode == 0 and f"ssh {sshd.user}@127.0.0.1:{sshd.port}" in remote.stdout
    _one_line_error(dlbox(project, "down", "--profile", "p"), 2, "--profile does not apply")
    assert dlbox(project, "down").returncode == 0

    assert dlbox(project, "up").returncode == 0
    _one_line_error(dlbox(project, "up", "--local"), 2, "the EC2 box")
    _one_line_error(dlbox(project, *on_ssh), 2, "the EC2 box")
    _one_line_error(dlbox(project, "down", "--purge"), 2, "--purge does not apply to the EC2 box")
    hello = dlbox(project, "ssh", "echo", "hello")
    assert (hello.returncode, hello.stdout.strip()) == (0, "hello"), hello.stderr
    assert dlbox(project, "status").returncode == 0
    assert dlbox(project, "down").returncode == 0
    assert _instances(aws) == [] and _state(directory) is None


def _shutdown_behaviour(aws, instance_id: str) -> str:
    return aws.describe_instance_attribute(InstanceId=instance_id,
                                           Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"]


def _detached_run(project, aws, instance: str, data: Path) -> Path:
    """`dlbox train` detached with Ctrl-C once its run started; the run's folder in runs/,
    after the run ended on the box."""
    directory, env = project
    before = set((directory / "runs").glob("*/run.json")) if (directory / "runs").exists() else set()
    proc = subprocess.Popen([DLBOX, "train", "scratch", "--data", str(data), "--epochs", "1",
                             "--img-size", "32"], cwd=directory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (new := set((directory / "runs").glob("*/run.json")) - before if
               (directory / "runs").exists() else set()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(POLL_S)
    [record] = new
    remote = Path(json.loads(record.read_text())["remote_dir"])  # the box is this machine
    while not (remote / "status.json").exists():  # started, and followed
        assert time.monotonic() < deadline, proc.communicate()
        time.sleep(POLL_S)
    while _shutdown_behaviour(aws, instance) != "stop":  # followed: its results are held
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 130 and "detached" in out and not err, out + err
    while not (remote / "exit_code").exists():
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(POLL_S)
    return record.parent


@pytest.mark.slow
def test_results_nobody_pulled_survive_the_watchdog_and_are_pulled_later(project, aws,
                                                                       small_sample):
    """While a run's results are unpulled the box stops (disk kept) instead of terminating
    on the watchdog's power-off; `status` and `runs` say where they are; `pull` starts the
    box and fetches them; `down` pulls a run that ended unpulled before it terminates."""
    directory, _ = project
    with open(directory / "dlbox.toml", "a") as f:
        f.write(f"python = {sys.executable!r}\n")
    assert dlbox(project, "up").returncode == 0
    instance = _state(directory)["instance_id"]
    assert _shutdown_behaviour(aws, instance) == "terminate"

    run = _detached_run(project, aws, instance, small_sample)
    assert _shutdown_behaviour(aws, instance) == "stop"
    aws.stop_instances(InstanceIds=[instance])  # what the watchdog's power-off now does
    status = dlbox(project, "status")
    assert "the box is stopped, its disk kept" in status.stdout
    assert f"run(s) {run.name} not pulled yet" in status.stdout
    listing = dlbox(project, "runs")
    assert f"on the box (`dlbox pull {run.name}`)" in listing.stdout
    assert not (run / "model.keras").exists()

    pull = dlbox(project, "pull", run.name)
    assert pull.returncode == 0, pull.stderr
    assert "was stopped to keep results nobody pulled; starting it" in pull.stdout
    assert (run / "model.keras").exists() and json.loads((run / "run.json").read_text())[
        "status"] == "done"
    assert _shutdown_behaviour(aws, instance) == "terminate"  # nothing held: the bill may end
    assert f"runs/{run.name}/" in dlbox(project, "runs").stdout

    second = _detached_run(project, aws, instance, small_sample)
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stderr
    assert f"run {second.name} had ended (done); its results are pulled" in down.stdout
    assert (second / "model.keras").exists() and _tagged(aws) == []


def test_train_after_an_up_cut_short_while_checking_python_names_up(project, aws, small_sample):
    """What an `up` interrupted between the login and the Python check leaves: the fix is
    to run `up` again, and train says so."""
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    state_file = directory / ".dlbox" / "state.json"
    data = json.loads(state_file.read_text())
    data["boxes"][0]["python"] = None
    state_file.write_text(json.dumps(data))
    train = dlbox(project, "train", "scratch", "--data", str(small_sample))
    _one_line_error(train, 2, "not ready to train yet", "`dlbox up`")
    assert not (directory / "runs").exists() or not any((directory / "runs").iterdir())
    assert dlbox(project, "down").returncode == 0


def test_down_without_state_asks_before_ending_a_box_runs_may_wait_on(project, aws):
    """The damaged-state advice is "move it away and run `dlbox down`": with runs of the
    project not pulled yet, that `down` names `dlbox up` (which records the box again) first."""
    directory, _ = project
    assert dlbox(project, "up").returncode == 0
    instance = _state(directory)["instance_id"]
    run = directory / "runs" / "20261129-000000-scratch"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "run_id": run.name, "model": "scratch", "box": _state(directory)["name"], "args": [],
        "remote_dir": "/nowhere", "started_at": "2026-11-29T00:00:00+00:00"}))
    (directory / ".dlbox" / "state.json").unlink()
    refused = dlbox(project, "down")
    _one_line_error(refused, 2, instance, run.name, "`dlbox up` records it again",
                    "`dlbox down --yes`")
    assert _tagged(aws) == [instance]
    assert dlbox(project, "down", "--yes").returncode == 0 and _tagged(aws) == []
