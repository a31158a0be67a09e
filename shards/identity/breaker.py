"""A circuit breaker per upstream (PLC host, did:web host, DNS server) as a Directory wrapper.

An outage then costs one fast ResolutionFailed per lookup instead of one timeout per new user.
Per upstream: closed -> (`threshold` consecutive failures, and no success for `quiet` seconds)
open -> (`cooldown` seconds) half-open -> one probe -> closed on success, open again on failure.
An upstream that answers most lookups stays closed while a few of them hang: a failed call does
not count if the upstream answered another one while it was in flight, and the quiet period
covers the timeouts that come in bursts."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .directory import Directory, Identity, IdentityError, ResolutionFailed
from .metrics import Counters

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
_MAX_IDLE_CIRCUITS = 10_000  # healthy circuits beyond this many are forgotten

T = TypeVar("T")


class CircuitOpen(ResolutionFailed):
    """Failing fast: the upstream failed repeatedly and is cooling down (never cached)."""

    reason = "circuit open"


@dataclass
class _Circuit:
    state: int = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    last_success: float | None = None


@dataclass(frozen=True)
class _Ticket:
    key: str
    probe: bool
    started: float  # clock at enter(): a success after it shows the upstream was up meanwhile


class CircuitBreakers:
    """The circuits of all upstreams, behind one lock."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
        quiet: float = 1.0,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.quiet = quiet
        self.counters = counters or Counters()
        self._clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}
        self.counters.add_gauges(self._gauges)

    def enter(self, key: str) -> _Ticket:
        """A ticket to call `key` (maybe as the half-open probe). Raises CircuitOpen."""
        with self._lock:
            c = self._circuits.setdefault(key, _Circuit())
            if c.state == CLOSED:
                return _Ticket(key, False, self._clock())
            if c.state == OPEN and self._clock() - c.opened_at >= self.cooldown:
                c.state, c.probing = HALF_OPEN, False
            if c.state == HALF_OPEN and not c.probing:
                c.probing = True
                return _Ticket(key, True, self._clock())
        self.counters.inc("breaker.rejected")
        raise CircuitOpen(f"circuit open for {key}")

    def success(self, ticket: _Ticket) -> None:
        with self._lock:
            c = self._circuits.get(ticket.key)
            if c is None:
                return
            c.last_success = self._clock()
            if ticket.probe:
                c.state, c.failures, c.probing = CLOSED, 0, False
                log.info("circuit for %s closed: probe succeeded", ticket.key)
            elif c.state == CLOSED:
                c.failures = 0
                if len(self._circuits) > _MAX_IDLE_CIRCUITS:
                    del self._circuits[ticket.key]

    def failure(self, ticket: _Ticket) -> None:
        with self._lock:
            c = self._circuits.setdefault(ticket.key, _Circuit())
            if ticket.probe:
                c.state, c.opened_at, c.probing = OPEN, self._clock(), False
                log.warning("circuit for %s stays open: probe failed", ticket.key)
                return
            if c.state != CLOSED:  # a call started before the circuit opened
                return
            if c.last_success is not None and c.last_success >= ticket.started:
                return  # it answered others meanwhile: this call hung on its own (one DID)
            c.failures += 1
            if c.failures < self.threshold or (
                    c.last_success is not None and self._clock() - c.last_success < self.quiet):
                return
            c.state, c.opened_at = OPEN, self._clock()
        self.counters.inc("breaker.trips")
        log.warning("circuit for %s open after %d consecutive failures; retrying in %.1fs",
                    ticket.key, self.threshold, self.cooldown)

    def abandon(self, ticket: _Ticket) -> None:
        """The call said nothing about this upstream: give the probe slot back."""
        if ticket.probe:
            with self._lock:
                c = self._circuits.get(ticket.key)
                if c is not None and c.state == HALF_OPEN:
                    c.probing = False

    def state(self, key: str) -> int:
        """CLOSED, OPEN, or HALF_OPEN (including open with the cool-down over)."""
        with self._lock:
            c = self._circuits.get(key)
            return CLOSED if c is None else self._state(c)

    def _state(self, c: _Circuit) -> int:
        if c.state == OPEN and self._clock() - c.opened_at >= self.cooldown:
            return HALF_OPEN
        return c.state

    def _gauges(self) -> dict[str, int]:
        with self._lock:
            states = {k: self._state(c) for k, c in self._circuits.items()}
        values = {f"breaker.state.{k}": s for k, s in states.items()}
        values["breaker.open"] = sum(1 for s in states.values() if s == OPEN)
        return values


class Upstreams(Protocol):
    """Names the upstreams (breaker keys) a lookup depends on; BaseDirectory implements it."""

    def did_upstreams(self, did: str) -> Sequence[str]: ...

    def handle_upstreams(self, handle: str) -> Sequence[str]: ...


class BreakerDirectory:
    """Fails fast while any upstream of a lookup is open; counts failures blamed on an upstream."""

    def __init__(
        self,
        inner: Directory,
        upstreams: Upstreams,
        *,
        threshold: int,
        cooldown: float,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.counters = counters or Counters()
        self.breakers = CircuitBreakers(threshold, cooldown, self.counters, clock)
        self._upstreams = upstreams

    def resolve_did(self, did: str) -> Identity:
        return self._guarded(self._upstreams.did_upstreams(did), lambda: self.inner.resolve_did(did))

    def verify(self, ident: Identity) -> Identity:
        return self._guarded(self._upstreams.handle_upstreams(ident.handle),
                             lambda: self.inner.verify(ident))

    def purge(self, did: str) -> None:
        self.inner.purge(did)

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot()

    def _guarded(self, keys: Sequence[str], call: Callable[[], T]) -> T:
        tickets: list[_Ticket] = []
        try:
            for key in keys:
                tickets.append(self.breakers.enter(key))
        except CircuitOpen:
            for ticket in tickets:
                self.breakers.abandon(ticket)
            raise
        try:
            result = call()
        except ResolutionFailed as exc:
            # Blamed upstream: a failure. No one blamed (mismatch, refused address): the
            # upstreams answered. Another upstream blamed: this one may not have been reached.
            for ticket in tickets:
                if ticket.key == exc.upstream:
                    self.breakers.failure(ticket)
                elif exc.upstream is None:
                    self.breakers.success(ticket)
                else:
                    self.breakers.abandon(ticket)
            raise
        except IdentityError:  # DIDNotFound: a final answer from a working upstream
            for ticket in tickets:
                self.breakers.success(ticket)
            raise
        except BaseException:
            for ticket in tickets:
                self.breakers.abandon(ticket)
            raise
        for ticket in tickets:
            self.breakers.success(ticket)
        return result
