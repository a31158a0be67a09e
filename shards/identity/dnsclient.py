"""DNS lookups (TXT for handles, addresses for HTTP) that separate "no such name" from "no answer".

A lookup is one small exchange: the server list and port are read once (from the config, or
/etc/resolv.conf), the query is laid out with dnspython's name encoding, sent from a fresh
socket (a random source port per query, as a stub resolver should) and its answer read with
dnspython's wire parser, taking only the question and answer sections. That does what
dns.resolver.Resolver did here (retries within a lifetime, dropping failing servers, TCP when
truncated, following the answer's CNAME chain) for a fraction of its CPU: building and parsing
whole dns.message objects cost more than the exchange itself. No EDNS: an answer over 512
bytes comes truncated, and is asked again over TCP."""
from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass

import dns.entropy
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.wire

from .config import IdentityConfig, parse_server
from .directory import ResolutionFailed
from .sockets import set_timeout

SYSTEM_ADDRESS_TTL = 60.0  # getaddrinfo tells no TTL: its answers are reused this long at most
MAX_CNAME_CHAIN = 16

_TYPES = {"A": dns.rdatatype.A, "AAAA": dns.rdatatype.AAAA, "TXT": dns.rdatatype.TXT}
_CNAME = dns.rdatatype.CNAME
_IN = dns.rdataclass.IN
_NOERROR, _NXDOMAIN = dns.rcode.NOERROR, dns.rcode.NXDOMAIN
_FAILURES_WITHOUT_QUESTION = frozenset(
    (dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED))
_QR, _TC, _RD = 0x8000, 0x0200, 0x0100  # header flags
_HEADER = struct.Struct("!HHHHHH")  # id, flags, question/answer/authority/additional counts
_QUESTION_TAIL = struct.Struct("!HH")  # type, class
_RR_HEAD = struct.Struct("!HHIH")  # type, class, ttl, rdata length
_TCP_LENGTH = struct.Struct("!H")

_Record = bytes | tuple[bytes, ...]  # an A/AAAA record's packed address, a TXT's strings


class HostNotFound(ResolutionFailed):
    """NXDOMAIN or no address record: the name definitively does not exist (not a failure to retry)."""


class AddressList(list[str]):
    """IP addresses of a host, with how long (seconds) they may be reused; `ttl` 0: not at all."""

    def __init__(self, addresses: list[str], ttl: float = 0.0) -> None:
        super().__init__(addresses)
        self.ttl = ttl


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_localhost(host: str) -> bool:
    # RFC 6761: localhost names are loopback and never sent to DNS.
    return host == "localhost" or host.endswith(".localhost")


@dataclass(frozen=True)
class _Servers:
    """Where and how to ask, read once from the config or the system's resolver settings."""

    addresses: tuple[str, ...]
    port: int
    attempt_timeout: float  # one try of one server
    lifetime: float  # one lookup, all tries


@dataclass(frozen=True)
class _Reply:
    """What a lookup needs of a response: its rcode, the records at the end of the answer's
    CNAME chain and the smallest TTL along that chain."""

    rcode: int
    records: list[_Record]
    ttl: float


class _Truncated(Exception):
    """The answer did not fit in UDP."""


class _NotOurs(Exception):
    """A datagram that is not the answer to our query (wrong id or question, malformed)."""


class _BadAnswer(Exception):
    """Our answer, but unusable (a CNAME chain too long or looping): the server is failing."""


def _name_wire(name: str) -> bytes:
    """The wire form of absolute `name`: plain ASCII labels laid out directly, anything else
    (escapes, IDNA, errors) by dnspython, whose Name objects cost more than the exchange.

    Raises HostNotFound for names that cannot exist."""
    labels = name.removesuffix(".").split(".")
    if (name.isascii() and "\\" not in name and len(name) < 254
            and all(0 < len(label) < 64 for label in labels)):
        return b"".join(bytes((len(label),)) + label.encode() for label in labels) + b"\0"
    try:
        return dns.name.from_text(name).to_wire()  # type: ignore[return-value]
    except dns.name.NameTooLong as exc:  # e.g. "_atproto." + a 250-character handle
        raise HostNotFound(f"{name[:60]}...: name too long to exist") from exc
    except dns.exception.DNSException as exc:
        raise HostNotFound(f"{name!r} is not a DNS name") from exc


