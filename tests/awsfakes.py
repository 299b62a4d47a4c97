"""Test helpers for moto: a Deep Learning AMI and its SSM parameter, and injected EC2 errors."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from unittest import mock

from infra.ami import DEFAULT_NAME_PATTERN, DEFAULT_SSM_PARAMETER

REGION = "us-east-1"
DLAMI_ID = "ami-0d1a0000000000001"
OLDER_DLAMI_ID = "ami-0d1a0000000000002"


def _account() -> str:
    from moto.core import DEFAULT_ACCOUNT_ID

    return DEFAULT_ACCOUNT_ID


def add_ami(image_id: str, name: str, created: datetime, region: str = REGION) -> None:
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami

    backend = ec2_backends[_account()][region]
    backend.amis[image_id] = Ami(
        backend, image_id, name=name, owner_alias="amazon", owner_id="898082745236",
        architecture="x86_64", root_device_type="ebs", root_device_name="/dev/sda1",
        creation_date=created, virtualization_type="hvm", region_name=region,
    )


def add_ssm_parameter(name: str, value: str, region: str = REGION) -> None:
    from moto.ssm.models import Parameter, ssm_backends

    backend = ssm_backends[_account()][region]
    backend._parameters[name].append(Parameter(
        account_id=_account(), name=name, value=value, parameter_type="String",
        description=None, allowed_pattern=None, keyid=None,
        last_modified_date=datetime.now(timezone.utc), version=1, data_type="text",
    ))


def install_dlami(region: str = REGION, with_ssm: bool = True) -> None:
    """Two DLAMIs by name (the newer one is DLAMI_ID) and, optionally, the SSM parameter."""
    add_ami(OLDER_DLAMI_ID, DEFAULT_NAME_PATTERN.replace("*", "20260901"),
            datetime(2026, 9, 1, tzinfo=timezone.utc), region)
    add_ami(DLAMI_ID, DEFAULT_NAME_PATTERN.replace("*", "20261101"),
            datetime(2026, 11, 1, tzinfo=timezone.utc), region)
    if with_ssm:
        add_ssm_parameter(DEFAULT_SSM_PARAMETER, DLAMI_ID, region)


@contextlib.contextmanager
def ec2_errors(rule):
    """Make moto's run_instances raise rule(kwargs)'s error code (None: launch normally).

    Patches the backend, so it works in-process and through moto's server alike.
    """
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances
    calls: list[dict] = []

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        calls.append(kwargs)
        code = rule(kwargs)
        if code:
            raise EC2ClientError(code, f"injected by the test: {code}")
        return original(self, image_id, count, user_data, security_group_names, **kwargs)

    with mock.patch.object(EC2Backend, "run_instances", run_instances):
        yield calls


@contextlib.contextmanager
def public_ip(address: str):
    """Give new moto instances this public IP (e.g. a loopback sshd)."""
    with mock.patch("moto.ec2.models.elastic_network_interfaces.random_public_ip",
                    return_value=address):
        yield


@contextlib.contextmanager
def public_ips(*addresses: str):
    """Give new moto instances these public IPs in turn (loopback sshds: one "box" each);
    the last one is given again once they are used up."""
    given = iter(addresses)

    def next_address() -> str:
        return next(given, addresses[-1])

    with mock.patch("moto.ec2.models.elastic_network_interfaces.random_public_ip",
                    side_effect=next_address):
        yield


@contextlib.contextmanager
def reclaimed_at_launch(count: int = 1):
    """The next count instances launched are terminated as soon as run_instances answers
    (spot capacity taken back while the box is being set up)."""
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances
    left = [count]

    def run_instances(self, *args, **kwargs):
        reservation = original(self, *args, **kwargs)
        if left[0] > 0:
            left[0] -= 1
            self.terminate_instances([i.id for i in reservation.instances])
        return reservation

    with mock.patch.object(EC2Backend, "run_instances", run_instances):
        yield


def reclaim(instance_id: str, region: str = REGION) -> None:
    """Terminate the instance as EC2 does when it takes spot capacity back (the state reason
    says so: Server.SpotInstanceTermination), not as a user or the instance itself would."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    instance = ec2_backends[_account()][region].get_instance(instance_id)
    instance.terminate()
    instance.state_reason = StateReason("Server.SpotInstanceTermination: Spot instance termination",
                                        "Server.SpotInstanceTermination")
    instance._reason = "Service initiated"


