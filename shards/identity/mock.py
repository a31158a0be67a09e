"""An in-memory Directory for tests of code that uses one (users, refresher, worker)."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

from .directory import INVALID_HANDLE, DIDNotFound, Identity, IdentityError


class MockDirectory:
    """Answers from dicts set by the test; counts calls; can hold answers until a gate opens.

    `identities[did]` is what resolve_did returns (unverified); `handles[handle]` the DID a
    (lowercase) handle points to; `errors[did]` / `verify_errors[handle]` are raised instead."""

    def __init__(self, identities: list[Identity] | None = None, *, verified: bool = True) -> None:
        self.identities: dict[str, Identity] = {i.did: i for i in identities or ()}
        self.handles: dict[str, str] = (
            {i.handle.lower(): i.did for i in identities or () if i.handle != INVALID_HANDLE}
            if verified else {}
        )
        self.errors: dict[str, IdentityError] = {}
        self.verify_errors: dict[str, IdentityError] = {}
        self.gate: threading.Event | None = None  # when set by the test, calls wait for it
        self.calls: Counter[str] = Counter()
        self.purged: list[str] = []
        self._lock = threading.Lock()

    def add(self, ident: Identity, *, points_back: bool = True) -> None:
        with self._lock:
            self.identities[ident.did] = ident
            if points_back:
                self.handles[ident.handle.lower()] = ident.did

    def resolve_did(self, did: str) -> Identity:
        self._enter(f"resolve_did:{did}")
        if did in self.errors:
            raise self.errors[did]
        ident = self.identities.get(did)
        if ident is None:
            raise DIDNotFound(did)
        return replace(ident, handle_verified=False)

    def verify(self, ident: Identity) -> Identity:
        handle = ident.handle.lower()
        self._enter(f"verify:{handle}")
        if handle in self.verify_errors:
            raise self.verify_errors[handle]
        return replace(ident, handle=handle).verified(self.handles.get(handle) == ident.did)

    def purge(self, did: str) -> None:
        with self._lock:
            self.purged.append(did)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.calls)

    def _enter(self, call: str) -> None:
        with self._lock:
            self.calls[call] += 1
        gate = self.gate
        if gate is not None:
            gate.wait()
