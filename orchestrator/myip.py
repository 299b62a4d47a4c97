"""The caller's public IP, for the security group's one SSH rule."""

from __future__ import annotations

import ipaddress
import os
import urllib.request

from .errors import DlboxError

IP_LOOKUP_URL = "https://checkip.amazonaws.com"
IP_LOOKUP_URL_ENV = "DLBOX_IP_LOOKUP_URL"  # tests and proxies point it elsewhere
IP_LOOKUP_TIMEOUT_S = 5


def public_cidr() -> str:
    """This machine's public address as a single-host CIDR (/32 or /128)."""
    url = os.environ.get(IP_LOOKUP_URL_ENV, IP_LOOKUP_URL)
    try:
        with urllib.request.urlopen(url, timeout=IP_LOOKUP_TIMEOUT_S) as answer:
            text = answer.read(100).decode().strip()
        address = ipaddress.ip_address(text)
    except (OSError, ValueError) as exc:
        raise DlboxError(f"could not find your public IP at {url} ({exc}); pass --ssh-cidr "
                         "YOUR.IP/32") from exc
    return f"{address}/{address.max_prefixlen}"
