"""CacheDirectory: TTLs, bound, purge, coalescing; and build_directory end to end."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from shards.identity import (
    INVALID_HANDLE,
    CacheDirectory,
    CircuitOpen,
    DIDNotFound,
    Identity,
    IdentityConfig,
    ResolutionFailed,
    build_directory,
)
from shards.identity.mock import MockDirectory
from shards.identity.testing import StubServer, did_document, local_config
from tools.fake_dns import FakeDNS

ALICE = "did:plc:" + "a" * 24
BOB = "did:plc:" + "b" * 24


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        threading.Event().wait(0.002)  # poll interval


@pytest.fixture
def mock() -> MockDirectory:
    return MockDirectory([Identity(ALICE, "alice.test", pds="https://pds.test"),
                          Identity(BOB, "bob.test")])


def cache(inner: MockDirectory, clock: Clock, **overrides: float) -> CacheDirectory:
    return CacheDirectory(inner, IdentityConfig(**overrides), clock=clock)  # type: ignore[arg-type]


def test_hit_until_ttl(mock: MockDirectory) -> None:
    clock = Clock()
    c = cache(mock, clock, cache_ttl=100)
    first = c.resolve_did(ALICE)
    clock.now += 99
    assert c.resolve_did(ALICE) == first
    assert mock.calls[f"resolve_did:{ALICE}"] == 1
    clock.now += 2
    c.resolve_did(ALICE)
    assert mock.calls[f"resolve_did:{ALICE}"] == 2
    stats = c.stats()
    assert (stats["cache.hit"], stats["cache.miss"], stats["cache.size"]) == (1, 2, 1)


def test_not_found_cached_briefly(mock: MockDirectory) -> None:
    clock = Clock()
    c = cache(mock, clock, not_found_ttl=120)
    for _ in range(3):
        with pytest.raises(DIDNotFound):
            c.resolve_did("did:plc:" + "c" * 24)
    assert mock.calls["resolve_did:did:plc:" + "c" * 24] == 1
    clock.now += 121
    with pytest.raises(DIDNotFound):
        c.resolve_did("did:plc:" + "c" * 24)
    assert mock.calls["resolve_did:did:plc:" + "c" * 24] == 2


def test_failures_cached_for_failure_ttl_only(mock: MockDirectory) -> None:
    clock = Clock()
    mock.errors[ALICE] = ResolutionFailed("upstream down", upstream="plc")
    c = cache(mock, clock, failure_ttl=60)
    for _ in range(2):
        with pytest.raises(ResolutionFailed) as info:
            c.resolve_did(ALICE)
        assert info.value.upstream == "plc"
    assert mock.calls[f"resolve_did:{ALICE}"] == 1
    clock.now += 61
    del mock.errors[ALICE]
    assert c.resolve_did(ALICE).handle == "alice.test"


def test_failures_not_cached_with_zero_ttl_nor_circuit_open(mock: MockDirectory) -> None:
    clock = Clock()
    mock.errors[ALICE] = CircuitOpen("circuit open for plc")
    mock.errors[BOB] = ResolutionFailed("down")
    c = cache(mock, clock, failure_ttl=0)
    for _ in range(2):
        for did in (ALICE, BOB):
            with pytest.raises(ResolutionFailed):
                c.resolve_did(did)
    assert mock.calls[f"resolve_did:{ALICE}"] == 2 and mock.calls[f"resolve_did:{BOB}"] == 2
    c2 = cache(mock, clock, failure_ttl=60)
    for _ in range(2):
        with pytest.raises(CircuitOpen):
            c2.resolve_did(ALICE)
    assert mock.calls[f"resolve_did:{ALICE}"] == 4


def test_verify_cached_per_did_and_handle(mock: MockDirectory) -> None:
    clock = Clock()
    c = cache(mock, clock, invalid_handle_ttl=10)
    ident = Identity(ALICE, "Alice.Test", pds="https://pds.test")
    mock.handles["alice.test"] = ALICE
    assert c.verify(ident) == Identity(ALICE, "alice.test", True, "https://pds.test")
    moved = Identity(ALICE, "alice.test", pds="https://new-pds.test")
    assert c.verify(moved).pds == "https://new-pds.test"  # answer applied to the identity given
    assert mock.calls["verify:alice.test"] == 1
    # Another handle of the same DID is another question.
    assert c.verify(Identity(ALICE, "other.test")).handle == INVALID_HANDLE
    assert c.verify(Identity(ALICE, "other.test")).handle == INVALID_HANDLE
    assert mock.calls["verify:other.test"] == 1
    clock.now += 11  # negative answers expire sooner
    c.verify(Identity(ALICE, "other.test"))
    assert mock.calls["verify:other.test"] == 2


def test_purge_drops_all_of_a_did(mock: MockDirectory) -> None:
    c = cache(mock, Clock())
    c.resolve_did(ALICE)
    c.resolve_did(BOB)
    c.verify(Identity(ALICE, "alice.test"))
    assert len(c) == 3
    c.purge(ALICE)
    assert len(c) == 1 and mock.purged == [ALICE]
    c.resolve_did(ALICE)
    c.verify(Identity(ALICE, "alice.test"))
    c.resolve_did(BOB)
    assert mock.calls[f"resolve_did:{ALICE}"] == 2 and mock.calls["verify:alice.test"] == 2
    assert mock.calls[f"resolve_did:{BOB}"] == 1


def test_purge_while_in_flight_keeps_old_answer_out(mock: MockDirectory) -> None:
    c = cache(mock, Clock())
    mock.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.resolve_did, ALICE)
        wait_for(lambda: mock.calls[f"resolve_did:{ALICE}"] == 1)
        c.purge(ALICE)
        mock.gate.set()
        assert pending.result(timeout=5).handle == "alice.test"
    assert len(c) == 0
    c.resolve_did(ALICE)
    assert mock.calls[f"resolve_did:{ALICE}"] == 2


def test_bounded_lru(mock: MockDirectory) -> None:
    dids = [f"did:plc:{c * 24}" for c in "cdefg"]
    for did in dids:
        mock.add(Identity(did, f"{did[-1]}.test"))
    c = cache(mock, Clock(), cache_size=3)
    for did in dids[:3]:
        c.resolve_did(did)
    c.resolve_did(dids[0])  # most recently used now
    c.resolve_did(dids[3])  # evicts dids[1], the least recently used
    c.resolve_did(dids[4])  # evicts dids[2]
    assert len(c) == 3
    c.resolve_did(dids[0])
    assert mock.calls[f"resolve_did:{dids[0]}"] == 1
    c.resolve_did(dids[1])
    assert mock.calls[f"resolve_did:{dids[1]}"] == 2


def test_concurrent_errors_coalesce(mock: MockDirectory) -> None:
    c = cache(mock, Clock())
    missing = "did:plc:" + "z" * 24
    mock.gate = threading.Event()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(c.resolve_did, missing) for _ in range(20)]
        wait_for(lambda: c.stats()["cache.coalesced"] == 19)
        mock.gate.set()
        errors = [f.exception(timeout=5) for f in futures]
    assert all(isinstance(e, DIDNotFound) for e in errors)
    assert len({id(e) for e in errors}) == 20  # each thread raises its own copy
    assert mock.calls[f"resolve_did:{missing}"] == 1


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def test_hundred_concurrent_lookups_one_upstream_request(stub: StubServer) -> None:
    stub.document(did_document(ALICE, "alice.test"))
    directory = build_directory(local_config(plc_url=stub.url))
    stub.hold()
    with ThreadPoolExecutor(100) as pool:
        futures = [pool.submit(directory.resolve_did, ALICE) for _ in range(100)]
        wait_for(lambda: directory.stats()["cache.coalesced"] == 99 and stub.count() == 1)
        stub.release()
        results = {f.result(timeout=5) for f in futures}
    assert results == {Identity(ALICE, "alice.test", False, "https://pds.example.com")}
    assert stub.count(f"/{ALICE}") == 1
    stats = directory.stats()
    assert (stats["cache.miss"], stats["cache.coalesced"], stats["resolution.plc.ok"]) == (1, 99, 1)
    directory.resolve_did(ALICE)
    assert stub.count() == 1 and directory.stats()["cache.hit"] == 1


def test_build_directory_end_to_end(stub: StubServer) -> None:
    with FakeDNS({"_atproto.alice.test": {"TXT": [f"did={ALICE}"]}}) as dns:
        stub.document(did_document(ALICE, "alice.test"))
        directory = build_directory(local_config(dns.address, plc_url=stub.url))
        for _ in range(3):
            ident = directory.verify(directory.resolve_did(ALICE))
            assert ident.handle_verified and ident.complete
        assert stub.count() == 1 and dns.count() == 1
        directory.purge(ALICE)
        directory.verify(directory.resolve_did(ALICE))
        assert stub.count() == 2 and dns.count() == 2
