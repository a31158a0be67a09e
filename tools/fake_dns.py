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
"""
from __future__ import annotations

import json
import selectors
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

Failure = Literal["servfail", "refused", "drop"]
Records = Mapping[str, Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class Query:
    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"


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
        self._serve_thread: threading.Thread | None = None
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
        self._serve_thread = self._spawn(self._serve, f"fake-dns-{port}")
        return self

    def stop(self) -> None:
        """Stops serving and closes the sockets (TCP connection threads end on their own)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake_w.send(b"x")
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5)
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

    def _serve(self) -> None:
        assert self._udp is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        if self._tcp is not None:
            sel.register(self._tcp, selectors.EVENT_READ)
        with sel:
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._udp:
                        self._serve_udp()
                    elif key.fileobj is self._tcp:
                        conn, _ = self._tcp.accept()
                        self._spawn(self._serve_tcp, "fake-dns-tcp", conn)

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self._answer(wire, "udp")
        if reply is not None:
            self._udp.sendto(reply, peer)

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
    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append(Query(name, rdtype, transport))
            failure: Failure | None = "drop" if self.down else self._failures.get(name)
            by_type = self._records.get(name)
            values = list(by_type.get(rdtype, ())) if by_type is not None else []
        if failure == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if failure == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif failure == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif by_type is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif values:
            rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN,
                                        question.rdtype, create=True)
            for value in values:
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


def main(argv: list[str]) -> int:
    """Serves the records of a JSON file ({name: {TYPE: [values]}}) until interrupted."""
    records = json.loads(open(argv[0]).read()) if argv else {}
    server = FakeDNS(records).start()
    print(server.address, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
