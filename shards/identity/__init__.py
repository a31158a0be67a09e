"""Identity resolution: DID -> handle and PDS, handle verification, cached and circuit-broken.

`build_directory(config)` gives the stack every worker uses; `directory.stats()` its counters
(see metrics.py for the keys)."""
from __future__ import annotations

import time
from collections.abc import Callable

from .base import BaseDirectory
from .breaker import BreakerDirectory, CircuitOpen
from .cache import CacheDirectory
from .config import IdentityConfig
from .directory import (
    INVALID_HANDLE,
    AddressRefused,
    DIDMismatch,
    DIDNotFound,
    Directory,
    Identity,
    IdentityError,
    ResolutionFailed,
)
from .metrics import Counters

__all__ = [
    "INVALID_HANDLE",
    "AddressRefused",
    "BaseDirectory",
    "BreakerDirectory",
    "CacheDirectory",
    "CircuitOpen",
    "Counters",
    "DIDMismatch",
    "DIDNotFound",
    "Directory",
    "Identity",
    "IdentityConfig",
    "IdentityError",
    "ResolutionFailed",
    "build_directory",
]


def build_directory(
    config: IdentityConfig | None = None,
    *,
    counters: Counters | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CacheDirectory:
    """The default stack, network -> breaker -> cache, sharing one Counters (`.stats()`)."""
    config = config or IdentityConfig()
    counters = counters or Counters()
    base = BaseDirectory(config, counters)
    guarded = BreakerDirectory(
        base, base, threshold=config.breaker_threshold, cooldown=config.breaker_cooldown,
        counters=counters, clock=clock,
    )
    return CacheDirectory(guarded, config, counters=counters, clock=clock)