def _wire_key(name: dns.name.Name) -> bytes:
    """A name as compared in answers: its wire form, ASCII lowercased (DNS ignores case)."""
    return name.to_wire().lower()  # type: ignore[union-attr]


@dataclass(frozen=True)
class _Query:
    """One question on the wire, with what checking its answer needs."""

    qid: int
    rdtype: int
    wire: bytes
    name_wire: bytes  # the question's name as in `wire`, lowercased
    tail: bytes  # the question's type and class

    @classmethod
    def make(cls, name_wire: bytes, rdtype: int) -> _Query:
        """A recursive query for one name and type, without EDNS, with a random id."""
        qid = dns.entropy.random_16()
        tail = _QUESTION_TAIL.pack(rdtype, _IN)
        return cls(qid, rdtype, _HEADER.pack(qid, _RD, 1, 0, 0, 0) + name_wire + tail,
                   name_wire.lower(), tail)


def _rdata(parser: dns.wire.Parser, rdtype: int, length: int) -> _Record:
    """A/AAAA: the packed address; TXT: its character-strings."""
    if rdtype == dns.rdatatype.TXT:
        data = parser.get_bytes(length)
        strings, pos = [], 0
        while pos < length:  # length-prefixed character-strings that fill the record exactly
            end = pos + 1 + data[pos]
            if end > length:
                raise dns.exception.FormError("TXT character-string past its record")
            strings.append(data[pos + 1:end])
            pos = end
        return tuple(strings)
    if length != (4 if rdtype == dns.rdatatype.A else 16):
        raise dns.exception.FormError(f"bad {dns.rdatatype.to_text(rdtype)} length {length}")
    return parser.get_bytes(length)


_TO_QUESTION = b"\xc0\x0c"  # a compression pointer to the question's name (offset 12)


def _parse(wire: bytes, query: _Query) -> _Reply:
    """Reads the answer to `query` in `wire`: the question and answer sections only.

    Raises _NotOurs for anything else (or malformed), _Truncated if the TC bit is set,
    _BadAnswer if the CNAME chain does not end."""
    qname, rdtype = query.name_wire, query.rdtype
    try:
        rid, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(wire)
        if rid != query.qid or not flags & _QR or (flags >> 11) & 0xF != 0:
            raise _NotOurs
        rcode = flags & 0xF
        if qdcount == 0 and rcode in _FAILURES_WITHOUT_QUESTION:
            return _Reply(rcode, [], 0.0)  # such errors may leave the question out
        # The question comes first, so its name cannot be compressed: compare it as bytes,
        # ignoring ASCII case as DNS names do.
        end = _HEADER.size + len(query.name_wire)
        if (qdcount != 1 or wire[_HEADER.size:end].lower() != query.name_wire
                or wire[end:end + 4] != query.tail):
            raise _NotOurs
        end += 4
        if flags & _TC:
            raise _Truncated
        if rcode != _NOERROR:
            return _Reply(rcode, [], 0.0)
        parser = dns.wire.Parser(wire, end)
        direct: list[_Record] = []  # records of qname itself
        direct_ttl = 0xFFFFFFFF
        found: dict[bytes, tuple[list[_Record], int]] = {}  # by _wire_key of the owner
        aliases: dict[bytes, tuple[bytes, int]] = {}
        for _ in range(ancount):
            if wire[parser.current:parser.current + 2] == _TO_QUESTION:
                parser.get_bytes(2)
                owner = qname
            else:
                owner = _wire_key(dns.name.from_wire_parser(parser))
            rr_type, rr_class, ttl, length = _RR_HEAD.unpack(parser.get_bytes(_RR_HEAD.size))
            if rr_class == _IN and rr_type == rdtype:
                record = _rdata(parser, rdtype, length)
                if owner is qname or owner == qname:
                    direct.append(record)
                    direct_ttl = min(direct_ttl, ttl)
                else:
                    records, least = found.setdefault(owner, ([], ttl))
                    records.append(record)
                    found[owner] = (records, min(least, ttl))
            elif rr_class == _IN and rr_type == _CNAME:
                with parser.restrict_to(length):
                    aliases[owner] = (_wire_key(dns.name.from_wire_parser(parser)), ttl)
            else:
                parser.get_bytes(length)
    except (dns.exception.DNSException, struct.error) as exc:  # truncated, bad pointers...
        raise _NotOurs from exc
    if direct:
        return _Reply(rcode, direct, float(direct_ttl))
    least_ttl = float("inf")
    name = qname
    for _ in range(MAX_CNAME_CHAIN):  # like dns.message's resolve_chaining
        if name not in aliases:
            return _Reply(rcode, [], 0.0)  # the name (or its alias) exists without such records
        name, ttl = aliases[name]
        least_ttl = min(least_ttl, ttl)
        if name in found:
            records, ttl = found[name]
            return _Reply(rcode, records, min(least_ttl, ttl))
    raise _BadAnswer(f"CNAME chain of {dns.name.from_wire(qname, 0)[0]} longer than"
                     f" {MAX_CNAME_CHAIN}")


