"""BaseDirectory against a stub PLC / did:web / well-known host and the fake DNS."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shards.identity import (
    INVALID_HANDLE,
    AddressRefused,
    BaseDirectory,
    DIDMismatch,
    DIDNotFound,
    Identity,
    ResolutionFailed,
)
from shards.identity.testing import StubServer, did_document, local_config
from tools.fake_dns import FakeDNS

ALICE = "did:plc:" + "a" * 24
BOB = "did:plc:" + "b" * 24
WELL_KNOWN = "/.well-known/atproto-did"


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    with FakeDNS() as server:
        yield server


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def directory(dns: FakeDNS, stub: StubServer, **overrides: Any) -> BaseDirectory:
    """PLC at the stub; handles and did:web hosts reach the stub through fake A records."""
    return BaseDirectory(local_config(dns.address, plc_url=stub.url, web_port=stub.port,
                                      **overrides))


# -- did:plc --------------------------------------------------------------------------------

def test_plc_document(dns: FakeDNS, stub: StubServer) -> None:
    stub.document(did_document(ALICE, "Alice.TEST", "https://pds.test"))
    base = directory(dns, stub)
    assert base.resolve_did(ALICE) == Identity(ALICE, "alice.test", False, "https://pds.test")
    assert stub.seen[-1].path == f"/{ALICE}"
    assert base.stats()["resolution.plc.ok"] == 1


@pytest.mark.parametrize("status", [404, 410])
def test_plc_gone_is_not_found(dns: FakeDNS, stub: StubServer, status: int) -> None:
    stub.route(f"/{ALICE}", {"message": "DID not registered"}, status=status)
    base = directory(dns, stub)
    with pytest.raises(DIDNotFound):
        base.resolve_did(ALICE)
    assert base.stats()["resolution.plc.not_found"] == 1


@pytest.mark.parametrize("status", [500, 503, 429, 400])
def test_plc_other_status_is_failure(dns: FakeDNS, stub: StubServer, status: int) -> None:
    stub.route(f"/{ALICE}", "nope", status=status)
    with pytest.raises(ResolutionFailed) as info:
        directory(dns, stub).resolve_did(ALICE)
    assert not isinstance(info.value, DIDNotFound)
    assert info.value.upstream == f"127.0.0.1:{stub.port}"


def test_plc_bad_json_is_failure(dns: FakeDNS, stub: StubServer) -> None:
    stub.route(f"/{ALICE}", "<html>hello</html>")
    base = directory(dns, stub)
    with pytest.raises(ResolutionFailed):
        base.resolve_did(ALICE)
    assert base.stats()["resolution.plc.failed"] == 1


def test_plc_document_for_another_did_is_mismatch(dns: FakeDNS, stub: StubServer) -> None:
    stub.document(did_document(BOB, "bob.test"), path=f"/{ALICE}")
    base = directory(dns, stub)
    with pytest.raises(DIDMismatch):
        base.resolve_did(ALICE)
    assert base.stats()["resolution.plc.mismatch"] == 1


@pytest.mark.parametrize(
    "did",
    ["not-a-did", "did:plc:short", "did:plc:" + "A" * 24, "did:key:z6Mkabc", "did:web:a.test:u:x",
     f"{ALICE}\n"],
)
def test_unresolvable_dids_are_not_found_without_requests(
    dns: FakeDNS, stub: StubServer, did: str
) -> None:
    with pytest.raises(DIDNotFound):
        directory(dns, stub).resolve_did(did)
    assert stub.count() == 0 and dns.count() == 0


# -- did:web --------------------------------------------------------------------------------

def test_did_web_document(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")
    stub.document(did_document("did:web:web.test", "web.test"), path="/.well-known/did.json")
    base = directory(dns, stub)
    assert base.resolve_did("did:web:web.test").handle == "web.test"
    assert stub.seen[-1].host == f"web.test:{stub.port}"
    assert base.stats()["resolution.web.ok"] == 1


def test_did_web_localhost_with_port(dns: FakeDNS, stub: StubServer) -> None:
    did = f"did:web:localhost%3A{stub.port}"
    stub.document(did_document(did, "carol.test"), path="/.well-known/did.json")
    base = BaseDirectory(local_config(dns.address))
    assert base.resolve_did(did).handle == "carol.test"
    assert dns.count() == 0  # localhost is never asked of DNS


def test_did_web_missing_document(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")
    with pytest.raises(DIDNotFound):
        directory(dns, stub).resolve_did("did:web:web.test")


# -- handles --------------------------------------------------------------------------------

def claimed(did: str = ALICE, handle: str = "alice.test") -> Identity:
    return Identity(did, handle, False, "https://pds.test")


def test_dns_verified_handle(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_txt("_atproto.alice.test", f"did={ALICE}", "unrelated=1")
    base = directory(dns, stub)
    assert base.verify(claimed(handle="Alice.Test")) == Identity(ALICE, "alice.test", True,
                                                                 "https://pds.test")
    assert stub.count() == 0
    assert base.stats()["resolution.dns.ok"] == 1


def test_https_verified_handle(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("alice.test", "127.0.0.1")  # no TXT record: DNS says NXDOMAIN for _atproto
    stub.route(WELL_KNOWN, f"{ALICE}\n")
    base = directory(dns, stub)
    assert base.verify(claimed()).handle_verified is True
    assert stub.seen[-1].host == f"alice.test:{stub.port}"
    assert dns.count("_atproto.alice.test", "TXT") == 1
    stats = base.stats()
    assert stats["resolution.dns.not_found"] == 1 and stats["resolution.https.ok"] == 1


def test_dns_pointing_elsewhere_is_invalid(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_txt("_atproto.alice.test", f"did={BOB}")
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, ALICE)  # DNS answered: HTTPS is not asked
    base = directory(dns, stub)
    result = base.verify(claimed())
    assert (result.handle, result.handle_verified) == (INVALID_HANDLE, False)
    assert stub.count() == 0
    assert base.stats()["resolution.dns.mismatch"] == 1


def test_https_pointing_elsewhere_is_invalid(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, BOB)
    assert directory(dns, stub).verify(claimed()).handle == INVALID_HANDLE


def test_nothing_anywhere_is_invalid(dns: FakeDNS, stub: StubServer) -> None:
    # NXDOMAIN for the TXT name and for the host itself: definitively no claim.
    assert directory(dns, stub).verify(claimed()).handle == INVALID_HANDLE
    dns.add_a("alice.test", "127.0.0.1")  # host exists, well-known is 404
    assert directory(dns, stub).verify(claimed()).handle == INVALID_HANDLE
    assert stub.count(WELL_KNOWN) == 1


@pytest.mark.parametrize(
    "body", ["<html>welcome</html>", "", "did:nope\n" + ALICE, "x" * 10_000],
)
def test_well_known_without_a_did_is_invalid(dns: FakeDNS, stub: StubServer, body: str) -> None:
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, body)
    assert directory(dns, stub).verify(claimed()).handle == INVALID_HANDLE


def test_ambiguous_txt_falls_back_to_https(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_txt("_atproto.alice.test", f"did={BOB}", f"did={ALICE}")
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, f"  {ALICE}  \nextra")
    assert directory(dns, stub).verify(claimed()).handle_verified is True
    assert stub.count(WELL_KNOWN) == 1


def test_well_known_server_error_is_failure(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, "oops", status=503)
    base = directory(dns, stub)
    with pytest.raises(ResolutionFailed):
        base.verify(claimed())
    assert base.stats()["resolution.https.failed"] == 1


def test_dns_failure_with_https_404_is_not_definitive(dns: FakeDNS, stub: StubServer) -> None:
    dns.fail("_atproto.alice.test", "servfail")
    dns.add_a("alice.test", "127.0.0.1")
    with pytest.raises(ResolutionFailed) as info:
        directory(dns, stub).verify(claimed())
    assert info.value.upstream == f"dns:{dns.address}"
    assert stub.count(WELL_KNOWN) == 1


def test_dns_failure_with_https_match_verifies(dns: FakeDNS, stub: StubServer) -> None:
    dns.fail("_atproto.alice.test", "drop")  # a timeout
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, ALICE)
    base = directory(dns, stub, dns_timeout=0.2)
    assert base.verify(claimed()).handle_verified is True
    assert base.stats()["resolution.dns.failed"] == 1


def test_well_known_host_down_is_failure(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("alice.test", "127.0.0.1")
    stub.hang()
    with pytest.raises(ResolutionFailed):
        directory(dns, stub, read_timeout=0.2).verify(claimed())


def test_private_well_known_host_refused_without_flag(dns: FakeDNS, stub: StubServer) -> None:
    # The handle's host is the very address and port of the operator's PLC directory: named by
    # the network's data, it is refused all the same.
    dns.add_a("alice.test", "127.0.0.1")
    stub.route(WELL_KNOWN, ALICE)
    stub.document(did_document(ALICE, "alice.test"))
    base = directory(dns, stub, allow_private_addresses=False)
    assert base.resolve_did(ALICE).handle == "alice.test"
    connections = stub.connections
    with pytest.raises(AddressRefused) as info:
        base.verify(claimed())
    assert info.value.reason == "refused loopback address"
    assert stub.connections == connections and stub.count(WELL_KNOWN) == 0
    assert base.stats()["resolution.https.refused"] == 1


@pytest.mark.parametrize("handle", [INVALID_HANDLE, "laptop.local", "no_underscores.test", ALICE])
def test_unverifiable_handles_are_invalid_without_lookups(
    dns: FakeDNS, stub: StubServer, handle: str
) -> None:
    assert directory(dns, stub).verify(claimed(handle=handle)).handle == INVALID_HANDLE
    assert dns.count() == 0 and stub.count() == 0


def test_longest_handle_has_no_txt_name_but_is_checked(dns: FakeDNS, stub: StubServer) -> None:
    handle = ".".join(["a" * 63] * 3 + ["b" * 56]) + ".test"  # 253 characters
    assert len(handle) == 253
    result = directory(dns, stub).verify(claimed(handle=handle))
    assert result.handle == INVALID_HANDLE  # _atproto.<handle> cannot exist; host is NXDOMAIN
    assert dns.count(handle, "A") == 1
