"""One shard worker: decode, make sure authors exist, write a batch per transaction, acknowledge.

Messages in: ("batch", batch_id, read_time, idxs, positions, lines), ("end",) once the source
has ended (after its last batch), and ("stop",).
Messages out: ("ready", shard), ("ack", shard, {batch_id: (committed_idxs, dead_idxs)})
after each commit (and with empty lists as soon as a batch is taken), ("stats", shard, stats)
now and then, and a last ("stats", ...) on exit."""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import psycopg

from common.logs import configure
from shards import collector
from shards.backfill import DONE, Backfill
from shards.events import BadEvent, Event, decode
from shards.identity import Counters, IdentityConfig, build_directory
from shards.new_repos import NewRepos, Revs
from shards.pds.client import PdsClient
from shards.pds.config import PdsConfig
from shards.profiles import ProfileFetcher
from shards.refresher import Refresher
from shards.stats import ShardStats
from shards.store.pool import open_pool
from shards.store.writes import Changes, Writer, existing_users, repo_revs
from shards.users import UserCreations

log = logging.getLogger("pipeline.shard")

STATS_EVERY = 1.0
# A transaction stays open this long for more events, up to GROUP_EVENTS: resolutions finish
# one by one, and committing each on its own cost more than the rows it wrote.
LINGER = 0.2
GROUP_EVENTS = 2000
DEAD_RAW_BYTES = 64 * 1024  # what a dead letter keeps of an oversized line


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a shard process needs; picklable so it crosses the process boundary."""

    shard: int
    shards: int
    dsn: str
    pool_size: int
    slots: int
    resolve_timeout: float
    identity: IdentityConfig
    source: str
    pds: PdsConfig = PdsConfig()  # this process's share of the pipeline's limits
    backfill_new_users: bool = False
    backfill_concurrency: int = 1  # repositories of new users fetched at once
    max_repo_bytes: int = 512 * 1024 * 1024
    refresh_interval: float = 30.0
    end_wait: float = 1.0  # once the source has ended, the longest a new author is waited for
    known_capacity: int = 1_000_000
    log_level: str = "WARNING"
    log_format: str = "text"


class KnownDIDs:
    """DIDs known to be in `users`, least recently seen dropped first."""

    def __init__(self, capacity: int) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, did: str) -> bool:
        if did in self._seen:
            self._seen.move_to_end(did)
            return True
        return False

    def add(self, did: str) -> None:
        self._seen[did] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)


class Acks:
    """Which events (committed, dead-lettered) of which batches the next commit makes durable."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[list[int], list[int]]] = {}

    def add(self, batch: int, idx: int, dead: bool = False) -> None:
        self.batches.setdefault(batch, ([], []))[1 if dead else 0].append(idx)


@dataclass
class OpenWrite:
    """The next transaction, gathered over at most LINGER seconds: rows, events, acknowledgements."""

    changes: Changes = field(default_factory=Changes)
    acks: Acks = field(default_factory=Acks)
    events: list[Event] = field(default_factory=list)
    since: float | None = None  # when the first thing was added

    def add(self, ev: Event) -> None:
        self.changes.add(ev)
        self.acks.add(ev.batch, ev.idx)
        self.events.append(ev)

    def size(self) -> int:
        return len(self.events) + len(self.changes.dead) + len(self.changes.users)


