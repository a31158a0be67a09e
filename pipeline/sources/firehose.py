"""Live relay or PDS firehose (`com.atproto.sync.subscribeRepos`): DAG-CBOR frames, cursor = seq.

Positions are seqs: the supervisor saves as cursor the first seq not yet committed (or the last
one plus 1), and since a relay sends the frames after the `cursor` it is given, a run resumes
with `cursor = saved - 1`. Each reconnection asks for the frames after the last seq received;
frames whose seq does not go up are skipped (see sequence.py). `#info` frames (OutdatedCursor:
the cursor is older than the relay keeps) are logged; an error frame (FutureCursor,
ConsumerTooSlow) ends the connection, is logged with its message, and the source reconnects
with backoff. Frames go on to the supervisor undecoded: the shards decode and verify them."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator

from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from pipeline.sources.base import SourceError
from pipeline.sources.jetstream import ConnectionStats
from pipeline.sources.reconnect import FATAL_HTTP, backoff, describe, receive
from pipeline.sources.sequence import SeqOrder
from shards.firehose.frames import BadFrame, parse_frame

log = logging.getLogger("pipeline.firehose")

XRPC_PATH = "/xrpc/com.atproto.sync.subscribeRepos"
DEFAULT_MAX_FRAME_BYTES = 8 << 20


class FirehoseSource:
    """Follows a subscribeRepos endpoint until close(); see the module docstring."""

    format = "firehose"
    resumable = True

    def __init__(self, url: str, *, read_timeout: float = 60.0, max_backoff: float = 60.0,
                 initial_backoff: float = 0.5, open_timeout: float = 10.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.url = firehose_url(url)
        self.name = f"firehose:{self.url}"
        self._read_timeout = read_timeout
        self._open_timeout = open_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._max_frame_bytes = max_frame_bytes
        self.stats = ConnectionStats()
        self.order = SeqOrder()
        self.infos: list[str] = []  # #info and error frames seen, newest last (at most 100)
        self._stop = threading.Event()
        self._next = 0
        self._count = 0
        self._ever_connected = False

    @property
    def next_position(self) -> int:
        """The last seq received plus 1 (0 before any: resuming from 0 means the live tail)."""
        return self._next

    @property
    def progress(self) -> tuple[int, int | None]:
        return self._count, None

    @property
    def skipped(self) -> int:
        return self.order.skipped

    def close(self) -> None:
        """Asks events() to return within about 0.2 s; safe from a signal handler."""
        self._stop.set()

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes] | None]:
        """Frames after `cursor - 1` (None or 0: the live tail), until close()."""
        resume = cursor - 1 if cursor else None
        self._next = cursor or 0
        attempt = 0
        while not self._stop.is_set():
            before = self._next
            reason = yield from self._session(resume)
            if reason is None or self._stop.is_set():
                return
            attempt = 1 if self._next > before else attempt + 1
            if self.order.last is not None:
                resume = self.order.last
            delay = backoff(attempt, self._initial_backoff, self._max_backoff)
            self.stats.failures += 1
            self.stats.last_error = reason
            log.warning("%s: %s; reconnecting in %.2f s from seq %s (attempt %d)", self.name,
                        reason, delay, resume if resume is not None else "live", attempt)
            yield None  # the reader hands on what it holds while this connection is replaced
            if self._stop.wait(delay):
                return

    def _session(self, resume: int | None) -> Generator[tuple[int, bytes] | None, None, str | None]:
        """One connection's frames; returns why it must be replaced, or None once closed."""
        self.stats.last_cursor = resume
        with contextlib.ExitStack() as stack:
            try:
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
                admit, seq = self.order.admit(raw)
                if not admit:
                    continue
                if seq is None:
                    control, ended = self._control(raw)
                    if ended is not None:
                        return ended
                    if control:
                        continue
                else:
                    self._next = seq + 1
                self._count += 1
                yield max(self._next - 1, 0), raw
        return None

    def _control(self, raw: bytes) -> tuple[bool, str | None]:
        """A frame without a seq: #info is logged, an error frame ends the connection. Returns
        (whether it was one of those two, why the connection ends)."""
        try:
            frame = parse_frame(raw)
        except BadFrame:
            return False, None  # handed on: the shard dead-letters it
        if frame.kind not in ("#info", "error"):
            return False, None
        name = frame.body.get("name") or frame.body.get("error") or "?"
        message = frame.body.get("message") or ""
        text = f"{name}: {message}" if message else str(name)
        self.infos = [*self.infos[-99:], text]
        if frame.kind == "#info":
            log.warning("%s: relay says %s", self.name, text)
            return True, None
        log.error("%s: relay ended the stream with an error: %s", self.name, text)
        return True, f"error frame {text}"

    def _connect(self, resume: int | None) -> ClientConnection:
        url = self.url if resume is None else f"{self.url}?cursor={resume}"
        return connect(url, open_timeout=self._open_timeout,
                       ping_interval=min(20.0, self._read_timeout / 2),
                       ping_timeout=min(20.0, self._read_timeout), close_timeout=1.0,
                       max_size=self._max_frame_bytes)

    def _raise_if_fatal(self, exc: BaseException) -> None:
        """A 4xx on the very first handshake is a wrong URL: tell the user."""
        if isinstance(exc, InvalidStatus) and not self._ever_connected:
            status = exc.response.status_code
            if status in FATAL_HTTP:
                raise SourceError(f"{self.name}: server answered HTTP {status} to the websocket"
                                  f" handshake; check the URL") from exc


def firehose_url(url: str) -> str:
    """The subscribeRepos URL for a relay or PDS URL; SourceError on a user's mistake."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError as exc:
        raise SourceError(f"firehose: malformed URL {url!r}: {exc}") from None
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise SourceError(f"firehose: URL must start with wss:// or ws://, got {url!r}"
                          " (e.g. wss://bsky.network)")
    if not parts.hostname:
        raise SourceError(f"firehose: URL has no host: {url!r}")
    if "cursor" in dict(urllib.parse.parse_qsl(parts.query)):
        raise SourceError(f"firehose: remove cursor= from the URL {url!r}; the saved cursor is used")
    if parts.query:
        raise SourceError(f"firehose: the URL takes no query string: {url!r}")
    path = parts.path if parts.path not in ("", "/") else XRPC_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))
