"""A firehose recording: `[u32 little-endian length][frame bytes]` records, plain, gzip or zstd.

Positions (the replay cursor, a dead letter's `position`) are byte offsets of each record in
the uncompressed stream, as JSON lines use, so a recording resumes where it stopped whatever
seqs it holds. A record longer than MAX_FRAME_BYTES means the file is damaged from there on:
its head is handed on (the shard dead-letters it) and the replay ends."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from pipeline.sources.base import SourceError
from pipeline.sources.sequence import SeqOrder
from pipeline.sources.streams import compression, open_stream, skip

log = logging.getLogger("pipeline.recording")

MAX_FRAME_BYTES = 8 << 20
DAMAGED_HEAD_BYTES = 64 * 1024
_FINGERPRINT_BYTES = 64 * 1024


class RecordingSource:
    """Replays a recording frame by frame; resumes from a byte offset of the uncompressed stream."""

    format = "firehose"
    resumable = True

    def __init__(self, path: str) -> None:
        self._closed = threading.Event()
        self._next = 0
        self._raw: BinaryIO | None = None
        self.order = SeqOrder()
        self.path = os.path.abspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(_FINGERPRINT_BYTES)
            self._total: int | None = os.path.getsize(self.path)
        except FileNotFoundError:
            raise SourceError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise SourceError(f"is a directory, not a file: {path}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from None
        self._compression = compression(head)
        self.name = f"replay:{self.path}#{hashlib.sha256(head).hexdigest()[:16]}"

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes]]:
        self._raw = open(self.path, "rb")
        f = open_stream(self._raw, self._compression)
        try:
            pos = skip(f, cursor) if cursor else 0
            self._next = pos
            read = f.read
            while not self._closed.is_set():
                start = pos
                head = read(4)
                if not head:
                    break
                size = int.from_bytes(head, "little")
                if len(head) < 4 or size > MAX_FRAME_BYTES:
                    log.error("%s: record at byte %d %s; the rest of the file is not read",
                              self.path, start, "is cut short" if len(head) < 4
                              else f"claims {size} bytes")
                    self._next = pos + len(head)
                    yield start, head + read(DAMAGED_HEAD_BYTES)
                    break
                frame = read(size)
                pos += 4 + len(frame)
                self._next = pos
                admit, _seq = self.order.admit(frame)
                if admit:
                    yield start, frame
        except (OSError, EOFError, gzip.BadGzipFile, zstandard.ZstdError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from None
        finally:
            f.close()
            self._raw.close()

    @property
    def skipped(self) -> int:
        """Frames left out because their seq did not go up."""
        return self.order.skipped

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
