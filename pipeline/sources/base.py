"""What every event source gives the supervisor: raw lines with monotonic positions."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class SourceError(Exception):
    """The source cannot be opened or read (missing file, refused connection): a user's error."""


class Source(Protocol):
    """Yields `(position, raw)` pairs; positions never decrease. A live source may yield None
    when it has nothing new for a moment, so that what was read is not held back.

    The supervisor saves as cursor the low watermark: the position of the first event that is
    not yet committed, or `next_position` once everything read so far is committed."""

    name: str
    """Cursor name in the `cursors` table, e.g. `replay:/abs/path#fingerprint`."""

    resumable: bool
    """Whether a saved cursor can be used to start reading part-way."""

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes] | None]:
        """Reads from the saved cursor (None: from the start or live tail) until the end or close()."""
        ...

    @property
    def next_position(self) -> int:
        """Where to resume when every event yielded so far is committed."""
        ...

    @property
    def progress(self) -> tuple[int, int | None]:
        """(done, total) in the source's own unit (bytes of a file), for progress displays."""
        ...

    def close(self) -> None:
        """Asks events() to stop soon; safe to call from another thread or a signal handler."""
        ...
