"""One shard worker: decode, make sure authors exist, write a batch per transaction, acknowledge.

Messages in: ("batch", batch_id, read_time, idxs, positions, lines), ("end",) once the source
has ended (after its last batch), and ("stop",).
Messages out: ("ready", shard), ("ack", shard, {batch_id: (committed_idxs, dead_idxs)})
after each commit (and with empty lists as soon as a batch is taken), ("stats", shard, stats)
now and then, and a last ("stats", ...) on exit."""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from multiprocessing.connection import Connection, wait
from typing import Any

import psycopg

from common import stop_signals
from common.logs import configure
from shards import collector
from shards.backfill import DONE, Backfill
from shards.events import BadEvent, Event, decode
from shards.frames import KEY_UNAVAILABLE, FrameEvent, Frames, Refused, frame_time
from shards.frames import decode as decode_frame
from shards.identity import Counters, Identity, IdentityConfig, build_directory
from shards.new_repos import NewRepos
from shards.pds.client import PdsClient
from shards.pds.config import PdsConfig
from shards.profiles import ProfileFetcher
from shards.refresher import Refresher
from shards.stats import ShardStats
from shards.store.fence import Fence, StaleEpoch
from shards.store.pool import RETRYABLE, open_pool
from shards.store.writes import Changes, Writer, existing_users, repo_states
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
    # Redis workers: the epoch this worker took the shard over with, checked by every write
    # transaction, and the lease after which the server ends a transaction left idle. Local
    # workers are restarted only once seen dead, so they have neither.
    epoch: int | None = None
    lease: float | None = None
    log_level: str = "WARNING"
    log_format: str = "text"
    verify: bool = True  # firehose commits: check hashes, signature and tree before writing


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
    frames: list[tuple[FrameEvent, bool]] = field(default_factory=list)  # (frame, written)
    since: float | None = None  # when the first thing was added

    def add(self, ev: Event) -> None:
        self.changes.add(ev)
        self.acks.add(ev.batch, ev.idx)
        self.events.append(ev)

    def add_frame(self, fe: FrameEvent, write: bool) -> None:
        """A frame's events and new rev (`write`), or only its acknowledgement (skipped)."""
        if write:
            for ev in fe.events:
                self.changes.add(ev)
            if fe.rev is not None and fe.did:
                self.changes.revs[fe.did] = fe.rev
        else:
            self.changes.noops += 1
        self.acks.add(fe.batch, fe.idx)
        self.frames.append((fe, write))

    def dead(self, source: str, batch: int, idx: int, position: int, raw: bytes,
             reason: str) -> None:
        self.changes.dead.append((source, position, raw[:DEAD_RAW_BYTES], reason))
        self.acks.add(batch, idx, dead=True)

    def size(self) -> int:
        return (len(self.events) + len(self.frames) + len(self.changes.dead)
                + len(self.changes.users))


