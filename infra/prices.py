"""What a box costs per hour: an embedded on-demand table, spot prices from AWS when it has them."""

from __future__ import annotations

from datetime import datetime, timezone

# On-demand Linux prices in us-east-1, USD per hour, from the EC2 On-Demand pricing page
# (aws.amazon.com/ec2/pricing/on-demand/) as published in 2025. Other regions differ by
# up to ~30 %; AWS's Pricing API needs extra permissions and is not in every region.
ON_DEMAND_USD_PER_HOUR = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.12xlarge": 5.672,
    "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.4xlarge": 1.3232, "g6.12xlarge": 4.6016,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.24208,
}
PRICE_SOURCE = "EC2 On-Demand pricing page, Linux, us-east-1, 2025 (embedded table)"


class AwsPrices:
    """On-demand from the embedded table; spot from describe_spot_price_history."""

    def __init__(self, ec2) -> None:
        self.ec2 = ec2

    def hourly(self, instance_type: str, zone: str, spot: bool) -> float | None:
        if spot:
            price = self._spot(instance_type, zone)
            if price is not None:
                return price
        return ON_DEMAND_USD_PER_HOUR.get(instance_type)

    def _spot(self, instance_type: str, zone: str) -> float | None:
        try:
            history = self.ec2.describe_spot_price_history(
                InstanceTypes=[instance_type], AvailabilityZone=zone,
                ProductDescriptions=["Linux/UNIX"], StartTime=datetime.now(timezone.utc),
                MaxResults=1,
            )["SpotPriceHistory"]
        except Exception:  # a price is a nicety: never fail a launch or a `down` over it
            return None
        return float(history[0]["SpotPrice"]) if history else None


def cost(usd_per_hour: float | None, seconds: float) -> float | None:
    return None if usd_per_hour is None else usd_per_hour * seconds / 3600
