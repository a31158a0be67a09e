"""A bounded TTL cache in front of a Directory, with one upstream lookup per key in flight.

Answers are kept about a day, "not found" a couple of minutes, failures a minute; concurrent
lookups of one key wait for the first one's answer instead of asking upstream again."""
from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .breaker import CircuitOpen
from .config import IdentityConfig
from .directory import (
    INVALID_HANDLE,
    DIDNotFound,
    Directory,
    Identity,
    IdentityError,
    ResolutionFailed,
)
from .metrics import Counters

# ("did", did) -> Identity; ("verify", did, handle) -> bool (did the handle point back)
_Key = tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    expires: float
    value: Any = None
    error: IdentityError | None = None


class _Pending:
    """One lookup in flight: the leader sets its outcome once, the others wait for it.

    A lock held until the outcome is set (cheaper than a concurrent.futures.Future)."""

    __slots__ = ("_unset", "value", "error")

    def __init__(self) -> None:
        self._unset = threading.Lock()
        self._unset.acquire()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error
        self._unset.release()

    def result(self) -> Any:
        with self._unset:  # free once set; each waiter passes through in turn
            pass
        if self.error is not None:
            raise self.error
        return self.value


def _fresh(exc: IdentityError) -> IdentityError:
    """A copy to raise, so one stored exception does not pile up tracebacks across threads."""
    try:
        return copy.copy(exc).with_traceback(None)
    except Exception:  # an exception class that cannot be rebuilt from its args
        return exc


class CacheDirectory:
    """Caches resolve_did and verify of an inner Directory; thread-safe."""

    def __init__(
        self,
        inner: Directory,
        config: IdentityConfig | None = None,
        *,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.config = config or IdentityConfig()
        self.counters = counters or Counters()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._by_did: dict[str, set[_Key]] = {}
        self._inflight: dict[_Key, _Pending] = {}
        self.counters.add_gauges(self._gauges)

    def resolve_did(self, did: str) -> Identity:
        result: Identity = self._lookup(("did", did), lambda: self.inner.resolve_did(did))
        return result

    def cached(self, did: str) -> Identity | None:
        """The DID's identity if the cache holds a fresh answer; never asks upstream."""
        with self._lock:
            entry = self._entries.get(("did", did))
            if entry is None or entry.error is not None or entry.expires <= self._clock():
                return None
            self._entries.move_to_end(("did", did))
            self.counters.inc("cache.hit")
            return entry.value  # type: ignore[no-any-return]

    def verify(self, ident: Identity) -> Identity:
        """Caches whether (did, handle) points back; the answer is applied to the given identity."""
        handle = ident.handle.lower()
        key = ("verify", ident.did, handle)
        ok: bool = self._lookup(key, lambda: self.inner.verify(ident).handle_verified)
        return replace(ident, handle=handle if ok else INVALID_HANDLE, handle_verified=ok)

    def purge(self, did: str) -> None:
        """Drops the DID's entries, and lets no lookup already in flight store its older answer."""
        with self._lock:
            for key in self._by_did.pop(did, ()):
                self._entries.pop(key, None)
            for key in [k for k in self._inflight if k[1] == did]:  # few: one per lookup running
                del self._inflight[key]
        self.inner.purge(did)

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _lookup(self, key: _Key, call: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires > self._clock():
                self._entries.move_to_end(key)
                self.counters.inc("cache.hit")
                if entry.error is not None:
                    raise _fresh(entry.error)
                return entry.value
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = self._inflight[key] = _Pending()
                self.counters.inc("cache.miss")
            else:
                self.counters.inc("cache.coalesced")
        if not leader:
            try:
                return future.result()
            except IdentityError as exc:
                raise _fresh(exc) from None
        try:
            value = call()
        except BaseException as exc:
            self._finish(key, future, None, exc)
            raise
        self._finish(key, future, value, None)
        return value

    def _finish(self, key: _Key, future: _Pending, value: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._inflight.get(key) is future:  # not purged meanwhile
                del self._inflight[key]
                ttl = self._ttl(key, value, error)
                if ttl > 0:
                    stored = error if isinstance(error, IdentityError) else None
                    self._store(key, _Entry(self._clock() + ttl, value, stored))
        future.set(value, error)

    def _ttl(self, key: _Key, value: Any, error: BaseException | None) -> float:
        cfg = self.config
        if error is None:
            if key[0] == "verify" and value is False:
                return cfg.invalid_handle_ttl
            return cfg.cache_ttl
        if isinstance(error, CircuitOpen):
            return 0  # about the upstream, not the key: recovery must be seen at once
        if isinstance(error, DIDNotFound):
            return cfg.not_found_ttl
        if isinstance(error, ResolutionFailed):
            return cfg.failure_ttl
        return 0  # not an identity answer (a bug, an interrupt): never cached

    def _store(self, key: _Key, entry: _Entry) -> None:
        did = key[1]
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._by_did.setdefault(did, set()).add(key)
        while len(self._entries) > self.config.cache_size:
            old, _ = self._entries.popitem(last=False)
            keys = self._by_did.get(old[1])
            if keys is not None:
                keys.discard(old)
                if not keys:
                    del self._by_did[old[1]]

    def _gauges(self) -> dict[str, int]:
        with self._lock:
            return {"cache.size": len(self._entries)}
