"""Idempotent set-up kept apart from instances: the SSH key pair, the security group and a
cluster's placement groups."""

from __future__ import annotations

import ipaddress

from botocore.exceptions import ClientError

from . import retry
from .aws import error_code, translated
from .errors import InfraError
from .models import LIVE_STATES, TAG_PROJECT

SSH_PROTOCOL = "tcp"
ALL_PROTOCOLS = "-1"  # a cluster's members reach each other on every port
CLUSTER_STRATEGY = "cluster"  # a cluster's instances close together: low latency, full bandwidth
MIN_PREFIX_V4 = 16  # the widest network SSH may be opened to (a site, not the internet)
MIN_PREFIX_V6 = 48
GROUP_DELETE_DEADLINE_S = 180  # a terminated instance's interface lingers for a while
GROUP_DELETE_FIRST_DELAY_S = 2.0
GROUP_DELETE_MAX_DELAY_S = 20.0


def _tag_spec(resource: str, tags: dict[str, str]) -> list[dict]:
    return [{"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def ensure_key_pair(ec2, name: str, public_key: str, tags: dict[str, str]) -> bool:
    """Import public_key as key pair name unless it exists; return True if created now."""
    with translated(f"import key pair {name}"):
        try:
            ec2.describe_key_pairs(KeyNames=[name])
            return False
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.NotFound":
                raise
        try:
            ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.encode(),
                                TagSpecifications=_tag_spec("key-pair", tags))
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.Duplicate":  # another `up` won the race
                raise
            return False
    return True


def delete_key_pair(ec2, name: str) -> None:
    with translated(f"delete key pair {name}"):
        ec2.delete_key_pair(KeyName=name)  # idempotent on AWS's side


def check_cidr(cidr: str) -> str:
    """A normalised CIDR that is never the whole internet."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise InfraError(f"{cidr!r} is not an IP address or CIDR; pass e.g. 203.0.113.7/32") from exc
    widest = MIN_PREFIX_V4 if net.version == 4 else MIN_PREFIX_V6
    if net.prefixlen < widest:
        what = "the whole internet" if net.prefixlen == 0 else f"{net.num_addresses:,} addresses"
        raise InfraError(f"refusing to open SSH to {cidr} ({what}); pass your own address "
                         f"as a /32, or a network no wider than /{widest}")
    return str(net)


def ensure_security_group(ec2, name: str, ssh_cidr: str, ssh_port: int,
                          tags: dict[str, str], cluster: bool = False) -> tuple[str, bool]:
    """A group in the default VPC whose only ingress is SSH from ssh_cidr, and (cluster)
    all traffic from the group's own members; (id, created now)."""
    cidr = check_cidr(ssh_cidr)
    with translated(f"set up security group {name}"):
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise InfraError("this region has no default VPC; create one with "
                             "`aws ec2 create-default-vpc`")
        by_name = [{"Name": "group-name", "Values": [name]},
                   {"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]}]
        created = False
        if not ec2.describe_security_groups(Filters=by_name)["SecurityGroups"]:
            try:
                ec2.create_security_group(
                    GroupName=name, Description="dlbox: SSH from the caller's address only"
                    + ("; all traffic between the cluster's members" if cluster else ""),
                    VpcId=vpcs[0]["VpcId"], TagSpecifications=_tag_spec("security-group", tags),
                )
                created = True
            except ClientError as exc:
                if error_code(exc) != "InvalidGroup.Duplicate":  # another `up` won the race
                    raise
        group = ec2.describe_security_groups(Filters=by_name)["SecurityGroups"][0]
        wanted = [_ssh_permission(cidr, ssh_port)]
        if cluster:
            wanted.append(_members_permission(group["GroupId"]))
        _only(ec2, group, wanted)
    return group["GroupId"], created


def _ssh_permission(cidr: str, port: int) -> dict:
    if ipaddress.ip_network(cidr).version == 4:
        ranges = {"IpRanges": [{"CidrIp": cidr, "Description": "dlbox: caller's address"}]}
    else:
        ranges = {"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "dlbox: caller's address"}]}
    return {"IpProtocol": SSH_PROTOCOL, "FromPort": port, "ToPort": port, **ranges}


def _members_permission(group_id: str) -> dict:
    """Every protocol and port, from the instances in the group itself (no address range)."""
    return {"IpProtocol": ALL_PROTOCOLS, "UserIdGroupPairs": [
        {"GroupId": group_id, "Description": "dlbox: the cluster's members"}]}


def _key(permission: dict) -> tuple:
    """What a rule allows, from where: two rules with one key allow the same."""
    protocol = permission.get("IpProtocol")
    ports = None if protocol == ALL_PROTOCOLS else (permission.get("FromPort"),
                                                    permission.get("ToPort"))
    return (protocol, ports, sorted(r["CidrIp"] for r in permission.get("IpRanges", [])),
            sorted(r["CidrIpv6"] for r in permission.get("Ipv6Ranges", [])),
            sorted(g["GroupId"] for g in permission.get("UserIdGroupPairs", [])),
            sorted(p["PrefixListId"] for p in permission.get("PrefixListIds", [])))


def _only(ec2, group: dict, wanted: list[dict]) -> None:
    """Revoke every ingress rule that is not wanted (say, yesterday's address), then allow
    the wanted ones the group lacks."""
    rules = group.get("IpPermissions", [])
    stale = [p for p in rules if _key(p) not in [_key(w) for w in wanted]]
    if stale:
        ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=stale)
    kept = [_key(p) for p in rules if p not in stale]
    missing = [w for w in wanted if _key(w) not in kept]
    if missing:
        ec2.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=missing)


def delete_security_group(ec2, group_id: str, deadline_s: float = GROUP_DELETE_DEADLINE_S) -> None:
    """Delete the group (gone already is fine), retrying while a terminated instance's
    network interface still holds it (DependencyViolation, for a minute or so)."""
    _delete(lambda: ec2.delete_security_group(GroupId=group_id), f"security group {group_id}",
            gone="InvalidGroup.NotFound", busy="DependencyViolation", deadline_s=deadline_s)


def ensure_placement_group(ec2, name: str, tags: dict[str, str]) -> bool:
    """A cluster placement group called name (tagged at creation); True if created now."""
    with translated(f"set up placement group {name}"):
        try:
            ec2.create_placement_group(GroupName=name, Strategy=CLUSTER_STRATEGY,
                                       TagSpecifications=_tag_spec("placement-group", tags))
            return True
        except ClientError as exc:
            if error_code(exc) != "InvalidPlacementGroup.Duplicate":  # made by an earlier `up`
                raise
        found = ec2.describe_placement_groups(GroupNames=[name])["PlacementGroups"]
    if not found or found[0].get("Strategy") != CLUSTER_STRATEGY:
        raise InfraError(f"placement group {name} exists with strategy "
                         f"{found[0].get('Strategy') if found else '?'}, not {CLUSTER_STRATEGY}; "
                         "delete it in the EC2 console, then `dlbox up` again")
    return False


def delete_placement_group(ec2, name: str, deadline_s: float = GROUP_DELETE_DEADLINE_S) -> None:
    """Delete the placement group (gone already is fine), retrying while EC2 still counts
    an instance just terminated in it."""
    _delete(lambda: ec2.delete_placement_group(GroupName=name), f"placement group {name}",
            gone="InvalidPlacementGroup.Unknown", busy="InvalidPlacementGroup.InUse",
            deadline_s=deadline_s)


def _delete(call, what: str, gone: str, busy: str, deadline_s: float) -> None:
    """call() deletes what: its gone error code is success, its busy one is retried."""

    def delete() -> None:
        with translated(f"delete {what}"):
            try:
                call()
            except ClientError as exc:
                if error_code(exc) != gone:
                    raise

    retry.call(delete, retry_if=lambda exc: _aws_code(exc) == busy,
               deadline_s=deadline_s, first_delay_s=GROUP_DELETE_FIRST_DELAY_S,
               max_delay_s=GROUP_DELETE_MAX_DELAY_S)


def _aws_code(exc: BaseException) -> str:
    """The AWS error code behind an infra error (translated() chains the ClientError)."""
    return error_code(exc.__cause__) if exc.__cause__ is not None else error_code(exc)


def _tagged(project: str | None) -> list[dict]:
    """Filters for dlbox's resources: one project's, or (None) every project's."""
    if project is None:
        return [{"Name": "tag-key", "Values": [TAG_PROJECT]}]
    return [{"Name": f"tag:{TAG_PROJECT}", "Values": [project]}]


def tagged_security_groups(ec2, project: str | None = None) -> list[str]:
    """Ids of the security groups dlbox created in the region (for one project, or all)."""
    with translated("list dlbox security groups"):
        groups = ec2.describe_security_groups(Filters=_tagged(project))["SecurityGroups"]
    return [g["GroupId"] for g in groups]


def tagged_key_pairs(ec2, project: str | None = None) -> list[str]:
    """Names of the key pairs dlbox imported in the region (for one project, or all)."""
    with translated("list dlbox key pairs"):
        pairs = ec2.describe_key_pairs(Filters=_tagged(project))["KeyPairs"]
    return [p["KeyName"] for p in pairs]


def tagged_placement_groups(ec2, project: str | None = None) -> list[str]:
    """Names of the placement groups dlbox created in the region (for one project, or all)."""
    with translated("list dlbox placement groups"):
        groups = ec2.describe_placement_groups(Filters=_tagged(project))["PlacementGroups"]
    return [g["GroupName"] for g in groups]


def release_unused(ec2, project: str | None, also_groups: tuple[str, ...] = (),
                   also_keys: tuple[str, ...] = (),
                   also_placement_groups: tuple[str, ...] = ()) -> None:
    """Delete dlbox's security groups, key pairs and placement groups (one project's, or
    every project's) that no instance uses any more: one still in use stays until its last
    user is gone."""
    for group_id in dict.fromkeys([*tagged_security_groups(ec2, project), *also_groups]):
        if not using(ec2, group_id=group_id):
            delete_security_group(ec2, group_id)
    for key_name in dict.fromkeys([*tagged_key_pairs(ec2, project), *also_keys]):
        if not using(ec2, key_name=key_name):
            delete_key_pair(ec2, key_name)
    for name in dict.fromkeys([*tagged_placement_groups(ec2, project), *also_placement_groups]):
        if not using(ec2, placement_group=name):
            delete_placement_group(ec2, name)


def using(ec2, *, group_id: str | None = None, key_name: str | None = None,
          placement_group: str | None = None) -> list[str]:
    """Ids of the instances not yet terminated that use a security group, a key pair or a
    placement group."""
    filters = [{"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    if group_id is not None:
        filters.append({"Name": "instance.group-id", "Values": [group_id]})
    if key_name is not None:
        filters.append({"Name": "key-name", "Values": [key_name]})
    if placement_group is not None:
        filters.append({"Name": "placement-group-name", "Values": [placement_group]})
    with translated("list the instances using a group or key pair"):
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [i["InstanceId"] for page in pages for r in page["Reservations"]
                for i in r["Instances"]]
