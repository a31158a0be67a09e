"""A firehose recording: `[u32 little-endian length][frame bytes]` records, plain, gzip or zstd.

Positions (the replay cursor, a dead letter's `position`) are byte offsets of each record in
the uncompressed stream, as JSON lines use, so a recording resumes where it stopped whatever
seqs it holds. A record longer than MAX_FRAME_BYTES means the file is damaged from there on:
its head is handed on (the shard dead-letters it) and the replay ends."""
from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator

import zstandard

from pipeline.sources.base import SourceError
from pipeline.sources.file import FileSource
from pipeline.sources.sequence import SeqOrder
from pipeline.sources.streams import skip

log = logging.getLogger("pipeline.recording")

MAX_FRAME_BYTES = 8 << 20
DAMAGED_HEAD_BYTES = 64 * 1024


class RecordingSource(FileSource):
    """Replays a recording frame by frame; resumes from a byte offset of the uncompressed stream."""

    format = "firehose"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.order = SeqOrder()

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes]]:
        f = self._open()
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
            if self._raw is not None:
                self._raw.close()

    @property
    def skipped(self) -> int:
        """Frames left out because their seq did not go up."""
        return self.order.skipped
