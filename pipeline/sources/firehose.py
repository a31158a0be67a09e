"""Live relay or PDS firehose (`com.atproto.sync.subscribeRepos`): DAG-CBOR frames, cursor = seq.

Positions are seqs: the supervisor saves as cursor the first seq not yet committed (or the last
one plus 1), and since a relay sends the frames after the `cursor` it is given, a run resumes
with `cursor = saved - 1`. Each reconnection asks for the frames after the last seq received;
frames whose seq does not go up are skipped (see sequence.py). `#info` frames (OutdatedCursor:
the cursor is older than the relay keeps) are logged; an error frame (FutureCursor,
ConsumerTooSlow) ends the connection, is logged with its message, and the source reconnects
with backoff. Frames go on to the supervisor undecoded: the shards decode and verify them."""
from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator

from pipeline.sources.base import SourceError
from pipeline.sources.live import Item, LiveSource
from pipeline.sources.sequence import SeqOrder
from shards.firehose.frames import BadFrame, parse_frame

log = logging.getLogger("pipeline.firehose")

XRPC_PATH = "/xrpc/com.atproto.sync.subscribeRepos"
DEFAULT_MAX_FRAME_BYTES = 8 << 20


class FirehoseSource(LiveSource):
    """Follows a subscribeRepos endpoint until close(); see the module docstring."""

    format = "firehose"

    def __init__(self, url: str, *, read_timeout: float = 60.0, max_backoff: float = 60.0,
                 initial_backoff: float = 0.5, open_timeout: float = 10.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(read_timeout=read_timeout, open_timeout=open_timeout,
                         initial_backoff=initial_backoff, max_backoff=max_backoff,
                         max_message_bytes=max_frame_bytes)
        self.url = firehose_url(url)
        self.name = f"firehose:{self.url}"
        self.order = SeqOrder()
        self.infos: list[str] = []  # #info and error frames seen, newest last (at most 100)
        self._next = 0

    @property
    def next_position(self) -> int:
        """The last seq received plus 1 (0 before any: resuming from 0 means the live tail)."""
        return self._next

    @property
    def skipped(self) -> int:
        return self.order.skipped

    def events(self, cursor: int | None) -> Iterator[tuple[int, bytes] | None]:
        """Frames after `cursor - 1` (None or 0: the live tail), until close()."""
        resume = cursor - 1 if cursor else None
        self._next = cursor or 0
        yield from self._follow(resume)

    def _message(self, raw: bytes) -> Item | str | None:
        """Frames whose seq goes up go on; #info is logged, an error frame ends the connection."""
        admit, seq = self.order.admit(raw)
        if not admit:
            return None
        if seq is None:
            control, ended = self._control(raw)
            if ended is not None:
                return ended
            if control:
                return None
        else:
            self._next = seq + 1
        return max(self._next - 1, 0), raw

    def _resume_cursor(self, previous: int | None) -> int | None:
        """After the last seq received, or where the last attempt asked when none came."""
        return self.order.last if self.order.last is not None else previous

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

    def _connect_url(self, resume: int | None) -> str:
        return self.url if resume is None else f"{self.url}?cursor={resume}"


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
