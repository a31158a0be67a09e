"""Garbage-collector settings for a long-running process that allocates objects per event."""
from __future__ import annotations

import gc

# Container allocations between two collections of the youngest generation (Python's is 700).
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Called once start-up is done: what start-up allocated is moved out of the collector's
    sight, and young objects are collected every YOUNG_THRESHOLD allocations.

    With Python's defaults a shard worker spent about an eighth of its CPU collecting: every
    full collection walked the modules, the pool and the identity cache again, and each event's
    short-lived dicts outlived several young collections."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