class ShardWorker:
    """The loop of one shard process; see the module docstring for its messages."""

    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self.stats = ShardStats(config.shard)
        name = f"pipeline-shard-{config.shard}"
        self.pool = open_pool(config.dsn, config.pool_size, name, idle_in_transaction=config.lease)
        counters = Counters()  # identity and PDS figures, reported together
        self.directory = build_directory(config.identity, counters=counters)
        fence = None if config.epoch is None else Fence(config.shard, config.epoch)
        client = PdsClient(config.identity, config.pds, counters)  # one set of host limits
        profiles = None
        if config.pds.fetch_profiles:
            profiles = ProfileFetcher(self.pool, client, config.shard, config.shards,
                                      poll=config.refresh_interval, fence=fence)
        self.backfill = Backfill(self.pool, self.directory, client,
                                 max_bytes=config.max_repo_bytes, fence=fence)
        self.new_repos = (NewRepos(self.backfill, config.backfill_concurrency, counters)
                          if config.backfill_new_users else None)
        self.refresher = Refresher(self.pool, self.directory, config.shard, config.shards,
                                   interval=config.refresh_interval, fence=fence,
                                   profiles=profiles)
        self.users = UserCreations(self.directory, config.slots, config.resolve_timeout,
                                   wake=None, late=self.refresher.offer)
        self.known = KnownDIDs(config.known_capacity)
        self.frames = Frames(config.verify)
        self.writer = Writer(fence)
        self.batches: dict[int, list[float]] = {}  # batch id -> [read time, events not yet committed]
        self.stopping = False

    def run(self) -> None:
        collector.settle()  # start-up is done: the pool, the directory and the modules stay
        self.conn.send(("ready", self.config.shard))
        self.refresher.start()
        last_stats = time.monotonic()
        txn = OpenWrite()
        while not (self.stopping and not self.users.pending and not txn.changes):
            fenced = self._fenced()
            if fenced is not None:
                raise fenced
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
                if pending.create:
                    self.stats.users_created += 1
                    self.stats.users_fallback += user.fallback
                    self.stats.users_unverified += (not user.fallback and user.incomplete)
                    self.stats.users_refused += user.refused
                    txn.changes.users.append(user.row())
                    self.known.add(pending.did)
                self._ready(pending.events, txn, now, pending.identity, resolved=True)
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
                        self.frames.written(did, repo.rev)
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

    def _fenced(self) -> StaleEpoch | None:
        """The refusal a background job's transaction met: the shard was taken over."""
        profiles = self.refresher.profiles
        return (self.refresher.fenced or (profiles.fenced if profiles is not None else None)
                or (self.new_repos.fenced if self.new_repos is not None else None))

    def _offer_new_users(self, changes: Changes) -> None:
        """New users go to the background jobs now, never waiting on them: those with a PDS and
        no profile from the stream to the profile fetcher, all to the repository backfill."""
        profiles = self.refresher.profiles
        for did, _handle, _incomplete, _verified, pds, _error in changes.users:
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
        self.stats.skipped = self.frames.skipped
        self.stats.verify_failures = self.frames.failures
        return self.stats

    def _take(self, msg: tuple[Any, ...], txn: OpenWrite) -> None:
        """Decodes a batch; events of known authors go into the open transaction, others wait."""
        _, batch_id, read_time, idxs, positions, lines = msg
        received = time.monotonic()
        self.batches[batch_id] = [read_time, len(idxs)]
        unknown: dict[str, list[Event | FrameEvent]] = {}
        known: list[Event | FrameEvent] = []
        revs: set[str] = set()
        for idx, position, raw in zip(idxs, positions, lines):
            try:  # a frame opens with a CBOR map, a JSON line with "{" or white space
                ev: Event | FrameEvent = (decode_frame if raw[:1] >= b"\x80" else decode)(
                    raw, batch_id, idx, position)
            except BadEvent as exc:
                if isinstance(exc, Refused):
                    self.frames.failures[exc.check] += 1
                self._dead(txn, batch_id, idx, position, raw, str(exc))
                continue
            if not ev.did:  # #info, unknown kinds: counted, nothing to write
                self.frames.skipped[f"kind {ev.kind[:40]}"] += 1
                txn.add_frame(ev, write=False)  # type: ignore[arg-type]
                continue
            if ev.rev is not None or ev.kind == "#account":
                revs.add(ev.did)
            pending = self.users.pending.get(ev.did)
            if pending is not None:
                pending.events.append(ev)
                self.users.coalesced += 1
            elif ev.did in self.known:
                known.append(ev)
            else:
                unknown.setdefault(ev.did, []).append(ev)
        existing = self._lookup(list(unknown), self.frames.missing_repos(revs))
        for ev in known:
            self._ready([ev], txn, received)
        for did, evs in unknown.items():
            if did in existing:
                self.known.add(did)
                self._ready(evs, txn, received)
            else:
                self.users.begin(did, received).events.extend(evs)

    def _lookup(self, dids: list[str], repos: list[str]) -> set[str]:
        """Which of `dids` are users already; loads the repository states of `repos`."""
        if not dids and not repos:
            return set()
        for attempt in range(1_000_000):
            try:
                with self.pool.connection() as conn:
                    if repos:
                        self.frames.load(repo_states(conn, repos))
                    return existing_users(conn, dids) if dids else set()
            except RETRYABLE as exc:
                self._backoff(attempt, exc)
        raise AssertionError("unreachable")

    def _ready(self, items: list[Event | FrameEvent], txn: OpenWrite, now: float,
               ident: Identity | None = None, resolved: bool = False) -> None:
        """Events of one author whose users row exists (or is in `txn`), in order. A frame that
        needs its author's key and finds none cached waits for the author's DID document, and
        everything after it waits too; `resolved`: that document was just asked for."""
        for i, item in enumerate(items):
            if item.did in self.users.pending:  # queued behind a resolution of its author
                self.users.pending[item.did].events.extend(items[i:])
                return
            if isinstance(item, Event):
                self._add(item, txn)
                continue
            if item.needs_key and self.frames.verify:
                if not resolved:
                    ident = self.directory.cached(item.did)
                if ident is None and not resolved:
                    self.users.begin(item.did, now, create=False).events.extend(items[i:])
                    return
            self._apply(item, txn, now, ident)

    def _apply(self, fe: FrameEvent, txn: OpenWrite, now: float, ident: Identity | None) -> None:
        """Verifies a frame with its author's key, then writes it, skips it, or dead-letters it."""
        if fe.needs_key and self.frames.verify:
            if ident is None:
                self.frames.failures["key"] += 1
                self._dead(txn, fe.batch, fe.idx, fe.position, fe.raw, KEY_UNAVAILABLE)
                return
            failed = self.frames.check(fe, self.frames.key(ident))
            if failed is not None and failed.startswith("signature") and not fe.refetched:
                fe.refetched = True  # keys rotate: read the document again, once
                self.directory.purge(fe.did or "")
                self.users.begin(fe.did or "", now, create=False).events.append(fe)
                return
            if failed is not None:
                self.frames.failures[failed.split(":")[0]] += 1
                self._dead(txn, fe.batch, fe.idx, fe.position, fe.raw, failed)
                return
        # Verified (or not to be): the blocks are not needed any more, and a transaction holds
        # hundreds of frames (letting them go now saved 5% of the CPU of a frame)
        fe.commit = None
        if fe.rev is not None or fe.kind == "#account":
            self._repo_state(fe.did or "")
        skipped = self.frames.admit(fe)
        if skipped is not None:
            self.frames.skipped[skipped] += 1
            txn.add_frame(fe, write=False)
            return
        if fe.kind == "#identity":
            self.directory.purge(fe.did or "")  # the next commit reads the document again
        if fe.rev is not None and self.new_repos is not None:
            self.new_repos.live(fe.did or "", fe.rev)
        txn.add_frame(fe, write=True)

    def _add(self, ev: Event, txn: OpenWrite) -> None:
        """A Jetstream event into the open transaction; a commit not newer than its repository's
        rev (a snapshot holds it already) is acknowledged and counted, not written."""
        if ev.rev is not None:
            self._repo_state(ev.did)
            skipped = self.frames.admit_event(ev)
            if skipped is not None:
                self.frames.skipped[skipped] += 1
                txn.acks.add(ev.batch, ev.idx)
                txn.changes.noops += 1
                return
            if self.new_repos is not None:
                self.new_repos.live(ev.did, ev.rev)
        txn.add(ev)

    def _repo_state(self, did: str) -> None:
        """Loads a repository's state that was dropped (or never read) while its events waited."""
        if did not in self.frames.repos:
            self._lookup([], [did])

    def _dead(self, txn: OpenWrite, batch: int, idx: int, position: int, raw: bytes,
              reason: str) -> None:
        txn.dead(self.config.source, batch, idx, position, raw, reason)
        self.stats.dead_reasons[reason.split(":")[0]] += 1

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
            except RETRYABLE as exc:
                self._backoff(attempt, exc)
                attempt += 1
            except psycopg.Error as exc:
                log.warning("shard %d: batch rejected (%s); writing event by event",
                            self.config.shard, exc)
                self._commit_one_by_one(txn)
                break
        now = time.monotonic()
        self.stats.transactions += 1
        self.stats.events_by_kind.update(ev.kind for ev in events)
        self.stats.events_by_kind.update(fe.kind for fe, _ in txn.frames)
        newest = frame_time(max((fe.time for fe, _ in txn.frames if fe.time), default=None))
        if newest is not None:  # ISO times of one relay compare as their strings
            self.stats.frame_time = max(self.stats.frame_time or 0.0, newest)
        for batch_id, (committed, dead) in acks.batches.items():
            self.stats.committed += len(committed)
            self.stats.dead_letters += len(dead)
            entry = self.batches[batch_id]
            self.stats.latency.observe(now - entry[0], len(committed) + len(dead))
            entry[1] -= len(committed) + len(dead)
            if entry[1] <= 0:
                del self.batches[batch_id]

    def _commit_one_by_one(self, txn: OpenWrite) -> None:
        """Users and dead letters first, then each event (or frame, with its rev) on its own;
        what the database still rejects becomes a dead letter."""
        changes, acks = txn.changes, txn.acks
        units: list[tuple[Event | FrameEvent, Changes]] = []
        for ev in txn.events:
            units.append((ev, Changes()))
            units[-1][1].add(ev)
        for fe, written in txn.frames:
            if written:
                units.append((fe, Changes(revs={fe.did: fe.rev} if fe.did and fe.rev else {})))
                for ev in fe.events:
                    units[-1][1].add(ev)
        with self.pool.connection() as conn:
            self.writer.write(conn, Changes(users=changes.users, dead=changes.dead))
            for item, single in units:
                try:
                    self.writer.write(conn, single)
                except RETRYABLE:
                    raise
                except psycopg.Error as exc:
                    reason = f"rejected by database: {str(exc).strip().splitlines()[0]}"
                    self.writer.write(conn, Changes(
                        dead=[(self.config.source, item.position, item.raw[:DEAD_RAW_BYTES],
                               reason)]))
                    committed, dead = acks.batches[item.batch]
                    committed.remove(item.idx)
                    dead.append(item.idx)
                    self.stats.dead_reasons["rejected by database"] += 1
                    self.stats.events_by_kind[item.kind] -= 1


class WorkerExit(IntEnum):
    """What a local worker's exit code says; a worker ended by a signal shows as minus its
    number (multiprocessing's convention)."""

    STOPPED = 0  # told to stop: everything it took is committed and acknowledged
    FAILED = 1  # an unexpected error, logged with its traceback
    ORPHANED = 3  # the supervisor went away: nobody left to acknowledge to


def main(config: WorkerConfig, conn: Connection) -> None:
    """Process entry point. The supervisor decides when a worker stops, so the SIGINT and
    SIGTERM that reach every process of the group (Ctrl-C, systemd) are ignored here."""
    stop_signals.ignore()
    configure(config.log_level, config.log_format, f"shard-{config.shard}")
    code = WorkerExit.STOPPED
    try:
        ShardWorker(config, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        code = WorkerExit.ORPHANED
    except Exception:
        log.exception("shard %d: worker failed", config.shard)
        code = WorkerExit.FAILED
    finally:
        conn.close()
    os._exit(code)
