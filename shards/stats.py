"""Plain counters a shard sends to the supervisor, which adds them up for the summary."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

# Latency buckets: upper bounds growing by 2^(1/4) from 0.1 ms, enough for hours.
_BASE, _STEP, _BUCKETS = 1e-4, 2 ** 0.25, 128


@dataclass
class Histogram:
    """A log-bucket histogram that merges by adding counts, for percentiles across processes."""

    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)

    def observe(self, seconds: float, n: int = 1) -> None:
        k = 0 if seconds <= _BASE else min(_BUCKETS - 1, math.ceil(math.log(seconds / _BASE, _STEP)))
        self.counts[k] += n

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]

    def quantile(self, q: float) -> float | None:
        total = sum(self.counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for k, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return _BASE * _STEP**k
        return None


@dataclass
class ShardStats:
    """What one shard worker has done since it started."""

    shard: int
    committed: int = 0
    dead_letters: int = 0
    dead_reasons: Counter[str] = field(default_factory=Counter)
    users_created: int = 0
    users_fallback: int = 0
    users_unverified: int = 0
    users_refused: int = 0  # written incomplete because an address was refused
    transactions: int = 0
    db_retries: int = 0
    active_user_creations: int = 0
    pending_user_creations: int = 0
    peak_active_user_creations: int = 0
    peak_pending_user_creations: int = 0
    coalesced_events: int = 0
    late_resolutions: int = 0
    latency: Histogram = field(default_factory=Histogram)
    events_by_kind: Counter[str] = field(default_factory=Counter)
    identity: dict[str, int] = field(default_factory=dict)
    pool: dict[str, int] = field(default_factory=dict)
    refresher_backlog: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # frames acknowledged unwritten, why
    verify_failures: Counter[str] = field(default_factory=Counter)  # firehose, by check
    frame_time: float | None = None  # unix time of the newest firehose frame committed

    def gauges(self, active: int, pending: int) -> None:
        self.active_user_creations, self.pending_user_creations = active, pending
        self.peak_active_user_creations = max(self.peak_active_user_creations, active)
        self.peak_pending_user_creations = max(self.peak_pending_user_creations, pending)
