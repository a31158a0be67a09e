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

import http
import os
import urllib.parse
from collections.abc import Mapping, Sequence

import libipld
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from pipeline.sources.streams import compression, open_stream
from shards.firehose.frames import route_key
from tools.fake_jetstream import FakeJetstream, serve_cli

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


class FakeRelay(FakeJetstream):
    """The server, run by an asyncio loop in a daemon thread; a context manager. Its lifecycle
    and the record of connections (`connections`, `cursors`) are FakeJetstream's."""

    def __init__(self, recording: str | os.PathLike[str] | Sequence[bytes], *,
                 host: str = "127.0.0.1", port: int = 0, drop_after: Sequence[int] = (),
                 error_after: Mapping[int, tuple[str, int]] | None = None) -> None:
        super().__init__([], host=host, port=port, drop_after=drop_after)
        frames = (read_recording(recording) if isinstance(recording, (str, os.PathLike))
                  else list(recording))
        self.frames = [(route_key(f)[0], f) for f in frames]
        seqs = [s for s, _ in self.frames if s is not None]
        self.first_seq, self.last_seq = (min(seqs), max(seqs)) if seqs else (0, 0)
        self._error_after = dict(error_after or {})

    @property
    def event_count(self) -> int:
        """Frames in the recording."""
        return len(self.frames)

    @property
    def url(self) -> str:
        """The server's root; the pipeline adds the subscribeRepos path."""
        return f"ws://{self._host}:{self.port}"

    @property
    def sent(self) -> list[int]:
        """Frames sent on each connection."""
        return [c.sent for c in self.connections]

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urllib.parse.urlsplit(request.path)
        if parts.path != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        cursor = dict(urllib.parse.parse_qsl(parts.query)).get("cursor")
        if cursor is not None and not cursor.isdigit():
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "bad cursor\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        info = self._register(urllib.parse.urlsplit(ws.request.path).query)
        cursor = info.cursor
        if cursor is not None and cursor > self.last_seq:
            await ws.send(error_frame("FutureCursor", "cursor in the future"))
            await ws.close()
            return
        if cursor is not None and cursor < self.first_seq - 1:
            await ws.send(info_frame("OutdatedCursor", "cursor older than the recording"))
        drop_at = (self._drop_after[info.number - 1] if info.number <= len(self._drop_after)
                   else None)
        error = self._error_after.get(info.number)
        for seq, frame in self.frames:
            if cursor is not None and seq is not None and seq <= cursor:
                continue
            if error is not None and info.sent >= error[1]:
                await ws.send(error_frame(error[0], "the relay ends this stream"))
                await ws.close()
                return
            if drop_at is not None and info.sent >= drop_at:
                await self._drop(ws, info)
                return
            await ws.send(frame)
            with self._lock:
                info.sent += 1
        await ws.wait_closed()


def main(argv: Sequence[str] | None = None) -> None:
    """Serves a recording until interrupted."""
    serve_cli(argv, FakeRelay, "python -m tools.fake_relay", __doc__.split("\n", 1)[0],
              "firehose recording (plain, gzip or zstd)", 6009, "frames")


if __name__ == "__main__":
    main()
