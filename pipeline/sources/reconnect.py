"""What the live sources (Jetstream, firehose) share about their connections: backoff between
attempts, how a failure is described, and which handshake answers mean a wrong URL."""
from __future__ import annotations

import random
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

POLL_SECONDS = 0.2
"""Longest recv() blocks before looking at close(): bounds how late close() is noticed."""
FATAL_HTTP = frozenset({400, 401, 403, 404, 405, 410})
"""Handshake answers that mean a wrong URL or parameters, not an outage."""


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
