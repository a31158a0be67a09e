"""Per PDS host: a request rate, a cap on requests in flight, and the pause a 429 asked for.

A scheduler asks `ready_in(host)` and starts a request with `take(host)` when it is 0; a caller
that may block uses `acquire(host)`. Either way `leave(host)` ends the request."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_FORGET_AFTER = 3600.0  # an idle host's state is dropped this long after its last request
_SWEEP_EVERY = 10_000  # requests between sweeps of idle hosts


@dataclass
class _Host:
    next_slot: float = 0.0  # when the next request may start
    paused_until: float = 0.0  # what the last 429 (or open circuit) asked for
    in_flight: int = 0


class HostLimits:
    """Thread-safe; times are the clock's (monotonic seconds)."""

    def __init__(self, rate: float, per_host: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._per_host = per_host
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a request ended, or a pause was set
        self._hosts: dict[str, _Host] = {}
        self._taken = 0

    def ready_in(self, host: str) -> float:
        """Seconds until a request to `host` may start: 0 now, inf while its requests in flight
        are at the cap (one must end first)."""
        with self._lock:
            return self._ready_in(self._hosts.get(host) or _Host())

    def take(self, host: str) -> None:
        """Starts a request now (the caller saw `ready_in` give 0)."""
        with self._lock:
            self._take(host)

    def acquire(self, host: str, stop: threading.Event | None = None) -> bool:
        """Waits until a request to `host` may start and starts it; False if `stop` was set."""
        with self._lock:
            while True:
                if stop is not None and stop.is_set():
                    return False
                wait = self._ready_in(self._hosts.get(host) or _Host())
                if wait <= 0:
                    self._take(host)
                    return True
                self._changed.wait(min(wait, 1.0))  # stop is looked at every second

    def leave(self, host: str) -> None:
        with self._lock:
            self._hosts[host].in_flight -= 1
            self._changed.notify_all()

    def pause(self, host: str, seconds: float) -> None:
        """No request to `host` starts in the next `seconds`."""
        with self._lock:
            h = self._hosts.setdefault(host, _Host())
            h.paused_until = max(h.paused_until, self._clock() + seconds)
            self._changed.notify_all()

    def paused_for(self, host: str) -> float:
        """Seconds the host is still paused for (0 when not)."""
        with self._lock:
            h = self._hosts.get(host)
            return 0.0 if h is None else max(0.0, h.paused_until - self._clock())

    def _ready_in(self, h: _Host) -> float:
        if h.in_flight >= self._per_host:
            return math.inf
        return max(0.0, h.next_slot - self._clock(), h.paused_until - self._clock())

    def _take(self, host: str) -> None:
        h = self._hosts.setdefault(host, _Host())
        now = self._clock()
        h.next_slot = max(now, h.next_slot) + self._interval
        h.in_flight += 1
        self._taken += 1
        if self._taken % _SWEEP_EVERY == 0:
            old = now - _FORGET_AFTER
            for name in [n for n, x in self._hosts.items()
                         if x.in_flight == 0 and x.next_slot < old and x.paused_until < old]:
                del self._hosts[name]
