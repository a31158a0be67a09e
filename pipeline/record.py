"""`pipeline record`: captures a live source to a zstd file that `pipeline run --replay` reads.

A firehose becomes `[u32 LE length][frame]` records, Jetstream becomes JSON lines; both are
zstd-compressed, so the file is about a fifth of what crossed the network. The file is closed
properly (its last zstd frame ended) on the time or event limit, and on SIGINT/SIGTERM."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

ZSTD_LEVEL = 3


@dataclass
class Recorded:
    """What a recording holds when it is done."""

    events: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def record(source: Any, out: BinaryIO, *, seconds: float | None, events: int | None,
           cursor: int | None = None) -> Recorded:
    """Writes what `source` yields until a limit or a signal; returns the figures."""
    framed = getattr(source, "format", "jetstream") == "firehose"
    done = Recorded()
    started = time.monotonic()
    deadline = None if seconds is None else started + seconds
    previous = {sig: signal.signal(sig, lambda *_: source.close())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    writer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(out, closefd=False)
    try:
        for item in source.events(cursor):
            if item is not None:
                raw = item[1]
                writer.write(len(raw).to_bytes(4, "little") + raw if framed else raw + b"\n")
                done.events += 1
                done.bytes_in += len(raw)
            if (events is not None and done.events >= events) or (
                    deadline is not None and time.monotonic() >= deadline):
                source.close()
                break
    finally:
        writer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        done.seconds = time.monotonic() - started
        done.bytes_out = out.tell()
    return done
