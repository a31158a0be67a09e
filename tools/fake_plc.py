"""A PLC directory stub on 127.0.0.1: serves DID documents and misbehaves on demand.

Tests and benchmarks use it to make identity resolution healthy, slow for some DIDs, hang,
refuse connections (down) or accept and never answer, and to count who asked for what.

It shares the machine with the system under test, so it is a single-threaded event loop that
parses only what it needs and answers with response bytes built once per DID.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import orjson

PROFILES = ("healthy", "slow", "hang", "down", "never")
MAX_HEAD = 64 * 1024  # a request head larger than this is refused (400)
_REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 404: "Not Found",
            501: "Not Implemented"}


@dataclass
class Behaviour:
    """How the stub answers; attributes may be changed while it runs.

    `down` only means "not listening at start()"; once up() it answers like `healthy`.
    """

    profile: str = "healthy"
    latency: tuple[float, float] = (0.001, 0.005)  # seconds, uniform, for answered requests
    slow_fraction: float = 0.1  # profile "slow": share of DIDs held for `slow_seconds`
    slow_seconds: float = 60.0
    seed: int = 0
    hang_dids: set[str] = field(default_factory=set)  # never answered, whatever the profile

    def is_slow(self, did: str) -> bool:
        """Whether `did` is one of the slow ones: a stable hash of seed and DID, not chance."""
        h = hashlib.sha256(f"{self.seed}:{did}".encode()).digest()
        return int.from_bytes(h[:8], "big") < self.slow_fraction * 2**64


def http_response(status: int, body: bytes, *, close: bool = False,
                  location: str | None = None) -> bytes:
    """A complete HTTP/1.1 response with a JSON body, ready for the socket."""
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n")
    if location is not None:
        head += f"Location: {location}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


@dataclass(frozen=True)
class Request:
    """The little of a request head the stub looks at."""

    method: str
    did: str  # the path without its leading "/" and query string, percent-decoded
    keep_alive: bool

    @classmethod
    def parse(cls, head: bytes) -> Request | None:
        """Parses a head (request line and headers, no final blank line); None if malformed."""
        line, _, headers = head.partition(b"\r\n")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return None
        method, target, version = (p.decode("latin-1") for p in parts)
        keep_alive = version >= "HTTP/1.1"  # as http.server: 1.1 keeps, 1.0 closes unless asked
        for header in headers.lower().split(b"\r\n"):
            if header.startswith(b"connection:"):
                value = header[11:].strip()
                if value == b"close":
                    keep_alive = False
                elif value == b"keep-alive":
                    keep_alive = True
        did = target.split("?", 1)[0].lstrip("/")
        if "%" in did:
            did = unquote(did)
        return cls(method, did, keep_alive)


@dataclass(eq=False)
class _Connection:
    """One client socket: bytes read but not yet parsed, bytes not yet sent, and its state."""

    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    busy: bool = False  # a request awaits its (delayed or never coming) answer
    held: str | None = None  # the DID of the request held for release, if any
    writing: bool = False  # also waiting for writability: the outbox did not fit at once
    closing: bool = False  # close once the outbox is flushed
    closed: bool = False


@dataclass(frozen=True)
class _Cached:
    """A DID's 200 response, valid while `docs` still maps the DID to this very document."""

    doc: Mapping[str, Any]
    response: bytes


@dataclass(frozen=True)
class _Pending:
    """An answer held back until its due time (latency, slow DIDs)."""

    conn: _Connection
    response: bytes
    keep_alive: bool


