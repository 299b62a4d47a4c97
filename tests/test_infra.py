"""infra against moto in-process: what the described AWS resources really have."""

from __future__ import annotations

import base64
from dataclasses import replace

import boto3
import pytest

from infra import ami, instances, network
from infra.errors import CapacityError, InfraError, QuotaError, RegionError
from infra.models import LaunchSpec
from tests.awsfakes import DLAMI_ID, OLDER_DLAMI_ID, REGION, ec2_errors, install_dlami

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0JgG3sX9gdkkR6sWw1k9z3E8hYjC7M1v0A3v0GdVJ0 t"


@pytest.fixture()
def aws(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION), boto3.client("ssm", region_name=REGION)


@pytest.fixture()
def dlami(aws):
    install_dlami()
    return aws


def _spec(ec2, **overrides) -> LaunchSpec:
    image = ami.resolve(ec2, boto3.client("ssm", region_name=REGION))
    network.ensure_key_pair(ec2, "k", PUBLIC_KEY, {"dlbox:project": "p"})
    group, _ = network.ensure_security_group(ec2, "dlbox-p", "203.0.113.7/32", 22,
                                             {"dlbox:project": "p"})
    fields = dict(box="dlbox-p-1", project="p", owner="me", image=image,
                  instance_types=("g4dn.xlarge", "g5.xlarge"), spot=False, spot_fallback=True,
                  key_name="k", security_group_id=group, disk_gb=120, user_data="#!/bin/bash\n")
    return LaunchSpec(**{**fields, **overrides})


def test_ami_from_the_ssm_parameter(dlami):
    ec2, ssm = dlami
    image = ami.resolve(ec2, ssm)
    assert image.image_id == DLAMI_ID and image.source.startswith("ssm:")


def test_ami_falls_back_to_the_newest_by_name(aws):
    install_dlami(with_ssm=False)
    ec2, ssm = aws
    image = ami.resolve(ec2, ssm)
    assert image.image_id == DLAMI_ID and image.source.startswith("name:")
    assert ami.resolve(ec2, ssm, OLDER_DLAMI_ID).image_id == OLDER_DLAMI_ID


def test_ami_errors_name_the_region(aws):
    ec2, ssm = aws
    with pytest.raises(RegionError, match="us-east-1"):
        ami.resolve(ec2, ssm)
    with pytest.raises(RegionError, match="does not exist"):
        ami.resolve(ec2, ssm, "ami-00000000000000000")
    with pytest.raises(RegionError, match="SSM parameter"):
        ami.resolve(ec2, ssm, "/aws/service/nothing/here")


def test_security_group_allows_ssh_from_one_address_only(aws):
    ec2, _ = aws
    group, created = network.ensure_security_group(ec2, "dlbox-p", "203.0.113.7/32", 22,
                                                   {"dlbox:project": "p"})
    assert created
    again, created_again = network.ensure_security_group(ec2, "dlbox-p", "198.51.100.9/32", 22,
                                                         {"dlbox:project": "p"})
    assert again == group and not created_again
    rules = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], [x["CidrIp"] for x in r["IpRanges"]]) for r in rules] == [
        (22, 22, ["198.51.100.9/32"])
    ]
    with pytest.raises(InfraError, match="whole internet"):
        network.ensure_security_group(ec2, "dlbox-p", "0.0.0.0/0", 22, {})


def test_key_pair_is_imported_once(aws):
    ec2, _ = aws
    assert network.ensure_key_pair(ec2, "k", PUBLIC_KEY, {"dlbox:project": "p"})
    assert not network.ensure_key_pair(ec2, "k", PUBLIC_KEY, {"dlbox:project": "p"})
    assert network.tagged_key_pairs(ec2) == ["k"]


