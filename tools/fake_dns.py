"""A DNS server for tests: answers TXT, A and AAAA from a dict on 127.0.0.1, NXDOMAIN otherwise.

    with FakeDNS({"_atproto.alice.test": {"TXT": ["did=did:plc:..."]},
                  "alice.test": {"A": ["127.0.0.1"]}}) as dns:
        config = IdentityConfig(dns_server=dns.address)   # "127.0.0.1:PORT"
        ...
        assert dns.count("_atproto.alice.test", "TXT") == 1

UDP and TCP on the same ephemeral port (answers too big for UDP are truncated, so clients
retry over TCP). A name present without records of the asked type answers NOERROR/no data.
Outages: `fail(name, "servfail" | "refused" | "drop")` for one name, `down = True` for all
(queries are dropped: clients time out). Run standalone: `python -m tools.fake_dns records.json`.

It shares the machine with the system under test, so plain queries (one IN question for A, AAAA
or TXT, at most an empty EDNS record) are answered by hand from a blocking UDP loop; dnspython
builds the answer to anything else.
"""
from __future__ import annotations

import json
import re
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import dns.exception
import dns.flags
import dns.ipv4
import dns.ipv6
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

Failure = Literal["servfail", "refused", "drop"]
Records = Mapping[str, Mapping[str, Sequence[str]]]

_HEADER = struct.Struct("!HHHHHH")  # id, flags, qd/an/ns/ar counts
_QUESTION_TAIL = struct.Struct("!HH")  # type, class
_RR_FIXED = struct.Struct("!HHI")  # type, class, ttl (then the rdata length)
_RD, _TC, _AA, _QR = 0x0100, 0x0200, 0x0400, 0x8000
_QR_OR_OPCODE = 0xF800
_IN, _OPT = 1, 41
_A, _TXT, _AAAA = 1, 16, 28
_PLAIN_TYPES = {_A: "A", _TXT: "TXT", _AAAA: "AAAA"}
_RCODES = {"servfail": dns.rcode.SERVFAIL, "refused": dns.rcode.REFUSED}
# A label dnspython prints as it is (no escapes), so its text form is the label itself.
_PLAIN_LABEL = re.compile(rb'[^\x00-\x20\x7f-\xff"().;\\@$]+')
# The OPT record dnspython answers EDNS queries with: root, payload 8192, no flags, no options.
_OPT_RR = b"\x00" + _RR_FIXED.pack(_OPT, 8192, 0) + b"\x00\x00"
_POINTER_TO_QUESTION = b"\xc0\x0c"  # answers name the question's name, at offset 12


@dataclass(frozen=True)
class Query:
    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"


@dataclass(frozen=True)
class Lookup:
    """What the records say about one question, read once under the lock."""

    failure: Failure | None
    exists: bool  # the name is known (no data for the type is NOERROR, not NXDOMAIN)
    values: list[str]


@dataclass(frozen=True)
class PlainQuery:
    """A query simple enough to answer by hand: one IN question, at most an empty OPT record."""

    qid: int
    rd: int  # the query's RD flag, echoed in the answer
    question: bytes  # the question section as sent, echoed in the answer
    qtype: int
    name: str  # as `_norm` gives it
    payload: int | None  # EDNS payload size, None without EDNS

    @classmethod
    def parse(cls, wire: bytes) -> PlainQuery | None:
        """None for anything else (dnspython then parses it, and rejects what is malformed)."""
        if len(wire) < 17:
            return None
        qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
        if flags & _QR_OR_OPCODE or (qdcount, ancount, nscount) != (1, 0, 0) or arcount > 1:
            return None
        labels, pos = [], 12
        while (length := wire[pos]) != 0:
            label = wire[pos + 1:pos + 1 + length]
            if length > 63 or len(label) != length or not _PLAIN_LABEL.fullmatch(label):
                return None
            labels.append(label)
            pos += 1 + length
            if pos >= len(wire):
                return None
        end = pos + 5
        if end - 12 > 255 + 4 or len(wire) < end:
            return None
        qtype, qclass = _QUESTION_TAIL.unpack_from(wire, pos + 1)
        if qclass != _IN or qtype not in _PLAIN_TYPES:
            return None
        payload = None
        if arcount:
            opt = wire[end:end + 11]
            if len(opt) != 11 or opt[:3] != b"\x00\x00\x29" or opt[9:] != b"\x00\x00":
                return None
            payload = int.from_bytes(opt[3:5], "big")
            end += 11
        if len(wire) != end:
            return None
        name = b".".join(labels).decode("ascii").lower()
        return cls(qid, flags & _RD, wire[12:pos + 5], qtype, name, payload)

    @property
    def rdtype(self) -> str:
        return _PLAIN_TYPES[self.qtype]

    def answer(self, lookup: Lookup, ttl: int, transport: str) -> bytes:
        """The answer dnspython would give, byte for byte; raises ValueError on a bad value."""
        rcode, answers, count = 0, b"", 0
        if lookup.failure is not None:
            rcode = _RCODES[lookup.failure]
        elif not lookup.exists:
            rcode = dns.rcode.NXDOMAIN
        elif lookup.values:
            rdatas = dict.fromkeys(_rdata_wire(self.qtype, v) for v in lookup.values)  # a set
            rr = _POINTER_TO_QUESTION + _RR_FIXED.pack(self.qtype, _IN, ttl)
            answers = b"".join(rr + len(r).to_bytes(2, "big") + r for r in rdatas)
            count = len(rdatas)
        opt = b"" if self.payload is None else _OPT_RR
        if transport == "tcp":
            limit = 65535
        else:
            limit = 512 if self.payload is None else min(max(512, self.payload), 65535)
        flags = _QR | _AA | self.rd | rcode
        if 12 + len(self.question) + len(answers) + len(opt) > limit:
            flags, answers, count = flags | _TC, b"", 0
        return (_HEADER.pack(self.qid, flags, 1, count, 0, 1 if opt else 0) + self.question
                + answers + opt)


