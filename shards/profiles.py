"""Completes users' profiles from their PDS in the background, without holding a connection
while it waits on the network, and under each host's limits.

Users come into a queue per PDS host as the shard worker writes them (`offer`), and from reads
of the due ones (`profile_after` passed) every `poll` seconds: at most `backlog` at a time.
Requests start as each host's rate and requests in flight allow (a 429 or an open circuit
pauses the host, and its users wait in the queue); outcomes are written a batch at a time. A
fetched profile, or one from the stream, is never asked for again; no profile is asked again a
day later, a failure after a doubling backoff."""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from psycopg_pool import ConnectionPool

from common.routing import sql_shard_expr
from shards.pds.client import (
    ABSENT, BAD, FAILED, FOUND, LATER, REFUSED, Answer, EndpointRefused, PdsClient,
)
from shards.store.fence import Fence, StaleEpoch
from shards.store.pool import RETRYABLE
from shards.store.writes import DEAD_LETTER, lock_users

log = logging.getLogger("pipeline.profiles")

BACKLOG = 10_000  # users read and not yet written, per process
POLL = 30.0  # seconds between reads of due users
STEP = 0.5  # the longest the loop sleeps: offered users wait at most this long
# The shortest: each wake-up of the loop takes the interpreter lock from the worker's main
# thread, so requests that end and host slots that open are gathered 0.1 s at a time.
MIN_STEP = 0.1
FLUSH_EVERY, FLUSH_COUNT = 0.5, 200  # outcomes are written this often, or this many at once
PASS_WAIT = 30.0  # one pass (refresh-users) waits for a paused host at most this long

# One statement per kind of outcome for a whole batch. Each leaves users whose profile is known
# (profile_after = 'infinity': from the stream, or fetched) alone, so a fetch that raced a
# profile event never replaces it.
_GUARD = " WHERE u.did = v.did AND u.profile_after < 'infinity'"
_FOUND = ("UPDATE users u SET display_name = v.name, description = v.description,"
          " avatar_cid = v.avatar, banner_cid = v.banner, profile_source = 'pds',"
          " profile_after = 'infinity', profile_attempts = 0, updated_at = now()"
          " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
          " AS v(did, name, description, avatar, banner)" + _GUARD)
_ABSENT = ("UPDATE users u SET profile_source = 'none', profile_attempts = 0,"
           " profile_after = now() + make_interval(secs => v.secs), updated_at = now()"
           " FROM unnest(%s::text[], %s::float8[]) AS v(did, secs)" + _GUARD)
_RETRY = ("UPDATE users u SET profile_after = now() + make_interval(secs => v.secs)"
          " FROM unnest(%s::text[], %s::float8[]) AS v(did, secs)" + _GUARD)
_FAILED = ("UPDATE users u SET profile_attempts = u.profile_attempts + 1, profile_after = now()"
           " + make_interval(secs => least(%s * power(2, u.profile_attempts), %s))"
           " FROM unnest(%s::text[]) AS v(did)" + _GUARD)
# No PDS known yet: nothing to ask until the refresher finds one (it makes the user due again).
_NO_PDS = "UPDATE users SET profile_after = 'infinity' WHERE did = ANY(%s) AND pds IS NULL"
_WITHOUT_PDS = Answer("no_pds")


@dataclass
class ProfileResult:
    """What a pass did: users settled (an outcome written), and every answer by result."""

    checked: int = 0
    results: dict[str, int] = field(default_factory=dict)

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


