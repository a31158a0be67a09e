"""tools.fake_dns: the DNS server the identity tests (and others) run against."""
from __future__ import annotations

from collections.abc import Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tools.fake_dns import FakeDNS


def resolver(server: FakeDNS, timeout: float = 0.5) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.timeout = r.lifetime = timeout
    r.cache = None
    return r


@pytest.fixture
def server() -> Iterator[FakeDNS]:
    with FakeDNS({"_atproto.alice.test": {"TXT": ["did=did:plc:alice", "other"]},
                  "alice.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]}}) as s:
        yield s


def test_txt_a_aaaa_answers(server: FakeDNS) -> None:
    r = resolver(server)
    txt = sorted(b"".join(x.strings).decode() for x in r.resolve("_atproto.alice.test", "TXT"))
    assert txt == ["did=did:plc:alice", "other"]
    assert [x.address for x in r.resolve("alice.test", "A")] == ["127.0.0.1"]
    assert [x.address for x in r.resolve("ALICE.test.", "AAAA")] == ["::1"]
    assert server.count("alice.test") == 2
    assert server.count("_atproto.alice.test", "TXT") == 1
    assert server.count() == 3


def test_nxdomain_and_no_data(server: FakeDNS) -> None:
    r = resolver(server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nobody.test", "TXT")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("alice.test", "TXT")


def test_long_txt_and_tcp(server: FakeDNS) -> None:
    long_value = "did=" + "x" * 600
    server.add_txt("long.test", long_value)
    answer = dns.query.tcp(dns.message.make_query("long.test", "TXT"), server.host,
                           port=server.port, timeout=1)
    assert b"".join(answer.answer[0][0].strings).decode() == long_value
    assert server.queries[-1].transport == "tcp"


def test_truncated_udp_falls_back_to_tcp(server: FakeDNS) -> None:
    server.set("many.test", "TXT", [f"value-{i}-" + "y" * 60 for i in range(20)])
    answer = resolver(server).resolve("many.test", "TXT")
    assert len(answer) == 20
    assert [q.transport for q in server.queries if q.name == "many.test"] == ["udp", "tcp"]


def test_failures_and_outage(server: FakeDNS) -> None:
    r = resolver(server, timeout=0.3)
    server.fail("alice.test", "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        r.resolve("alice.test", "A")
    server.fail("alice.test", None)
    assert r.resolve("alice.test", "A")
    server.down = True
    with pytest.raises(dns.exception.Timeout):
        r.resolve("alice.test", "A")
    assert server.count("alice.test", "A") >= 3


def test_remove_and_update(server: FakeDNS) -> None:
    r = resolver(server)
    server.remove("alice.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("alice.test", "A")
    server.remove("alice.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("alice.test", "AAAA")
    server.add_a("alice.test", "127.0.0.2")
    assert [x.address for x in r.resolve("alice.test", "A")] == ["127.0.0.2"]


def test_raw_rcode_refused(server: FakeDNS) -> None:
    server.fail("alice.test", "refused")
    reply = dns.query.udp(dns.message.make_query("alice.test", "A"), server.host,
                          port=server.port, timeout=1)
    assert reply.rcode() == dns.rcode.REFUSED
