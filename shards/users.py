"""Safe user creation: one resolution per DID, a bounded number at once, each with a deadline.

Resolutions run on daemon threads that never touch the database; the shard's main loop waits for
each one until its deadline (counted from when the event arrived, time queued for a slot
included) and then writes the user with what it has: the verified handle, the claimed one, or the
DID itself as a fallback, marked incomplete for the refresher."""
from __future__ import annotations

import heapq
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from shards.events import Event
from shards.identity.directory import Directory, Identity, ResolutionFailed


class ResolverThreads:
    """Named daemon threads serving one queue, so a hung network call never blocks exit."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._tasks.put((future, fn))
        return future

    def _serve(self) -> None:
        while True:
            future, fn = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)


@dataclass(frozen=True)
class NewUser:
    """The users row written when a resolution settles."""

    did: str
    handle: str
    handle_verified: bool
    pds: str | None
    incomplete: bool
    fallback: bool

    def row(self) -> tuple[Any, ...]:
        return (self.did, self.handle, self.incomplete, self.handle_verified, self.pds)

    @classmethod
    def of(cls, ident: Identity) -> NewUser:
        return cls(ident.did, ident.handle, ident.handle_verified, ident.pds,
                   not ident.complete, False)


@dataclass(eq=False)
class Pending:
    """An unknown author: its resolution and the events that wait for it, in order."""

    did: str
    deadline: float
    future: Future[Identity] | None = None
    events: list[Event] = field(default_factory=list)
    partial: Identity | None = None
    settled: bool = False


class UserCreations:
    """De-duplicated, bounded, deadline-limited resolution of new authors for one shard.

    `wake` is called when a resolution finishes; None when the caller looks on its own."""

    def __init__(
        self,
        directory: Directory,
        slots: int,
        timeout: float,
        wake: Callable[[], None] | None,
        late: Callable[[Identity], None],
    ) -> None:
        self._directory = directory
        self._slots = threading.BoundedSemaphore(slots)
        self._threads = ResolverThreads(slots, "resolver")
        self._timeout = timeout
        self._wake = wake
        self._late = late
        self._lock = threading.Lock()
        self._finished: deque[str] = deque()
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.pending: dict[str, Pending] = {}
        self.active = 0
        self.coalesced = 0

    def begin(self, did: str, received: float) -> Pending:
        """The one resolution in flight for `did`, started if there is none."""
        pending = self.pending.get(did)
        if pending is not None:
            self.coalesced += 1
            return pending
        pending = Pending(did, received + self._timeout)
        self.pending[did] = pending
        heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), did))
        pending.future = self._threads.submit(lambda: self._resolve(pending))
        pending.future.add_done_callback(lambda _f: self._done(pending))
        return pending

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def settle_due(self, now: float) -> list[tuple[Pending, NewUser]]:
        """Pending authors whose resolution finished or whose deadline passed, with their row."""
        due: list[str] = []
        while self._finished:
            due.append(self._finished.popleft())
        while self._deadlines and self._deadlines[0][0] <= now:
            due.append(heapq.heappop(self._deadlines)[2])
        settled = []
        for did in due:
            pending = self.pending.get(did)
            if pending is None:
                continue
            with self._lock:
                if pending.settled:
                    continue
                if not pending.future.done() and pending.deadline > now:
                    continue
                pending.settled = True
                user = self._outcome(pending)
            del self.pending[did]
            settled.append((pending, user))
        return settled

    def _outcome(self, pending: Pending) -> NewUser:
        future = pending.future
        if future.done() and future.exception() is None:
            return NewUser.of(future.result())
        if pending.partial is not None:  # document read, handle not yet verified
            p = pending.partial
            return NewUser(p.did, p.handle, False, p.pds, True, False)
        return NewUser(pending.did, pending.did, False, None, True, True)

    def _resolve(self, pending: Pending) -> Identity:
        with self._slots:
            if pending.settled:  # its deadline passed while queued: leave it to the refresher
                raise TimeoutError(pending.did)
            with self._lock:
                self.active += 1
            try:
                ident = self._directory.resolve_did(pending.did)
                pending.partial = ident
                if ident.complete:
                    return ident
                try:
                    return self._directory.verify(ident)
                except ResolutionFailed:
                    return ident
            finally:
                with self._lock:
                    self.active -= 1

    def _done(self, pending: Pending) -> None:
        with self._lock:
            late = pending.settled
        if not late:
            self._finished.append(pending.did)
            if self._wake is not None:
                self._wake()
            return
        if pending.future.exception() is None:  # failures: the refresher retries on its own
            self._late(pending.future.result())
