"""A local stand-in for a Jetstream v1 server, serving a recorded JSON-lines file.

For tests and for trying the pipeline without the network:

    python -m tools.fake_jetstream --file tests/data/jetstream/expected_v1.jsonl --port 6008
    pipeline run --jetstream ws://127.0.0.1:6008/subscribe

What it speaks of Jetstream's protocol (GET /subscribe, one JSON event per text message):
- `cursor` (unix µs): only events with `time_us >= cursor` are sent, in file order. Without a
  cursor it sends the whole file from the start; a real Jetstream would live-tail instead.
- `wantedCollections` (repeatable, exact NSIDs or prefixes ending in `.*`): commit events are
  filtered by collection; identity and account events are always sent.
- `maxMessageSizeBytes`: larger events are skipped (0 or absent: no limit).
- Lines that are not JSON objects with a `time_us` are sent unfiltered (for dead-letter tests).
After the file, the connection stays open and quiet, like a live stream with nothing new.

For tests it can drop connections (`drop_after=[60, 50]`: the first connection is cut after 60
messages, the second after 50, later ones are not), by closing TCP without a websocket close
frame, and it records every connection's parameters (`connections`).
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import http
import os
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

__all__ = ["ConnectionInfo", "FakeJetstream", "main"]

PATH = "/subscribe"


@dataclass(frozen=True)
class _Event:
    """One recorded line with the fields the filters need, parsed once at load."""

    raw: bytes
    time_us: int | None
    kind: str | None
    collection: str | None


@dataclass
class ConnectionInfo:
    """What one client connection asked for and what it got; snapshots are handed out."""

    number: int
    """1 for the first connection."""
    query: str
    cursor: int | None
    wanted_collections: tuple[str, ...]
    max_message_bytes: int | None
    sent: int = 0
    dropped: bool = False


class FakeJetstream:
    """The server, run by an asyncio loop in a daemon thread; a context manager."""

    def __init__(
        self,
        recording: str | os.PathLike[str] | Sequence[bytes],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        drop_after: Sequence[int] = (),
    ) -> None:
        """`recording`: a JSON-lines path, or the lines themselves (bytes, no newline).
        `port=0` picks a free port (see `.port`/`.url` once started)."""
        if isinstance(recording, (str, os.PathLike)):
            with open(recording, "rb") as f:
                lines: Sequence[bytes] = f.read().split(b"\n")
        else:
            lines = recording
        self._events = [_parse(line.rstrip(b"\r")) for line in lines if line.strip()]
        self._host = host
        self._requested_port = port
        self._drop_after = list(drop_after)
        self._lock = threading.Condition()
        self._connections: list[ConnectionInfo] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._shutdown: asyncio.Event | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeJetstream:
        """Binds and starts serving; raises OSError when the port is taken."""
        if self._thread is not None:
            raise RuntimeError("FakeJetstream already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="fake-jetstream", daemon=True)
        self._thread.start()
        self._port = ready.result(timeout=10)
        return self

    def stop(self) -> None:
        """Closes every connection and the listening socket; waits for the loop thread."""
        if self._thread is None or self._loop is None:
            return
        if self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeJetstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- what tests look at ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeJetstream not started")
        return self._port

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self.port}{PATH}"

    @property
    def connections(self) -> list[ConnectionInfo]:
        """Snapshots of every connection so far, in order."""
        with self._lock:
            return [dataclasses.replace(c) for c in self._connections]

    @property
    def event_count(self) -> int:
        """Events in the recording (before any filter)."""
        return len(self._events)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def cursors(self) -> list[int | None]:
        """The cursor each connection asked for (None: no cursor)."""
        return [c.cursor for c in self.connections]

    def wait_for_connections(self, n: int, timeout: float) -> bool:
        """True once at least n connections were accepted, False after timeout seconds."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._connections) >= n, timeout)

    # -- the server ---------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: concurrent.futures.Future[int]) -> None:
        self._shutdown = asyncio.Event()
        try:
            server: Server = await serve(
                self._handle, self._host, self._requested_port,
                process_request=self._check_request, ping_interval=None)
        except Exception as exc:  # noqa: BLE001 -- handed to start()'s caller
            ready.set_exception(exc)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        await self._shutdown.wait()
        server.close()
        await server.wait_closed()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answers 404 off /subscribe and 400 on a bad cursor, as Jetstream does."""
        parts = urllib.parse.urlsplit(request.path)
        if parts.path != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        for key, value in urllib.parse.parse_qsl(parts.query):
            if key in ("cursor", "maxMessageSizeBytes") and not _is_int(value):
                return connection.respond(http.HTTPStatus.BAD_REQUEST, f"bad {key}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        info = self._register(urllib.parse.urlsplit(ws.request.path).query)
        index = info.number - 1
        drop_at = self._drop_after[index] if index < len(self._drop_after) else None
        if drop_at is not None and drop_at <= 0:
            await self._drop(ws, info)
            return
        for event in self._events:
            if not _wanted(event, info):
                continue
            await ws.send(event.raw, text=True)
            with self._lock:
                info.sent += 1
            if drop_at is not None and info.sent >= drop_at:
                await self._drop(ws, info)
                return
        await ws.wait_closed()

    def _register(self, query: str) -> ConnectionInfo:
        params = urllib.parse.parse_qs(query)
        cursor = params.get("cursor", [None])[-1]
        size = params.get("maxMessageSizeBytes", [None])[-1]
        with self._lock:
            info = ConnectionInfo(
                number=len(self._connections) + 1,
                query=query,
                cursor=int(cursor) if cursor is not None else None,
                wanted_collections=tuple(params.get("wantedCollections", ())),
                max_message_bytes=int(size) if size is not None else None,
            )
            self._connections.append(info)
            self._lock.notify_all()
        return info

    async def _drop(self, ws: ServerConnection, info: ConnectionInfo) -> None:
        """Cuts TCP after flushing what was sent, with no close frame: a network failure."""
        with self._lock:
            info.dropped = True
        ws.transport.close()
        await ws.wait_closed()


def _parse(line: bytes) -> _Event:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return _Event(line, None, None, None)
    if not isinstance(obj, dict):
        return _Event(line, None, None, None)
    time_us = obj.get("time_us")
    commit = obj.get("commit")
    collection = commit.get("collection") if isinstance(commit, dict) else None
    return _Event(line, time_us if isinstance(time_us, int) else None, obj.get("kind"),
                  collection)


def _wanted(event: _Event, info: ConnectionInfo) -> bool:
    if event.time_us is None:
        return True
    if info.cursor is not None and event.time_us < info.cursor:
        return False
    if info.max_message_bytes and len(event.raw) > info.max_message_bytes:
        return False
    if event.kind != "commit" or not info.wanted_collections:
        return True
    collection = event.collection or ""
    return any(collection == w or (w.endswith(".*") and collection.startswith(w[:-1]))
               for w in info.wanted_collections)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def serve_cli(argv: Sequence[str] | None, server_class: type[FakeJetstream], prog: str,
              description: str, file_help: str, port: int, unit: str) -> None:
    """The command line of a stream stub: serves a recording until interrupted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--file", required=True, help=file_help)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port ({port}, 0: any free one)")
    parser.add_argument("--drop-after", type=int, action="append", default=[], metavar="K",
                        help=f"cut the n-th connection after K {unit} (repeat for later ones)")
    args = parser.parse_args(argv)
    server = server_class(args.file, host=args.host, port=args.port, drop_after=args.drop_after)
    with server:
        print(f"serving {server.event_count} {unit} of {args.file} at {server.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def main(argv: Sequence[str] | None = None) -> None:
    """Serves a file until interrupted."""
    serve_cli(argv, FakeJetstream, "python -m tools.fake_jetstream", __doc__.split("\n", 1)[0],
              "Jetstream JSON-lines recording", 6008, "messages")


if __name__ == "__main__":
    main()
