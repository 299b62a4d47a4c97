"""boto3 sessions and clients, and the translation of botocore errors into infra errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions

from .errors import CredentialsError, InfraError, RegionError

API_RETRY_ATTEMPTS = 5  # botocore's own retries of throttling and 5xx answers
API_CONNECT_TIMEOUT_S = 10
API_READ_TIMEOUT_S = 60
CREDENTIAL_ERROR_CODES = {
    "AuthFailure", "UnauthorizedOperation", "ExpiredToken", "ExpiredTokenException",
    "RequestExpired", "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
}


def session(region: str, profile: str | None = None) -> boto3.session.Session:
    """A session on the standard credential chain (AWS_ENDPOINT_URL is honoured by botocore)."""
    with translated("read your AWS configuration"):
        try:
            s = boto3.session.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise CredentialsError(f"AWS profile {profile!r} not found; check ~/.aws/config or "
                                   "pass another --profile") from exc
        if region not in s.get_available_regions("ec2") and not region.startswith(("us-iso",
                                                                                   "local")):
            raise RegionError(f"unknown AWS region {region!r}; pass --region like us-east-1")
        # Before anything reaches the network: no credentials is the first thing to say.
        if s.get_credentials() is None:
            raise CredentialsError("no AWS credentials found; run `aws configure`, set "
                                   "AWS_PROFILE or pass --profile")
    return s


def client(sess: boto3.session.Session, service: str):
    config = botocore.config.Config(
        retries={"max_attempts": API_RETRY_ATTEMPTS, "mode": "standard"},
        connect_timeout=API_CONNECT_TIMEOUT_S,
        read_timeout=API_READ_TIMEOUT_S,
    )
    return sess.client(service, config=config)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    return ""


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn credential, connection and unexpected AWS errors into one-line infra errors."""
    try:
        yield
    except InfraError:
        raise
    except botocore.exceptions.NoCredentialsError as exc:
        raise CredentialsError("no AWS credentials found; run `aws configure`, set "
                               "AWS_PROFILE or pass --profile") from exc
    except (botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError) as exc:
        raise CredentialsError(f"your AWS credentials are incomplete or could not be read ({exc}); "
                               "fix them (`aws configure`) or pass another --profile") from exc
    except (botocore.exceptions.TokenRetrievalError,
            botocore.exceptions.SSOTokenLoadError) as exc:
        raise CredentialsError(f"AWS login expired ({exc}); run `aws sso login`") from exc
    except botocore.exceptions.EndpointConnectionError as exc:
        raise RegionError(f"cannot reach AWS at {exc.kwargs.get('endpoint_url')}; check the "
                          "region and your network") from exc
    except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError) as exc:
        raise InfraError(f"AWS did not answer while trying to {action} ({exc}); check your "
                         "network and run the command again") from exc
    except botocore.exceptions.ClientError as exc:
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if code in CREDENTIAL_ERROR_CODES:
            raise CredentialsError(f"AWS refused the credentials while trying to {action} "
                                   f"({code}: {message}); refresh them or pass --profile") from exc
        raise InfraError(f"AWS error while trying to {action}: {code}: {message}") from exc
    except botocore.exceptions.BotoCoreError as exc:  # anything else botocore says, in one line
        raise InfraError(f"AWS error while trying to {action}: {exc}; check your AWS "
                         "configuration and run the command again") from exc
