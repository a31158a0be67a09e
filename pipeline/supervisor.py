"""The supervisor: reads the source, routes events to shard processes, tracks what is committed.

Stop order: stop reading, send what is buffered, wait until every batch is acknowledged (workers
finish their pending user creations within the resolve timeout), save the cursor, stop workers.
Only the supervisor answers SIGINT and SIGTERM; its workers and their fork server ignore them, so
a signal to the whole process group stops the run in that same order. While stopping, a worker
that dies is not restarted: what it had not committed is left to the next run."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Any

import orjson
import psycopg

from common import stop_signals
from common.routing import shard_for
from pipeline.sources.base import Source, SourceError
from pipeline.summary import Summary
from shards.firehose.frames import route_key
from shards.identity import IdentityConfig
from shards.pds.config import PdsConfig
from shards.stats import ShardStats
from shards.store.pool import Budget, connect
from shards.worker import WorkerConfig, WorkerExit
from shards.worker import main as worker_main

log = logging.getLogger("pipeline")

CHUNK_LINES = 1000
CURSOR_EVERY = 1.0
READY_TIMEOUT = 60.0
# multiprocessing's exit code for a worker whose fork server, which reports exit codes, is gone
FORK_SERVER_GONE = 255
LEFT_TO_NEXT_RUN = ("its %d events not yet committed are left to the next run, which resumes"
                    " before them")


@dataclass(frozen=True)
class RunOptions:
    """What `pipeline run` was asked to do."""

    dsn: str
    shards: int = 4
    pool_budget: int = 200
    max_user_creations: int = 100
    resolve_timeout: float = 5.0
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    pds: PdsConfig = field(default_factory=PdsConfig)  # the whole pipeline's limits
    backfill_new_users: bool = False
    backfill_concurrency: int = 8  # the whole pipeline's
    max_repo_bytes: int = 512 * 1024 * 1024
    batch_size: int = 1000
    linger: float = 0.05
    max_inflight: int = 2
    max_open_events: int = 20_000  # per shard: sent but not yet committed
    from_start: bool = False
    refresh_interval: float = 30.0
    end_wait: float = 1.0  # once the source has ended, the longest a new author is waited for
    log_level: str = "WARNING"
    log_format: str = "text"
    transport: str = "local"  # or a redis:// URL: workers are `pipeline worker` processes
    stream_limit: int = 200  # redis: most entries in a shard's stream before the reader waits
    verify: bool = True  # firehose commits: check hashes, signature and tree before writing


@dataclass(eq=False)
class Batch:
    """Events sent to one shard, kept until every one of them is committed."""

    id: int
    shard: int
    read_time: float
    positions: list[int]
    lines: list[bytes]
    done: bytearray = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.done = bytearray(len(self.lines))
        self.remaining = len(self.lines)

    def settle(self, idxs: list[int]) -> int:
        """Marks events committed (their lines are no longer needed); returns how many were new."""
        new = 0
        for i in idxs:
            if not self.done[i]:
                self.done[i] = 1
                self.lines[i] = b""
                new += 1
        self.remaining -= new
        return new

    def first_open(self) -> int:
        """Position of the first event not yet committed."""
        return self.positions[self.done.index(0)]

    def message(self) -> tuple[Any, ...]:
        if self.remaining == len(self.lines):
            return ("batch", self.id, self.read_time, range(len(self.lines)), self.positions,
                    self.lines)
        idxs = [i for i, d in enumerate(self.done) if not d]
        return ("batch", self.id, self.read_time, idxs, [self.positions[i] for i in idxs],
                [self.lines[i] for i in idxs])


@dataclass(eq=False)
class Buffer:
    """Events routed to a shard and not yet sent."""

    read_time: float = 0.0
    positions: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class ShardProcess:
    """One worker process and what the supervisor owes it."""

    shard: int
    process: Any = None
    conn: Connection | None = None
    ready: bool = False
    started: float = 0.0
    restart_at: float | None = None
    quick_deaths: int = 0
    restarts: int = 0
    inflight: set[int] = field(default_factory=set)
    retained: dict[int, Batch] = field(default_factory=dict)
    open_events: int = 0
    buffer: Buffer = field(default_factory=Buffer)
    stats: ShardStats | None = None
    past: list[ShardStats] = field(default_factory=list)
    finished: bool = False
    told_end: bool = False  # sent ("end",) after the last batch


class AlreadyRunning(Exception):
    """Another run holds this source's lock."""


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Supervisor:
    """Runs one source to its end (or until stopped) through N shard processes."""

    def __init__(self, options: RunOptions, source: Source,
                 on_progress: Callable[[Summary], None] | None = None) -> None:
        self.o = options
        self.source = source
        self.frames = getattr(source, "format", "jetstream") == "firehose"
        self.on_progress = on_progress
        self.per_shard_pool = Budget(options.pool_budget, options.shards).per_shard()
        self.slots = max(1, options.max_user_creations // options.shards)
        # Workers fork from a server that imported their code once: a start costs a fork,
        # not a fresh interpreter importing psycopg and the identity stack (about 0.2 s of CPU).
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["shards.worker"])
        self.shards = [ShardProcess(k) for k in range(options.shards)]
        self.chunks: queue.Queue[tuple[float, list[int], list[bytes], int] | None] = queue.Queue(4)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.stopping = threading.Event()
        self.reader_done = False
        self.reader_error: BaseException | None = None
        self.next_batch = 0
        self.routed_next = 0
        self.events_read = 0
        self.committed = 0
        self.dead = 0
        self.start_cursor: int | None = None
        self.saved_cursor: int | None = None
        self.db: psycopg.Connection | None = None
        self.started = time.monotonic()
        self._shard_of = lru_cache(maxsize=1 << 18)(lambda key: shard_for(key, options.shards))
        self.transport: Any = None  # redis: links to workers elsewhere, nothing spawned here
        self._give_up_at: float | None = None
        if options.transport != "local":
            from pipeline.transport.redis import SupervisorTransport

            self.transport = SupervisorTransport(options.transport, options.shards, source.name,
                                                 options.stream_limit)

    # ----- lifecycle -------------------------------------------------------------------------

    def run(self) -> Summary:
        """Raises AlreadyRunning, SourceError, psycopg.OperationalError for the CLI to report."""
        self._open_db()
        try:
            self._spawn_all()
            reader = threading.Thread(target=self._read, name="reader", daemon=True)
            reader.start()
            self._loop()
            self._stop_workers()
            self._save_cursor(force=True)
        finally:
            for sp in self.shards:
                if sp.process is not None and sp.process.is_alive():
                    sp.process.kill()
            if self.db is not None:
                self.db.close()
        if self.reader_error is not None:
            raise self.reader_error
        return self.summary()

    def stop(self) -> None:
        """Stop reading and drain; safe from a signal handler."""
        self.stopping.set()
        self.source.close()
        self._wake()

    def _open_db(self) -> None:
        self.db = connect(self.o.dsn, "pipeline", autocommit=True)
        got = self.db.execute("SELECT pg_try_advisory_lock(%s)",
                              (_lock_key(self.source.name),)).fetchone()
        if not got or not got[0]:
            raise AlreadyRunning(self.source.name)
        row = self.db.execute("SELECT cursor FROM cursors WHERE name = %s",
                              (self.source.name,)).fetchone()
        if row and self.source.resumable and not self.o.from_start:
            self.start_cursor = row[0]
        self.routed_next = self.start_cursor or 0

    def _spawn_all(self) -> None:
        for sp in self.shards:
            self._spawn(sp)
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(sp.ready for sp in self.shards) and not self.stopping.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError("shard workers did not start in time")
            self._poll(0.2)
            for sp in self.shards:
                if sp.restarts > 2:
                    raise RuntimeError(f"shard {sp.shard} cannot start; see its log above")
                if sp.restart_at is not None and sp.restart_at <= time.monotonic():
                    self._spawn(sp)

    def _spawn(self, sp: ShardProcess) -> None:
        if self.transport is not None:  # entries wait in Redis until a worker takes them
            sp.conn, sp.ready, sp.started = self.transport.link(sp.shard), True, time.monotonic()
            sp.restart_at = None
            return
        config = WorkerConfig(
            shard=sp.shard, shards=self.o.shards, dsn=self.o.dsn, pool_size=self.per_shard_pool,
            slots=self.slots, resolve_timeout=self.o.resolve_timeout, identity=self.o.identity,
            source=self.source.name, pds=self.o.pds.share(self.o.shards),
            backfill_new_users=self.o.backfill_new_users,
            backfill_concurrency=max(1, self.o.backfill_concurrency // self.o.shards),
            max_repo_bytes=self.o.max_repo_bytes, refresh_interval=self.o.refresh_interval,
            end_wait=self.o.end_wait, log_level=self.o.log_level, log_format=self.o.log_format,
            verify=self.o.verify,
        )
        parent, child = self.ctx.Pipe(duplex=True)
        sp.process = self.ctx.Process(target=worker_main, args=(config, child),
                                      name=f"pipeline-shard-{sp.shard}", daemon=False)
        # The fork server (started on first use) and every worker it forks are born with SIGINT
        # and SIGTERM blocked, so a signal to the whole group cannot end them before the worker
        # ignores both. The resource tracker is started first: its own start unblocks the two.
        resource_tracker.ensure_running()
        with stop_signals.blocked():
            sp.process.start()
        child.close()
        sp.conn, sp.ready, sp.started, sp.restart_at = parent, False, time.monotonic(), None
        sp.inflight, sp.told_end = set(), False
        for batch in sp.retained.values():  # redelivery: what the dead worker never committed
            self._send(sp, batch)

    def _died(self, sp: ShardProcess) -> None:
        if sp.conn is None or self.transport is not None:
            return  # redis: a dead worker's entries stay pending; the next one reclaims them
        sp.process.join(timeout=5)
        code = sp.process.exitcode
        sp.conn.close()
        sp.conn = None
        if sp.stats is not None:
            sp.past.append(sp.stats)
            sp.stats = None
        if sp.finished or self.stopping.is_set():
            sp.restart_at = None  # nobody is restarted while stopping
            left = self._uncommitted(sp)
            if code == WorkerExit.STOPPED and not left:
                log.info("shard %d worker stopped (%s)", sp.shard, describe_exit(code))
            else:
                log.warning("shard %d worker exited while stopping (%s) and is not restarted; "
                            + LEFT_TO_NEXT_RUN, sp.shard, describe_exit(code), left)
            return
        now = time.monotonic()
        sp.quick_deaths = sp.quick_deaths + 1 if now - sp.started < 30 else 0
        delay = 0.0 if sp.quick_deaths == 0 else min(0.5 * 2 ** (sp.quick_deaths - 1), 30.0)
        sp.restart_at = now + delay
        sp.restarts += 1
        log.warning("shard %d worker exited (%s); restarting in %.1fs with %d unacknowledged"
                    " batches", sp.shard, describe_exit(code), delay, len(sp.retained))

    @staticmethod
    def _uncommitted(sp: ShardProcess) -> int:
        """Events routed to the shard and not yet committed."""
        return sum(b.remaining for b in sp.retained.values()) + len(sp.buffer.lines)

    # ----- reading and routing ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _read(self) -> None:
        """Reader thread: chunks of lines, each with the position to resume from after it."""
        positions: list[int] = []
        lines: list[bytes] = []
        started = time.monotonic()
        try:
            for item in self.source.events(self.start_cursor):
                if item is not None:
                    if not lines:
                        started = time.monotonic()
                    positions.append(item[0])
                    lines.append(item[1])
                if lines and (item is None or len(lines) >= CHUNK_LINES
                              or time.monotonic() - started >= self.o.linger):
                    self._put((started, positions, lines, self.source.next_position))
                    positions, lines = [], []
            if lines:
                self._put((started, positions, lines, self.source.next_position))
        except SourceError as exc:
            self.reader_error = exc
        except Exception as exc:  # reported by run(); the drain still saves what is committed
            log.exception("reading the source failed")
            self.reader_error = exc
        finally:
            self._put(None)

    def _put(self, item: tuple[float, list[int], list[bytes], int] | None) -> None:
        while True:
            try:
                self.chunks.put(item, timeout=0.2)
                self._wake()
                return
            except queue.Full:
                if self.stopping.is_set() and item is not None:
                    return

    def _route(self, chunk: tuple[float, list[int], list[bytes], int]) -> None:
        read_time, positions, lines, next_pos = chunk
        shards, shard_of, frames = self.shards, self._shard_of, self.frames
        for pos, raw in zip(positions, lines):
            if frames:  # the frame's repo (or did) as it is sent, b"" when there is none
                key = route_key(raw)[1]
            elif raw.startswith(b'{"did":"'):
                end = raw.find(b'"', 8)
                key = raw[8:end] if end > 0 and b"\\" not in raw[8:end] else _did_of(raw)
            else:
                key = _did_of(raw)
            buf = shards[shard_of(key)].buffer
            if not buf.lines:
                buf.read_time = read_time
            buf.positions.append(pos)
            buf.lines.append(raw)
        self.events_read += len(lines)
        self.routed_next = next_pos

    def _can_send(self, sp: ShardProcess) -> bool:
        if self.transport is not None:  # backpressure: the shard's stream is long enough
            return (sp.conn is not None and len(sp.retained) < self.o.stream_limit
                    and sp.conn.can_send())
        return (sp.conn is not None and len(sp.inflight) < self.o.max_inflight
                and sp.open_events < self.o.max_open_events)

    def _flush(self, final: bool = False) -> None:
        now = time.monotonic()
        for sp in self.shards:
            buf = sp.buffer
            while buf.lines and self._can_send(sp) and (
                final or len(buf.lines) >= self.o.batch_size or now - buf.read_time >= self.o.linger
            ):
                n = self.o.batch_size
                batch = Batch(self.next_batch, sp.shard, buf.read_time, buf.positions[:n],
                              buf.lines[:n])
                del buf.positions[:n], buf.lines[:n]
                self.next_batch += 1
                sp.retained[batch.id] = batch
                sp.open_events += batch.remaining
                self._send(sp, batch)

    def _tell_end(self) -> None:
        """Tells each local worker, after its last batch, that the source has ended: from then
        on it waits for slow resolutions at most --end-wait seconds more."""
        if self.transport is not None:  # redis workers outlive runs: nothing to tell them
            return
        for sp in self.shards:
            if sp.conn is not None and not sp.told_end and not sp.buffer.lines:
                sp.told_end = self._deliver(sp, ("end",))

    def _send(self, sp: ShardProcess, batch: Batch) -> None:
        if self._deliver(sp, batch.message()):
            sp.inflight.add(batch.id)

    def _deliver(self, sp: ShardProcess, msg: tuple[Any, ...]) -> bool:
        """Sends `msg` to the shard; False (and the shard counted dead) if its pipe is broken."""
        try:
            sp.conn.send(msg)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._died(sp)
            return False

    # ----- acknowledgements ------------------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        conns = {sp.conn: sp for sp in self.shards if sp.conn is not None}
        sentinels = {sp.process.sentinel: sp for sp in self.shards
                     if sp.conn is not None and sp.process is not None}
        if self.transport is not None and self.stopping.is_set():
            self._stop_waiting()
        ready = wait([self._wake_r, *conns, *sentinels], timeout)
        for obj in ready:
            if obj is self._wake_r:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif obj in conns:
                sp = conns[obj]
                try:
                    while sp.conn is not None and sp.conn.poll():
                        self._handle(sp, sp.conn.recv())
                except (EOFError, OSError):
                    self._died(sp)
        for obj in ready:
            if obj in sentinels and sentinels[obj].conn is not None:
                sp = sentinels[obj]
                try:
                    while sp.conn.poll():  # its last acknowledgements still count
                        self._handle(sp, sp.conn.recv())
                except (EOFError, OSError):
                    pass
                self._died(sp)

    def _handle(self, sp: ShardProcess, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ack":
            for batch_id, (committed, dead) in msg[2].items():
                sp.inflight.discard(batch_id)
                batch = sp.retained.get(batch_id)
                if batch is None:
                    continue
                before = batch.remaining
                self.committed += batch.settle(committed)
                self.dead += batch.settle(dead)
                sp.open_events -= before - batch.remaining
                if batch.remaining == 0:
                    del sp.retained[batch_id]
        elif kind == "stats":
            sp.stats = msg[2]
        elif kind == "ready":
            sp.ready = True
            sp.quick_deaths = 0 if time.monotonic() - sp.started > 30 else sp.quick_deaths

    # ----- the loop ---------------------------------------------------------------------------

    def _pending_work(self) -> bool:
        """Whether batches remain that a worker of this run can still commit."""
        return any((sp.buffer.lines or sp.retained)
                   and (sp.conn is not None or sp.restart_at is not None) for sp in self.shards)

    def _loop(self) -> None:
        last_cursor = last_progress = time.monotonic()
        while True:
            busy = any(sp.buffer.lines for sp in self.shards)
            self._poll(self.o.linger if busy else 0.5)
            for sp in self.shards:
                if sp.conn is None and sp.restart_at is not None:
                    if self.stopping.is_set():
                        sp.restart_at = None
                        log.warning("shard %d worker is not restarted while stopping; "
                                    + LEFT_TO_NEXT_RUN, sp.shard, self._uncommitted(sp))
                    elif sp.restart_at <= time.monotonic():
                        self._spawn(sp)
            if not self.stopping.is_set():
                self._take_chunks()
            self._flush(final=self.reader_done or self.stopping.is_set())
            if self.reader_done and not self.stopping.is_set():
                self._tell_end()
            now = time.monotonic()
            if now - last_cursor >= CURSOR_EVERY:
                self._save_cursor()
                last_cursor = now
            if self.on_progress is not None and now - last_progress >= 0.5:
                self.on_progress(self.summary())
                last_progress = now
            drained = self.reader_done or self.stopping.is_set()
            if drained and not self._pending_work():
                return

    def _take_chunks(self) -> None:
        limit = 2 * self.o.batch_size
        while not self.reader_done and all(len(sp.buffer.lines) < limit for sp in self.shards):
            try:
                chunk = self.chunks.get_nowait()
            except queue.Empty:
                return
            if chunk is None:
                self.reader_done = True
                return
            self._route(chunk)
            self._flush()

    def _stop_workers(self) -> None:
        if self.transport is not None:  # workers are long-lived and serve the next run too
            for sp in self.shards:
                sp.finished = True
                if sp.conn is not None:
                    sp.past.extend(sp.conn.past_stats())
            self.transport.close()
            return
        for sp in self.shards:
            sp.finished = True
            if sp.conn is not None:
                try:
                    sp.conn.send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + 15
        while any(sp.conn is not None for sp in self.shards) and time.monotonic() < deadline:
            self._poll(0.2)

    def _stop_waiting(self) -> None:
        """Redis, on a signal: wait a while for acknowledgements, then leave the entries to the
        workers. The cursor stays the low watermark; the next run re-reads from it."""
        now = time.monotonic()
        if self._give_up_at is None:
            self._give_up_at = now + self.o.resolve_timeout + 10
        elif now >= self._give_up_at and self._pending_work():
            mark = self.watermark()
            log.warning("stopping with unacknowledged batches in Redis; the workers will commit"
                        " them, and the cursor stays at %d", mark)
            for sp in self.shards:
                sp.retained.clear()
                sp.open_events = 0
                sp.buffer = Buffer()
            self.routed_next = mark

    # ----- cursor and figures ----------------------------------------------------------------

    def watermark(self) -> int:
        """The position before which every event is committed."""
        marks = [self.routed_next]
        for sp in self.shards:
            if sp.buffer.positions:
                marks.append(sp.buffer.positions[0])
            marks.extend(b.first_open() for b in sp.retained.values())
        return min(marks)

    def _save_cursor(self, force: bool = False) -> None:
        mark = self.watermark()
        if mark == self.saved_cursor and not force:
            return
        for attempt in range(5):
            try:
                if self.db is None or self.db.closed:
                    self.db = connect(self.o.dsn, "pipeline", autocommit=True)
                    self.db.execute("SELECT pg_advisory_lock(%s)", (_lock_key(self.source.name),))
                self.db.execute(
                    "INSERT INTO cursors (name, cursor, event_time) VALUES (%s, %s,"
                    " to_timestamp(%s)) ON CONFLICT (name) DO UPDATE SET cursor = EXCLUDED.cursor,"
                    " event_time = coalesce(EXCLUDED.event_time, cursors.event_time),"
                    " updated_at = now()",
                    (self.source.name, mark, self.frame_time()),
                )
                self.saved_cursor = mark
                return
            except psycopg.OperationalError as exc:
                log.warning("saving the cursor failed (%s); retrying", str(exc).strip())
                if self.db is not None:
                    self.db.close()
                self.db = None
                if not force:
                    return
                time.sleep(min(0.2 * 2**attempt, 3))

    def frame_time(self) -> float | None:
        """Unix time of the newest firehose frame committed (None for other sources)."""
        times = [s.frame_time for sp in self.shards for s in (*sp.past, sp.stats)
                 if s is not None and s.frame_time is not None]
        return max(times, default=None)

    def summary(self) -> Summary:
        stats = [s for sp in self.shards for s in (*sp.past, sp.stats) if s is not None]
        return Summary.collect(
            source=self.source.name, events_read=self.events_read, committed=self.committed,
            dead_letters=self.dead, elapsed=time.monotonic() - self.started,
            start_cursor=self.start_cursor, cursor=self.saved_cursor,
            restarts=sum(sp.restarts for sp in self.shards), shard_stats=stats,
            current={sp.shard: sp.stats for sp in self.shards},
            progress=self.source.progress, source_skipped=getattr(self.source, "skipped", 0),
        )


def describe_exit(code: int | None) -> str:
    """A worker's exit code in words, for the log."""
    if code is None:
        return "exit code unknown"
    try:
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        if code == FORK_SERVER_GONE:
            return f"exit code {code}: its fork server is gone"
        return f"exit code {code}: {WorkerExit(code).name.lower()}"
    except ValueError:  # a number no name is known for
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _did_of(raw: bytes) -> bytes:
    """Slow path for routing: the parsed `did`, or b"" for lines the worker will dead-letter."""
    try:
        did = orjson.loads(raw).get("did")
    except (orjson.JSONDecodeError, AttributeError):
        return b""
    return did.encode() if isinstance(did, str) else b""


def install_signal_handlers(supervisor: Supervisor) -> None:
    """First SIGINT/SIGTERM drains and exits 0; a second SIGINT exits at once."""

    def first(signum: int, _frame: object) -> None:
        log.warning("received %s: draining, then exiting", signal.Signals(signum).name)
        supervisor.stop()
        signal.signal(signal.SIGINT, second)

    def second(_signum: int, _frame: object) -> None:
        for sp in supervisor.shards:
            if sp.process is not None and sp.process.is_alive():
                sp.process.kill()
        raise SystemExit(130)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)