def _udp(query: _Query, server: str, port: int, timeout: float) -> _Reply:
    """One UDP exchange; datagrams that are not our answer are ignored until `timeout`.

    Raises TimeoutError, _Truncated, _BadAnswer or OSError (unreachable, refused)."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        set_timeout(sock, timeout)
        sock.connect((server, port))  # datagrams from any other address never reach us
        sock.send(query.wire)
        while True:
            try:
                return _parse(sock.recv(65535), query)
            except BlockingIOError:  # the kernel's timeout
                raise TimeoutError from None
            except _NotOurs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError from None
                set_timeout(sock, remaining)


def _tcp(query: _Query, server: str, port: int, timeout: float) -> _Reply:
    """One TCP exchange, for answers too big for UDP.

    Raises TimeoutError, _NotOurs, _Truncated, _BadAnswer, EOFError or OSError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((server, port), timeout=timeout) as sock:
        sock.sendall(_TCP_LENGTH.pack(len(query.wire)) + query.wire)

        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                part = sock.recv(n - len(data))
                if not part:
                    raise EOFError("DNS server closed the connection")
                data += part
            return data

        (length,) = _TCP_LENGTH.unpack(read(2))
        return _parse(read(length), query)


def _addresses(family: int, records: list[_Record]) -> list[str]:
    return [socket.inet_ntop(family, r) for r in records if isinstance(r, bytes)]


