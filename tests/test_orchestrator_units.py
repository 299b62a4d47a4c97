"""Small pieces of the orchestrator and infra, each against the real thing it wraps."""

from __future__ import annotations

import os
import time

import botocore.exceptions
import pytest

from infra import aws, prices
from infra.errors import CredentialsError, InfraError
from orchestrator import config, follow, keys, netwait
from orchestrator.errors import DlboxError, UsageError
from tests.sshd import free_port


def test_wait_for_ssh_names_host_and_port_when_nothing_answers():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(DlboxError, match=f"127.0.0.1:{port} did not answer SSH"):
        netwait.wait_for_ssh("127.0.0.1", port, timeout_s=1.0)
    assert time.monotonic() - started < 5  # bounded


def test_wait_for_ssh_reads_a_real_banner(sshd):
    assert netwait.wait_for_ssh(sshd.host, sshd.port, timeout_s=5).startswith("SSH-2.0-OpenSSH")


@pytest.mark.parametrize("code", ["ExpiredToken", "AuthFailure", "UnauthorizedOperation"])
def test_credential_errors_become_one_line(code):
    error = botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "nope"}}, "X")
    with pytest.raises(CredentialsError, match=code), aws.translated("do X"):
        raise error


def test_other_aws_errors_keep_their_code():
    error = botocore.exceptions.ClientError({"Error": {"Code": "Weird", "Message": "m"}}, "X")
    with pytest.raises(InfraError, match="Weird: m"), aws.translated("do X"):
        raise error


def test_on_demand_price_from_the_table_and_spot_from_aws(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with mock_aws():
        import boto3

        source = prices.AwsPrices(boto3.client("ec2", region_name="us-east-1"))
        assert source.hourly("g4dn.xlarge", "us-east-1a", spot=False) == 0.526
        spot = source.hourly("g4dn.xlarge", "us-east-1a", spot=True)
        assert spot is not None and spot != 0.526  # moto's spot price history answered
        assert source.hourly("x9.huge", "us-east-1a", spot=False) is None
    assert prices.cost(0.5, 7200) == 1.0 and prices.cost(None, 10) is None


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    (tmp_path / "dlbox.toml").write_text(
        'region = "eu-west-1"\nspot = true\ninstance_types = ["g5.xlarge"]\n')
    cfg = config.load(tmp_path, region="us-west-2", disk_gb=None)
    assert (cfg.region, cfg.spot, cfg.instance_types, cfg.disk_gb) == (
        "us-west-2", True, ("g5.xlarge",), 100)
    with pytest.raises(UsageError, match="idle_minutes"):
        config.load(tmp_path, idle_minutes=-1)
    (tmp_path / "dlbox.toml").write_text("login_timeout_seconds = 0\n")
    with pytest.raises(UsageError, match=r"login_timeout_seconds must be 1\.\.3600 \(got 0\)"):
        config.load(tmp_path)
    (tmp_path / "dlbox.toml").write_text("region = [")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.load(tmp_path)


def test_key_is_made_once_with_mode_0600_and_never_overwritten(tmp_path):
    path, public = keys.ensure(tmp_path / "keys")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert public.startswith("ssh-ed25519 ")
    before = path.read_bytes()
    again_path, again_public = keys.ensure(tmp_path / "keys")
    assert again_path.read_bytes() == before and again_public == public
    assert len(keys.fingerprint(public)) == 12


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.0/8", "0.0.0.0/1", "::/0", "2001:db8::/32"])
def test_ssh_is_never_opened_to_wide_networks(cidr):
    from infra import network

    with pytest.raises(InfraError, match="refusing to open SSH"):
        network.check_cidr(cidr)
    assert network.check_cidr("203.0.113.7/32") == "203.0.113.7/32"
    assert network.check_cidr("198.51.100.0/24") == "198.51.100.0/24"


def test_the_live_bar_shows_epoch_steps_metrics_and_the_runs_eta():
    view = follow.bar_view({"state": "running", "phase": "fine-tuning", "epoch": 3, "epochs": 20,
                          "stage": "validate", "step": 57, "steps": 63, "eta_seconds": 252.0,
                          "metrics": {"loss": 0.41234, "accuracy": 0.8012, "lr": 1e-5}})
    assert view == follow.BarView(label="fine-tuning epoch 3/20 (validating)", step=57, steps=63,
                                metrics="loss 0.4123 acc 0.8012", eta_seconds=252.0)
    caching = follow.bar_view({"state": "running", "phase": "caching", "step": 10, "steps": 2000})
    assert (caching.label, caching.step, caching.steps, caching.metrics) == (
        "caching images", 10, 2000, "")
    evaluating = follow.bar_view({"state": "running", "phase": "evaluating", "step": 63, "steps": 63})
    assert (evaluating.label, evaluating.step, evaluating.steps) == ("evaluating", 0, None)
    assert follow.bar_view({"state": "done", "phase": "evaluating"}) is None
    assert follow.bar_view({}) is None


def test_the_box_digests_a_listing_exactly_as_dlbox_does(tmp_path):
    """find | sed | sort | sha256sum on the box and sync.digest here must agree, or every
    unchanged dataset would be listed in full (and a changed one missed)."""
    from orchestrator import sync
    from orchestrator.localmachine import LocalMachine

    root = tmp_path / "data"
    for name in ("a", "a.b", "a b", "ab", "é.jpg", "sub/a", "sub/z/9.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode() * 3)
    os.utime(root / "a", (0, 1_700_000_000.999))  # a fraction: both sides truncate
    machine = LocalMachine()
    mine = sync.local_manifest(root)
    assert set(mine) == {"a", "a.b", "a b", "ab", "é.jpg", "sub/a", "sub/z/9.jpg"}
    assert mine["a"] == (3, 1_700_000_000)
    assert sync.remote_digest(machine, str(root)) == sync.digest(mine)
    assert sync.remote_manifest(machine, str(root)) == mine
    assert sync.remote_digest(machine, str(root), ["a.b"]) == sync.digest({"a.b": mine["a.b"]})
    assert sync.remote_digest(machine, str(tmp_path / "nowhere")) is None
    (root / "sub" / "a").write_bytes(b"changed")
    assert sync.remote_digest(machine, str(root)) != sync.digest(mine)


def test_state_of_another_dlbox_version_is_one_clear_line(tmp_path):
    """An older state file is read (version 1 held one box, EC2 without a kind); a newer or
    damaged one is a UsageError naming the fix, never a traceback."""
    import json

    from orchestrator import boxes, state

    path = tmp_path / ".dlbox" / "state.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"version": 1, "box": {
        "kind": "local", "name": "local", "workdir": "/w", "python": "/p"}}))
    [box] = boxes.recorded(tmp_path)
    assert (box.kind, box.workdir, box.label) == ("local", "/w", "the local box")
    path.write_text(json.dumps({"version": 1, "box": None}))
    assert boxes.current(tmp_path) is None
    path.write_text(json.dumps({"version": 99, "boxes": []}))
    with pytest.raises(UsageError, match=r"newer dlbox .*upgrade dlbox"):
        state.records(tmp_path)
    for damaged in ("{not json", '{"version": 2, "boxes": [{"kind": "ec2"}]}', "[]"):
        path.write_text(damaged)
        with pytest.raises(UsageError, match="is damaged"):
            state.records(tmp_path)
    path.write_text(json.dumps({"version": 2, "boxes": [{"kind": "quantum", "name": "q"}]}))
    with pytest.raises(UsageError, match="does not know; upgrade dlbox"):
        boxes.current(tmp_path)


