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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shards.events import Event
from shards.identity.directory import (
    AddressRefused,
    Directory,
    Identity,
    ResolutionFailed,
    failure_reason,
)

TIMED_OUT = "timed out: no answer before the event's deadline"


class ResolverThreads:
    """Named daemon threads serving one queue, so a hung network call never blocks exit.

    Their number is the cap on resolutions at once: a thread that waits on a slow answer is
    stood in for by a new one (`grow`), which leaves again once that answer came (`shrink`)."""

    def __init__(self, size: int, name: str, most: int) -> None:
        """`size` threads to begin with; `grow` adds stand-ins up to `most`."""
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._name = name
        self._most = max(size, most)
        self._lock = threading.Lock()
        self._retiring = 0
        self._serial = itertools.count(1)
        self.count = 0
        for _ in range(size):
            self.grow()

    def grow(self) -> bool:
        """One more thread (unless `most` run), standing in for one stuck on a slow answer."""
        with self._lock:
            if self.count >= self._most:
                return False
            self.count += 1
        name = f"{self._name}-{next(self._serial)}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()
        return True

    def shrink(self) -> None:
        """One thread leaves once its task returns (a slow answer came: its stand-in goes)."""
        with self._lock:
            self._retiring += 1

    def submit(self, task: Callable[[], None]) -> None:
        """Runs `task` on the next free thread; it must not raise."""
        self._tasks.put(task)

    def _serve(self) -> None:
        while True:
            self._tasks.get()()
            if self._retiring:
                with self._lock:
                    if self._retiring:
                        self._retiring -= 1
                        self.count -= 1
                        return


@dataclass(frozen=True)
class NewUser:
    """The users row written when a resolution settles; `error` says why it is incomplete."""

    did: str
    handle: str
    handle_verified: bool
    pds: str | None
    incomplete: bool
    fallback: bool
    error: str | None = None  # "reason: detail" (failure_reason), None when complete
    refused: bool = False  # what stopped it was an address refused by the policy

    def row(self) -> tuple[Any, ...]:
        return (self.did, self.handle, self.incomplete, self.handle_verified, self.pds,
                self.error)


@dataclass(eq=False)
class Pending:
    """An unknown author: its resolution and the events that wait for it, in order."""

    did: str
    deadline: float
    events: list[Event] = field(default_factory=list)
    done: bool = False  # its resolution returned: `result` is set, or it failed
    result: Identity | None = None
    partial: Identity | None = None
    settled: bool = False
    started: float = 0.0  # when its resolution got a slot
    holds_slot: bool = False
    stand_in: bool = False  # a thread was added while this one waits on a slow answer
    error: BaseException | None = None  # why the resolution or the handle check failed
    create: bool = True  # a new user; False: a known one whose DID document (key) is needed

    @property
    def identity(self) -> Identity | None:
        """What the resolution learnt in time: the whole answer, or the document alone."""
        return self.result if self.result is not None else self.partial


