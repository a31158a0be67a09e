"""A PLC directory stub on 127.0.0.1: serves DID documents and misbehaves on demand.

Tests and benchmarks use it to make identity resolution healthy, slow for some DIDs, hang,
refuse connections (down) or accept and never answer, and to count who asked for what.
"""
from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import orjson

PROFILES = ("healthy", "slow", "hang", "down", "never")


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


class _Server(ThreadingHTTPServer):
    """One listening generation: its connections and held requests end with it."""

    daemon_threads = True
    block_on_close = False  # stop() must never wait for hanging handlers
    request_queue_size = 1024  # hundreds of clients may connect at once
    allow_reuse_address = True  # up() binds the same port again

    def __init__(self, port: int, plc: FakePLC) -> None:
        self.plc = plc
        self.released = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients and down() cut connections
            super().handle_error(request, client_address)

    def kill(self) -> None:
        """Stops listening, releases held requests and cuts every open connection."""
        self.shutdown()
        self.server_close()
        self.released.set()
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """GET /{did}: the document, 404, or a held connection, as the behaviour says."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients pool connections
    disable_nagle_algorithm = True  # headers and body leave at once, no delayed-ACK stall

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        plc, released = self.server.plc, self.server.released
        did = unquote(self.path.split("?", 1)[0].lstrip("/"))
        plc._count(did)
        b = plc.behaviour
        if b.profile == "never" or did in b.hang_dids:
            released.wait()
            self.close_connection = True
            return
        if b.profile == "slow" and b.is_slow(did):
            if released.wait(b.slow_seconds):
                self.close_connection = True
                return
        elif released.wait(random.uniform(*b.latency)):
            self.close_connection = True
            return
        doc = plc.docs.get(did)
        if doc is None:
            self._send(404, {"message": f"DID not registered: {did}"})
        else:
            self._send(200, doc)

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


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
        self._server: _Server | None = None
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
        return self._server is not None

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
            if self._server is not None:
                return
            self._server = _Server(self.port, self)
            self.port = self._server.server_address[1]
            server = self._server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"fake-plc-{self.port}", daemon=True).start()

    def down(self) -> None:
        """Closes the listening socket and open connections: clients get connection refused."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.kill()

    def stop(self) -> None:
        """Same as down(); never waits for held requests."""
        self.down()

    def __enter__(self) -> FakePLC:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
@click.option("--hang", "hang_dids", multiple=True, help="A DID never answered (repeatable).")
def main(docs_path: str, port: int, profile: str, slow_fraction: float, seed: int,
         hang_dids: tuple[str, ...]) -> None:
    """Serve a fake PLC directory on 127.0.0.1 until interrupted."""
    docs = orjson.loads(Path(docs_path).read_bytes())
    plc = FakePLC(docs, port=port, profile=profile, slow_fraction=slow_fraction, seed=seed,
                  hang_dids=hang_dids)
    with plc:
        click.echo(f"fake PLC ({profile}, {len(docs)} DIDs) at {plc.url}; Ctrl-C to stop", err=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        click.echo(f"{plc.total_requests} requests served", err=True)


if __name__ == "__main__":
    main()