class _Listener:
    """One listening generation: a thread running the event loop; its connections end with it."""

    def __init__(self, port: int, plc: FakePLC) -> None:
        self.plc = plc
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # up() rebinds the port
        try:
            self.sock.bind(("127.0.0.1", port))
            self.sock.listen(1024)  # hundreds of clients may connect at once
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.wake_r)
        self.connections: set[_Connection] = set()
        self.timers: list[tuple[float, int, _Pending]] = []
        self.held: dict[str, dict[_Connection, bool]] = {}  # hung requests by DID: keep-alive
        self.releases: list[str] = []  # DIDs whose hung requests are to be answered now
        self.sequence = itertools.count()  # ties in the timer heap never compare _Pending
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"fake-plc-{self.port}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kill(self) -> None:
        """Stops listening, releases held requests and cuts every open connection."""
        self.stopping = True
        self.wake()
        self.thread.join(timeout=5)

    def release(self, did: str) -> None:
        """Has the loop answer the requests for `did` it holds (from any thread)."""
        self.releases.append(did)
        self.wake()

    def wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stopping:
                timeout = None
                if self.timers:
                    timeout = max(0.0, self.timers[0][0] - time.monotonic())
                for key, mask in self.selector.select(timeout):
                    conn = key.data
                    if conn is None:
                        self.accept()
                    elif conn is self.wake_r:
                        self.answer_released()
                    elif isinstance(conn, _Connection):
                        if mask & selectors.EVENT_READ:
                            self.read(conn)
                        if mask & selectors.EVENT_WRITE and not conn.closed:
                            self.flush(conn)
                if self.timers:
                    self.fire_due()
        finally:
            self.close_all()

    def answer_released(self) -> None:
        try:
            self.wake_r.recv(4096)
        except OSError:
            pass
        while self.releases:
            did = self.releases.pop()
            for conn, keep_alive in self.held.pop(did, {}).items():  # closed ones left already
                conn.busy, conn.held = False, None
                self.send(conn, self.plc._response_for(did), keep_alive)
                self.serve(conn)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # BlockingIOError: none left; others (EMFILE, ...): retry later
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stall
            conn = _Connection(sock)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def read(self, conn: _Connection) -> None:
        """Reads whatever arrived; a held connection keeps reading so a hang-up is noticed."""
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.inbox += data
        if not conn.busy:
            self.serve(conn)

    def serve(self, conn: _Connection) -> None:
        """Answers the complete requests in the inbox, one at a time, until one is held."""
        while not (conn.busy or conn.closing or conn.closed):
            end = conn.inbox.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbox) > MAX_HEAD:
                    self.fail(conn, 400, "request head too large")
                return
            request = Request.parse(bytes(conn.inbox[:end]))
            del conn.inbox[:end + 4]
            if request is None:
                self.fail(conn, 400, "malformed request")
            elif request.method != "GET":
                self.fail(conn, 501, f"unsupported method {request.method}")
            else:
                self.answer(conn, request)

    def answer(self, conn: _Connection, request: Request) -> None:
        plc, did = self.plc, request.did
        plc._count(did)
        b = plc.behaviour
        if b.profile == "never" or did in b.hang_dids:
            conn.busy, conn.held = True, did  # until released, hung up or the listener ends
            self.held.setdefault(did, {})[conn] = request.keep_alive
            return
        if b.profile == "slow" and b.is_slow(did):
            delay = b.slow_seconds
        else:
            delay = random.uniform(*b.latency)
        response = plc._response_for(did)
        if delay <= 0:
            self.send(conn, response, request.keep_alive)
            return
        conn.busy = True
        pending = _Pending(conn, response, request.keep_alive)
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.sequence), pending))

    def fire_due(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            pending = heapq.heappop(self.timers)[2]
            conn = pending.conn
            if conn.closed:
                continue
            conn.busy = False
            self.send(conn, pending.response, pending.keep_alive)
            self.serve(conn)  # requests that arrived meanwhile (pipelining)

    def fail(self, conn: _Connection, status: int, message: str) -> None:
        body = orjson.dumps({"message": message})
        self.send(conn, http_response(status, body, close=True), keep_alive=False)

    def send(self, conn: _Connection, data: bytes, keep_alive: bool) -> None:
        if not keep_alive:
            conn.closing = True
        if conn.outbox:
            conn.outbox += data
            return
        conn.outbox = data
        self.flush(conn)

    def flush(self, conn: _Connection) -> None:
        """Sends what the socket takes now; waits for writability only if some is left."""
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            if not conn.writing:
                conn.writing = True
                self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif conn.closing:
            self.close(conn)
        elif conn.writing:
            conn.writing = False
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def close(self, conn: _Connection, *, cut: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.discard(conn)
        waiting = self.held.get(conn.held) if conn.held is not None else None
        if waiting is not None:  # a client that hung up is not answered on release
            waiting.pop(conn, None)
            if not waiting:
                del self.held[conn.held]
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if cut:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.sock.close()

    def close_all(self) -> None:
        self.selector.close()
        self.sock.close()
        for conn in list(self.connections):
            self.close(conn, cut=True)
        self.timers.clear()
        self.wake_r.close()
        self.wake_w.close()


class FakePLC:
    """The stub: `with FakePLC(docs) as plc: resolve(plc.url + "/" + did)`."""

    def __init__(self, docs: Mapping[str, Mapping[str, Any]], *, port: int = 0,
                 profile: str = "healthy", latency: tuple[float, float] = (0.001, 0.005),
                 slow_fraction: float = 0.1, slow_seconds: float = 60.0, seed: int = 0,
                 hang_dids: Iterable[str] = ()) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
        self.docs = docs
        self.behaviour = Behaviour(profile, latency, slow_fraction, slow_seconds, seed,
                                   set(hang_dids))
        self.port = port
        self._listener: _Listener | None = None
        self._responses: dict[str, _Cached] = {}
        self._redirects: dict[str, bytes] = {}
        self._counts: Counter[str] = Counter()
        self._total = 0
        self._counted = threading.Condition()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """Base URL; stays the same across down() and up()."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def start(self) -> FakePLC:
        """Starts listening, unless the profile is `down` (then only the port is chosen)."""
        if self.behaviour.profile == "down":
            if not self.port:
                with socket.socket() as s:  # reserve a port number nobody listens on
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]
        else:
            self.up()
        return self

    def up(self) -> None:
        """Listens on the port (the same one after a down()); held requests get a fresh start."""
        with self._lock:
            if self._listener is not None:
                return
            listener = _Listener(self.port, self)
            self._listener, self.port = listener, listener.port
            listener.start()

    def down(self) -> None:
        """Closes the listening socket and open connections: clients get connection refused."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.kill()

    def stop(self) -> None:
        """Same as down(); never waits for held requests."""
        self.down()

    def __enter__(self) -> FakePLC:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self, did: str) -> None:
        """Requests for `did` get no answer from now on, until release(did)."""
        self.behaviour.hang_dids.add(did)

    def release(self, did: str) -> None:
        """Answers `did` again, held requests included: tests hold a run open, then let it end."""
        self.behaviour.hang_dids.discard(did)
        listener = self._listener
        if listener is not None:
            listener.release(did)

    def redirect(self, did: str, location: str) -> None:
        """Answers `did` with a 302 to `location` from now on, as a directory that moved might."""
        self._redirects[did] = http_response(302, b"{}", location=location)

    def _response_for(self, did: str) -> bytes:
        """The response bytes for `did`, built once per document (a replaced document is rebuilt)."""
        moved = self._redirects.get(did)
        if moved is not None:
            return moved
        doc = self.docs.get(did)
        if doc is None:
            return http_response(404, orjson.dumps({"message": f"DID not registered: {did}"}))
        cached = self._responses.get(did)
        if cached is None or cached.doc is not doc:
            cached = _Cached(doc, http_response(200, orjson.dumps(doc)))
            self._responses[did] = cached
        return cached.response

    def _count(self, did: str) -> None:
        with self._counted:
            self._counts[did] += 1
            self._total += 1
            self._counted.notify_all()

    def requests_for(self, did: str) -> int:
        """How many GETs asked for `did` (held ones included)."""
        with self._counted:
            return self._counts[did]

    @property
    def total_requests(self) -> int:
        with self._counted:
            return self._total

    def wait_for_requests(self, total: int, timeout: float = 5.0) -> bool:
        """Blocks until `total` requests have arrived: lets tests synchronise without sleeping."""
        with self._counted:
            return self._counted.wait_for(lambda: self._total >= total, timeout)


@click.command()
@click.option("--docs", "docs_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="JSON object of DID -> DID document (tools.generate --docs writes one).")
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--profile", type=click.Choice(PROFILES), default="healthy", show_default=True)
@click.option("--slow-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--latency", type=(float, float), default=(0.001, 0.005), show_default=True,
              metavar="MIN MAX", help="Seconds before an answer, uniform (0 0: at once).")
@click.option("--hang", "hang_dids", multiple=True, help="A DID never answered (repeatable).")
def main(docs_path: str, port: int, profile: str, slow_fraction: float, seed: int,
         latency: tuple[float, float], hang_dids: tuple[str, ...]) -> None:
    """Serve a fake PLC directory on 127.0.0.1 until interrupted."""
    docs = orjson.loads(Path(docs_path).read_bytes())
    plc = FakePLC(docs, port=port, profile=profile, latency=latency, slow_fraction=slow_fraction,
                  seed=seed, hang_dids=hang_dids)
    with plc:
        click.echo(f"fake PLC ({profile}, {len(docs)} DIDs) at {plc.url}; Ctrl-C to stop", err=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        click.echo(f"{plc.total_requests} requests served", err=True)


if __name__ == "__main__":
    main()
