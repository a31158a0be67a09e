"""A local stand-in for a relay's firehose (`com.atproto.sync.subscribeRepos`), serving a recording.

For tests and for trying the pipeline without the network:

    python -m tools.fake_relay --file tests/data/frames.bin.zst --port 6009
    pipeline run --firehose ws://127.0.0.1:6009

What it speaks of the protocol: GET /xrpc/com.atproto.sync.subscribeRepos, one binary frame per
message, in the recording's order. `cursor` (a seq): only frames whose seq is above it are sent;
a cursor older than the first recorded seq gets an `#info` OutdatedCursor frame first, one above
the last an error frame FutureCursor and the end of the connection, as a relay does. Without a
cursor the whole recording is sent. After it, the connection stays open and quiet.

For tests it can drop connections (`drop_after=[60, 50]`: the first connection is cut after 60
frames, the second after 50), by closing TCP without a close frame, or end one with an error
frame (`error_after={1: ("ConsumerTooSlow", 40)}`: the first connection gets it after 40
frames); it records every connection's cursor (`cursors`).
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http
import os
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from types import TracebackType

import libipld
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from pipeline.sources.streams import compression, open_stream
from shards.firehose.frames import route_key

__all__ = ["FakeRelay", "read_recording", "error_frame", "info_frame"]

PATH = "/xrpc/com.atproto.sync.subscribeRepos"


def read_recording(path: str | os.PathLike[str]) -> list[bytes]:
    """The frames of a recording (plain, gzip or zstd)."""
    with open(path, "rb") as raw:
        kind = compression(raw.read(4))
        raw.seek(0)
        with open_stream(raw, kind) as f:
            data = f.read()
    frames, at = [], 0
    while at + 4 <= len(data):
        n = int.from_bytes(data[at:at + 4], "little")
        frames.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return frames


def error_frame(error: str, message: str = "") -> bytes:
    """An error frame: header {op: -1}, body {error, message}."""
    return libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor(
        {"error": error, "message": message})


def info_frame(name: str, message: str = "") -> bytes:
    """An #info frame (OutdatedCursor)."""
    return libipld.encode_dag_cbor({"op": 1, "t": "#info"}) + libipld.encode_dag_cbor(
        {"name": name, "message": message})


class FakeRelay:
    """The server, run by an asyncio loop in a daemon thread; a context manager."""

    def __init__(self, recording: str | os.PathLike[str] | Sequence[bytes], *,
                 host: str = "127.0.0.1", port: int = 0, drop_after: Sequence[int] = (),
                 error_after: Mapping[int, tuple[str, int]] | None = None) -> None:
        frames = (read_recording(recording) if isinstance(recording, (str, os.PathLike))
                  else list(recording))
        self.frames = [(route_key(f)[0], f) for f in frames]
        seqs = [s for s, _ in self.frames if s is not None]
        self.first_seq, self.last_seq = (min(seqs), max(seqs)) if seqs else (0, 0)
        self._host = host
        self._requested_port = port
        self._drop_after = list(drop_after)
        self._error_after = dict(error_after or {})
        self._lock = threading.Condition()
        self.cursors: list[int | None] = []
        self.sent: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._shutdown: asyncio.Event | None = None
        self._port: int | None = None

    def start(self) -> FakeRelay:
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-relay",
                                        daemon=True)
        self._thread.start()
        self._port = ready.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeRelay:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeRelay not started")
        return self._port

    @property
    def url(self) -> str:
        """The server's root; the pipeline adds the subscribeRepos path."""
        return f"ws://{self._host}:{self.port}"

    def wait_for_connections(self, n: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.cursors) >= n, timeout)

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
            server = await serve(self._handle, self._host, self._requested_port,
                                 process_request=self._check_request, ping_interval=None,
                                 max_size=None)
        except Exception as exc:  # noqa: BLE001 -- handed to start()'s caller
            ready.set_exception(exc)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        await self._shutdown.wait()
        server.close()
        await server.wait_closed()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urllib.parse.urlsplit(request.path)
        if parts.path != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        cursor = dict(urllib.parse.parse_qsl(parts.query)).get("cursor")
        if cursor is not None and not cursor.isdigit():
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "bad cursor\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        value = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(ws.request.path).query)).get(
            "cursor")
        cursor = int(value) if value is not None else None
        with self._lock:
            self.cursors.append(cursor)
            self.sent.append(0)
            number = len(self.cursors)
            self._lock.notify_all()
        if cursor is not None and cursor > self.last_seq:
            await ws.send(error_frame("FutureCursor", "cursor in the future"))
            await ws.close()
            return
        if cursor is not None and cursor < self.first_seq - 1:
            await ws.send(info_frame("OutdatedCursor", "cursor older than the recording"))
        drop_at = self._drop_after[number - 1] if number <= len(self._drop_after) else None
        error = self._error_after.get(number)
        count = 0
        for seq, frame in self.frames:
            if cursor is not None and seq is not None and seq <= cursor:
                continue
            if error is not None and count >= error[1]:
                await ws.send(error_frame(error[0], "the relay ends this stream"))
                await ws.close()
                return
            if drop_at is not None and count >= drop_at:
                ws.transport.close()  # no close frame: a network failure
                return
            await ws.send(frame)
            count += 1
            with self._lock:
                self.sent[number - 1] = count
        await ws.wait_closed()


def main(argv: Sequence[str] | None = None) -> None:
    """Serves a recording until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tools.fake_relay",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--file", required=True, help="firehose recording (plain, gzip or zstd)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=6009, help="port (6009, 0: any free one)")
    parser.add_argument("--drop-after", type=int, action="append", default=[], metavar="K",
                        help="cut the n-th connection after K frames (repeat for later ones)")
    args = parser.parse_args(argv)
    server = FakeRelay(args.file, host=args.host, port=args.port, drop_after=args.drop_after)
    with server:
        print(f"serving {len(server.frames)} frames of {args.file} at {server.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