class ProfileFetcher:
    """Per shard (or for all shards when `shard` is None): `start` runs it in the background
    until `stop`; `run_pass` once over the due users (refresh-users).

    With a fence (a Redis worker's), a write that finds its shard taken over stops the fetcher
    and leaves the StaleEpoch in `fenced` for the worker to stop on."""

    def __init__(self, pool: ConnectionPool, client: PdsClient, shard: int | None = None,
                 shards: int = 1, backlog: int = BACKLOG, poll: float = POLL,
                 fence: Fence | None = None) -> None:
        self._pool = pool
        self._fence = fence
        self.fenced: StaleEpoch | None = None
        self._client = client
        self._limits = client.limits
        self._config = client.config
        self._where = "" if shard is None else f" AND {sql_shard_expr('did', shards)} = {int(shard)}"
        self._backlog = backlog
        self._host_cap = max(16, backlog // 4)  # one host's share of the backlog
        self._poll = poll
        self.name = "profiles" if shard is None else f"profiles-{shard}"
        self._threads = ThreadPoolExecutor(self._config.concurrency, thread_name_prefix=self.name)
        self._waiting: dict[str, deque[tuple[str, str]]] = {}  # host -> (did, base URL)
        self._held: set[str] = set()  # read, and not yet written
        self._running = 0
        self._done: queue.SimpleQueue[tuple[str, str, Answer]] = queue.SimpleQueue()
        self._outcomes: list[tuple[str, str, Answer]] = []  # (did, host, answer) to write
        self._offers: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._flush_at = math.inf
        self._next_read = 0.0
        self._last_read_new = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result = ProfileResult()

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops asking; answers still on their way are dropped (those users stay due)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def offer(self, did: str, pds: str) -> None:
        """A user just written with this PDS and no profile: asked without waiting for the next
        read of the table (thread-safe, never blocks; dropped when the backlog is full)."""
        self._offers.put((did, pds))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.step()
            except StaleEpoch as exc:
                self.fenced = exc
                return
            except Exception:  # never let the loop die; the next step tries again
                log.exception("%s: step failed", self.name)
                delay = STEP
            self._stop.wait(delay)

    def run_pass(self, due_only: bool = True, wait: float = PASS_WAIT) -> ProfileResult:
        """Asks about every due user, waiting for a paused host at most `wait` seconds (its users
        are left due otherwise). Without `due_only`, users still waiting out a backoff are asked
        at once; those whose PDS had no profile keep their interval."""
        if not due_only:
            with self._pool.connection() as conn:
                conn.execute("UPDATE users SET profile_after = now() WHERE profile_source IS NULL"
                             f" AND profile_after > now() AND profile_after < 'infinity'{self._where}")
        while not self._stop.is_set():
            delay = self.step(read_now=not self._held)
            if not self._held and not self._last_read_new:
                break
            if not self._running and self._waiting and all(
                    self._limits.paused_for(host) > wait for host in self._waiting):
                self._drop_waiting()
                break
            self._stop.wait(delay)
        return self.result

    # -- one step ----------------------------------------------------------------------------
    def step(self, read_now: bool = False) -> float:
        """Settles finished requests, reads due users when few are held, starts what the hosts
        allow, writes outcomes that waited long enough; returns seconds until the next step."""
        now = time.monotonic()
        self._collect(now)
        while not self._offers.empty():
            did, pds = self._offers.get()
            if len(self._held) < self._backlog:  # else the next read of the table finds it
                self._take_in(did, pds)
        can_read = len(self._held) <= self._backlog // 2
        if can_read and (read_now or now >= self._next_read):
            self._read()
            self._next_read = now + self._poll
        next_slot = self._dispatch()
        if self._outcomes and (now >= self._flush_at or len(self._outcomes) >= FLUSH_COUNT
                               or not self._running and not self._waiting):
            self._write()
        delay = min(STEP, next_slot, self._flush_at - now,
                    self._next_read - now if can_read else math.inf)
        return max(MIN_STEP, delay)

    def _read(self) -> None:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT did, pds FROM users WHERE profile_after <= now()"
                f" AND profile_after < 'infinity'{self._where}"
                f" ORDER BY profile_after LIMIT {self._backlog}").fetchall()
        self._last_read_new = sum(self._take_in(did, pds) for did, pds in rows)

    def _take_in(self, did: str, pds: str | None) -> bool:
        """Queues a due user for its host (or settles it at once: no PDS, a refused endpoint);
        True if it is new here."""
        if did in self._held:
            return False
        if pds is None:
            self._settle(did, "", _WITHOUT_PDS)
            return True
        try:
            base, host = self._client.origin(pds)
        except EndpointRefused as exc:
            self._settle(did, "", Answer(REFUSED, retry_in=self._config.absent_retry,
                                         detail=str(exc)))
            return True
        waiting = self._waiting.setdefault(host, deque())
        if len(waiting) >= self._host_cap:  # the rest of a crowded host waits in the table
            return False
        waiting.append((did, base))
        self._held.add(did)
        return True

    def _dispatch(self) -> float:
        """Starts every request a host allows now (the threads, `concurrency` of them, take them
        in turn); returns seconds until a host allows one."""
        soonest = math.inf
        for host in list(self._waiting):
            waiting = self._waiting[host]
            while waiting:
                ready_in = self._limits.ready_in(host)
                if ready_in > 0:
                    soonest = min(soonest, ready_in)
                    break
                did, base = waiting.popleft()
                self._limits.take(host)
                self._running += 1
                self._threads.submit(self._ask, did, base, host)
            if not waiting:
                del self._waiting[host]
            else:  # the next step starts with the hosts served least recently
                self._waiting[host] = self._waiting.pop(host)
        return soonest

    def _ask(self, did: str, base: str, host: str) -> None:
        try:
            answer = self._client.profile(did, base, host)
        except Exception as exc:  # a bug, not an answer: tried again after a backoff
            log.exception("%s: asking %s for %s failed", self.name, host, did)
            answer = Answer(FAILED, detail=str(exc))
        finally:
            self._limits.leave(host)
        self._done.put((did, base, answer))  # gathered at the next step

    def _collect(self, now: float) -> None:
        while not self._done.empty():
            did, base, answer = self._done.get()
            self._running -= 1
            host = base.split("://", 1)[1]
            if answer.result == LATER:  # the host is paused: first in its line again
                self.result.count(LATER)
                self._waiting.setdefault(host, deque()).appendleft((did, base))
            else:
                self._settle(did, host, answer, now)

    def _settle(self, did: str, host: str, answer: Answer, now: float | None = None) -> None:
        self._held.add(did)
        self._outcomes.append((did, host, answer))
        if self._flush_at == math.inf:
            self._flush_at = (now or time.monotonic()) + FLUSH_EVERY

    def _drop_waiting(self) -> None:
        for waiting in self._waiting.values():
            for did, _base in waiting:
                self._held.discard(did)
        self._waiting.clear()
        if self._outcomes:
            self._write()

    def _write(self) -> None:
        """Writes the outcomes in one transaction; on a connection fault they are dropped and
        the users stay due."""
        outcomes, self._outcomes, self._flush_at = self._outcomes, [], math.inf
        statements, dead = _statements(outcomes, self._config.first_backoff,
                                       self._config.max_backoff)
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                if self._fence is not None:
                    self._fence.check(cur)
                lock_users(cur, (did for did, _host, _answer in outcomes))
                for sql, params in statements:
                    cur.execute(sql, params)
                if dead:
                    cur.executemany(DEAD_LETTER, dead)
        except RETRYABLE as exc:
            log.warning("%s: could not save profiles: %s", self.name, exc)
        else:
            self.result.checked += len(outcomes)
            for _did, _host, answer in outcomes:
                self.result.count(answer.result)
        finally:
            for did, _host, _answer in outcomes:
                self._held.discard(did)