class DnsClient:
    """Queries the configured server (or the system's); thread-safe, no caching (the cache does)."""

    def __init__(self, config: IdentityConfig) -> None:
        self._config = config
        self.label = f"dns:{config.dns_server or 'system'}"
        self._lock = threading.Lock()
        self._servers: _Servers | None = None

    def _get_servers(self) -> _Servers:
        servers = self._servers
        if servers is None:
            with self._lock:
                if self._servers is None:
                    self._servers = self._make_servers()
                servers = self._servers
        return servers

    def servers(self) -> tuple[str, ...]:
        """The addresses of the servers asked. Raises ResolutionFailed when there is none."""
        return self._get_servers().addresses

    def _make_servers(self) -> _Servers:
        cfg = self._config
        try:
            if cfg.dns_server is None:
                resolver = dns.resolver.Resolver(configure=True)
                port = resolver.port
                addresses = tuple(str(ns) for ns in resolver.nameservers)
            else:
                host, port = parse_server(cfg.dns_server)
                if not is_ip_literal(host):  # a named server: find its address once
                    host = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]
                addresses = (host,)
        except (OSError, dns.exception.DNSException) as exc:
            raise ResolutionFailed(f"no usable DNS server: {exc}", upstream=self.label) from exc
        if not addresses or not all(is_ip_literal(a) for a in addresses):
            raise ResolutionFailed(f"no usable DNS server in {addresses}", upstream=self.label)
        return _Servers(addresses, port,
                        attempt_timeout=cfg.dns_timeout / 2,  # one retry fits in the lifetime
                        lifetime=cfg.dns_timeout)

    def _exchange(self, name_wire: bytes, rdtype: int, name: str) -> _Reply:
        """The NOERROR or NXDOMAIN reply of the first server to give one, within the lifetime.

        Servers that fail (SERVFAIL, REFUSED, unreachable, broken TCP) are dropped for this
        lookup; silent ones are asked again until the lifetime is over, like the Resolver."""
        servers = self._get_servers()
        query = _Query.make(name_wire, rdtype)
        deadline = time.monotonic() + servers.lifetime
        pending = list(servers.addresses)
        errors: list[str] = []
        while pending:
            for server in list(pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResolutionFailed(
                        f"DNS timeout for {name} {dns.rdatatype.to_text(rdtype)}",
                        upstream=self.label)
                try:
                    try:
                        reply = _udp(query, server, servers.port,
                                     min(servers.attempt_timeout, remaining))
                    except _Truncated:  # too big for UDP: ask again over TCP
                        reply = _tcp(query, server, servers.port,
                                     max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    continue  # asked again next round, while the lifetime lasts
                except (OSError, EOFError, _NotOurs, _Truncated, _BadAnswer) as exc:
                    pending.remove(server)
                    errors.append(f"{server}: {exc!r}")
                    continue
                if reply.rcode in (_NOERROR, _NXDOMAIN):
                    return reply
                pending.remove(server)
                errors.append(f"{server}: {dns.rcode.to_text(reply.rcode)}")
        raise ResolutionFailed(
            f"DNS failure for {name} {dns.rdatatype.to_text(rdtype)}: {'; '.join(errors)}",
            upstream=self.label)

    def _query(self, name: str, rdtype: str) -> _Reply:
        """The records of one query; none when the name exists without them.

        Raises HostNotFound on NXDOMAIN, ResolutionFailed when no server gave an answer."""
        reply = self._exchange(_name_wire(name), _TYPES[rdtype], name)
        if reply.rcode == _NXDOMAIN:
            raise HostNotFound(f"NXDOMAIN for {name}")
        return reply

    def txt(self, name: str) -> list[str]:
        """The TXT values of `name` (character-strings joined); [] when the name or record is absent."""
        try:
            records = self._query(name, "TXT").records
        except HostNotFound:
            return []
        return [b"".join(r).decode("utf-8", "replace") for r in records]

    def needs_lookup(self, host: str) -> bool:
        """False for IP literals and localhost, which are never sent to a resolver."""
        return not (is_ip_literal(host) or _is_localhost(host))

    def addresses(self, host: str) -> AddressList:
        """IP addresses of `host`, with their TTL (`.ttl`).

        Raises HostNotFound (definitive) or ResolutionFailed."""
        if is_ip_literal(host):
            return AddressList([host], float("inf"))
        if _is_localhost(host):
            return AddressList(["127.0.0.1"], float("inf"))
        if self._config.dns_server is None:
            return self._system_addresses(host)
        # A failing A query raises at once: asking AAAA of a failing server would double the wait.
        reply = self._query(host, "A")
        found = _addresses(socket.AF_INET, reply.records)
        ttls = [reply.ttl] if found else []
        try:
            reply = self._query(host, "AAAA")
        except ResolutionFailed:
            if not found:
                raise
        else:
            found += _addresses(socket.AF_INET6, reply.records)
            ttls += [reply.ttl] if reply.records else []
        if not found:
            raise HostNotFound(f"no address for {host}")
        return AddressList(found, min(ttls))

    def _system_addresses(self, host: str) -> AddressList:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise HostNotFound(f"no address for {host}") from exc
            raise ResolutionFailed(f"address lookup of {host}: {exc}", upstream=self.label) from exc
        return AddressList(list(dict.fromkeys(str(info[4][0]) for info in infos)),
                           SYSTEM_ADDRESS_TTL)
