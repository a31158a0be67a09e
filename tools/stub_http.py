"""The event loop of the HTTP stubs (PLC directory, PDS) that tests and benchmarks run on 127.0.0.1.

They share the machine with the system under test, so this is one thread running a selector
loop that parses only the request line and the Connection header, and answers with bytes the
stub built (once per document, ideally). A stub says per request: answer now, after a delay,
or hold the request under a key until `release(key)`; it can go down (connections refused) and
come back up on the same port."""
from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import unquote

import orjson

MAX_HEAD = 64 * 1024  # a request head larger than this is refused (400)
REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable"}


def http_response(status: int, body: bytes, *, close: bool = False,
                  content_type: str = "application/json; charset=utf-8",
                  headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response, ready for the socket."""
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n")
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


@dataclass(frozen=True)
class Request:
    """The little of a request head a stub looks at."""

    method: str
    path: str  # percent-decoded, without the query string
    query: str  # as sent
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
        path, _, query = target.partition("?")
        if "%" in path:
            path = unquote(path)
        return cls(method, path, query, keep_alive)


@dataclass(frozen=True)
class Reply:
    """A stub's answer to one request: `response` after `delay` seconds, or none until
    `release(hold)` (then the stub is asked again)."""

    response: bytes = b""
    delay: float = 0.0
    hold: str | None = None


@dataclass(eq=False)
class _Connection:
    """One client socket: bytes read but not yet parsed, bytes not yet sent, and its state."""

    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    busy: bool = False  # a request awaits its (delayed or never coming) answer
    held: str | None = None  # the key of the request held for release, if any
    writing: bool = False  # also waiting for writability: the outbox did not fit at once
    closing: bool = False  # close once the outbox is flushed
    closed: bool = False


@dataclass(frozen=True)
class _Pending:
    """An answer held back until its due time."""

    conn: _Connection
    response: bytes
    keep_alive: bool


class _Listener:
    """One listening generation: a thread running the event loop; its connections end with it."""

    def __init__(self, port: int, stub: LoopStub) -> None:
        self.stub = stub
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
        self.held: dict[str, dict[_Connection, Request]] = {}  # held requests by key
        self.releases: list[str] = []  # keys whose held requests are to be answered now
        self.sequence = itertools.count()  # ties in the timer heap never compare _Pending
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"{stub.name}-{self.port}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kill(self) -> None:
        """Stops listening, releases held requests and cuts every open connection."""
        self.stopping = True
        self.wake()
        self.thread.join(timeout=5)

    def release(self, key: str) -> None:
        """Has the loop answer the requests held under `key` (from any thread)."""
        self.releases.append(key)
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
            key = self.releases.pop()
            for conn, request in self.held.pop(key, {}).items():  # closed ones left already
                conn.busy, conn.held = False, None
                self.reply(conn, request, self.stub.reply(request))
                self.serve(conn)  # requests that arrived meanwhile (pipelining)

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
                self.stub.count(request)
                self.reply(conn, request, self.stub.reply(request))

    def reply(self, conn: _Connection, request: Request, reply: Reply) -> None:
        if reply.hold is not None:
            conn.busy, conn.held = True, reply.hold  # until released, hung up or the end
            self.held.setdefault(reply.hold, {})[conn] = request
        elif reply.delay <= 0:
            self.send(conn, reply.response, request.keep_alive)
        else:
            conn.busy = True
            pending = _Pending(conn, reply.response, request.keep_alive)
            heapq.heappush(self.timers, (time.monotonic() + reply.delay, next(self.sequence),
                                         pending))

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


class LoopStub:
    """A stub's life: start (or only choose a port, when `listen` is False), down, up, stop,
    release held requests, count requests by key. Subclasses answer with `reply` and name what
    they count with `key_of`."""

    name = "stub"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._listener: _Listener | None = None
        self._counts: Counter[str] = Counter()
        self._total = 0
        self._counted = threading.Condition()
        self._lock = threading.Lock()

    # -- what a stub answers -----------------------------------------------------------------
    def reply(self, request: Request) -> Reply:  # pragma: no cover - every stub has its own
        raise NotImplementedError

    def key_of(self, request: Request) -> str:
        """What requests are counted (and held) by."""
        return request.path

    # -- life ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL; stays the same across down() and up()."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_until_interrupted(self, what: str) -> None:
        """A stub's command line: serves until Ctrl-C, saying on stderr what it is and where
        ("fake PLC (...) at URL; ..."), then how many requests it served."""
        with self:
            print(f"{what} at {self.url}; Ctrl-C to stop", file=sys.stderr, flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            print(f"{self.total_requests} requests served", file=sys.stderr, flush=True)

    def start(self, listen: bool = True) -> Self:
        """Starts listening; without `listen` only a port nobody listens on is chosen."""
        if listen:
            self.up()
        elif not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
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

    def release_held(self, key: str) -> None:
        """Answers the requests held under `key` (asking `reply` again)."""
        listener = self._listener
        if listener is not None:
            listener.release(key)

    # -- counting ----------------------------------------------------------------------------
    def count(self, request: Request) -> None:
        key = self.key_of(request)
        with self._counted:
            self._counts[key] += 1
            self._total += 1
            self._counted.notify_all()

    def requests_for(self, key: str) -> int:
        """How many requests were counted under `key` (held ones included)."""
        with self._counted:
            return self._counts[key]

    @property
    def total_requests(self) -> int:
        with self._counted:
            return self._total

    def wait_for_requests(self, total: int, timeout: float = 5.0) -> bool:
        """Blocks until `total` requests have arrived: lets tests synchronise without sleeping."""
        with self._counted:
            return self._counted.wait_for(lambda: self._total >= total, timeout)
