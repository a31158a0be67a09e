"""shards.identity.dnsclient: TXT and address lookups, TTLs, TCP fallback, failures, CNAMEs,
and answers that are not ours (wrong id, wrong question, garbage) being ignored."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest

from shards.identity import ResolutionFailed
from shards.identity.dnsclient import DnsClient, HostNotFound
from shards.identity.testing import local_config
from tools.fake_dns import FakeDNS

DID = "did:plc:" + "a" * 24


@pytest.fixture
def server() -> Iterator[FakeDNS]:
    with FakeDNS({"_atproto.alice.test": {"TXT": [f"did={DID}", "other"]},
                  "alice.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
                  "v4only.test": {"A": ["127.0.0.2"]},
                  "empty.test": {"A": []}}, ttl=42) as s:
        yield s


def client(address: str, **overrides: float) -> DnsClient:
    return DnsClient(local_config(address, **overrides))


def test_txt_values_and_absent_names(server: FakeDNS) -> None:
    dns_client = client(server.address)
    assert sorted(dns_client.txt("_atproto.alice.test")) == [f"did={DID}", "other"]
    assert dns_client.txt("_atproto.ALICE.Test") != []  # names ignore case
    assert dns_client.txt("_atproto.nobody.test") == []  # NXDOMAIN
    assert dns_client.txt("alice.test") == []  # the name exists, without TXT
    assert [q.transport for q in server.queries] == ["udp"] * 4


def test_addresses_carry_their_ttl(server: FakeDNS) -> None:
    dns_client = client(server.address)
    both = dns_client.addresses("alice.test")
    assert both == ["127.0.0.1", "::1"] and both.ttl == 42
    v4 = dns_client.addresses("v4only.test")
    assert v4 == ["127.0.0.2"] and v4.ttl == 42
    for missing in ("nobody.test", "empty.test"):
        with pytest.raises(HostNotFound):
            dns_client.addresses(missing)
    literal = dns_client.addresses("127.0.0.9")
    assert literal == ["127.0.0.9"] and literal.ttl == float("inf")
    assert server.count("127.0.0.9") == 0


def test_truncated_udp_falls_back_to_tcp(server: FakeDNS) -> None:
    values = [f"value-{i}-" + "y" * 60 for i in range(20)]
    server.set("many.test", "TXT", values)
    assert sorted(client(server.address).txt("many.test")) == sorted(values)
    assert [q.transport for q in server.queries if q.name == "many.test"] == ["udp", "tcp"]


@pytest.mark.parametrize("how", ["servfail", "refused"])
def test_server_errors_fail_at_once(server: FakeDNS, how: str) -> None:
    server.fail("_atproto.alice.test", how)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(ResolutionFailed) as info:
        client(server.address, dns_timeout=2.0).txt("_atproto.alice.test")
    assert time.monotonic() - started < 1.0
    assert not isinstance(info.value, HostNotFound)
    assert info.value.upstream == f"dns:{server.address}"
    assert server.count("_atproto.alice.test") == 1


def test_silent_server_asked_again_until_the_lifetime(server: FakeDNS) -> None:
    server.down = True
    started = time.monotonic()
    with pytest.raises(ResolutionFailed, match="timeout") as info:
        client(server.address, dns_timeout=0.4).addresses("alice.test")
    assert 0.35 < time.monotonic() - started < 1.5
    assert info.value.upstream == f"dns:{server.address}"
    assert server.count("alice.test", "A") == 2  # one retry in the lifetime, no AAAA after


def test_name_too_long_does_not_exist(server: FakeDNS) -> None:
    dns_client = client(server.address)
    too_long = "_atproto." + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])
    assert dns_client.txt(too_long) == []
    assert server.count() == 0


# -- a scripted server: answers crafted with dnspython, for what FakeDNS cannot do ----------

Responder = Callable[[dns.message.Message], list[bytes]]


class Scripted:
    """UDP on 127.0.0.1: each query gets the datagrams `respond` returns, in order."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            for datagram in self.respond(dns.message.from_wire(wire)):
                self.sock.sendto(datagram, peer)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def answer(query: dns.message.Message, *rrsets: tuple[str, int, str, str]) -> dns.message.Message:
    response = dns.message.make_response(query)
    for name, ttl, rdtype, value in rrsets:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, value))
    return response


def test_cname_chain_followed_with_least_ttl() -> None:
    def respond(query: dns.message.Message) -> list[bytes]:
        name = query.question[0].name.to_text()
        if name == "_atproto.alias.test.":
            return [answer(query, ("_atproto.alias.test.", 300, "CNAME", "middle.test."),
                           ("middle.test.", 300, "CNAME", "target.test."),
                           ("target.test.", 300, "TXT", f'"did={DID}"')).to_wire()]
        if name == "host.test.":
            rdtype = query.question[0].rdtype
            if rdtype == dns.rdatatype.A:
                return [answer(query, ("host.test.", 30, "CNAME", "real.test."),
                               ("real.test.", 300, "A", "127.0.0.3")).to_wire()]
            return [answer(query, ("host.test.", 30, "CNAME", "real.test.")).to_wire()]
        if name == "loop.test.":
            return [answer(query, ("loop.test.", 300, "CNAME", "loop.test.")).to_wire()]
        return [answer(query).to_wire()]

    with Scripted(respond) as server:
        dns_client = client(server.address, dns_timeout=1.0)
        assert dns_client.txt("_atproto.alias.test") == [f"did={DID}"]
        found = dns_client.addresses("host.test")
        assert found == ["127.0.0.3"] and found.ttl == 30
        started = time.monotonic()
        with pytest.raises(ResolutionFailed, match="CNAME chain"):
            dns_client.txt("loop.test")
        assert time.monotonic() - started < 0.5  # a failing server, not a silent one


def test_answers_not_to_our_question_are_ignored() -> None:
    def respond(query: dns.message.Message) -> list[bytes]:
        good = answer(query, ("_atproto.alice.test.", 60, "TXT", f'"did={DID}"'))
        wrong_id = answer(query, ("_atproto.alice.test.", 60, "TXT", '"did=did:plc:forged"'))
        wrong_id.id = (query.id + 1) % 65536
        other = dns.message.make_query("_atproto.mallory.test", "TXT")
        other.id = query.id
        wrong_question = answer(other, ("_atproto.mallory.test.", 60, "TXT", '"did=x"'))
        not_a_response = dns.message.make_query("_atproto.alice.test", "TXT")
        not_a_response.id = query.id
        # The server echoes the question in another case (0x20 mixing): still ours.
        good.question[0] = dns.rrset.RRset(
            dns.name.from_text("_ATPROTO.Alice.TEST."), dns.rdataclass.IN, dns.rdatatype.TXT)
        overlong = bytearray(good.to_wire())  # its TXT string claims more than its record holds
        overlong[-len(f"did={DID}") - 1] += 1
        return [wrong_id.to_wire(), wrong_question.to_wire(), not_a_response.to_wire(),
                b"\x00\x01garbage", query.to_wire()[:5], bytes(overlong), good.to_wire()]

    with Scripted(respond) as server:
        assert client(server.address).txt("_atproto.alice.test") == [f"did={DID}"]


def test_nxdomain_with_alias_is_not_found() -> None:
    def respond(query: dns.message.Message) -> list[bytes]:
        response = answer(query, ("gone.test.", 60, "CNAME", "nowhere.test."))
        response.set_rcode(dns.rcode.NXDOMAIN)
        return [response.to_wire()]

    with Scripted(respond) as server:
        with pytest.raises(HostNotFound):
            client(server.address).addresses("gone.test")
