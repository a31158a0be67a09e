"""tools.fake_dns: the DNS server the identity tests (and others) run against."""
from __future__ import annotations

from collections.abc import Iterator

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tools.fake_dns import FakeDNS, PlainQuery


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


def _query_wire(name: str, rdtype: str, **options: object) -> bytes:
    query = dns.message.make_query(name, rdtype, **options)
    return query.to_wire()


RECORDS = {"_atproto.alice.test": {"TXT": ["did=did:plc:alice", "other", "other"]},
           "alice.test": {"A": ["127.0.0.1", "127.0.0.1", "10.0.0.2"],
                          "AAAA": ["::1", "0::1", "2001:db8::5"]},
           "empty.test": {"TXT": [""]},
           "long.test": {"TXT": ["did=" + "x" * 600]},
           "many.test": {"TXT": [f"value-{i}-" + "y" * 60 for i in range(20)]},
           "nodata.test": {},
           "broken.test": {"A": ["127.0.0.1"]}}
NAMES = [*RECORDS, "_ATProto.Alice.TEST.", "nobody.test", "refusing.test", "x-y_z.alice.test"]
VARIANTS: list[dict[str, object]] = [
    {}, {"flags": 0}, {"use_edns": 0}, {"use_edns": 0, "payload": 1232},
    {"use_edns": 0, "payload": 100}, {"use_edns": 0, "payload": 1232, "want_dnssec": True}]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_plain_answers_are_what_dnspython_builds(transport: str) -> None:
    """Plain queries are answered by hand: the same answer dnspython builds, up to the order of
    the records (dnspython shuffles them)."""
    with FakeDNS(RECORDS) as server:
        server.fail("broken.test", "servfail")
        server.fail("refusing.test", "refused")
        checked = 0
        for name in NAMES:
            for rdtype in ("TXT", "A", "AAAA"):
                for options in VARIANTS:
                    case = (name, rdtype, options)
                    wire = _query_wire(name, rdtype, **options)
                    assert PlainQuery.parse(wire) is not None, case
                    ours = server._answer(wire, transport)
                    theirs = server._answer_with_dnspython(wire, transport)
                    assert ours is not None and theirs is not None
                    assert (ours[:12], len(ours)) == (theirs[:12], len(theirs)), case
                    mine, reference = dns.message.from_wire(ours), dns.message.from_wire(theirs)
                    assert mine == reference, case
                    assert (mine.edns, mine.payload) == (reference.edns, reference.payload)
                    checked += 1
        assert server.count() == 2 * checked


def test_other_queries_go_through_dnspython(server: FakeDNS) -> None:
    server.set("mail.test", "MX", ["10 mx.mail.test."])
    with_option = _query_wire("alice.test", "A", use_edns=0,
                              options=[dns.edns.GenericOption(65001, b"x")])
    for wire in (_query_wire("mail.test", "MX"), with_option, _query_wire("we\\.ird.test", "A")):
        assert PlainQuery.parse(wire) is None
    reply = dns.query.udp(dns.message.make_query("mail.test", "MX"), server.host,
                          port=server.port, timeout=1)
    assert reply.answer[0][0].exchange == dns.name.from_text("mx.mail.test.")
    assert server.count("mail.test", "MX") == 1


def test_malformed_and_response_datagrams_are_ignored(server: FakeDNS) -> None:
    query = _query_wire("alice.test", "A")
    response = bytearray(query)
    response[2] |= 0x80  # QR: a response, not a query
    for wire in (b"", b"\x00" * 11, query[:-1], query + b"junk", bytes(response)):
        assert server._answer(wire, "udp") is None
    reply = dns.query.udp(dns.message.make_query("alice.test", "A"), server.host,
                          port=server.port, timeout=1)
    assert reply.rcode() == dns.rcode.NOERROR
