"""Test aids: an HTTP stub on 127.0.0.1 that plays a PLC directory, a did:web or a well-known host.

Canned answers by path, request and connection counts, slow oversized bodies, and a "hang"
mode (accept, never answer) for outages. Never used by the pipeline itself."""
from __future__ import annotations

import json
import ssl
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .config import IdentityConfig


def did_document(
    did: str, handle: str | None = None, pds: str | None = "https://pds.example.com",
    *, also_known_as: list[str] | None = None,
) -> dict[str, Any]:
    """A minimal atproto DID document."""
    aka = also_known_as if also_known_as is not None else ([f"at://{handle}"] if handle else [])
    doc: dict[str, Any] = {"@context": ["https://www.w3.org/ns/did/v1"], "id": did,
                           "alsoKnownAs": aka, "verificationMethod": [], "service": []}
    if pds:
        doc["service"].append(
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}
        )
    return doc


def local_config(dns_server: str | None = None, **overrides: Any) -> IdentityConfig:
    """A config for tests: private addresses allowed, plain-HTTP web fetches, short timeouts."""
    values: dict[str, Any] = dict(
        dns_server=dns_server, allow_private_addresses=True, web_scheme="http",
        connect_timeout=1.0, read_timeout=1.0, total_timeout=3.0, dns_timeout=0.5,
    )
    values.update(overrides)
    return IdentityConfig(**values)


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream_total: int = 0  # > 0: stream this many bytes instead of `body`
    chunk: int = 16 * 1024
    pause: float = 0.0  # between chunks
    declare_length: bool = False
    drop: bool = False  # close the connection after answering, without saying so


@dataclass
class StreamResult:
    """What the server managed to send of a streamed body, and whether the client hung up."""

    sent: int = 0
    aborted: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    host: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        stub = self.server.stub
        stub._record(Seen("GET", self.path, self.headers.get("Host", "")))
        if stub.hanging:
            stub._release.wait()
            self.close_connection = True
            return
        stub._gate.wait()  # open unless the test holds answers back
        route = stub.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(status=404, body=b"not found")
        if route.stream_total:
            self._stream(stub, route)
            return
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        self.wfile.write(route.body)
        self.close_connection = route.drop

    def _stream(self, stub: StubServer, route: Route) -> None:
        result = stub.streams.setdefault(self.path, StreamResult())
        self.close_connection = True
        try:
            self.send_response(route.status)
            self.send_header("Content-Type", "application/json")
            if route.declare_length:
                self.send_header("Content-Length", str(route.stream_total))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b'{"id": "')
            block = b"x" * route.chunk
            while result.sent < route.stream_total:
                self.wfile.write(block)
                self.wfile.flush()
                result.sent += len(block)
                if route.pause:
                    stub._stopping.wait(route.pause)  # pacing, not synchronisation
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            result.aborted = True
        finally:
            result.done.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the default 5 drops the SYNs of a burst of clients while accept lags
    stub: StubServer

    def process_request(self, request: Any, client_address: Any) -> None:
        self.stub._connected()
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that hang up: on purpose
            super().handle_error(request, client_address)


class StubServer:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port); use as a context manager."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.streams: dict[str, StreamResult] = {}
        self.seen: list[Seen] = []
        self.connections = 0
        self.hanging = False
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> StubServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.stub = self
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"stub-http-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._release.set()
        self._gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def route(self, path: str, body: bytes | str | dict[str, Any] | list[Any] = b"", *,
              status: int = 200, headers: dict[str, str] | None = None,
              drop: bool = False) -> None:
        """Serves `body` (dicts and lists as JSON) at `path`; `drop`: then closes the
        keep-alive connection unannounced, as an idle timeout would."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.routes[path] = Route(status=status, body=body, headers=dict(headers or {}), drop=drop)

    def document(self, doc: dict[str, Any], path: str | None = None) -> None:
        """Serves a DID document where a PLC directory would (`/{did}`) unless `path` is given."""
        self.route(path or f"/{doc['id']}", doc, headers={"Content-Type": "application/json"})

    def stream(self, path: str, total: int, *, chunk: int = 16 * 1024, pause: float = 0.0,
               declare_length: bool = False) -> StreamResult:
        """Serves a `total`-byte body in chunks; the result tells how much went out."""
        self.routes[path] = Route(stream_total=total, chunk=chunk, pause=pause,
                                  declare_length=declare_length)
        return self.streams.setdefault(path, StreamResult())

    def hang(self) -> None:
        """From now on accept connections and read requests, but never answer."""
        self._release.clear()
        self.hanging = True

    def serve(self) -> None:
        """Answer again; requests left hanging are closed unanswered."""
        self.hanging = False
        self._release.set()

    def hold(self) -> None:
        """Requests are read and counted but not answered until release()."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if path is None or s.path == path)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1