class ShardWorker:
    """The loop of one shard process; see the module docstring for its messages."""

    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self.stats = ShardStats(config.shard)
        name = f"pipeline-shard-{config.shard}"
        self.pool = open_pool(config.dsn, config.pool_size, name)
        counters = Counters()  # identity and PDS figures, reported together
        self.directory = build_directory(config.identity, counters=counters)
        client = PdsClient(config.identity, config.pds, counters)  # one set of host limits
        profiles = None
        if config.pds.fetch_profiles:
            profiles = ProfileFetcher(self.pool, client, config.shard, config.shards,
                                      poll=config.refresh_interval)
        self.backfill = Backfill(self.pool, self.directory, client,
                                 max_bytes=config.max_repo_bytes)
        self.new_repos = (NewRepos(self.backfill, config.backfill_concurrency, counters)
                          if config.backfill_new_users else None)
        self.revs = Revs()
        self.refresher = Refresher(self.pool, self.directory, config.shard, config.shards,
                                   interval=config.refresh_interval, profiles=profiles)
        self.users = UserCreations(self.directory, config.slots, config.resolve_timeout,
                                   wake=None, late=self.refresher.offer)
        self.known = KnownDIDs(config.known_capacity)
        self.writer = Writer()
        self.batches: dict[int, list[float]] = {}  # batch id -> [read time, events not yet committed]
        self.stopping = False

    def run(self) -> None:
        collector.settle()  # start-up is done: the pool, the directory and the modules stay
        self.conn.send(("ready", self.config.shard))
        self.refresher.start()
        last_stats = time.monotonic()
        txn = OpenWrite()
        while not (self.stopping and not self.users.pending and not txn.changes):
            now = time.monotonic()
            timeout = 0.5
            deadline = self.users.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            if txn.since is not None:
                timeout = min(timeout, max(0.0, txn.since + LINGER - now))
            if self.users.pending:  # finished resolutions are gathered, not each woken for
                timeout = min(timeout, LINGER)
            ready = wait([self.conn], timeout)
            if self.conn in ready:
                taken: dict[int, tuple[list[int], list[int]]] = {}
                while not self.stopping and self.conn.poll():
                    msg = self.conn.recv()
                    if msg[0] == "stop":
                        self.stopping = True
                    elif msg[0] == "end":
                        self.users.end(time.monotonic(), self.config.end_wait)
                    else:
                        taken[msg[1]] = ([], [])
                        self._take(msg, txn)
                if taken:  # frees the supervisor to send more while this transaction gathers
                    self.conn.send(("ack", self.config.shard, taken))
            now = time.monotonic()
            for pending, user in self.users.settle_due(now):
                self.stats.users_created += 1
                self.stats.users_fallback += user.fallback
                self.stats.users_unverified += (not user.fallback and user.incomplete)
                txn.changes.users.append(user.row())
                self.known.add(pending.did)
                for ev in pending.events:
                    self._add(txn, ev)
            if txn.changes and txn.since is None:
                txn.since = now
            if txn.changes and (self.stopping or txn.size() >= GROUP_EVENTS
                                or now - txn.since >= LINGER):
                txn = self._finish(txn)
            if self.new_repos is not None:
                ready = self.new_repos.ready()
                if ready and txn.changes:  # the live events before them are written first
                    txn = self._finish(txn)
                for did, (ident, repo, size) in ready:
                    outcome = self.backfill.write(ident, repo, size)
                    if outcome.result == DONE:
                        self.revs.set(did, repo.rev)
                    self.new_repos.written(did, outcome)
            if now - last_stats >= STATS_EVERY:
                self.conn.send(("stats", self.config.shard, self.snapshot()))
                last_stats = now
        self.refresher.stop()
        if self.new_repos is not None:
            self.new_repos.stop()
        self.conn.send(("stats", self.config.shard, self.snapshot()))

    def _finish(self, txn: OpenWrite) -> OpenWrite:
        """Commits and acknowledges a transaction; its new users go to the background jobs."""
        self._commit(txn)
        self.conn.send(("ack", self.config.shard, txn.acks.batches))
        self._offer_new_users(txn.changes)
        return OpenWrite()

    def _add(self, txn: OpenWrite, ev: Event) -> None:
        """An event into the open transaction, unless the repository snapshot written for its
        author holds it already (acknowledged, not written)."""
        if ev.rev is not None:
            if self.revs.stale(ev.did, ev.rev):
                txn.acks.add(ev.batch, ev.idx)
                txn.changes.noops += 1
                return
            if self.new_repos is not None:
                self.new_repos.live(ev.did, ev.rev)
        txn.add(ev)

    def _offer_new_users(self, changes: Changes) -> None:
        """New users go to the background jobs now, never waiting on them: those with a PDS and
        no profile from the stream to the profile fetcher, all to the repository backfill."""
        profiles = self.refresher.profiles
        for did, _handle, _incomplete, _verified, pds in changes.users:
            if profiles is not None and pds is not None and did not in changes.profiles:
                profiles.offer(did, pds)
            if self.new_repos is not None:
                self.new_repos.offer(did)

    def snapshot(self) -> ShardStats:
        self.stats.gauges(self.users.active, len(self.users.pending))
        self.stats.coalesced_events = self.users.coalesced
        self.stats.late_resolutions = self.refresher.late_offered
        self.stats.identity = self.directory.stats()
        pool = self.pool.get_stats()
        self.stats.pool = {"size": pool.get("pool_size", 0),
                           "in_use": pool.get("pool_size", 0) - pool.get("pool_available", 0),
                           "waiting": pool.get("requests_waiting", 0)}
        self.stats.refresher_backlog = self.refresher.backlog
        return self.stats

    def _take(self, msg: tuple[Any, ...], txn: OpenWrite) -> None:
        """Decodes a batch; events of known authors go into the open transaction, others wait."""
        _, batch_id, read_time, idxs, positions, lines = msg
        received = time.monotonic()
        self.batches[batch_id] = [read_time, len(idxs)]
        unknown: dict[str, list[Event]] = {}
        for idx, position, raw in zip(idxs, positions, lines):
            try:
                ev = decode(raw, batch_id, idx, position)
            except BadEvent as exc:
                txn.changes.dead.append(
                    (self.config.source, position, raw[:DEAD_RAW_BYTES], str(exc)))
                txn.acks.add(batch_id, idx, dead=True)
                self.stats.dead_reasons[str(exc).split(":")[0]] += 1
                continue
            pending = self.users.pending.get(ev.did)
            if pending is not None:
                pending.events.append(ev)
                self.users.coalesced += 1
            elif ev.did in self.known:
                self._add(txn, ev)
            else:
                unknown.setdefault(ev.did, []).append(ev)
        if not unknown:
            return
        existing = self._existing(list(unknown))
        for did, evs in unknown.items():
            if did in existing:
                self.known.add(did)
                for ev in evs:
                    self._add(txn, ev)
            else:
                self.users.begin(did, received).events.extend(evs)

    def _existing(self, dids: list[str]) -> set[str]:
        for attempt in range(1_000_000):
            try:
                with self.pool.connection() as conn:
                    for did, rev in repo_revs(conn, dids):  # backfilled: older commits skip
                        self.revs.set(did, rev)
                    return existing_users(conn, dids)
            except psycopg.OperationalError as exc:
                self._backoff(attempt, exc)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: Exception) -> None:
        self.stats.db_retries += 1
        delay = min(0.1 * 2**attempt, 5.0)
        log.warning("shard %d: database error, retrying in %.1fs: %s",
                    self.config.shard, delay, str(exc).strip().splitlines()[0] if str(exc) else exc)
        time.sleep(delay)

    def _commit(self, txn: OpenWrite) -> None:
        """One transaction; retried on connection faults, split event by event on bad data."""
        changes, events, acks = txn.changes, txn.events, txn.acks
        attempt = 0
        while True:
            try:
                with self.pool.connection() as conn:
                    self.writer.write(conn, changes)
                break
            except psycopg.OperationalError as exc:
                self._backoff(attempt, exc)
                attempt += 1
            except psycopg.Error as exc:
                log.warning("shard %d: batch rejected (%s); writing event by event",
                            self.config.shard, exc)
                self._commit_one_by_one(changes, events, acks)
                break
        now = time.monotonic()
        self.stats.transactions += 1
        self.stats.events_by_kind.update(ev.kind for ev in events)
        for batch_id, (committed, dead) in acks.batches.items():
            self.stats.committed += len(committed)
            self.stats.dead_letters += len(dead)
            entry = self.batches[batch_id]
            self.stats.latency.observe(now - entry[0], len(committed) + len(dead))
            entry[1] -= len(committed) + len(dead)
            if entry[1] <= 0:
                del self.batches[batch_id]

    def _commit_one_by_one(self, changes: Changes, events: list[Event], acks: Acks) -> None:
        base = Changes(users=changes.users, dead=changes.dead)
        with self.pool.connection() as conn:
            self.writer.write(conn, base)
            for ev in events:
                single = Changes()
                single.add(ev)
                try:
                    self.writer.write(conn, single)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    reason = f"rejected by database: {str(exc).strip().splitlines()[0]}"
                    self.writer.write(
                        conn, Changes(dead=[(self.config.source, ev.position, ev.raw, reason)]))
                    committed, dead = acks.batches[ev.batch]
                    committed.remove(ev.idx)
                    dead.append(ev.idx)
                    self.stats.dead_reasons["rejected by database"] += 1
                    self.stats.events_by_kind[ev.kind] -= 1


def main(config: WorkerConfig, conn: Connection) -> None:
    """Process entry point: the supervisor coordinates stopping, so SIGINT is left to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(config.log_level, config.log_format, f"shard-{config.shard}")
    try:
        ShardWorker(config, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the supervisor is gone: nothing to acknowledge to
    finally:
        conn.close()
    os._exit(0)
