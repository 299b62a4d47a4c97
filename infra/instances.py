"""The instance lifecycle: launch with fallbacks, wait, describe, find by tag, terminate."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

from botocore.exceptions import ClientError, WaiterError

from . import retry
from .aws import error_code, translated
from .errors import CapacityError, QuotaError, WaitTimeout
from .models import (
    LIVE_STATES,
    TAG_BOX,
    TAG_PROJECT,
    Attempt,
    Instance,
    Launched,
    LaunchedCluster,
    LaunchSpec,
    placement_group_in,
)

# Answers that mean "not here, not now": try the next zone, type or market.
CAPACITY_ERROR_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "Unsupported", "InstanceLimitExceeded", "SpotMaxPriceTooLow", "UnfulfillableCapacity",
    "InsufficientFreeAddressesInSubnet",
})
# Account quotas: no other zone or type helps. (family letter, market) -> Service Quotas name.
QUOTA_ERROR_CODES = frozenset({"VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"})
QUOTA_NAMES = {
    ("g", "on-demand"): "Running On-Demand G and VT instances (L-DB2E81BA)",
    ("g", "spot"): "All G and VT Spot Instance Requests (L-3819A6DF)",
    ("p", "on-demand"): "Running On-Demand P instances (L-417A185B)",
    ("p", "spot"): "All P Spot Instance Requests (L-7212CCBC)",
}
# Shutdown from inside the instance (the watchdog's poweroff): end the bill, or keep the disk.
SHUTDOWN_TERMINATES = "terminate"
SHUTDOWN_STOPS = "stop"
RUNNING_POLL_S = 5
TERMINATED_POLL_S = 2
TERMINATED_POLL_MAX_S = 15
UNKNOWN_ID_GRACE_S = 20  # a new id can be unknown to DescribeInstances for seconds
ATTEMPT_END_TIMEOUT_S = 600  # a cluster's partial launch, terminated before the next zone


def zones_offering(ec2, instance_type: str) -> list[str]:
    """The availability zones of the region that offer instance_type."""
    with translated(f"list the zones offering {instance_type}"):
        offerings = ec2.describe_instance_type_offerings(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [instance_type]}],
        )["InstanceTypeOfferings"]
    return sorted({o["Location"] for o in offerings})


def _run_args(spec: LaunchSpec, instance_type: str, zone: str, market: str,
              placement_group: str | None = None) -> dict:
    tags = [{"Key": k, "Value": v} for k, v in spec.tags.items()]
    args = {
        "ImageId": spec.image.image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": spec.key_name,
        "SecurityGroupIds": [spec.security_group_id],
        "Placement": {"AvailabilityZone": zone,
                      **({"GroupName": placement_group} if placement_group else {})},
        "UserData": spec.user_data,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 2},
        "BlockDeviceMappings": [{
            "DeviceName": spec.image.root_device_name,
            "Ebs": {"VolumeSize": spec.disk_gb, "VolumeType": "gp3", "Encrypted": True,
                    "DeleteOnTermination": True},
        }],
        # The watchdog powers the box off; AWS then terminates it and the bill stops.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                              {"ResourceType": "volume", "Tags": tags}],
        # Idempotent: a retried request cannot start a second instance.
        "ClientToken": f"dlbox-{uuid.uuid4().hex}",
    }
    if market == "spot":
        args["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time",
                            "InstanceInterruptionBehavior": "terminate"},
        }
    if spec.iam_instance_profile:
        args["IamInstanceProfile"] = {"Name": spec.iam_instance_profile}
    return args


def _quota_error(exc: ClientError, instance_type: str, market: str) -> QuotaError:
    quota = QUOTA_NAMES.get((instance_type[:1], market), f"the EC2 quota for {instance_type}")
    message = exc.response.get("Error", {}).get("Message", "")
    return QuotaError(
        f"AWS quota reached for {market} {instance_type} ({error_code(exc)}: {message}); "
        f"request more in the Service Quotas console: EC2 → {quota}"
    )


def launch(ec2, spec: LaunchSpec, on_launched: Callable[[str], None]) -> Launched:
    """Launch one instance: each zone of each type, spot first if asked, then on-demand.

    on_launched(instance_id) runs the moment run_instances answers, before any waiting,
    so the caller can record the id and an interrupt never leaves an untracked instance.
    """
    done = launch_cluster(ec2, spec, (spec.box,), lambda _, instance_id: on_launched(instance_id),
                          on_dropped=lambda _: None)
    return Launched(done.instances[0], done.attempts)


def launch_cluster(ec2, spec: LaunchSpec, boxes: tuple[str, ...],
                   on_launched: Callable[[int, str], None], on_dropped: Callable[[int], None],
                   zones: tuple[str, ...] | None = None) -> LaunchedCluster:
    """Launch one instance per box (boxes[i] is node i's name), all of one type in one zone
    (and, with spec.placement_group, in that zone's cluster placement group): each zone of
    each type, spot first if asked, then on-demand; zones: only those.

    on_launched(node, instance_id) runs the moment run_instances answers for that node.
    A capacity error for any node moves the whole cluster on: the instances launched for
    that attempt are terminated (verified), on_dropped(node) runs for each, and a placement
    group made for the attempt is deleted, before the next zone or type is tried.
    """
    markets = ["spot", "on-demand"] if spec.spot and spec.spot_fallback else (
        ["spot"] if spec.spot else ["on-demand"])
    attempts: list[Attempt] = []
    for market in markets:
        for instance_type in spec.instance_types:
            offered = [z for z in zones_offering(ec2, instance_type) if zones is None or z in zones]
            if not offered:
                attempts.append(Attempt(instance_type, "-", market, "not offered in this region"
                                        if zones is None else f"not offered in {', '.join(zones)}"))
            for zone in offered:
                launched, outcome = _attempt(ec2, spec, boxes, instance_type, zone, market,
                                             on_launched, on_dropped)
                attempts.append(Attempt(instance_type, zone, market, outcome))
                if launched:
                    return LaunchedCluster(launched, tuple(attempts))
    tried = "; ".join(f"{a.market} {a.instance_type} in {a.zone}: {a.outcome}" for a in attempts)
    raise CapacityError(f"no capacity for any instance type tried ({tried}); try later, "
                        "another region, or more instance_types", tuple(attempts))


def _attempt(ec2, spec: LaunchSpec, boxes: tuple[str, ...], instance_type: str, zone: str,
             market: str, on_launched: Callable[[int, str], None],
             on_dropped: Callable[[int], None]) -> tuple[tuple[Instance, ...], str]:
    """Every node in zone: (the instances, "launched"), or ((), the capacity error) with
    whatever this attempt launched terminated (verified). Any other error is raised with
    the instances launched so far left to the caller, who has recorded them."""
    from . import network

    group = placement_group_in(spec.placement_group, zone) if spec.placement_group else None
    made_group = group is not None and network.ensure_placement_group(
        ec2, group, {k: v for k, v in spec.tags.items() if k not in (TAG_BOX, "Name")})
    launched: list[Instance] = []
    for node, box in enumerate(boxes):
        args = _run_args(replace(spec, box=box), instance_type, zone, market, group)
        with translated(f"launch a {market} {instance_type} in {zone}"):
            try:
                raw = ec2.run_instances(**args)["Instances"][0]
            except ClientError as exc:
                code = error_code(exc)
                if code in QUOTA_ERROR_CODES:
                    raise _quota_error(exc, instance_type, market) from exc
                if code not in CAPACITY_ERROR_CODES:
                    raise
                break
        on_launched(node, raw["InstanceId"])  # first: nothing may come between
        launched.append(_instance(raw))
    else:
        return tuple(launched), "launched"
    terminate(ec2, [i.instance_id for i in launched], ATTEMPT_END_TIMEOUT_S)
    for dropped in range(len(launched)):
        on_dropped(dropped)
    if made_group:
        network.delete_placement_group(ec2, group)
    return (), code if len(boxes) == 1 else f"{code} for node {len(launched)} of {len(boxes)}"


def _instance(raw: dict) -> Instance:
    return Instance(
        instance_id=raw["InstanceId"],
        instance_type=raw["InstanceType"],
        state=raw["State"]["Name"],
        zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
        spot=raw.get("InstanceLifecycle") == "spot",
        launch_time=raw["LaunchTime"],
        public_ip=raw.get("PublicIpAddress"),
        image_id=raw.get("ImageId", ""),
        tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
        key_name=raw.get("KeyName"),
        security_group_ids=tuple(g["GroupId"] for g in raw.get("SecurityGroups", [])),
        state_reason=_state_reason(raw),
        state_changed_at=_state_changed_at(raw.get("StateTransitionReason") or ""),
        placement_group=raw.get("Placement", {}).get("GroupName") or None,
    )


def _state_changed_at(text: str) -> datetime | None:
    """The time in a StateTransitionReason ("User initiated (2026-12-04 19:12:31 GMT)")."""
    found = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)", text)
    if found is None:
        return None
    return datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)


def _state_reason(raw: dict) -> str | None:
    """EC2's own words for the last state change ("Server.SpotInstanceTermination: ...")."""
    reason = raw.get("StateReason") or {}
    code, message = reason.get("Code") or "", reason.get("Message") or ""
    if message.startswith(code):  # "Server.SpotInstanceTermination: Spot instance termination"
        return message or None
    return f"{code}: {message}" if message else code


def describe(ec2, instance_id: str) -> Instance | None:
    """The instance, or None if AWS no longer knows it."""
    with translated(f"describe {instance_id}"):
        try:
            reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except ClientError as exc:
            if error_code(exc) == "InvalidInstanceID.NotFound":
                return None
            raise
    found = [i for r in reservations for i in r["Instances"]]
    return _instance(found[0]) if found else None


def find(ec2, *, project: str | None = None, box: str | None = None,
         states: tuple[str, ...] = LIVE_STATES) -> list[Instance]:
    """Live dlbox instances, found by their tags (no local state needed)."""
    filters = [{"Name": "instance-state-name", "Values": list(states)},
               {"Name": "tag-key", "Values": [TAG_BOX]}]
    if project is not None:
        filters.append({"Name": f"tag:{TAG_PROJECT}", "Values": [project]})
    if box is not None:
        filters.append({"Name": f"tag:{TAG_BOX}", "Values": [box]})
    with translated("list dlbox instances"):
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [_instance(i) for page in pages for r in page["Reservations"] for i in r["Instances"]]


def set_shutdown_behaviour(ec2, instance_id: str, behaviour: str) -> None:
    """What a shutdown from inside the instance does: SHUTDOWN_TERMINATES or SHUTDOWN_STOPS."""
    with translated(f"set the shutdown behaviour of {instance_id}"):
        # The Attribute/Value form: AWS takes it for this attribute, and moto implements it.
        ec2.modify_instance_attribute(InstanceId=instance_id,
                                      Attribute="instanceInitiatedShutdownBehavior", Value=behaviour)


def start(ec2, instance_id: str, timeout_s: float) -> Instance:
    """Start a stopped (or stopping) instance and wait until it runs; return it. One that
    another command is starting already (pending) is only waited for."""
    found = describe(ec2, instance_id)
    if found is None or found.state not in ("pending", "running"):
        _wait(ec2, "instance_stopped", [instance_id], RUNNING_POLL_S, timeout_s,
              f"wait for {instance_id} to stop before starting it")
        with translated(f"start {instance_id}"):
            ec2.start_instances(InstanceIds=[instance_id])
    return wait_running(ec2, instance_id, timeout_s)


def console_output(ec2, instance_id: str) -> str:
    """The instance's serial console text so far ("" until EC2 has some)."""
    with translated(f"read the console output of {instance_id}"):
        return ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""


def _wait(ec2, waiter_name: str, ids: list[str], poll_s: int, timeout_s: float, what: str) -> None:
    if not ids:
        return  # a waiter on an empty list would describe every instance in the region
    waiter = ec2.get_waiter(waiter_name)
    config = {"Delay": poll_s, "MaxAttempts": max(1, math.ceil(timeout_s / poll_s))}
    with translated(what):
        try:
            waiter.wait(InstanceIds=ids, WaiterConfig=config)
        except WaiterError as exc:
            if "Max attempts exceeded" in str(exc):
                raise WaitTimeout(f"{what}: still not done after {timeout_s:.0f} s") from exc
            raise WaitTimeout(f"{what}: {exc}") from exc


def wait_running(ec2, instance_id: str, timeout_s: float) -> Instance:
    """Block until the instance runs (bounded); return it with its public IP."""
    return wait_all_running(ec2, [instance_id], timeout_s)[0]


def wait_all_running(ec2, instance_ids: list[str], timeout_s: float) -> list[Instance]:
    """Block until every instance runs (one bounded wait); return them in order."""
    _wait(ec2, "instance_running", instance_ids, RUNNING_POLL_S, timeout_s,
          f"wait for {', '.join(instance_ids)} to run")
    found = [describe(ec2, instance_id) for instance_id in instance_ids]
    assert all(found)  # the waiter just saw them running
    return found


def terminate(ec2, instance_ids: list[str], timeout_s: float) -> None:
    """Terminate and poll until AWS reports every instance terminated (the bill stopped).

    One call per instance: EC2 rejects a whole batch when one id is unknown. An id that
    EC2 does not know yet (just launched) is retried until it knows it or the grace is up.
    """
    started = time.monotonic()
    pending = list(dict.fromkeys(instance_ids))

    def one_round() -> list[str]:
        for instance_id in list(pending):
            inst = describe(ec2, instance_id)
            # Asked even when EC2 does not list the id yet (a launch seconds old may be
            # unknown to DescribeInstances, not to TerminateInstances).
            if inst is None or inst.state not in ("shutting-down", "terminated"):
                with translated(f"terminate {instance_id}"):
                    try:
                        ec2.terminate_instances(InstanceIds=[instance_id])
                    except ClientError as exc:
                        if error_code(exc) != "InvalidInstanceID.NotFound":
                            raise
                inst = describe(ec2, instance_id)
            unknown_too_long = inst is None and time.monotonic() - started > UNKNOWN_ID_GRACE_S
            if unknown_too_long or (inst is not None and inst.state == "terminated"):
                pending.remove(instance_id)  # AWS forgets terminated instances after a while
        return pending

    left = retry.poll(one_round, until=lambda ids: not ids, deadline_s=timeout_s,
                      first_delay_s=TERMINATED_POLL_S, max_delay_s=TERMINATED_POLL_MAX_S)
    if left:
        raise WaitTimeout(f"{', '.join(left)} not terminated after {timeout_s:.0f} s; "
                          "run `dlbox down` again or check the EC2 console")
