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

import contextlib
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import orjson
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from pipeline.sources.base import SourceError
from pipeline.sources.reconnect import FATAL_HTTP, backoff, describe, receive

__all__ = ["ConnectionStats", "JetstreamSource", "DEFAULT_MAX_MESSAGE_BYTES"]

log = logging.getLogger("pipeline.jetstream")

DEFAULT_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
_MAX_COLLECTIONS = 100
"""Jetstream refuses more wantedCollections than this."""
_NSID = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(\.[A-Za-z0-9-]+)+(\.\*)?$|^[A-Za-z][A-Za-z0-9-]*\.\*$")


@dataclass
class ConnectionStats:
    """What the reader thread has been through; for status displays and tests."""

    connects: int = 0
    """Successful websocket handshakes."""
    failures: int = 0
    """Failed connection attempts plus dropped or timed-out connections."""
    last_error: str | None = None
    last_cursor: int | None = None
    """Cursor asked for by the latest attempt (None: live tail)."""


class JetstreamSource:
    """Follows a Jetstream endpoint; see the module docstring for cursors and reconnects.

    `events()` blocks (it runs in the supervisor's reader thread) and ends only on `close()`,
    on reaching `stop_at_time_us`, or with SourceError when the server rejects the URL itself
    (HTTP 4xx on the first handshake). Everything else is retried forever with backoff."""

    format = "jetstream"
    resumable = True

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
        self._rewind_us = int(rewind_seconds * 1_000_000)
        self._read_timeout = read_timeout
        self._open_timeout = open_timeout
        self._initial_backoff = max(0.0, initial_backoff)
        self._max_backoff = max_backoff
        self._max_message_bytes = max_message_bytes
        self._stop_at = stop_at_time_us
        self.name = f"jetstream:{self._base_url}"
        self.stats = ConnectionStats()
        self._stop = threading.Event()
        self._position = 0
        self._count = 0
        self._tail_started_us: int | None = None
        self._ever_connected = False

    # -- the Source protocol -------------------------------------------------------------

    @property
    def next_position(self) -> int:
        """The last yielded position (0 before any event: resuming from 0 means live tail)."""
        return self._position

    @property
    def progress(self) -> tuple[int, int | None]:
        """(events read, None): a live stream has no total."""
        return self._count, None

    def close(self) -> None:
        """Asks events() to return; it notices within ~0.2 s in recv or at once in backoff.

        Only sets an Event, so it is safe from any thread or a signal handler. A connection
        attempt in progress (TCP/TLS handshake) is not interrupted; it is bounded by
        open_timeout."""
        self._stop.set()

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
        attempt = 0
        while not self._stop.is_set():
            start = self._position
            reason = yield from self._session(resume)
            if reason is None or self._stop.is_set():
                return
            # A connection that moved the position forward was healthy: start backoff afresh.
            attempt = 1 if self._position > start else attempt + 1
            resume = self._resume_cursor()
            delay = backoff(attempt, self._initial_backoff, self._max_backoff)
            self.stats.failures += 1
            self.stats.last_error = reason
            log.warning("%s: %s; reconnecting in %.2f s from cursor %s (attempt %d)",
                        self.name, reason, delay, resume if resume is not None else "live",
                        attempt)
            if self._stop.wait(delay):
                return

    # -- helpers ---------------------------------------------------------------------------

    def _session(self, resume: int | None) -> Generator[tuple[int, bytes] | None, None, str | None]:
        """One connection's events; returns why it must be replaced, or None when finished
        (close() called or stop_at_time_us reached)."""
        self.stats.last_cursor = resume
        with contextlib.ExitStack() as stack:
            try:
                # enter_context: connect() is a context manager in every websockets version.
                ws = stack.enter_context(self._connect(resume))
            except (OSError, WebSocketException) as exc:
                self._raise_if_fatal(exc)
                return f"connect failed: {describe(exc)}"
            self.stats.connects += 1
            self._ever_connected = True
            last_message = time.monotonic()
            while not self._stop.is_set():
                raw = receive(ws, last_message, self._read_timeout)
                if raw is None:
                    yield None
                    continue
                if isinstance(raw, str):
                    return raw
                last_message = time.monotonic()
                time_us = _time_us(raw)
                if time_us is not None and time_us > self._position:
                    self._position = time_us
                self._count += 1
                yield self._position, raw
                if self._stop_at is not None and time_us is not None and time_us >= self._stop_at:
                    return None
        return None

    def _connect(self, resume: int | None) -> ClientConnection:
        """Opens one connection; pings detect a dead peer even while the stream is quiet."""
        return connect(
            self._connect_url(resume),
            open_timeout=self._open_timeout,
            ping_interval=min(20.0, self._read_timeout / 2),
            ping_timeout=min(20.0, self._read_timeout),
            close_timeout=1.0,
            max_size=self._max_message_bytes,
        )

    def _connect_url(self, resume: int | None) -> str:
        """The URL's own query string, then wantedCollections, the size cap and the cursor."""
        params: list[tuple[str, str]] = [("wantedCollections", c) for c in self._collections]
        if "maxMessageSizeBytes" not in {k for k, _ in urllib.parse.parse_qsl(self._query)}:
            params.append(("maxMessageSizeBytes", str(self._max_message_bytes)))
        if resume is not None:
            params.append(("cursor", str(resume)))
        query = "&".join(q for q in (self._query, urllib.parse.urlencode(params)) if q)
        return f"{self._base_url}?{query}" if query else self._base_url

    def _resume_cursor(self) -> int | None:
        """Last position minus rewind; before any event, the live tail's start minus rewind."""
        base = self._position or self._tail_started_us
        return None if not base else max(1, base - self._rewind_us)

    def _raise_if_fatal(self, exc: BaseException) -> None:
        """A 4xx on the very first handshake is a wrong URL or parameter: tell the user."""
        if isinstance(exc, InvalidStatus) and not self._ever_connected:
            status = exc.response.status_code
            if status in FATAL_HTTP:
                raise SourceError(
                    f"{self.name}: server answered HTTP {status} to the websocket handshake;"
                    f" check the URL (usually ending in /subscribe) and the collections"
                ) from exc


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