def test_state_keeps_several_boxes_and_replaces_by_name(tmp_path):
    from orchestrator import boxes, state
    from orchestrator.localbox import LocalBox
    from orchestrator.sshbox import SshBox

    local = LocalBox(name="local", workdir="/w", python="/p")
    remote = SshBox(name="u@h:22", host="h", port=22, user="u", key_path="/k", workdir="/r",
                    python="/py")
    state.put(tmp_path, local)
    state.put(tmp_path, remote)
    state.put(tmp_path, LocalBox(name="local", workdir="/w2", python="/p"))
    assert [(b.kind, b.workdir) for b in boxes.recorded(tmp_path)] == [("ssh", "/r"), ("local", "/w2")]
    with pytest.raises(UsageError, match="records 2 boxes"):
        boxes.current(tmp_path)
    state.remove(tmp_path, "u@h:22")
    assert boxes.current(tmp_path) == LocalBox(name="local", workdir="/w2", python="/p")
    assert oct((tmp_path / ".dlbox" / "state.json").stat().st_mode & 0o777) == "0o600"


def test_a_report_from_a_damaged_history_leaves_the_bad_rows_out(tmp_path):
    """A history.csv cut short or edited by hand: the report is still written, without the
    rows it cannot chart (a pull must never end in a traceback over it)."""
    from orchestrator import report
    from orchestrator.runs import Run

    (tmp_path / "history.csv").write_text(
        "epoch,phase,loss,accuracy,val_loss,val_accuracy,seconds,images_per_second\n"
        "1,training,0.69,0.51,0.68,0.55,3.0,120\n"
        "2,training,nan,0.52,0.67,0.56,3.0,121\n"
        "3,training,0.6\n")
    (tmp_path / "metrics.json").write_text("{not json")
    run = Run(run_id="r", model="scratch", box="local", remote_dir="/x", args=[],
              started_at="2026-11-29T00:00:00+00:00")
    path = report.write(tmp_path, run, box="local", duration="1 min", cost="-")
    html = path.read_text()
    assert "<td>1</td><td>training</td><td>0.69</td>" in html
    assert "<td>2</td>" not in html and "<td>3</td>" not in html
    (tmp_path / "history.csv").write_text("epoch,loss\n1,0.5\n")  # a hand-made one
    assert report.write(tmp_path, run, box="local", duration="1 min", cost="-").exists()
