"""What the live sources (Jetstream, firehose) share: one websocket at a time, replaced with
backoff whenever it fails, until close(). A subclass says where to connect and what a message
means; everything about connections, quiet periods and retries is here."""
from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from pipeline.sources.base import SourceError


POLL_SECONDS = 0.2
"""Longest recv() blocks before looking at close(): bounds how late close() is noticed."""
FATAL_HTTP = frozenset({400, 401, 403, 404, 405, 410})
"""Handshake answers that mean a wrong URL or parameters, not an outage."""

Item = tuple[int, bytes]


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


def backoff(attempt: int, initial: float, most: float) -> float:
    """Exponential from `initial`, capped at `most`, with 50-100% jitter."""
    base = min(most, initial * 2 ** min(attempt - 1, 30))
    return base * random.uniform(0.5, 1.0)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def receive(ws: ClientConnection, last_message: float, read_timeout: float) -> bytes | str | None:
    """The next message as bytes; None after POLL_SECONDS of quiet (the reader hands on what it
    holds); or, as a str, why the connection is done: closed, or quiet for `read_timeout`
    seconds since `last_message`."""
    try:
        raw = ws.recv(timeout=POLL_SECONDS, decode=False)
    except TimeoutError:
        if time.monotonic() - last_message >= read_timeout:
            return f"no message for {read_timeout:g} s"
        return None
    except ConnectionClosed as exc:
        return f"connection closed: {exc}"
    return raw.encode() if isinstance(raw, str) else raw  # str only if decode=False is ignored


class LiveSource:
    """Follows one websocket endpoint; `events()` blocks in the supervisor's reader thread and
    ends on close(), when `_finished()` says so, or with SourceError when the server rejects the
    URL itself (a 4xx on the first handshake). Everything else is retried forever."""

    resumable = True
    name: str
    format: str  # its logger is pipeline.<format>
    fatal_hint = "check the URL"  # what a 4xx on the first handshake asks of the user

    def __init__(self, *, read_timeout: float, open_timeout: float, initial_backoff: float,
                 max_backoff: float, max_message_bytes: int) -> None:
        self._read_timeout = read_timeout
        self._open_timeout = open_timeout
        self._initial_backoff = max(0.0, initial_backoff)
        self._max_backoff = max_backoff
        self._max_message_bytes = max_message_bytes
        self.stats = ConnectionStats()
        self._stop = threading.Event()
        self._count = 0
        self._ever_connected = False

    # -- what a subclass says --------------------------------------------------------------

    @property
    def next_position(self) -> int:
        raise NotImplementedError

    def _connect_url(self, resume: int | None) -> str:
        raise NotImplementedError

    def _message(self, raw: bytes) -> Item | str | None:
        """The item a message gives, None to skip it, or (a str) why the connection ends."""
        raise NotImplementedError

    def _resume_cursor(self, previous: int | None) -> int | None:
        """Where a new connection resumes after a failure; `previous` was the last attempt's."""
        raise NotImplementedError

    def _finished(self) -> bool:
        """True once the source has given all it should (checked after each item)."""
        return False

    # -- the Source protocol ---------------------------------------------------------------

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

    def _follow(self, resume: int | None) -> Iterator[Item | None]:
        """Connections one after another from `resume`, with backoff between failures."""
        attempt = 0
        while not self._stop.is_set():
            before = self.next_position
            reason = yield from self._session(resume)
            if reason is None or self._stop.is_set():
                return
            # A connection that moved the position forward was healthy: start backoff afresh.
            attempt = 1 if self.next_position > before else attempt + 1
            resume = self._resume_cursor(resume)
            delay = backoff(attempt, self._initial_backoff, self._max_backoff)
            self.stats.failures += 1
            self.stats.last_error = reason
            logging.getLogger(f"pipeline.{self.format}").warning(
                "%s: %s; reconnecting in %.2f s from cursor %s (attempt %d)", self.name,
                reason, delay, resume if resume is not None else "live", attempt)
            yield None  # the reader hands on what it holds while this connection is replaced
            if self._stop.wait(delay):
                return

    def _session(self, resume: int | None) -> Generator[Item | None, None, str | None]:
        """One connection's items; returns why it must be replaced, or None when finished."""
        self.stats.last_cursor = resume
        with contextlib.ExitStack() as stack:
            try:
                # enter_context: connect() is a context manager in every websockets version;
                # pings detect a dead peer even while the stream is quiet.
                ws = stack.enter_context(connect(
                    self._connect_url(resume), open_timeout=self._open_timeout,
                    ping_interval=min(20.0, self._read_timeout / 2),
                    ping_timeout=min(20.0, self._read_timeout), close_timeout=1.0,
                    max_size=self._max_message_bytes))
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
                item = self._message(raw)
                if isinstance(item, str):
                    return item
                if item is not None:
                    self._count += 1
                    yield item
                    if self._finished():
                        return None
        return None

    def _raise_if_fatal(self, exc: BaseException) -> None:
        """A 4xx on the very first handshake is a wrong URL or parameter: tell the user."""
        if isinstance(exc, InvalidStatus) and not self._ever_connected:
            status = exc.response.status_code
            if status in FATAL_HTTP:
                raise SourceError(f"{self.name}: server answered HTTP {status} to the websocket"
                                  f" handshake; {self.fatal_hint}") from exc
