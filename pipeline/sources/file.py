"""A recorded Jetstream file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, or `-` for stdin); positions
are byte offsets of the uncompressed stream."""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from pipeline.sources.base import SourceError
from pipeline.sources.streams import compression, open_stream, skip
from shards.events import MAX_LINE_BYTES

_FINGERPRINT_BYTES = 64 * 1024


class FileSource:
    """Replays a file line by line; resumes from a byte offset of the uncompressed stream."""

    format = "jetstream"

    def __init__(self, path: str) -> None:
        self._closed = threading.Event()
        self._next = 0
        self._raw: BinaryIO | None = None
        self._total: int | None = None
        if path == "-":
            self.path = "-"
            self.name = "replay:stdin"
            self.resumable = False
            return
        self.path = os.path.abspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(_FINGERPRINT_BYTES)
            self._total = os.path.getsize(self.path)
        except FileNotFoundError:
            raise SourceError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise SourceError(f"is a directory, not a file: {path}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from None
        self._compression = compression(head)
        digest = hashlib.sha256(head).hexdigest()[:16]
        self.name = f"replay:{self.path}#{digest}"
        self.resumable = True

    def _open(self) -> BinaryIO:
        if self.path == "-":
            return sys.stdin.buffer
        self._raw = open(self.path, "rb")
        return open_stream(self._raw, self._compression)

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes]]:
        f = self._open()
        try:
            pos = 0
            if cursor and self.resumable:
                pos = skip(f, cursor)
            self._next = pos
            readline = f.readline
            while not self._closed.is_set():
                line = readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                start = pos
                pos += len(line)
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while True:  # skip the rest; the worker dead-letters the oversized head
                        rest = readline(1 << 20)
                        pos += len(rest)
                        if not rest or rest.endswith(b"\n"):
                            break
                self._next = pos
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield start, line
        except (OSError, EOFError, gzip.BadGzipFile, zstandard.ZstdError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from None
        finally:
            if f is not sys.stdin.buffer:
                f.close()
            if self._raw is not None:
                self._raw.close()

    @property
    def next_position(self) -> int:
        return self._next

    @property
    def progress(self) -> tuple[int, int | None]:
        if self._raw is not None and not self._raw.closed and self._total is not None:
            try:
                return self._raw.tell(), self._total
            except (OSError, ValueError):
                pass
        return self._next, self._total

    def close(self) -> None:
        self._closed.set()
