"""Find the Deep Learning AMI: an SSM public parameter, a name pattern, or an explicit id."""

from __future__ import annotations

from botocore.exceptions import ClientError

from .aws import error_code, translated
from .errors import RegionError
from .models import Image

DEFAULT_SSM_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)
DEFAULT_NAME_PATTERN = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
AMAZON_OWNERS = ["amazon"]


def resolve(ec2, ssm, choice: str | None = None) -> Image:
    """The AMI for choice: "ami-...", an SSM path ("/aws/..."), a name pattern, or the default.

    The default tries the DLAMI's SSM public parameter, then the newest available image
    owned by Amazon whose name matches the DLAMI's pattern.
    """
    if choice and choice.startswith("ami-"):
        return _by_id(ec2, choice)
    if choice and choice.startswith("/"):
        image_id = _from_ssm(ssm, choice)
        if image_id is None:
            raise RegionError(f"SSM parameter {choice} does not exist in this region; "
                              "check the path or choose another region")
        return _by_id(ec2, image_id, source=f"ssm:{choice}")
    if choice:
        return _newest_by_name(ec2, choice)
    image_id = _from_ssm(ssm, DEFAULT_SSM_PARAMETER)
    if image_id is not None:
        return _by_id(ec2, image_id, source=f"ssm:{DEFAULT_SSM_PARAMETER}")
    return _newest_by_name(ec2, DEFAULT_NAME_PATTERN)


def _from_ssm(ssm, path: str) -> str | None:
    with translated("read the AMI's SSM parameter"):
        try:
            return ssm.get_parameter(Name=path)["Parameter"]["Value"]
        except ClientError as exc:
            if error_code(exc) == "ParameterNotFound":
                return None
            raise


def _by_id(ec2, image_id: str, source: str = "id") -> Image:
    with translated(f"describe {image_id}"):
        try:
            images = ec2.describe_images(ImageIds=[image_id])["Images"]
        except ClientError as exc:
            if error_code(exc).startswith("InvalidAMIID"):
                images = []
            else:
                raise
    if not images:
        raise RegionError(f"AMI {image_id} does not exist in this region; pass another ami "
                          "or remove it to use the Deep Learning AMI")
    return _image(images[0], source)


def _newest_by_name(ec2, pattern: str) -> Image:
    with translated("search Deep Learning AMIs"):
        images = ec2.describe_images(
            Owners=AMAZON_OWNERS,
            Filters=[{"Name": "name", "Values": [pattern]}, {"Name": "state", "Values": ["available"]}],
        )["Images"]
    if not images:
        region = ec2.meta.region_name
        raise RegionError(f"no AMI named {pattern!r} in {region}; choose another --region "
                          "or set ami in dlbox.toml")
    newest = max(images, key=lambda i: i.get("CreationDate", ""))
    return _image(newest, f"name:{pattern}")


def _image(raw: dict, source: str) -> Image:
    return Image(
        image_id=raw["ImageId"],
        name=raw.get("Name", ""),
        root_device_name=raw.get("RootDeviceName") or "/dev/sda1",
        source=source,
    )