# moto 5.2 implements no placement group call (CreatePlacementGroup answers "not
# implemented") and ignores Placement.GroupName; dlbox's clusters need both. The stand-in
# below lives in moto's own classes, so it serves moto in-process and moto's server (and a
# CLI run as a subprocess against it) alike. It is installed once, when this module is
# first imported (every AWS test imports it: conftest's aws fixture, test_infra), and
# keeps AWS's rules that dlbox relies on: names unique (InvalidPlacementGroup.Duplicate),
# an unknown group refused at launch and at deletion (InvalidPlacementGroup.Unknown), no
# deletion while an instance not yet terminated is in the group (InvalidPlacementGroup.InUse).
def _placement_groups(backend) -> dict[str, dict]:
    """The backend's placement groups by name (a moto reset makes new backends: none)."""
    if not hasattr(backend, "dlbox_placement_groups"):
        backend.dlbox_placement_groups = {}
    return backend.dlbox_placement_groups


def _group_matches(group: dict, filters: dict[str, list[str]]) -> bool:
    tags = {t["Key"]: t["Value"] for t in group["Tags"]}
    for name, values in filters.items():
        if name == "tag-key":
            ok = bool(set(tags) & set(values))
        elif name.startswith("tag:"):
            ok = tags.get(name[4:]) in values
        elif name in ("group-name", "strategy", "state"):
            ok = group[{"group-name": "GroupName", "strategy": "Strategy",
                        "state": "State"}[name]] in values
        else:
            raise NotImplementedError(f"placement group filter {name!r} (tests/awsfakes.py)")
        if not ok:
            return False
    return True


def _create_placement_group(self):
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError

    groups = _placement_groups(self.ec2_backend)
    name = self._get_param("GroupName")
    if name in groups:
        raise EC2ClientError("InvalidPlacementGroup.Duplicate",
                             f"The placement group '{name}' already exists.")
    tags = self._parse_tag_specification().get("placement-group", {})
    groups[name] = {"GroupName": name, "State": "available",
                    "Strategy": self._get_param("Strategy"),
                    "GroupId": f"pg-{len(groups) + 1:017x}",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
    return ActionResult({"PlacementGroup": groups[name]})


def _describe_placement_groups(self):
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError

    groups = _placement_groups(self.ec2_backend)
    names = self._get_param("GroupNames", [])
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise EC2ClientError("InvalidPlacementGroup.Unknown",
                             f"The Placement Group '{unknown[0]}' is unknown.")
    filters = self._filters_from_querystring()
    return ActionResult({"PlacementGroups": [
        g for g in groups.values()
        if (not names or g["GroupName"] in names) and _group_matches(g, filters)]})


def _delete_placement_group(self):
    from moto.core.responses import EmptyResult
    from moto.ec2.exceptions import EC2ClientError

    groups = _placement_groups(self.ec2_backend)
    name = self._get_param("GroupName")
    if name not in groups:
        raise EC2ClientError("InvalidPlacementGroup.Unknown",
                             f"The Placement Group '{name}' is unknown.")
    if any(i.placement.group_name == name and i.state != "terminated"
           for i in self.ec2_backend.all_instances()):
        raise EC2ClientError("InvalidPlacementGroup.InUse",
                             f"The placement group '{name}' is in use and cannot be deleted.")
    del groups[name]
    return EmptyResult()


def _install_placement_groups() -> None:
    from moto.ec2 import utils
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.responses import EC2Response
    from moto.ec2.responses.instances import InstanceResponse

    if getattr(EC2Response, "dlbox_placement_groups", False):
        return
    EC2Response.dlbox_placement_groups = True
    EC2Response.create_placement_group = _create_placement_group
    EC2Response.describe_placement_groups = _describe_placement_groups
    EC2Response.delete_placement_group = _delete_placement_group
    utils.filter_dict_attribute_mapping["placement-group-name"] = "placement.group_name"
    original = InstanceResponse.run_instances

    def run_instances(self):
        name = self._get_param("Placement.GroupName")
        if name and name not in _placement_groups(self.ec2_backend):
            raise EC2ClientError("InvalidPlacementGroup.Unknown",
                                 f"The Placement Group '{name}' is unknown.")
        result = original(self)
        for instance in result.result.instances:
            instance.placement.group_name = name or ""
        return result

    InstanceResponse.run_instances = run_instances


_install_placement_groups()