class UserCreations:
    """De-duplicated, bounded, deadline-limited resolution of new authors for one shard.

    At most `slots` resolutions hold a slot at once. One still unanswered after SLOW_FACTOR
    times the median time of recent ones (between SLOW_MIN and SLOW_MAX seconds) gives its
    slot up and keeps waiting on a thread of its own (up to MAX_THREADS), so DIDs that hang
    delay only their own events, while an upstream slow for everyone still sees at most
    `slots` new requests at a time. `wake` is called when a resolution finishes; None when the
    caller looks on its own."""

    MAX_THREADS = 512
    SLOW_FACTOR, SLOW_MIN, SLOW_MAX = 10.0, 0.02, 1.0

    def __init__(
        self,
        directory: Directory,
        slots: int,
        timeout: float,
        wake: Callable[[], None] | None,
        late: Callable[[Identity], None],
    ) -> None:
        self._directory = directory
        self._threads = ResolverThreads(slots, "resolver", self.MAX_THREADS)
        self._running: set[Pending] = set()  # resolutions holding a slot
        # Until answers tell otherwise, a resolution is slow after 0.5 s: an upstream that is
        # slower for everyone is learned within a few hundred answers.
        self._durations: deque[float] = deque([0.05], maxlen=255)
        self.slow = 0  # resolutions that gave their slot up
        self._timeout = timeout
        self._wake = wake
        self._late = late
        self._lock = threading.Lock()
        self._watching = threading.Condition(self._lock)
        threading.Thread(target=self._watch, name="resolver-watch", daemon=True).start()
        self._finished: deque[str] = deque()
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.pending: dict[str, Pending] = {}
        self.active = 0
        self.coalesced = 0

    def begin(self, did: str, received: float, create: bool = True) -> Pending:
        """The one resolution in flight for `did`, started if there is none. `create=False`
        resolves a known author's DID document only (its signing key), without a users row."""
        pending = self.pending.get(did)
        if pending is not None:
            self.coalesced += 1
            return pending
        pending = Pending(did, received + self._timeout, create=create)
        self.pending[did] = pending
        heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), did))
        self._threads.submit(lambda: self._run(pending))
        return pending

    @property
    def threads(self) -> int:
        """Resolver threads now: one per slot, plus stand-ins for slow answers still awaited."""
        return self._threads.count

    def end(self, now: float, wait: float) -> None:
        """The source has ended: from `now` on, no creation waits more than `wait` seconds more.

        Resolutions that answer in time are unaffected; one that hangs no longer keeps a replay
        from finishing for the rest of its timeout (its late answer, if any, is lost with the
        process, and the refresher completes the user)."""
        self._timeout = min(self._timeout, wait)
        limit = now + wait
        for pending in self.pending.values():
            if pending.deadline > limit:
                pending.deadline = limit
                heapq.heappush(self._deadlines, (limit, next(self._seq), pending.did))

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
                if not pending.done and pending.deadline > now:
                    continue
                pending.settled = True
                user = self._outcome(pending)
            del self.pending[did]
            settled.append((pending, user))
        return settled

    def _outcome(self, pending: Pending) -> NewUser:
        failed = pending.error if pending.done else None
        error = TIMED_OUT if failed is None else failure_reason(failed)
        refused = isinstance(failed, AddressRefused)
        ident = pending.result
        if ident is not None:
            complete = ident.complete
            return NewUser(ident.did, ident.handle, ident.handle_verified, ident.pds,
                           not complete, False, None if complete else error, refused)
        if pending.partial is not None:  # document read, handle not yet verified
            p = pending.partial
            return NewUser(p.did, p.handle, False, p.pds, True, False, error, refused)
        return NewUser(pending.did, pending.did, False, None, True, True, error, refused)

    def _slow_after(self) -> float:
        typical = sorted(self._durations)[len(self._durations) // 2]
        return min(max(self.SLOW_FACTOR * typical, self.SLOW_MIN), self.SLOW_MAX)

    def _watch(self) -> None:
        """Takes the slot of each resolution once it is slow, and lends its thread a stand-in."""
        while True:
            with self._watching:
                if not self._running:
                    self._watching.wait()
                limit, now = self._slow_after(), time.monotonic()
                slow = [p for p in self._running if now - p.started >= limit]
                for p in slow:
                    self._running.discard(p)
                    p.holds_slot = False
                    p.stand_in = self._threads.grow()  # under the lock: its end sees stand_in
                self.slow += len(slow)
                self.active -= len(slow)
                first = min((p.started for p in self._running), default=None)
            if first is not None:
                time.sleep(max(first + limit - time.monotonic(), self.SLOW_MIN / 2))

    def _run(self, pending: Pending) -> None:
        """A resolver thread's task: resolve, then hand the outcome to the shard loop (or, once
        the user was written without it, to the refresher)."""
        with self._lock:
            if pending.settled:  # its deadline passed while queued: left to the refresher
                return
            pending.holds_slot, pending.started = True, time.monotonic()
            if not self._running:
                self._watching.notify()
            self._running.add(pending)
            self.active += 1
        result: Identity | None = None
        try:
            result = self._resolve(pending)
        except Exception as exc:  # a failure: the user is written with what is known
            pending.error = exc
        finally:
            with self._lock:
                self._durations.append(time.monotonic() - pending.started)
                self._running.discard(pending)
                slot, pending.holds_slot = pending.holds_slot, False
                self.active -= slot
                pending.result, pending.done = result, True
                late = pending.settled
            if not slot and pending.stand_in:  # the slow answer came: its stand-in can go
                self._threads.shrink()
        if not late:
            self._finished.append(pending.did)
            if self._wake is not None:
                self._wake()
        elif result is not None and pending.create:  # failures: the refresher retries on its own
            self._late(result)

    def _resolve(self, pending: Pending) -> Identity:
        ident = self._directory.resolve_did(pending.did)
        pending.partial = ident
        if ident.complete or not pending.create:
            return ident
        try:
            return self._directory.verify(ident)
        except ResolutionFailed as exc:
            pending.error = exc
            return ident