def test_launched_instance_is_hardened_and_tagged(dlami):
    ec2, _ = dlami
    recorded = []
    launched = instances.launch(ec2, _spec(ec2), on_launched=recorded.append)
    inst = launched.instance
    assert recorded == [inst.instance_id]
    raw = ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    assert raw["MetadataOptions"]["HttpTokens"] == "required"
    assert raw["ImageId"] == DLAMI_ID and raw["KeyName"] == "k"
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags == {"dlbox:box": "dlbox-p-1", "dlbox:project": "p", "dlbox:owner": "me",
                    "Name": "dlbox-p-1"}
    shutdown = ec2.describe_instance_attribute(InstanceId=inst.instance_id,
                                               Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = ec2.describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
    assert base64.b64decode(user_data["UserData"]["Value"]).startswith(b"#!/bin/bash")
    volume_id = raw["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    volume = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert volume["Encrypted"] and volume["Size"] == 120 and volume["VolumeType"] == "gp3"
    assert {t["Key"]: t["Value"] for t in volume["Tags"]}["dlbox:box"] == "dlbox-p-1"
    group = ec2.describe_security_groups(GroupIds=[raw["SecurityGroups"][0]["GroupId"]])
    cidrs = [r["CidrIp"] for p in group["SecurityGroups"][0]["IpPermissions"] for r in p["IpRanges"]]
    assert cidrs == ["203.0.113.7/32"]


def test_capacity_errors_move_to_the_next_zone_then_the_next_type(dlami):
    ec2, _ = dlami
    g4_zones = instances.zones_offering(ec2, "g4dn.xlarge")
    with ec2_errors(lambda kw: "InsufficientInstanceCapacity"
                    if kw["instance_type"] == "g4dn.xlarge" else None) as calls:
        launched = instances.launch(ec2, _spec(ec2), on_launched=lambda _: None)
    assert launched.instance.instance_type == "g5.xlarge"
    assert [c["placement"] for c in calls[: len(g4_zones)]] == g4_zones
    assert [a.outcome for a in launched.attempts[:-1]] == ["InsufficientInstanceCapacity"] * len(g4_zones)


def test_quota_error_names_the_quota_and_stops(dlami):
    ec2, _ = dlami
    with ec2_errors(lambda kw: "VcpuLimitExceeded") as calls, \
            pytest.raises(QuotaError, match="Running On-Demand G and VT instances"):
        instances.launch(ec2, _spec(ec2), on_launched=lambda _: None)
    assert len(calls) == 1
    assert instances.find(ec2) == []


def test_spot_without_capacity_falls_back_to_on_demand_when_allowed(dlami):
    ec2, _ = dlami

    def no_spot(kw):
        return "InsufficientInstanceCapacity" if kw["instance_market_options"] == "spot" else None

    with ec2_errors(no_spot):
        launched = instances.launch(ec2, _spec(ec2, spot=True), on_launched=lambda _: None)
        assert not launched.instance.spot
        assert {a.market for a in launched.attempts} == {"spot", "on-demand"}
        with pytest.raises(CapacityError, match=r"spot g5\.xlarge"):
            instances.launch(ec2, _spec(ec2, spot=True, spot_fallback=False), on_launched=lambda _: None)


def test_spot_launch_is_spot(dlami):
    ec2, _ = dlami
    launched = instances.launch(ec2, _spec(ec2, spot=True), on_launched=lambda _: None)
    assert launched.instance.spot


def test_find_by_tag_and_terminate_until_terminated(dlami):
    ec2, _ = dlami
    inst = instances.launch(ec2, _spec(ec2), on_launched=lambda _: None).instance
    assert [i.instance_id for i in instances.find(ec2, project="p")] == [inst.instance_id]
    assert instances.find(ec2, project="other") == []
    instances.terminate(ec2, [inst.instance_id], timeout_s=30)
    assert instances.describe(ec2, inst.instance_id).state == "terminated"
    assert instances.find(ec2) == []
    instances.terminate(ec2, [], timeout_s=30)  # nothing to do is fine


def test_a_group_and_key_pair_stay_until_their_last_user_is_gone(dlami):
    ec2, _ = dlami
    spec = _spec(ec2)
    first = instances.launch(ec2, spec, on_launched=lambda _: None).instance
    second = instances.launch(ec2, spec, on_launched=lambda _: None).instance
    assert first.key_name == "k" and first.security_group_ids == (spec.security_group_id,)
    instances.terminate(ec2, [first.instance_id], timeout_s=30)
    network.release_unused(ec2, "p")
    assert network.tagged_key_pairs(ec2, "p") == ["k"]  # the second instance still uses both
    assert network.tagged_security_groups(ec2, "p") == [spec.security_group_id]
    instances.terminate(ec2, [second.instance_id], timeout_s=30)
    network.release_unused(ec2, "p")
    assert network.tagged_key_pairs(ec2) == [] and network.tagged_security_groups(ec2) == []


def test_a_stopped_instance_starts_again_and_its_shutdown_behaviour_can_change(dlami):
    ec2, _ = dlami
    inst = instances.launch(ec2, _spec(ec2), on_launched=lambda _: None).instance
    instances.set_shutdown_behaviour(ec2, inst.instance_id, instances.SHUTDOWN_STOPS)
    attribute = ec2.describe_instance_attribute(InstanceId=inst.instance_id,
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    ec2.stop_instances(InstanceIds=[inst.instance_id])
    assert [i.state for i in instances.find(ec2, project="p", states=("stopped",))] == ["stopped"]
    assert instances.start(ec2, inst.instance_id, timeout_s=30).state == "running"


def _rules(ec2, group: str) -> list[tuple]:
    """(protocol, ports, address ranges, source groups) of each ingress rule."""
    permissions = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    return sorted((p["IpProtocol"], (p.get("FromPort"), p.get("ToPort")) if p["IpProtocol"] != "-1"
                   else None, [r["CidrIp"] for r in p["IpRanges"]] + [r["CidrIpv6"] for r in
                                                                       p["Ipv6Ranges"]],
                   [g["GroupId"] for g in p["UserIdGroupPairs"]]) for p in permissions)


def test_a_clusters_group_allows_ssh_from_one_address_and_all_traffic_between_members(aws):
    ec2, _ = aws
    group, _ = network.ensure_security_group(ec2, "dlbox-p", "203.0.113.7/32", 22,
                                             {"dlbox:project": "p"}, cluster=True)
    expected = [("-1", None, [], [group]), ("tcp", (22, 22), ["203.0.113.7/32"], [])]
    assert _rules(ec2, group) == expected
    again, _ = network.ensure_security_group(ec2, "dlbox-p", "203.0.113.7/32", 22,
                                             {"dlbox:project": "p"}, cluster=True)
    assert again == group and _rules(ec2, group) == expected  # nothing doubled
    network.ensure_security_group(ec2, "dlbox-p", "198.51.100.9/32", 22, {}, cluster=True)
    assert _rules(ec2, group) == [("-1", None, [], [group]),
                                  ("tcp", (22, 22), ["198.51.100.9/32"], [])]
    network.ensure_security_group(ec2, "dlbox-p", "198.51.100.9/32", 22, {})  # a single box
    assert _rules(ec2, group) == [("tcp", (22, 22), ["198.51.100.9/32"], [])]


def _cluster(ec2, spec, nodes: int = 2, **kwargs):
    """launch_cluster of boxes c-0..c-{nodes-1}; (launched, recorded ids by node)."""
    recorded: dict[int, str | None] = {}
    launched = instances.launch_cluster(
        ec2, spec, tuple(f"c-{k}" for k in range(nodes)),
        on_launched=recorded.__setitem__, on_dropped=lambda k: recorded.__setitem__(k, None),
        **kwargs)
    return launched, recorded


def _placement_group(ec2, name: str) -> dict:
    [group] = ec2.describe_placement_groups(GroupNames=[name])["PlacementGroups"]
    return group


def test_a_cluster_is_one_type_in_one_zone_in_a_cluster_placement_group(dlami):
    ec2, _ = dlami
    spec = _spec(ec2, placement_group="dlbox-p")
    launched, recorded = _cluster(ec2, spec, nodes=3)
    nodes = launched.instances
    zone = nodes[0].zone
    name = f"dlbox-p-{zone}"
    assert recorded == {k: inst.instance_id for k, inst in enumerate(nodes)}
    assert {(i.instance_type, i.zone, i.placement_group) for i in nodes} == {
        ("g4dn.xlarge", zone, name)}
    assert [i.box for i in nodes] == ["c-0", "c-1", "c-2"]
    group = _placement_group(ec2, name)
    assert group["Strategy"] == "cluster"
    assert {t["Key"]: t["Value"] for t in group["Tags"]} == {"dlbox:project": "p",
                                                            "dlbox:owner": "me"}
    assert network.tagged_placement_groups(ec2, "p") == [name]
    assert network.tagged_placement_groups(ec2, "other") == []

    instances.terminate(ec2, [nodes[0].instance_id], timeout_s=30)
    network.release_unused(ec2, "p")
    assert network.tagged_placement_groups(ec2, "p") == [name]  # the other nodes are in it
    instances.terminate(ec2, [i.instance_id for i in nodes[1:]], timeout_s=30)
    network.release_unused(ec2, "p")
    assert network.tagged_placement_groups(ec2) == []
    assert network.tagged_security_groups(ec2) == [] and network.tagged_key_pairs(ec2) == []


def test_a_capacity_error_for_the_last_node_moves_the_whole_cluster(dlami):
    ec2, _ = dlami
    zones = instances.zones_offering(ec2, "g4dn.xlarge")
    spec = _spec(ec2, placement_group="dlbox-p")

    def no_second_node_in_the_first_zone(kw):
        box = kw["tags"]["instance"]["dlbox:box"]
        return "InsufficientInstanceCapacity" if kw["placement"] == zones[0] and box == "c-1" \
            else None

    with ec2_errors(no_second_node_in_the_first_zone) as calls:
        launched, recorded = _cluster(ec2, spec)
    assert [c["placement"] for c in calls] == [zones[0], zones[0], zones[1], zones[1]]
    assert [a.outcome for a in launched.attempts] == [
        "InsufficientInstanceCapacity for node 1 of 2", "launched"]
    assert {i.zone for i in launched.instances} == {zones[1]}
    assert recorded == {0: launched.instances[0].instance_id, 1: launched.instances[1].instance_id}
    left = ec2.describe_instances(Filters=[{"Name": "availability-zone", "Values": [zones[0]]}])
    assert [i["State"]["Name"] for r in left["Reservations"] for i in r["Instances"]] == [
        "terminated"]  # node 0 of the first try, ended before the next zone was tried
    assert network.tagged_placement_groups(ec2, "p") == [f"dlbox-p-{zones[1]}"]


def test_a_cluster_without_capacity_anywhere_leaves_nothing(dlami):
    ec2, _ = dlami
    spec = _spec(ec2, placement_group="dlbox-p", instance_types=("g4dn.xlarge",))

    def only_one_node_fits(kw):
        return "InsufficientInstanceCapacity" if kw["tags"]["instance"]["dlbox:box"] == "c-1" \
            else None

    dropped = []
    with ec2_errors(only_one_node_fits), pytest.raises(CapacityError, match="for node 1 of 2"):
        instances.launch_cluster(ec2, spec, ("c-0", "c-1"), on_launched=lambda *_: None,
                                 on_dropped=dropped.append)
    assert instances.find(ec2) == [] and network.tagged_placement_groups(ec2) == []
    assert dropped == [0] * len(instances.zones_offering(ec2, "g4dn.xlarge"))


def test_a_new_node_joins_its_clusters_zone_and_placement_group(dlami):
    """A lost node made again: only its cluster's zone and type, in the group it left."""
    ec2, _ = dlami
    spec = _spec(ec2, placement_group="dlbox-p")
    first, _ = _cluster(ec2, spec)
    zone = first.instances[0].zone
    instances.terminate(ec2, [first.instances[1].instance_id], timeout_s=30)
    with ec2_errors(lambda kw: None) as calls:
        again, _ = _cluster(ec2, replace(spec, instance_types=("g4dn.xlarge",)), nodes=1,
                            zones=(zone,))
    assert [c["placement"] for c in calls] == [zone]  # no other zone is tried
    assert again.instances[0].placement_group == f"dlbox-p-{zone}"
    with ec2_errors(lambda kw: "InsufficientInstanceCapacity"), \
            pytest.raises(CapacityError, match=zone):
        _cluster(ec2, replace(spec, instance_types=("g4dn.xlarge",)), nodes=1, zones=(zone,))
    # The group was not made by the failed try: it stays for the nodes in it.
    assert network.tagged_placement_groups(ec2, "p") == [f"dlbox-p-{zone}"]


def test_down_all_deletes_every_projects_placement_groups_nothing_uses(dlami):
    """release_unused(None) (`down --all`): dlbox's groups of every project once empty; a
    group that is not dlbox's (no project tag) is never touched."""
    ec2, _ = dlami
    used = _cluster(ec2, _spec(ec2, placement_group="dlbox-p"), nodes=1)[0].instances[0]
    assert network.ensure_placement_group(ec2, "dlbox-q-us-east-1a", {"dlbox:project": "q"})
    assert not network.ensure_placement_group(ec2, "dlbox-q-us-east-1a", {"dlbox:project": "q"})
    ec2.create_placement_group(GroupName="theirs", Strategy="cluster")
    network.release_unused(ec2, None)
    assert network.tagged_placement_groups(ec2) == [used.placement_group]
    instances.terminate(ec2, [used.instance_id], timeout_s=30)
    network.release_unused(ec2, None)
    assert network.tagged_placement_groups(ec2) == []
    assert [g["GroupName"] for g in ec2.describe_placement_groups()["PlacementGroups"]] == [
        "theirs"]
