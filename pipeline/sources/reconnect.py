"""What the live sources (Jetstream, firehose) share about their connections: backoff between
attempts, how a failure is described, and which handshake answers mean a wrong URL."""
from __future__ import annotations

import random

FATAL_HTTP = frozenset({400, 401, 403, 404, 405, 410})
"""Handshake answers that mean a wrong URL or parameters, not an outage."""


def backoff(attempt: int, initial: float, most: float) -> float:
    """Exponential from `initial`, capped at `most`, with 50-100% jitter."""
    base = min(most, initial * 2 ** min(attempt - 1, 30))
    return base * random.uniform(0.5, 1.0)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
