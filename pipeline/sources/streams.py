"""Recorded files as one uncompressed byte stream: plain, gzip or zstd, told apart by magic bytes.

Both kinds of recording (Jetstream JSON lines, firehose frames) go through here, so either may
be compressed either way; `detect_format` tells the two apart by their first bytes."""
from __future__ import annotations

import gzip
import io
from typing import BinaryIO

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
FORMATS = ("jetstream", "firehose")
_SNIFF_BYTES = 8


def compression(head: bytes) -> str:
    """`gzip`, `zstd` or `plain`, from a file's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "plain"


def open_stream(raw: BinaryIO, kind: str) -> BinaryIO:
    """The uncompressed bytes of `raw` (a file opened in binary mode), buffered."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=False)
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
    return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[arg-type]


def skip(stream: BinaryIO, n: int) -> int:
    """Moves `n` bytes forward (reading, where the stream cannot seek); returns bytes skipped."""
    if stream.seekable():
        stream.seek(n)
        return n
    done = 0
    while done < n:
        chunk = stream.read(min(1 << 20, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def detect_format(head: bytes) -> str:
    """`firehose` when the uncompressed stream opens with `[u32 LE length][CBOR map]`, else
    `jetstream` (JSON lines open with `{` or white space)."""
    if len(head) >= 5 and 0 < int.from_bytes(head[:4], "little") < 1 << 26 \
            and 0xa0 <= head[4] <= 0xbf:
        return "firehose"
    return "jetstream"


def sniff(path: str) -> tuple[str, str]:
    """(compression, format) of a recorded file; OSError when it cannot be read."""
    with open(path, "rb") as raw:
        kind = compression(raw.read(_SNIFF_BYTES))
        raw.seek(0)
        with open_stream(raw, kind) as stream:
            try:
                head = stream.read(_SNIFF_BYTES)
            except (EOFError, gzip.BadGzipFile, zstandard.ZstdError):
                head = b""
    return kind, detect_format(head)