def _rdata_wire(qtype: int, value: str) -> bytes:
    """A, AAAA or TXT rdata in wire form, as dnspython writes it."""
    if qtype == _TXT:
        raw = value.encode()
        return b"".join(len(c).to_bytes(1, "big") + c
                        for c in [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    try:
        if qtype == _A:
            return dns.ipv4.inet_aton(value)
        return dns.ipv6.inet_aton(value)
    except dns.exception.SyntaxError as e:
        raise ValueError(f"bad address {value!r}") from e


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class FakeDNS:
    """An authoritative-looking DNS server over a dict of {name: {TYPE: [values]}}; thread-safe."""

    def __init__(self, records: Records | None = None, *, host: str = "127.0.0.1",
                 tcp: bool = True, ttl: int = 60) -> None:
        self.host = host
        self.port = 0
        self.ttl = ttl
        self.down = False
        self.queries: list[Query] = []
        self._tcp_enabled = tcp
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, list[str]]] = {}
        self._failures: dict[str, Failure] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for name, by_type in (records or {}).items():
            for rdtype, values in by_type.items():
                self.set(name, rdtype, values)

    # -- records ------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """"HOST:PORT", the form IdentityConfig.dns_server and --dns-server take."""
        return f"{self.host}:{self.port}"

    def set(self, name: str, rdtype: str, values: Sequence[str]) -> None:
        """Replaces the `rdtype` records of `name` (an empty list: the name exists, no data)."""
        with self._lock:
            self._records.setdefault(_norm(name), {})[rdtype.upper()] = list(values)

    def add_txt(self, name: str, *values: str) -> None:
        self._add(name, "TXT", values)

    def add_a(self, name: str, *addresses: str) -> None:
        self._add(name, "A", addresses)

    def add_aaaa(self, name: str, *addresses: str) -> None:
        self._add(name, "AAAA", addresses)

    def _add(self, name: str, rdtype: str, values: Sequence[str]) -> None:
        with self._lock:
            self._records.setdefault(_norm(name), {}).setdefault(rdtype, []).extend(values)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Forgets a name (then NXDOMAIN) or one of its record types."""
        with self._lock:
            if rdtype is None:
                self._records.pop(_norm(name), None)
            else:
                self._records.get(_norm(name), {}).pop(rdtype.upper(), None)

    def fail(self, name: str, how: Failure | None) -> None:
        """Makes queries for `name` fail in this way (None: answer normally again)."""
        with self._lock:
            if how is None:
                self._failures.pop(_norm(name), None)
            else:
                self._failures[_norm(name)] = how

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Queries received (answered or not) for this name and type, or all."""
        with self._lock:
            return sum(1 for q in self.queries
                       if (name is None or q.name == _norm(name))
                       and (rdtype is None or q.rdtype == rdtype.upper()))

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeDNS:
        for _ in range(20):  # the UDP port must also be free for TCP
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self.port))
            port = udp.getsockname()[1]
            if not self._tcp_enabled:
                break
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._tcp = tcp
            break
        else:
            raise OSError("no port free for both UDP and TCP")
        self._udp, self.port = udp, port
        self._threads = [self._spawn(self._serve_udp, f"fake-dns-{port}")]
        if self._tcp is not None:
            self._threads.append(self._spawn(self._serve_tcp_accept, f"fake-dns-tcp-{port}"))
        return self

    def stop(self) -> None:
        """Stops serving and closes the sockets (TCP connection threads end on their own)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake_w.send(b"x")
        if self._udp is not None:  # an empty datagram to itself ends the blocking receive
            try:
                self._udp.sendto(b"", self._udp.getsockname())
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> FakeDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _spawn(target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread

    def _serve_udp(self) -> None:
        """One blocking receive per query: no selector call between datagrams."""
        udp = self._udp
        assert udp is not None
        while not self._stop.is_set():
            try:
                wire, peer = udp.recvfrom(65535)
            except OSError:
                if self._stop.is_set():
                    return
                continue  # e.g. ICMP port unreachable from an earlier answer's peer
            reply = self._answer(wire, "udp")
            if reply is not None:
                try:
                    udp.sendto(reply, peer)
                except OSError:
                    pass

    def _serve_tcp_accept(self) -> None:
        assert self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._tcp, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._tcp:
                        conn, _ = self._tcp.accept()
                        self._spawn(self._serve_tcp, "fake-dns-tcp", conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while not self._stop.is_set():
                    head = self._recv_exact(conn, 2)
                    if head is None:
                        return
                    wire = self._recv_exact(conn, int.from_bytes(head, "big"))
                    if wire is None:
                        return
                    reply = self._answer(wire, "tcp")
                    if reply is None:  # dropped: stay silent until stopped
                        self._stop.wait()
                        return
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                return None
            data += part
        return data

    # -- answers ------------------------------------------------------------------------
    def _lookup(self, name: str, rdtype: str, transport: str) -> Lookup:
        """Records the query and reads what to answer, under the lock."""
        with self._lock:
            self.queries.append(Query(name, rdtype, transport))
            failure: Failure | None = "drop" if self.down else self._failures.get(name)
            by_type = self._records.get(name)
            values = list(by_type.get(rdtype, ())) if by_type is not None else []
        return Lookup(failure, by_type is not None, values)

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to a query, or None to stay silent (dropped, or not a query at all)."""
        plain = PlainQuery.parse(wire)
        if plain is None:
            return self._answer_with_dnspython(wire, transport)
        lookup = self._lookup(plain.name, plain.rdtype, transport)
        if lookup.failure == "drop":
            return None
        try:
            return plain.answer(lookup, self.ttl, transport)
        except ValueError:  # a value plain encoding rejects: let dnspython say what is wrong
            return self._render(dns.message.from_wire(wire), lookup, transport)

    def _answer_with_dnspython(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question or query.flags & dns.flags.QR:
            return None
        question = query.question[0]
        lookup = self._lookup(_norm(question.name.to_text()),
                              dns.rdatatype.to_text(question.rdtype), transport)
        if lookup.failure == "drop":
            return None
        return self._render(query, lookup, transport)

    def _render(self, query: dns.message.Message, lookup: Lookup, transport: str) -> bytes:
        question = query.question[0]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if lookup.failure is not None:
            response.set_rcode(_RCODES[lookup.failure])
        elif not lookup.exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif lookup.values:
            rdtype = dns.rdatatype.to_text(question.rdtype)
            rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN,
                                        question.rdtype, create=True)
            for value in lookup.values:
                rrset.add(self._rdata(rdtype, value), self.ttl)
        if transport == "tcp":
            limit = 65535
        else:
            limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    @staticmethod
    def _rdata(rdtype: str, value: str) -> dns.rdata.Rdata:
        if rdtype == "TXT":
            raw = value.encode()
            chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
            return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
        return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)


@click.command()
@click.argument("records_path", metavar="RECORDS", required=False,
                type=click.Path(exists=True, dir_okay=False))
def main(records_path: str | None) -> None:
    """Serve the DNS records of RECORDS, a JSON file of {name: {TYPE: [values]}}, on 127.0.0.1
    (UDP and TCP) until interrupted; prints the HOST:PORT to give --dns-server."""
    try:
        records = json.loads(Path(records_path).read_text()) if records_path else {}
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="RECORDS") from None
    server = FakeDNS(records).start()
    click.echo(server.address)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
