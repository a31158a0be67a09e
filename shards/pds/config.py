"""Every knob of fetching from PDS hosts in one frozen value, so each worker builds the same."""
from __future__ import annotations

from dataclasses import dataclass, replace

# Bluesky's PDS hosts allow one address 3,000 requests per 5 minutes.
DEFAULT_RATE = 10.0


@dataclass(frozen=True)
class PdsConfig:
    """How much and how politely PDS hosts are asked, and when a user's PDS is asked again.

    Rates are requests per second, times seconds, sizes bytes. `rate`, `host_concurrency` and
    `concurrency` are what one process may do; `share` divides the pipeline's among shards."""

    fetch_profiles: bool = True
    rate: float = DEFAULT_RATE  # per PDS host; 0: no limit
    host_concurrency: int = 2  # requests in flight per PDS host
    concurrency: int = 32  # requests in flight in all
    profile_max_bytes: int = 64 * 1024
    error_max_bytes: int = 4 * 1024  # an error answer's body (its XRPC error name) read at most
    absent_retry: float = 24 * 3600.0  # a PDS without the profile record is asked again after this
    first_backoff: float = 60.0  # 5xx and timeouts: per user, doubling
    max_backoff: float = 6 * 3600.0
    rate_limited_wait: float = 60.0  # a 429 that says nothing about when to come back
    max_rate_limited_wait: float = 3600.0  # the longest Retry-After or RateLimit-Reset honoured
    repo_timeout: float = 600.0  # one repository download, whole (each read: the read timeout)
    breaker_threshold: int = 5  # consecutive failures of one host that open its circuit
    breaker_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.host_concurrency < 1 or self.concurrency < 1:
            raise ValueError("PDS rate must be >= 0, concurrencies >= 1")

    def share(self, parts: int) -> PdsConfig:
        """One process's part of the pipeline's limits, when `parts` processes ask at once."""
        return replace(self, rate=self.rate / parts,
                       concurrency=max(1, self.concurrency // parts))
