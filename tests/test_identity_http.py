"""shards.identity.http: address policy, pinning, size caps, redirects, timeouts; all on 127.0.0.1."""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shards.identity import AddressRefused, BaseDirectory, DIDNotFound, ResolutionFailed
from shards.identity import http as http_mod
from shards.identity.addresses import Trust, address_kind, is_public_address, preferred_address
from shards.identity.dnsclient import DnsClient, HostNotFound
from shards.identity.http import HttpFetcher, ResponseTooLarge
from shards.identity.testing import StubServer, did_document, local_config
from tools.fake_dns import FakeDNS

PLC = "did:plc:" + "a" * 24
MB = 1024 * 1024


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    with FakeDNS() as server:
        yield server


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("::1", False),
     ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
     ("fe80::1", False), ("fc00::1", False), ("100.64.0.1", False), ("0.0.0.0", False),
     ("224.0.0.1", False), ("255.255.255.255", False), ("192.0.2.1", False),
     ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", False), ("2002:7f00:1::", False),
     ("64:ff9b::7f00:1", False), ("not-an-ip", False)],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("address", "kind"),
    [("8.8.8.8", "public"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
     ("10.1.2.3", "private"), ("fc00::1", "private"), ("169.254.169.254", "link-local"),
     ("fe80::1", "link-local"), ("100.64.0.1", "shared"), ("0.0.0.0", "unspecified"),
     ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("::ffff:10.0.0.1", "private"),
     ("2002:7f00:1::", "loopback"), ("not-an-ip", "invalid")],
)
def test_address_kind_names_why_an_address_is_not_public(address: str, kind: str) -> None:
    assert address_kind(address) == kind


def test_preferred_address_is_ipv4_first() -> None:
    assert preferred_address(["::1", "127.0.0.1"]) == "127.0.0.1"
    assert preferred_address(["::1"]) == "::1"


def test_operator_named_plc_on_loopback_is_used_without_flag(stub: StubServer) -> None:
    stub.document(did_document(PLC, "alice.test"))
    stub.route("/moved", status=302, headers={"Location": f"{stub.url}/{PLC}"})
    base = BaseDirectory(local_config(plc_url=stub.url, allow_private_addresses=False))
    assert base.resolve_did(PLC).handle == "alice.test"
    assert base.stats()["resolution.plc.ok"] == 1
    # A redirect that stays on the operator's endpoint is still the operator's.
    fetcher = HttpFetcher(local_config(allow_private_addresses=False),
                          DnsClient(local_config()))
    moved = fetcher.get(f"{stub.url}/moved", max_bytes=MB, trust=Trust.OPERATOR)
    assert moved.status == 200 and PLC.encode() in moved.body
    with pytest.raises(AddressRefused):  # the same URL, named by the network's data
        fetcher.get(f"{stub.url}/{PLC}", max_bytes=MB)


@pytest.mark.parametrize("target", ["ip", "name"])
def test_redirect_from_operator_plc_to_elsewhere_is_vetted(
    dns: FakeDNS, stub: StubServer, target: str
) -> None:
    with StubServer() as inward:
        inward.document(did_document(PLC, "alice.test"))
        dns.add_a("inward.test", "127.0.0.1")
        host = "127.0.0.1" if target == "ip" else "inward.test"
        moved = f"http://{host}:{inward.port}/{PLC}"
        stub.route(f"/{PLC}", status=302, headers={"Location": moved})
        base = BaseDirectory(local_config(dns.address, plc_url=stub.url,
                                          allow_private_addresses=False))
        with pytest.raises(AddressRefused, match="loopback address 127.0.0.1"):
            base.resolve_did(PLC)
        assert stub.count(f"/{PLC}") == 1
        assert inward.connections == 0
        stats = base.stats()
        assert stats["resolution.plc.refused"] == 1 and stats["refused.loopback"] == 1
        allowed = BaseDirectory(local_config(dns.address, plc_url=stub.url))
        assert allowed.resolve_did(PLC).handle == "alice.test"  # the flag lets it through
        assert inward.connections == 1


