"""Live Jetstream v1 source: JSON events over a websocket, resumable by `time_us` cursor.

Jetstream's cursor is a unix time in microseconds; a connection asked for `cursor=N` replays
events from N on, then follows the live stream. We hand the supervisor each event's `time_us`
(clamped so that positions never go backwards) and, on any failure, reconnect from the last
position minus a few seconds of rewind, so nothing is missed and the overlap is absorbed by the
pipeline's idempotent writes.

Message size: we ask the server not to send events larger than `max_message_bytes`
(Jetstream's `maxMessageSizeBytes`; such events are dropped there, as Jetstream documents), and
set the same limit in the websocket client as a safety net. If a server ignores the parameter
and sends a bigger message, the client closes the connection (1009 "message too big"); that is
logged like any other drop and retried with backoff, so it can stall the stream but never spin
or exhaust memory.
"""
from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Iterator, Sequence

import orjson

from pipeline.sources.base import SourceError
from pipeline.sources.live import ConnectionStats, Item, LiveSource

__all__ = ["ConnectionStats", "JetstreamSource", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
_MAX_COLLECTIONS = 100
"""Jetstream refuses more wantedCollections than this."""
_NSID = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(\.[A-Za-z0-9-]+)+(\.\*)?$|^[A-Za-z][A-Za-z0-9-]*\.\*$")


class JetstreamSource(LiveSource):
    """Follows a Jetstream endpoint; see the module docstring for cursors and reconnects.

    `events()` also ends on reaching `stop_at_time_us`."""

    format = "jetstream"
    fatal_hint = "check the URL (usually ending in /subscribe) and the collections"

    def __init__(
        self,
        url: str,
        collections: Sequence[str] = (),
        rewind_seconds: float = 3.0,
        read_timeout: float = 30.0,
        max_backoff: float = 60.0,
        stop_at_time_us: int | None = None,
        *,
        initial_backoff: float = 0.5,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_timeout: float = 10.0,
    ) -> None:
        """`stop_at_time_us`: for replays of a finite recording, events() returns right after
        yielding the first event whose own time_us is >= this bound.
        `read_timeout`: seconds without any message before the connection is considered dead;
        keep it above the longest quiet gap expected for the wanted collections."""
        self._base_url, self._query = _check_url(url)
        if isinstance(collections, str):
            collections = (collections,)
        self._collections = _check_collections(collections)
        for label, value in (("rewind_seconds", rewind_seconds), ("max_backoff", max_backoff)):
            if value < 0:
                raise SourceError(f"jetstream: {label} must be >= 0, got {value}")
        for label, value in (("read_timeout", read_timeout), ("open_timeout", open_timeout),
                             ("max_message_bytes", max_message_bytes)):
            if value <= 0:
                raise SourceError(f"jetstream: {label} must be > 0, got {value}")
        super().__init__(read_timeout=read_timeout, open_timeout=open_timeout,
                         initial_backoff=initial_backoff, max_backoff=max_backoff,
                         max_message_bytes=max_message_bytes)
        self._rewind_us = int(rewind_seconds * 1_000_000)
        self._stop_at = stop_at_time_us
        self.name = f"jetstream:{self._base_url}"
        self._position = 0
        self._last_time_us: int | None = None
        self._tail_started_us: int | None = None

    # -- the Source protocol -------------------------------------------------------------

    @property
    def next_position(self) -> int:
        """The last yielded position (0 before any event: resuming from 0 means live tail)."""
        return self._position

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes] | None]:
        """Yields `(position, raw)` from `cursor - rewind` (None or <= 0: live tail)."""
        if cursor is not None and cursor > 0:
            self._position = cursor
            resume: int | None = max(1, cursor - self._rewind_us)
            if self._stop_at is not None and cursor > self._stop_at:
                return
        else:
            self._position = 0
            resume = None
            self._tail_started_us = time.time_ns() // 1000
        yield from self._follow(resume)

    def _message(self, raw: bytes) -> Item:
        """Each event goes on at the newest time_us seen (positions never go backwards)."""
        time_us = _time_us(raw)
        if time_us is not None and time_us > self._position:
            self._position = time_us
        self._last_time_us = time_us
        return self._position, raw

    def _finished(self) -> bool:
        return (self._stop_at is not None and self._last_time_us is not None
                and self._last_time_us >= self._stop_at)

    def _connect_url(self, resume: int | None) -> str:
        """The URL's own query string, then wantedCollections, the size cap and the cursor."""
        params: list[tuple[str, str]] = [("wantedCollections", c) for c in self._collections]
        if "maxMessageSizeBytes" not in {k for k, _ in urllib.parse.parse_qsl(self._query)}:
            params.append(("maxMessageSizeBytes", str(self._max_message_bytes)))
        if resume is not None:
            params.append(("cursor", str(resume)))
        query = "&".join(q for q in (self._query, urllib.parse.urlencode(params)) if q)
        return f"{self._base_url}?{query}" if query else self._base_url

    def _resume_cursor(self, previous: int | None) -> int | None:
        """Last position minus rewind; before any event, the live tail's start minus rewind."""
        base = self._position or self._tail_started_us
        return None if not base else max(1, base - self._rewind_us)


def _time_us(raw: bytes) -> int | None:
    """The event's time_us, or None when the message is not a JSON object with an int one."""
    try:
        value = orjson.loads(raw).get("time_us")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_url(url: str) -> tuple[str, str]:
    """Returns (URL without query or fragment, query); SourceError on a user's mistake."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError as exc:
        raise SourceError(f"jetstream: malformed URL {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise SourceError(
            f"jetstream: URL must start with ws:// or wss://, got {url!r}"
            " (e.g. wss://jetstream2.us-east.bsky.network/subscribe)")
    if not parts.hostname:
        raise SourceError(f"jetstream: URL has no host: {url!r}")
    query = parts.query
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == "cursor":
            raise SourceError(
                f"jetstream: remove cursor= from the URL {url!r}; the saved cursor is used")
        if key == "compress" and value.lower() in ("1", "true", "t"):
            raise SourceError(f"jetstream: compress=true (zstd frames) is not supported: {url!r}")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return base, query


def _check_collections(collections: Sequence[str]) -> tuple[str, ...]:
    """Jetstream accepts NSIDs or NSID prefixes ending in `.*`, at most 100 of them."""
    result = tuple(collections)
    if len(result) > _MAX_COLLECTIONS:
        raise SourceError(
            f"jetstream: at most {_MAX_COLLECTIONS} collections, got {len(result)}")
    for collection in result:
        if not isinstance(collection, str) or not _NSID.match(collection):
            raise SourceError(
                f"jetstream: not a collection NSID (or prefix ending in .*): {collection!r}")
    return result
