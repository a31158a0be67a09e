"""Plain thread-safe counters of the identity stack, for the run summary and a Prometheus exporter.

Keys (dotted; the exporter turns the middle parts into labels):
  resolution.<method>.<result>  method: plc, web, dns, https
                                result: ok, not_found, failed, mismatch, refused
  refused.<kind>                lookups (and PDS requests) refused by the kind of address their
                                host resolved to (loopback, private, link-local, ...: see
                                addresses.address_kind)
  cache.hit, cache.miss, cache.coalesced, cache.size (gauge)
  breaker.trips, breaker.rejected, breaker.open (gauge: circuits now open)
  breaker.state.<upstream> (gauge: 0 closed, 1 open, 2 half-open/ready to probe; PDS hosts
                             as pds:<host>)
  pds.profile.<result>, pds.repo.<result>  PDS requests: found, absent, later, failed,
                                refused, bad
  pds.rate_limited.<host>     429 answers from one PDS host
  backfill.<result>           --backfill-new-users: done, skipped, refused, failed, dropped
"""
from __future__ import annotations

import threading
from collections.abc import Callable

METHODS = ("plc", "web", "dns", "https")
RESULTS = ("ok", "not_found", "failed", "mismatch", "refused")

Gauges = Callable[[], dict[str, int]]


class Counters:
    """Named integers behind one lock; gauges are callables read at snapshot time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {
            f"resolution.{m}.{r}": 0 for m in METHODS for r in RESULTS
        }
        for key in ("cache.hit", "cache.miss", "cache.coalesced", "breaker.trips",
                    "breaker.rejected"):
            self._values[key] = 0
        self._gauges: list[Gauges] = []

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + n

    def resolution(self, method: str, result: str) -> None:
        """Counts one answer of one resolution method."""
        self.inc(f"resolution.{method}.{result}")

    def refused(self, method: str, kind: str) -> None:
        """Counts one lookup refused because its host resolved to a `kind` address."""
        self.inc(f"resolution.{method}.refused")
        self.inc(f"refused.{kind}")

    def get(self, key: str) -> int:
        return self.snapshot().get(key, 0)

    def add_gauges(self, read: Gauges) -> None:
        """Registers a callable whose values are merged into every snapshot."""
        with self._lock:
            self._gauges.append(read)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            values = dict(self._values)
            gauges = list(self._gauges)
        for read in gauges:  # outside the lock: gauges take their owners' locks
            for key, value in read().items():  # two breakers' "breaker.open" add up
                values[key] = values.get(key, 0) + value
        return values