def test_private_did_web_refused_without_flag(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")
    stub.document(did_document("did:web:web.test", "bob.test"), path="/.well-known/did.json")
    base = BaseDirectory(local_config(dns.address, web_port=stub.port,
                                      allow_private_addresses=False))
    with pytest.raises(AddressRefused):
        base.resolve_did("did:web:web.test")
    assert dns.count("web.test", "A") == 1
    assert stub.connections == 0


def test_any_non_public_address_refuses_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoAddresses(DnsClient):
        def addresses(self, host: str) -> list[str]:
            return ["8.8.8.8", "127.0.0.1"]

    def no_connection(*args: object) -> None:
        pytest.fail("a refused address must not be connected to")

    monkeypatch.setattr(HttpFetcher, "_connect", no_connection)
    config = local_config(allow_private_addresses=False)
    fetcher = HttpFetcher(config, TwoAddresses(config))
    with pytest.raises(AddressRefused):
        fetcher.get("http://mixed.test/x", max_bytes=100)


def test_pinned_to_vetted_address_with_name_in_host_header(dns: FakeDNS, stub: StubServer) -> None:
    # web.test exists only in the fake DNS: the system resolver could not have found it.
    did = f"did:web:web.test%3A{stub.port}"
    dns.add_a("web.test", "127.0.0.1")
    stub.document(did_document(did, "bob.test"), path="/.well-known/did.json")
    base = BaseDirectory(local_config(dns.address))
    assert base.resolve_did(did).handle == "bob.test"
    assert stub.seen[-1].host == f"web.test:{stub.port}"
    assert dns.count("web.test", "A") == 1


def test_streamed_oversized_document_cut_off(stub: StubServer) -> None:
    streamed = stub.stream(f"/{PLC}", 10 * MB, pause=0.002)
    base = BaseDirectory(local_config(plc_url=stub.url))
    started = time.monotonic()
    with pytest.raises(ResponseTooLarge):
        base.resolve_did(PLC)
    assert time.monotonic() - started < 2
    assert streamed.done.wait(5), "server never noticed the client leaving"
    assert streamed.aborted
    assert streamed.sent < 2 * MB
    assert base.stats()["resolution.plc.failed"] == 1


def test_declared_oversized_document_not_read(stub: StubServer) -> None:
    streamed = stub.stream(f"/{PLC}", 10 * MB, pause=0.002, declare_length=True)
    base = BaseDirectory(local_config(plc_url=stub.url))
    with pytest.raises(ResponseTooLarge, match="Content-Length"):
        base.resolve_did(PLC)
    assert streamed.done.wait(5)
    assert streamed.aborted and streamed.sent < 2 * MB


def test_cap_is_inclusive(stub: StubServer) -> None:
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    stub.route("/exact", b"x" * 100)
    assert fetcher.get(f"{stub.url}/exact", max_bytes=100).body == b"x" * 100
    with pytest.raises(ResponseTooLarge):
        fetcher.get(f"{stub.url}/exact", max_bytes=99)


def test_slow_upstream_times_out(stub: StubServer) -> None:
    stub.hang()
    base = BaseDirectory(local_config(plc_url=stub.url, read_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(ResolutionFailed) as info:
        base.resolve_did(PLC)
    assert 0.25 < time.monotonic() - started < 2
    assert info.value.upstream == f"127.0.0.1:{stub.port}"


def test_a_fetch_ends_at_its_total_timeout_even_within_one_read(stub: StubServer) -> None:
    stub.hang()  # one read could wait 5 s; the whole fetch may take 0.3
    base = BaseDirectory(local_config(plc_url=stub.url, read_timeout=5.0, total_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(ResolutionFailed, match="timed out|in time"):
        base.resolve_did(PLC)
    assert 0.25 < time.monotonic() - started < 2


def test_redirects_followed_within_bound(stub: StubServer) -> None:
    stub.route(f"/{PLC}", status=302, headers={"Location": "/moved"})
    stub.route("/moved", status=301, headers={"Location": f"{stub.url}/final"})
    stub.document(did_document(PLC, "alice.test"), path="/final")
    assert BaseDirectory(local_config(plc_url=stub.url)).resolve_did(PLC).handle == "alice.test"
    with pytest.raises(ResolutionFailed, match="redirects"):
        BaseDirectory(local_config(plc_url=stub.url, max_redirects=1)).resolve_did(PLC)


def test_redirect_target_is_vetted_again(
    dns: FakeDNS, stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend 127.0.0.1 is public and 127.0.0.2 private: the first hop passes, the second not.
    monkeypatch.setattr(http_mod, "address_kind",
                        lambda a: "public" if a == "127.0.0.1" else "private")
    dns.add_a("first.test", "127.0.0.1")
    dns.add_a("second.test", "127.0.0.2")
    stub.route("/.well-known/did.json", status=302,
               headers={"Location": f"http://second.test:{stub.port}/.well-known/did.json"})
    base = BaseDirectory(local_config(dns.address, web_port=stub.port,
                                      allow_private_addresses=False))
    with pytest.raises(AddressRefused):
        base.resolve_did("did:web:first.test")
    assert stub.count() == 1
    assert dns.count("second.test", "A") == 1


def test_redirect_to_missing_host(dns: FakeDNS, stub: StubServer) -> None:
    stub.route(f"/{PLC}", status=307, headers={"Location": "http://gone.test/x"})
    with pytest.raises(ResolutionFailed) as info:
        BaseDirectory(local_config(dns.address, plc_url=stub.url)).resolve_did(PLC)
    assert isinstance(info.value.__cause__, HostNotFound)


def test_did_web_host_nxdomain_is_not_found(dns: FakeDNS) -> None:
    base = BaseDirectory(local_config(dns.address))
    with pytest.raises(DIDNotFound):
        base.resolve_did("did:web:nowhere.test")
    assert base.stats()["resolution.web.not_found"] == 1


def test_dns_outage_blames_dns(dns: FakeDNS) -> None:
    dns.down = True
    base = BaseDirectory(local_config(dns.address, dns_timeout=0.3))
    with pytest.raises(ResolutionFailed) as info:
        base.resolve_did("did:web:web.test")
    assert info.value.upstream == f"dns:{dns.address}"
    assert not isinstance(info.value, DIDNotFound)


# -- TLS: the pinned connection still checks the certificate against the name ---------------

def _make_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_stub(tmp_path: Path) -> Iterator[tuple[StubServer, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = _make_cert(tmp_path, "secure.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with StubServer(ssl_context=context) as server:
        yield server, cert


def test_tls_pinned_connection_verifies_the_name(dns: FakeDNS, tls_stub: tuple[StubServer, Path]) -> None:
    stub, cert = tls_stub
    dns.add_a("secure.test", "127.0.0.1")
    dns.add_a("other.test", "127.0.0.1")
    stub.document(did_document("did:web:secure.test", "carol.test"), path="/.well-known/did.json")
    base = BaseDirectory(local_config(dns.address, web_scheme="https", web_port=stub.port,
                                      ca_bundle=str(cert)))
    assert base.resolve_did("did:web:secure.test").handle == "carol.test"
    assert stub.seen[-1].host == f"secure.test:{stub.port}"
    # Same address, but the certificate is not for other.test: refused by the TLS check.
    stub.document(did_document("did:web:other.test", "dave.test"), path="/.well-known/did.json")
    with pytest.raises(ResolutionFailed, match="(?i)certificate|hostname"):
        base.resolve_did("did:web:other.test")


def test_tls_answer_that_never_comes_times_out(dns: FakeDNS,
                                               tls_stub: tuple[StubServer, Path]) -> None:
    stub, cert = tls_stub
    dns.add_a("secure.test", "127.0.0.1")
    stub.hang()
    base = BaseDirectory(local_config(dns.address, web_scheme="https", web_port=stub.port,
                                      ca_bundle=str(cert), read_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(ResolutionFailed, match="timed out"):
        base.resolve_did("did:web:secure.test")
    assert 0.25 < time.monotonic() - started < 2


def test_https_to_http_redirect_refused(dns: FakeDNS, tls_stub: tuple[StubServer, Path]) -> None:
    stub, cert = tls_stub
    dns.add_a("secure.test", "127.0.0.1")
    stub.route("/.well-known/did.json", status=302,
               headers={"Location": "http://secure.test/.well-known/did.json"})
    base = BaseDirectory(local_config(dns.address, web_scheme="https", web_port=stub.port,
                                      ca_bundle=str(cert)))
    with pytest.raises(ResolutionFailed, match="refusing redirect"):
        base.resolve_did("did:web:secure.test")
    assert stub.count() == 1


# -- vetted addresses are reused for their TTL, then looked up and vetted again -------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fetcher(dns: FakeDNS, clock: Clock, **overrides: object) -> HttpFetcher:
    config = local_config(dns.address, **overrides)
    return HttpFetcher(config, DnsClient(config), clock=clock)


def test_vetted_address_reused_for_its_dns_ttl(stub: StubServer) -> None:
    with FakeDNS({"web.test": {"A": ["127.0.0.1"]}}, ttl=60) as dns:
        clock = Clock()
        fetcher = _fetcher(dns, clock)
        stub.route("/x", b"ok")
        url = f"http://web.test:{stub.port}/x"
        assert fetcher.get(url, max_bytes=10).body == b"ok"
        clock.now += 59
        assert fetcher.get(url, max_bytes=10).body == b"ok"
        assert dns.count("web.test", "A") == 1
        clock.now += 2  # past the TTL
        assert fetcher.get(url, max_bytes=10).body == b"ok"
        assert dns.count("web.test", "A") == 2
        assert stub.count("/x") == 3


def test_address_ttl_caps_the_dns_ttl_and_zero_disables(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")  # TTL 60
    stub.route("/x", b"ok")
    url = f"http://web.test:{stub.port}/x"
    clock = Clock()
    capped = _fetcher(dns, clock, address_ttl=10.0)
    capped.get(url, max_bytes=10)
    clock.now += 11
    capped.get(url, max_bytes=10)
    assert dns.count("web.test", "A") == 2
    never = _fetcher(dns, clock, address_ttl=0.0)
    never.get(url, max_bytes=10)
    never.get(url, max_bytes=10)
    assert dns.count("web.test", "A") == 4


def test_rebinding_to_private_address_refused_once_the_ttl_is_over(
    dns: FakeDNS, stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend 127.0.0.1 is public and 127.0.0.2 private.
    monkeypatch.setattr(http_mod, "address_kind",
                        lambda a: "public" if a == "127.0.0.1" else "private")
    dns.add_a("web.test", "127.0.0.1")
    stub.route("/x", b"ok")
    url = f"http://web.test:{stub.port}/x"
    clock = Clock()
    fetcher = _fetcher(dns, clock, allow_private_addresses=False)
    assert fetcher.get(url, max_bytes=10).body == b"ok"
    dns.set("web.test", "A", ["127.0.0.2"])  # the name now points inward
    clock.now += 30
    assert fetcher.get(url, max_bytes=10).body == b"ok"  # still the address vetted before
    assert dns.count("web.test", "A") == 1
    clock.now += 31
    with pytest.raises(AddressRefused):
        fetcher.get(url, max_bytes=10)
    assert dns.count("web.test", "A") == 2
    assert stub.count("/x") == 2
    with pytest.raises(AddressRefused):  # refusals are not remembered as vetted
        fetcher.get(url, max_bytes=10)
    assert dns.count("web.test", "A") == 3


def test_transport_failure_forgets_the_vetted_address(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")
    stub.route("/x", b"ok")
    url = f"http://web.test:{stub.port}/x"
    fetcher = _fetcher(dns, Clock(), read_timeout=0.3)
    fetcher.get(url, max_bytes=10)
    stub.hang()
    with pytest.raises(ResolutionFailed):
        fetcher.get(url, max_bytes=10)
    stub.serve()
    assert fetcher.get(url, max_bytes=10).body == b"ok"
    assert dns.count("web.test", "A") == 2  # looked up again after the failure


def test_keep_alive_connection_reused_across_fetches(stub: StubServer) -> None:
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    stub.route("/x", b"ok")
    for _ in range(5):
        assert fetcher.get(f"{stub.url}/x", max_bytes=10).body == b"ok"
    assert stub.connections == 1


def test_connection_closed_while_idle_is_replaced(stub: StubServer) -> None:
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    stub.route("/x", b"ok", drop=True)
    for _ in range(3):  # each answer is followed by the server closing the pooled connection
        assert fetcher.get(f"{stub.url}/x", max_bytes=10).body == b"ok"
    assert stub.count("/x") == 3 and stub.connections == 3


def test_many_threads_share_one_fetcher(dns: FakeDNS, stub: StubServer) -> None:
    dns.add_a("web.test", "127.0.0.1")
    for i in range(200):
        stub.route(f"/{i}", str(i))
    fetcher = _fetcher(dns, Clock())

    def fetch(i: int) -> bytes:
        return fetcher.get(f"http://web.test:{stub.port}/{i}", max_bytes=10).body

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(fetch, range(200)))
    assert bodies == [str(i).encode() for i in range(200)]
    assert dns.count("web.test", "A") <= 8  # only the first fetches of each thread may ask
    assert stub.connections <= 8


# -- framing: chunked bodies, bodies that end with the connection, unsafe targets -----------

@pytest.fixture
def raw_server() -> Iterator[tuple[str, list[bytes]]]:
    """Answers each connection's first request with the next canned bytes, then closes."""
    answers: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", answers
    listener.close()


def test_chunked_body_is_joined(raw_server: tuple[str, list[bytes]]) -> None:
    url, answers = raw_server
    answers.append(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    assert fetcher.get(f"{url}/x", max_bytes=100).body == b"hello world"
    answers.append(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
    with pytest.raises(ResponseTooLarge):
        fetcher.get(f"{url}/x", max_bytes=63)


def test_body_ending_with_the_connection(raw_server: tuple[str, list[bytes]]) -> None:
    url, answers = raw_server
    answers.append(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    assert fetcher.get(f"{url}/x", max_bytes=100).body == b"until the end"
    answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ncut short")
    with pytest.raises(ResolutionFailed, match="closed mid-body"):
        fetcher.get(f"{url}/x", max_bytes=100)


@pytest.mark.parametrize("path", ["/a b", "/a\r\nX-Injected: 1", "/caf\u00e9"])
def test_targets_that_could_split_the_request_are_refused(stub: StubServer, path: str) -> None:
    fetcher = HttpFetcher(local_config(), DnsClient(local_config()))
    with pytest.raises(ResolutionFailed, match="unsupported URL"):
        fetcher.get(f"{stub.url}{path}", max_bytes=10)
    assert stub.count() == 0
