"""`dlbox up --nodes N` on EC2: moto's server plays EC2 over HTTP, each node is its own OpenSSH
server on its own loopback address (127.0.0.2, .3) on one port. Nothing trains here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import config
from tests import awsfakes
from tests import sshd as sshd_mod
from tests.conftest import CALLER_IP
from tests.journey import quick_python
from tests.test_cli_ec2 import CLI_TIMEOUT_S, _instances, _one_line_error, cli_env, dlbox
from tests.test_infra import _rules

NODES = ("127.0.0.2", "127.0.0.3")


@pytest.fixture()
def cluster(tmp_path, aws, moto_url, ip_lookup_url, box_settings, box_bin, monkeypatch):
    """(project, servers): a project whose EC2 instances are, in launch order, the loopback
    sshds 127.0.0.2 and 127.0.0.3 (then .3 again), on one SSH port; each accepts the
    project's key and runs a watchdog that has just booted."""
    from orchestrator import ec2box, keys

    subprocess.run([box_bin / "dlbox-watchdog", "--boot"], check=True, timeout=CLI_TIMEOUT_S)
    for left in ("active", "unpulled"):  # a new box's registry is empty
        shutil.rmtree(Path(ec2box.RUNS_REGISTRY_ON_BOX).parent / left, ignore_errors=True)
    monkeypatch.setenv("DLBOX_IP_LOOKUP_URL", ip_lookup_url)  # for dlbox called in-process
    directory = tmp_path / "proj"
    directory.mkdir()
    _, public = keys.ensure(directory / ".dlbox" / "keys")
    port = sshd_mod.free_port()
    env = {"PATH": f"{box_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
    servers = []
    try:
        for n, host in enumerate(NODES):
            servers.append(sshd_mod.start(tmp_path / f"node{n}", env=env, port=port, host=host))
            sshd_mod.authorize(servers[-1], public)
        (directory / "dlbox.toml").write_text(
            f"ssh_port = {port}\nssh_user = {servers[0].user!r}\npython = {quick_python()!r}\n"
            + box_settings)
        with awsfakes.public_ips(*NODES):
            yield (directory, cli_env(tmp_path, moto_url, ip_lookup_url)), servers
    finally:
        for server in servers:
            sshd_mod.stop(server)


def _records(directory: Path) -> list[dict]:
    return json.loads((directory / ".dlbox" / "state.json").read_text())["boxes"]


def _placement_groups(aws) -> list[dict]:
    return aws.describe_placement_groups()["PlacementGroups"]


def _nothing_left(aws, directory: Path) -> None:
    """No instance, key pair, group or placement group of dlbox's, no record."""
    assert _instances(aws, ("pending", "running", "stopping", "stopped", "shutting-down")) == []
    assert aws.describe_key_pairs()["KeyPairs"] == []
    assert [g["GroupName"] for g in aws.describe_security_groups()["SecurityGroups"]] == ["default"]
    assert _placement_groups(aws) == []
    assert _records(directory) == []


def _up(project) -> list[dict]:
    up = dlbox(project, "up", "--nodes", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    return _records(project[0])


def test_up_two_nodes_in_one_placement_group_then_status_and_down(cluster, aws):
    from orchestrator.ec2aws import project_name

    project, servers = cluster
    directory = project[0]
    nodes = _up(project)
    assert [(b["node"], b["nodes"], b["host"], b["address"]) for b in nodes] == [
        (0, 2, "127.0.0.2", "127.0.0.2"), (1, 2, "127.0.0.3", "127.0.0.3")]
    zone = nodes[0]["zone"]
    group = f"dlbox-{project_name(directory)}-{zone}"
    assert {(b["instance_type"], b["zone"], b["placement_group"]) for b in nodes} == {
        ("g4dn.xlarge", zone, group)}
    live = _instances(aws)
    assert sorted(i["InstanceId"] for i in live) == sorted(b["instance_id"] for b in nodes)
    assert {(i["Placement"]["AvailabilityZone"], i["Placement"]["GroupName"]) for i in live} \
        == {(zone, group)}
    [placement] = _placement_groups(aws)
    assert (placement["GroupName"], placement["Strategy"]) == (group, "cluster")
    assert {"Key": "dlbox:project", "Value": project_name(directory)} in placement["Tags"]
    sg = nodes[0]["security_group_id"]
    port = servers[0].port
    assert _rules(aws, sg) == [("-1", None, [], [sg]), ("tcp", (port, port), [f"{CALLER_IP}/32"],
                                                       [])]
    known = (directory / ".dlbox" / "known_hosts").read_text()
    assert all(s.host_public_key.split()[1] in known for s in servers)
    assert "HostName 127.0.0.2" in (directory / ".dlbox" / "ssh_config").read_text()

    status = dlbox(project, "status")
    assert status.returncode == 0, status.stderr
    assert "node 0 of 2, reached by the others at 127.0.0.2" in status.stdout
    assert f"placement group {group}" in status.stdout

    _one_line_error(dlbox(project, "up", "--nodes", "3"), 2, "a cluster of 2 nodes", "dlbox down")
    again = dlbox(project, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("reusing box") == 2 and len(_instances(aws)) == 2

    down = dlbox(project, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(f"{b['instance_id']} terminated" in down.stdout for b in nodes)
    _nothing_left(aws, directory)


def test_a_down_cut_short_after_one_node_is_finished_by_the_next(cluster, aws):
    """The key pair, group and placement group stay while a node uses them; `down` again
    ends the node left, then deletes them."""
    from orchestrator import boxes

    project, _ = cluster
    directory = project[0]
    nodes = _up(project)
    said: list[str] = []
    boxes.recorded(directory)[0].down(directory, boxes.DownFlags(), said.append)
    assert [i["InstanceId"] for i in _instances(aws)] == [nodes[1]["instance_id"]]
    assert [b["node"] for b in _records(directory)] == [1]
    assert len(aws.describe_key_pairs()["KeyPairs"]) == 1 and len(_placement_groups(aws)) == 1
    assert aws.describe_security_groups(GroupIds=[nodes[0]["security_group_id"]])
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    _nothing_left(aws, directory)


def test_a_lost_node_is_made_again_with_its_index_in_its_zone_and_placement_group(cluster, aws):
    from orchestrator import boxes

    project, _ = cluster
    directory = project[0]
    nodes = _up(project)
    lost = boxes.recorded(directory)[1]
    awsfakes.reclaim(lost.instance_id)
    assert lost.gone(directory).reclaimed
    said: list[str] = []
    new = lost.replacement(directory, said.append)
    assert (new.node, new.nodes, new.zone, new.placement_group, new.instance_type) == (
        1, 2, lost.zone, lost.placement_group, lost.instance_type)
    assert new.instance_id != lost.instance_id and new.address == "127.0.0.3" and new.python
    assert [(b.node, b.name) for b in boxes.cluster(directory, boxes.current(directory))] == [
        (0, nodes[0]["name"]), (1, new.name)]
    [raw] = [i for i in _instances(aws) if i["InstanceId"] == new.instance_id]
    assert raw["Placement"]["GroupName"] == lost.placement_group
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    _nothing_left(aws, directory)


def test_nodes_from_dlbox_toml_and_the_flag_over_it(tmp_path):
    (tmp_path / "dlbox.toml").write_text("nodes = 3\n")
    assert config.load(tmp_path).nodes == 3
    assert config.load(tmp_path, nodes=2).nodes == 2
    (tmp_path / "dlbox.toml").write_text("nodes = 0\n")
    with pytest.raises(config.UsageError, match=r"nodes must be 1\.\.64"):
        config.load(tmp_path)
    config.write_default(tmp_path, force=True)
    assert "# nodes = 1" in (tmp_path / "dlbox.toml").read_text()
    assert config.load(tmp_path) == config.Config()


def test_a_node_that_cannot_be_made_again_keeps_its_place_and_up_makes_it(cluster, aws):
    """No capacity for the lost node's type in its zone: nothing of it runs, its record
    stays (the cluster is whole in the state file); a later `up` makes it again there."""
    from infra.errors import CapacityError
    from orchestrator import boxes

    project, _ = cluster
    directory = project[0]
    nodes = _up(project)
    lost = boxes.recorded(directory)[1]
    awsfakes.reclaim(lost.instance_id)
    lost.retire(directory, lambda _: None)
    with awsfakes.ec2_errors(lambda kw: "InsufficientInstanceCapacity") as calls, \
            pytest.raises(CapacityError, match=lost.zone):
        lost.replacement(directory, lambda _: None)
    assert [c["placement"] for c in calls] == [lost.zone]  # its zone only: no other is tried
    assert [i["InstanceId"] for i in _instances(aws)] == [nodes[0]["instance_id"]]
    assert sorted(b["node"] for b in _records(directory)) == [0, 1]
    assert len(_placement_groups(aws)) == 1  # node 0 is in it

    again = dlbox(project, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "node(s) 1 of the cluster are gone; making them again" in again.stdout
    records = sorted(_records(directory), key=lambda b: b["node"])
    assert [(b["node"], b["zone"], b["placement_group"]) for b in records] == [
        (0, lost.zone, lost.placement_group), (1, lost.zone, lost.placement_group)]
    assert records[1]["instance_id"] not in (None, lost.instance_id)
    assert records[1]["address"] == "127.0.0.3" and len(_instances(aws)) == 2
    down = dlbox(project, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    _nothing_left(aws, directory)
