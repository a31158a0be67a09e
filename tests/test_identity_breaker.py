"""BreakerDirectory: opening, failing fast, probing and closing, alone and over real upstreams."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from shards.identity import (
    INVALID_HANDLE,
    BreakerDirectory,
    CircuitOpen,
    DIDMismatch,
    DIDNotFound,
    Identity,
    ResolutionFailed,
    build_directory,
)
from shards.identity.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreakers
from shards.identity.testing import StubServer, did_document, local_config
from tools.fake_dns import FakeDNS

ALICE = "did:plc:" + "a" * 24


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """An inner Directory whose next answer the test sets; also names the upstreams."""

    def __init__(self) -> None:
        self.outcome: Callable[[], Identity] = lambda: Identity(ALICE, "alice.test")
        self.calls = 0
        self.gate: threading.Event | None = None
        self.keys: tuple[str, ...] = ("plc",)

    def resolve_did(self, did: str) -> Identity:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait()
        return self.outcome()

    def verify(self, ident: Identity) -> Identity:
        return self.resolve_did(ident.did)

    def purge(self, did: str) -> None:
        pass

    def did_upstreams(self, did: str) -> Sequence[str]:
        return self.keys

    def handle_upstreams(self, handle: str) -> Sequence[str]:
        return ("dns",)


def raiser(exc: Exception) -> Callable[[], Identity]:
    def outcome() -> Identity:
        raise exc
    return outcome


def failing(upstream: str = "plc") -> Callable[[], Identity]:
    return raiser(ResolutionFailed("timeout", upstream=upstream))


@pytest.fixture
def inner() -> Scripted:
    return Scripted()


def breaker(inner: Scripted, clock: Clock, threshold: int = 3) -> BreakerDirectory:
    return BreakerDirectory(inner, inner, threshold=threshold, cooldown=10, clock=clock)


def test_opens_after_threshold_consecutive_failures(inner: Scripted) -> None:
    b = breaker(inner, Clock())
    inner.outcome = failing()
    for _ in range(3):
        with pytest.raises(ResolutionFailed) as info:
            b.resolve_did(ALICE)
        assert not isinstance(info.value, CircuitOpen)
    with pytest.raises(CircuitOpen, match="circuit open for plc"):
        b.resolve_did(ALICE)
    assert inner.calls == 3
    stats = b.stats()
    assert (stats["breaker.trips"], stats["breaker.rejected"], stats["breaker.open"]) == (1, 1, 1)
    assert stats["breaker.state.plc"] == OPEN


def test_a_burst_of_timeouts_between_answers_keeps_it_closed(inner: Scripted) -> None:
    clock = Clock()
    b = breaker(inner, clock)
    b.resolve_did(ALICE)  # answered at t=0
    clock.now = 0.5
    inner.outcome = failing()
    for _ in range(5):  # lookups of a few hanging DIDs time out together
        with pytest.raises(ResolutionFailed) as info:
            b.resolve_did(ALICE)
        assert not isinstance(info.value, CircuitOpen)
    assert b.breakers.state("plc") == CLOSED
    clock.now = 1.5  # nothing answered for longer than the quiet period: now it is down
    with pytest.raises(ResolutionFailed):
        b.resolve_did(ALICE)
    assert b.breakers.state("plc") == OPEN


def test_calls_that_hung_while_others_were_answered_do_not_count() -> None:
    clock = Clock()
    breakers = CircuitBreakers(threshold=3, cooldown=10, clock=clock)
    hung = [breakers.enter("plc") for _ in range(5)]  # five DIDs that never answer, at t=0
    clock.now = 0.5
    breakers.success(breakers.enter("plc"))  # the directory answers another one meanwhile
    clock.now = 10.0  # their timeouts, long after the last answer
    for ticket in hung:
        breakers.failure(ticket)
    assert breakers.state("plc") == CLOSED
    late = [breakers.enter("plc") for _ in range(3)]  # started after the last answer: an outage
    clock.now = 20.0
    for ticket in late:
        breakers.failure(ticket)
    assert breakers.state("plc") == OPEN


@pytest.mark.parametrize("answer", [DIDNotFound("gone"), DIDMismatch("other id")])
def test_answers_reset_the_count(inner: Scripted, answer: Exception) -> None:
    b = breaker(inner, Clock())
    for outcome in (failing(), failing(), raiser(answer), failing(), failing()):
        inner.outcome = outcome
        with pytest.raises((ResolutionFailed, DIDNotFound)):
            b.resolve_did(ALICE)
    assert b.breakers.state("plc") == CLOSED
    assert inner.calls == 5


def test_failures_blamed_elsewhere_do_not_count(inner: Scripted) -> None:
    b = breaker(inner, Clock(), threshold=2)
    inner.keys = ("dns", "plc")
    inner.outcome = failing("dns")
    for _ in range(2):
        with pytest.raises(ResolutionFailed):
            b.resolve_did(ALICE)
    assert b.breakers.state("dns") == OPEN
    assert b.breakers.state("plc") == CLOSED


def test_half_open_lets_one_probe_then_closes(inner: Scripted) -> None:
    clock = Clock()
    b = breaker(inner, clock)
    inner.outcome = failing()
    for _ in range(3):
        with pytest.raises(ResolutionFailed):
            b.resolve_did(ALICE)
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        b.resolve_did(ALICE)
    clock.now += 0.2
    assert b.stats()["breaker.state.plc"] == HALF_OPEN
    inner.outcome = lambda: Identity(ALICE, "alice.test")
    inner.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(b.resolve_did, ALICE)
        deadline = time.monotonic() + 5
        while inner.calls < 4:
            assert time.monotonic() < deadline
            threading.Event().wait(0.002)
        with pytest.raises(CircuitOpen):  # only one probe at a time
            b.resolve_did(ALICE)
        inner.gate.set()
        assert probe.result(timeout=5).handle == "alice.test"
    inner.gate = None
    assert b.breakers.state("plc") == CLOSED
    b.resolve_did(ALICE)
    assert inner.calls == 5


def test_failed_probe_reopens(inner: Scripted) -> None:
    clock = Clock()
    b = breaker(inner, clock)
    inner.outcome = failing()
    for _ in range(3):
        with pytest.raises(ResolutionFailed):
            b.resolve_did(ALICE)
    clock.now += 10
    with pytest.raises(ResolutionFailed) as info:
        b.resolve_did(ALICE)  # the probe, failing
    assert not isinstance(info.value, CircuitOpen)
    with pytest.raises(CircuitOpen):
        b.resolve_did(ALICE)
    assert inner.calls == 4
    clock.now += 10
    inner.outcome = lambda: Identity(ALICE, "alice.test")
    b.resolve_did(ALICE)
    assert b.breakers.state("plc") == CLOSED


def test_probe_slot_returned_on_unexpected_error(inner: Scripted) -> None:
    clock = Clock()
    b = breaker(inner, clock, threshold=1)
    inner.outcome = failing()
    with pytest.raises(ResolutionFailed):
        b.resolve_did(ALICE)
    clock.now += 10
    inner.outcome = raiser(RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        b.resolve_did(ALICE)
    inner.outcome = lambda: Identity(ALICE, "alice.test")
    b.resolve_did(ALICE)  # not "circuit open": the slot came back
    assert b.breakers.state("plc") == CLOSED


# -- over real upstreams ------------------------------------------------------------------

@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def test_hanging_plc_fails_fast_then_recovers(stub: StubServer) -> None:
    timeout, cooldown = 0.3, 1.0
    stub.document(did_document(ALICE, "alice.test"))
    directory = build_directory(local_config(
        plc_url=stub.url, read_timeout=timeout, breaker_threshold=3, breaker_cooldown=cooldown,
        failure_ttl=0,
    ))
    key = f"breaker.state.127.0.0.1:{stub.port}"
    stub.hang()
    for _ in range(3):
        with pytest.raises(ResolutionFailed) as info:
            directory.resolve_did(ALICE)
        assert not isinstance(info.value, CircuitOpen)
    assert directory.stats()[key] == OPEN
    requests_before = stub.count()

    started = time.monotonic()
    for _ in range(200):
        with pytest.raises(CircuitOpen):
            directory.resolve_did(ALICE)
    elapsed = time.monotonic() - started
    assert elapsed < 200 * timeout / 50  # far less than a timeout each (60 s)
    assert stub.count() == requests_before  # nothing reached the upstream

    stub.serve()
    deadline = time.monotonic() + cooldown + 5
    while True:
        try:
            ident = directory.resolve_did(ALICE)
            break
        except CircuitOpen:
            assert time.monotonic() < deadline, "breaker never closed"
            threading.Event().wait(0.02)  # poll interval
    assert ident.handle == "alice.test"
    stats = directory.stats()
    assert stats[key] == CLOSED and stats["breaker.trips"] == 1 and stats["breaker.open"] == 0


def test_refused_connections_open_the_circuit() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = build_directory(local_config(plc_url=f"http://127.0.0.1:{port}",
                                             breaker_threshold=2, failure_ttl=0))
    for _ in range(2):
        with pytest.raises(ResolutionFailed) as info:
            directory.resolve_did(ALICE)
        assert not isinstance(info.value, CircuitOpen)
    with pytest.raises(CircuitOpen):
        directory.resolve_did(ALICE)
    assert directory.stats()["resolution.plc.failed"] == 2


def test_dns_outage_opens_the_dns_circuit() -> None:
    with FakeDNS({"_atproto.alice.test": {"TXT": [f"did={ALICE}"]}}) as dns:
        directory = build_directory(local_config(
            dns.address, dns_timeout=0.2, breaker_threshold=2, breaker_cooldown=0.3,
            failure_ttl=0,
        ))
        claimed = Identity(ALICE, "alice.test")
        dns.down = True
        for _ in range(2):
            with pytest.raises(ResolutionFailed) as info:
                directory.verify(claimed)
            assert info.value.upstream == f"dns:{dns.address}"
        asked = dns.count()
        with pytest.raises(CircuitOpen):
            directory.verify(claimed)
        assert dns.count() == asked
        # Handles invalid on their face need no DNS and are not held up by the circuit.
        assert directory.verify(Identity(ALICE, "laptop.local")).handle == INVALID_HANDLE
        dns.down = False
        deadline = time.monotonic() + 5
        while True:
            try:
                assert directory.verify(claimed).handle_verified
                break
            except CircuitOpen:
                assert time.monotonic() < deadline, "DNS circuit never closed"
                threading.Event().wait(0.02)
        assert directory.stats()[f"breaker.state.dns:{dns.address}"] == CLOSED