def _statements(outcomes: list[tuple[str, str, Answer]], first_backoff: float,
                max_backoff: float) -> tuple[list[tuple[str, tuple[object, ...]]],
                                             list[tuple[str, int, bytes, str]]]:
    """One statement per kind of outcome, and the dead letters of answers that were no profile."""
    found: list[tuple[object, ...]] = []
    absent: list[tuple[str, float]] = []
    retry: list[tuple[str, float]] = []
    failed: list[str] = []
    no_pds: list[str] = []
    dead = []
    for did, host, answer in outcomes:
        if answer is _WITHOUT_PDS:
            no_pds.append(did)
        elif answer.result == FOUND:
            found.append((did, *(answer.fields or (None,) * 4)))
        elif answer.result == ABSENT:
            absent.append((did, answer.retry_in))
        elif answer.result == FAILED:
            failed.append(did)
        else:  # REFUSED, BAD: asked again when retry_in has passed
            retry.append((did, answer.retry_in))
            if answer.result == BAD:
                dead.append((f"pds:{host}", 0, answer.raw or did.encode(), answer.detail))
    statements: list[tuple[str, tuple[object, ...]]] = []
    for sql, rows in ((_FOUND, found), (_ABSENT, absent), (_RETRY, retry)):
        if rows:
            statements.append((sql, tuple(list(column) for column in zip(*rows))))
    if failed:
        statements.append((_FAILED, (first_backoff, max_backoff, failed)))
    if no_pds:
        statements.append((_NO_PDS, (no_pds,)))
    return statements, dead
