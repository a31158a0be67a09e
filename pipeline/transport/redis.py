"""Redis Streams transport: shard workers on other machines, fed and acknowledged through Redis.

Keys (all in the database of the URL):

  pipeline:shard:<k>        stream of batches for shard k, consumer group `pipeline`; an entry is
                            XACKed and XDELed once every event of it is committed or
                            dead-lettered, so XLEN is the shard's backlog (the backpressure figure)
  pipeline:shard:<k>:done   hash: entry id -> which events of a partly committed entry are durable,
                            so a worker that reclaims the entry skips them (per-DID order holds)
  pipeline:shard:<k>:lock   the one live worker of shard k (SET NX PX, renewed by a heartbeat);
                            a worker reads and claims entries only in scripts that check it
  pipeline:acks:<run>       acknowledgements and stats of one supervisor run, read by it
  pipeline:sent:<run>:<k>   the last batch id that run appended to shard k (retries append once)

The classes here look like a multiprocessing Connection (send, poll, recv, fileno, close), so the
supervisor and ShardWorker run unchanged over them. Entries are a plain binary encoding, never
pickle: whoever can write to Redis cannot run code in a worker or the supervisor.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import threading
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, fields
from typing import Any

import orjson
import redis

from shards.stats import Histogram, ShardStats

log = logging.getLogger("pipeline.redis")

GROUP = "pipeline"
ACKS_MAXLEN = 20_000  # approximate cap of a run's acks stream (its supervisor trims what it read)
ACKS_TTL = 86_400  # an abandoned run's acks stream disappears after a day
DEFAULT_STREAM_LIMIT = 200
DEFAULT_LOCK_TTL = 15.0
WORKER_QUEUE = 2  # batches read from Redis and not yet taken by the worker
WORKER_MAX_OPEN = 64  # batches taken and not yet fully committed (like local --max-retained)
BLOCK_MS = 1000
NOT_HOLDER_WAIT = 0.2  # while the lock is not ours, how often reading looks again
STATS_WITH_ACKS = 0.5  # a worker's figures ride along with its acks at most this often
_GAUGES = {"shard", "active_user_creations", "pending_user_creations",
           "peak_active_user_creations", "peak_pending_user_creations", "refresher_backlog"}


def shard_stream(shard: int) -> str:
    return f"pipeline:shard:{shard}"


def done_key(shard: int) -> str:
    return f"pipeline:shard:{shard}:done"


def lock_key(shard: int) -> str:
    return f"pipeline:shard:{shard}:lock"


def acks_stream(run: str | bytes) -> str:
    return f"pipeline:acks:{run.decode() if isinstance(run, bytes) else run}"


def connect(url: str) -> redis.Redis:
    """A thread-safe client; blocking reads use at most BLOCK_MS, well under the socket timeout."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                socket_keepalive=True, health_check_interval=30)


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}://{rest}"


# ----- encoding ------------------------------------------------------------------------------

def _pack(values: Iterable[int]) -> bytes:
    a = array("q", values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _unpack(data: bytes) -> list[int]:
    a = array("q")
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def encode_batch(run: str, source: str, shards: int, msg: tuple[Any, ...]) -> dict[str, bytes]:
    """("batch", id, read_time, idxs, positions, lines) as stream fields; the monotonic read time
    becomes wall-clock time so that another machine can measure read-to-commit latency."""
    _, batch_id, read_time, idxs, positions, lines = msg
    full = (isinstance(idxs, range) and idxs.start == 0 and idxs.step == 1
            and len(idxs) == len(lines))
    wall = time.time() - (time.monotonic() - read_time)
    return {"v": b"1", "run": run.encode(), "src": source.encode(), "n": b"%d" % shards,
            "id": b"%d" % batch_id, "t": repr(wall).encode(),
            "idx": b"" if full else _pack(idxs), "pos": _pack(positions),
            "len": _pack(len(line) for line in lines), "data": b"".join(lines)}


@dataclass
class Entry:
    """One decoded stream entry."""

    entry_id: bytes
    run: bytes
    source: str
    shards: int
    batch_id: int
    read_wall: float
    idxs: list[int] | range
    positions: list[int]
    lines: list[bytes]


def decode_entry(entry_id: bytes, f: dict[bytes, bytes]) -> Entry:
    positions = _unpack(f[b"pos"])
    data, lines, at = f[b"data"], [], 0
    for n in _unpack(f[b"len"]):
        lines.append(data[at:at + n])
        at += n
    if at != len(data) or len(lines) != len(positions):
        raise ValueError("lengths do not match the data")
    idxs: list[int] | range = _unpack(f[b"idx"]) if f[b"idx"] else range(len(lines))
    if len(idxs) != len(lines):
        raise ValueError("indexes do not match the lines")
    return Entry(entry_id, f[b"run"], f[b"src"].decode(), int(f[b"n"]), int(f[b"id"]),
                 float(f[b"t"]), idxs, positions, lines)


def _stats_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError


def encode_stats(stats: ShardStats) -> bytes:
    return orjson.dumps(stats, default=_stats_default, option=orjson.OPT_NON_STR_KEYS)


def decode_stats(data: bytes) -> ShardStats:
    raw = orjson.loads(data)
    template = ShardStats(0)
    kwargs: dict[str, Any] = {}
    for f in fields(ShardStats):
        if f.name not in raw:
            continue
        value, like = raw[f.name], getattr(template, f.name)
        if isinstance(like, Counter):
            value = Counter(value)
        elif isinstance(like, Histogram):
            value = Histogram(list(value["counts"]))
        kwargs[f.name] = value
    return ShardStats(**kwargs)


def stats_since(current: ShardStats, base: ShardStats | None) -> ShardStats:
    """What a long-lived worker did since `base`: counters minus base, gauges as they are."""
    out = copy.deepcopy(current)
    if base is None:
        return out
    for f in fields(ShardStats):
        if f.name in _GAUGES:
            continue
        now, then = getattr(current, f.name), getattr(base, f.name)
        if isinstance(now, bool):
            continue
        if isinstance(now, int):
            setattr(out, f.name, now - then)
        elif isinstance(now, Counter):
            diff = Counter(now)
            diff.subtract(then)
            setattr(out, f.name, +diff)
        elif isinstance(now, Histogram):
            setattr(out, f.name, Histogram([a - b for a, b in zip(now.counts, then.counts)]))
    return out


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD/XREADGROUP reply (RESP2 list, or RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        for value in reply.values():
            out.extend(value[0] if value and isinstance(value[0], list) else value)
        return out
    return [entry for _name, entries in reply for entry in entries]


def _retrying(what: str, call: Callable[[], Any], stop: threading.Event | None = None) -> Any:
    """Runs `call` until Redis answers (connection trouble is retried with backoff)."""
    attempt = 0
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if stop is not None and stop.is_set():
                raise
            delay = min(0.1 * 2**attempt, 5.0)
            log.warning("redis: %s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            attempt += 1


def ensure_group(client: redis.Redis, shard: int) -> None:
    try:
        client.xgroup_create(shard_stream(shard), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# ----- a Connection look-alike ---------------------------------------------------------------

class _Inbox:
    """Messages for the local side, readable with poll/recv and selectable through fileno()."""

    def __init__(self) -> None:
        self._q: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.closed = False

    def _put(self, msg: tuple[Any, ...], front: bool = False) -> None:
        with self._lock:
            if front:
                self._q.appendleft(msg)
            else:
                self._q.append(msg)
            try:
                self._w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already readable

    def fileno(self) -> int:
        return self._r.fileno()

    def poll(self, timeout: float | None = 0.0) -> bool:
        if self._q:
            return True
        if timeout:
            deadline = time.monotonic() + timeout
            while not self._q and time.monotonic() < deadline:
                time.sleep(0.01)
        return bool(self._q)

    def recv(self) -> tuple[Any, ...]:
        with self._lock:
            if not self._q:
                raise EOFError("nothing to receive")
            msg = self._q.popleft()
            if not self._q:  # not readable any more until the next _put
                try:
                    while self._r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            return msg

    def _close_inbox(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


# ----- supervisor side -----------------------------------------------------------------------

class SupervisorTransport:
    """The supervisor's end: one link per shard and a thread reading this run's acks stream."""

    def __init__(self, url: str, shards: int, source: str,
                 stream_limit: int = DEFAULT_STREAM_LIMIT) -> None:
        self.url = url
        self.client = connect(url)
        self.shards = shards
        self.source = source
        self.stream_limit = stream_limit
        self.run = uuid.uuid4().hex[:16]
        self.acks = acks_stream(self.run)
        self.links: dict[int, RedisShardLink] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def link(self, shard: int) -> RedisShardLink:
        if shard not in self.links:
            _retrying("creating the consumer group", lambda: ensure_group(self.client, shard))
            self.links[shard] = RedisShardLink(self, shard)
        if self._thread is None:  # the acks stream exists before the first batch is sent
            _retrying(f"creating {self.acks}", self._keep_acks)
            self._thread = threading.Thread(target=self._read_acks, name="redis-acks", daemon=True)
            self._thread.start()
        return self.links[shard]

    def _keep_acks(self) -> None:
        """Creates (or keeps) this run's acks stream: workers never create one (NOMKSTREAM), so
        a finished or abandoned run's stream, once deleted, stays deleted."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.acks, {"k": b"-1", "t": b"run"}, maxlen=ACKS_MAXLEN, approximate=True)
        pipe.expire(self.acks, ACKS_TTL)
        pipe.execute()

    def _read_acks(self) -> None:
        last, kept = b"0-0", time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - kept > 60:  # alive for a day past the last sign of life
                try:
                    self._keep_acks()
                    kept = time.monotonic()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("redis: keeping %s failed (%s); retrying", self.acks, exc)
                    self._stop.wait(1.0)
                    continue
            try:
                reply = self.client.xread({self.acks: last}, count=500, block=BLOCK_MS)
            except redis.RedisError as exc:
                log.warning("redis: reading acknowledgements failed (%s); retrying", exc)
                self._stop.wait(1.0)
                continue
            entries = _entries(reply)
            for entry_id, f in entries:
                last = entry_id
                try:
                    link = self.links.get(int(f[b"k"]))
                    if link is None:  # a "run" marker, or a shard of another size
                        continue
                    kind = f[b"t"]
                    if kind == b"ack":
                        acks = {int(b): (c, d) for b, c, d in orjson.loads(f[b"d"])}
                        link._put(("ack", link.shard, acks))
                    elif kind == b"stats":
                        link._stats(f.get(b"c", b""), decode_stats(f[b"d"]))
                except Exception:  # a malformed entry must not stop the acknowledgements
                    log.exception("redis: ignoring a malformed acknowledgement %r", entry_id)
            if entries:
                try:
                    self.client.xtrim(self.acks, minid=last, approximate=False)
                except redis.RedisError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BLOCK_MS / 1000 + 5)
        try:
            self.client.delete(self.acks, *(link.sent_key for link in self.links.values()))
        except redis.RedisError:
            pass
        for link in self.links.values():
            link.close()
        self.client.close()


class RedisShardLink(_Inbox):
    """Supervisor side of one shard: send() appends batches, recv() gives ack and stats messages."""

    MEASURE_EVERY = 0.02

    def __init__(self, transport: SupervisorTransport, shard: int) -> None:
        super().__init__()
        self.t = transport
        self.shard = shard
        self.stream = shard_stream(shard)
        self.sent_key = f"pipeline:sent:{transport.run}:{shard}"
        # XLEN when last measured plus what was appended since; starts full to measure first.
        self._length = transport.stream_limit
        self._measured = 0.0
        self._consumer: bytes | None = None
        self._past: list[ShardStats] = []
        self._latest: ShardStats | None = None

    def can_send(self) -> bool:
        """False while the shard's stream holds `stream_limit` entries or more (backpressure)."""
        if self._length < self.t.stream_limit:
            return True
        now = time.monotonic()
        if now - self._measured >= self.MEASURE_EVERY:
            try:
                self._length = self.t.client.xlen(self.stream)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis: measuring %s failed (%s)", self.stream, exc)
            self._measured = now
        return self._length < self.t.stream_limit

    def send(self, msg: tuple[Any, ...]) -> None:
        if msg[0] != "batch":
            return  # workers are long-lived: "stop" is not the supervisor's to send
        fields_ = encode_batch(self.t.run, self.t.source, self.t.shards, msg)
        batch_id, attempts = msg[1], 0

        def append() -> None:
            # With the entry, the last batch id appended: a retry after a lost reply must not
            # append the batch twice (a late copy would replay old events over newer ones).
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                last = self.t.client.get(self.sent_key)
                if last is not None and int(last) >= batch_id:
                    return
            pipe = self.t.client.pipeline(transaction=True)
            pipe.xadd(self.stream, fields_)
            pipe.set(self.sent_key, batch_id, ex=ACKS_TTL)
            pipe.execute()

        _retrying(f"appending to {self.stream}", append)
        self._length += 1

    def _stats(self, consumer: bytes, stats: ShardStats) -> None:
        if self._consumer is not None and consumer != self._consumer and self._latest is not None:
            self._past.append(self._latest)  # a worker that stopped or died: its figures stay
        self._consumer, self._latest = consumer, stats
        self._put(("stats", self.shard, stats))

    def past_stats(self) -> list[ShardStats]:
        return list(self._past)

    def close(self) -> None:
        if not self.closed:
            self._close_inbox()


# ----- worker side ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Open:
    """A stream entry handed to the worker and not yet fully committed."""

    entry_id: bytes
    run: bytes
    batch_id: int
    slot: dict[int, int] | None  # supervisor idx -> index in the entry, when not the identity
    done: bytearray
    remaining: int


_READS = {
    # KEYS: lock, stream; ARGV: token, group, consumer, then the command's own.
    "claim": """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return {0} end
return {1, redis.call('xautoclaim', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'COUNT', ARGV[5])}
""",
    "sweep": """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return {0} end
local ids = {}
for _, p in ipairs(redis.call('xpending', KEYS[2], ARGV[2], 'IDLE', ARGV[4], '-', '+', 10000)) do
  if p[2] ~= ARGV[3] and #ids < tonumber(ARGV[5]) then ids[#ids + 1] = p[1] end
end
if #ids == 0 then return {1, {}} end
return {1, redis.call('xclaim', KEYS[2], ARGV[2], ARGV[3], ARGV[4], unpack(ids))}
""",
    "read": """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return {0} end
local got = redis.call('xreadgroup', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                       'STREAMS', KEYS[2], '>')
if got then return {1, {1, got[1][2]}} end
local last = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', 1)
return {1, {2, last[1] and last[1][1] or '0-0'}}
""",
}


def _fields(entries: list[Any]) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """[id, [field, value, ...]] entries of a script's reply as (id, fields); an entry deleted
    while pending (nil from Redis 6.2) is left out."""
    return [(entry[0], dict(zip(entry[1][::2], entry[1][1::2]))) for entry in entries if entry]


class RedisWorkerLink(_Inbox):
    """Worker side of one shard: recv() gives batches from the consumer group (first the entries
    a dead worker left pending, then new ones), send() publishes acknowledgements and XACKs and
    XDELs each entry once all its events are durable. It reads only while it holds `lock`."""

    def __init__(self, client: redis.Redis, shard: int, shards: int, lock: ShardLock,
                 consumer: str | None = None, on_source: Callable[[str], None] | None = None,
                 max_open: int = WORKER_MAX_OPEN) -> None:
        super().__init__()
        self.client = client
        self.shard = shard
        self.shards = shards
        self.lock = lock
        self.lease = lock.ttl_ms / 1000
        self._lock_held = True
        self._scripts = {name: client.register_script(src) for name, src in _READS.items()}
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_source = on_source
        self.max_open = max_open
        self.stream = shard_stream(shard)
        self.done_key = done_key(shard)
        self.open: dict[int, _Open] = {}
        self.reclaimed = 0
        self.entries_done = 0
        self._next_local = 0
        self._source: str | None = None
        self._run: bytes | None = None
        self._baselines: dict[bytes, ShardStats | None] = {}
        self._stats_ref: ShardStats | None = None
        self._stats_sent = 0.0
        self._warned_shards = False
        self._sources: dict[int, str] = {}
        self._cond = threading.Condition()
        self._stop_fetching = threading.Event()
        self._thread = threading.Thread(target=self._fetch, name="redis-fetch", daemon=True)
        self._thread.start()

    # -- what the worker calls --

    def recv(self) -> tuple[Any, ...]:
        msg = super().recv()
        if msg[0] == "batch":
            local = msg[1]
            o = self.open.get(local)
            if o is not None and o.run != self._run:
                if o.run not in self._baselines:  # figures of this run start from here
                    self._baselines[o.run] = copy.deepcopy(self._stats_ref)
                self._run = o.run
            source = self._sources.pop(local, None)
            if source is not None and source != self._source and self.on_source is not None:
                self.on_source(source)
            self._source = source or self._source
            with self._cond:
                self._cond.notify_all()
        return msg

    def send(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ack":
            self._ack(msg[2])
        elif kind == "stats":
            self._publish_stats(msg[2])

    def stop(self) -> None:
        """Stop reading new entries and ask the worker to drain (safe from any thread)."""
        self._stop_fetching.set()
        with self._cond:
            self._cond.notify_all()
        self._put(("stop",), front=True)

    def close(self) -> None:
        self._stop_fetching.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=BLOCK_MS / 1000 + 5)
        if not self.closed:
            self._close_inbox()

    # -- acknowledgements --

    def _ack(self, batches: dict[int, tuple[list[int], list[int]]]) -> None:
        by_run: dict[bytes, list[tuple[int, list[int], list[int]]]] = {}
        finished: list[_Open] = []
        partial: list[_Open] = []
        for local, (committed, dead) in batches.items():
            o = self.open.get(local)
            if o is None or not (committed or dead):
                continue
            for i in (*committed, *dead):
                j = i if o.slot is None else o.slot[i]
                if not o.done[j]:
                    o.done[j] = 1
                    o.remaining -= 1
            by_run.setdefault(o.run, []).append((o.batch_id, list(committed), list(dead)))
            (finished if o.remaining <= 0 else partial).append(o)
        if not by_run:
            return

        now = time.monotonic()
        with_stats = self._stats_ref is not None and self._run in by_run and (
            now - self._stats_sent >= STATS_WITH_ACKS or len(finished) == len(self.open))
        stats = self._stats_fields() if with_stats else None

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            if stats is not None:  # first, so the supervisor has them when the acks end its run
                pipe.xadd(acks_stream(self._run), stats, maxlen=ACKS_MAXLEN, approximate=True,
                          nomkstream=True)
            for run, acks in by_run.items():  # a run that is over has no stream: nothing to tell
                key = acks_stream(run)
                pipe.xadd(key, {"k": b"%d" % self.shard, "c": self.consumer.encode(), "t": b"ack",
                                "d": orjson.dumps(acks)}, maxlen=ACKS_MAXLEN, approximate=True,
                          nomkstream=True)
                pipe.expire(key, ACKS_TTL)
            for o in partial:
                pipe.hset(self.done_key, o.entry_id, bytes(o.done))
            if finished:
                ids = [o.entry_id for o in finished]
                pipe.xack(self.stream, GROUP, *ids)
                pipe.xdel(self.stream, *ids)
                pipe.hdel(self.done_key, *ids)
            pipe.execute()

        # Retried as a whole: a MULTI applies all or nothing, and every part of it is idempotent.
        _retrying("acknowledging", write)
        if stats is not None:
            self._stats_sent = now
        for o in finished:
            self.entries_done += 1
        with self._cond:
            for local in [k for k, o in self.open.items() if o.remaining <= 0]:
                del self.open[local]
            self._cond.notify_all()

    def _stats_fields(self) -> dict[str, bytes] | None:
        try:
            data = encode_stats(stats_since(self._stats_ref, self._baselines.get(self._run)))
        except (TypeError, orjson.JSONEncodeError) as exc:
            log.debug("redis: encoding stats failed: %s", exc)
            return None
        return {"k": b"%d" % self.shard, "c": self.consumer.encode(), "t": b"stats", "d": data}

    def _publish_stats(self, stats: ShardStats) -> None:
        """The worker's figures, to the run it works for; never creates a finished run's stream."""
        self._stats_ref = stats  # the worker's live object: later acks send fresh copies
        if self._run is None:
            return
        stats_fields = self._stats_fields()
        if stats_fields is None:
            return
        try:
            self.client.xadd(acks_stream(self._run), stats_fields, maxlen=ACKS_MAXLEN,
                             approximate=True, nomkstream=True)
            self._stats_sent = time.monotonic()
        except redis.RedisError as exc:  # figures only: never worth stopping for
            log.debug("redis: publishing stats failed: %s", exc)

    # -- reading entries --

    def _fetch(self) -> None:
        claiming, cursor, attempt, group, holder = True, b"0-0", 0, False, True
        next_sweep = time.monotonic() + self.lease
        while not self._stop_fetching.is_set():
            with self._cond:
                while not self._stop_fetching.is_set() and not (
                        len(self._q) < WORKER_QUEUE and len(self.open) < self.max_open):
                    self._cond.wait(0.5)
                room = min(WORKER_QUEUE - len(self._q), self.max_open - len(self.open))
            if self._stop_fetching.is_set():
                return
            try:
                if not group:
                    ensure_group(self.client, self.shard)
                    group = True
                if claiming:
                    # We hold the shard's lock, so every pending entry that is not open here is a
                    # dead (or stopped) worker's, or one whose delivery to us got lost: take them
                    # all, oldest first, before anything new. Open ones are read before the
                    # claim: one finished while the claim was on its way is pending in its reply.
                    with self._cond:
                        mine = {o.entry_id for o in self.open.values()}
                    claimed = self._claim(cursor, room)
                    if claimed is not None:
                        cursor, entries = claimed
                        self._deliver(entries, reclaimed=True, skip=mine)
                        if cursor in (b"0-0", "0-0"):
                            claiming = False
                            if self.reclaimed:
                                log.info("shard %d: took over %d pending entries", self.shard,
                                         self.reclaimed)
                            self._forget_idle_consumers()
                elif time.monotonic() >= next_sweep:
                    swept = self._sweep(room)
                    next_sweep = time.monotonic() + self.lease
                    if swept:
                        before = self.reclaimed
                        self._deliver(swept, reclaimed=True)
                        log.warning("shard %d: took over %d entries left pending for over %.0fs "
                                    "by a consumer that is gone", self.shard,
                                    self.reclaimed - before, self.lease)
                        self._forget_idle_consumers()
                else:
                    got = self._read(room)
                    if isinstance(got, list):
                        self._deliver(got, reclaimed=False)
                    elif got is not None:  # nothing new: wait for an entry after the last one
                        self.client.xread({self.stream: got}, count=1, block=BLOCK_MS)
                if not self._lock_held:
                    if holder:
                        log.warning("shard %d: %s is not this worker's; reading waits until its "
                                    "heartbeat takes it back", self.shard, self.lock.key)
                    claiming, cursor = True, b"0-0"  # once it is ours again, claim first
                    self._stop_fetching.wait(NOT_HOLDER_WAIT)
                holder = self._lock_held
                attempt = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                delay = min(0.2 * 2**attempt, 5.0)
                log.warning("redis: reading %s failed (%s); retrying in %.1fs", self.stream, exc,
                            delay)
                attempt += 1
                claiming, cursor = True, b"0-0"  # a reply lost on the way is still pending
                self._stop_fetching.wait(delay)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis restarted empty: start over
                    claiming, cursor, group = True, b"0-0", False
                    continue
                log.error("redis: reading %s failed: %s", self.stream, exc)
                self._stop_fetching.wait(1.0)

    # Every read and claim is a script that first checks that this worker holds the shard's lock:
    # a worker that outlived its lease (paused, cut off) takes nothing more once a successor holds
    # the lock, so the successor's claim at start is the last word on what was pending.

    def _call(self, script: Any, *args: Any) -> Any:
        """Runs a read script; None (and `_lock_held` false) when the lock is not ours."""
        reply = script(keys=[self.lock.key, self.stream],
                       args=[self.lock.token, GROUP, self.consumer, *args])
        self._lock_held = bool(reply[0])
        return reply[1] if self._lock_held else None

    def _claim(self, cursor: bytes, count: int) -> tuple[bytes, list[Any]] | None:
        """XAUTOCLAIM of every pending entry, from `cursor`: (next cursor, entries)."""
        reply = self._call(self._scripts["claim"], cursor, count)
        return None if reply is None else (reply[0], _fields(reply[1]))

    def _sweep(self, count: int) -> list[Any] | None:
        """Entries pending on another consumer for longer than the lease, claimed, oldest first."""
        reply = self._call(self._scripts["sweep"], int(self.lease * 1000), count)
        return None if reply is None else _fields(reply)

    def _read(self, count: int) -> list[Any] | bytes | None:
        """New entries; when there are none, the id of the stream's last entry to wait after."""
        reply = self._call(self._scripts["read"], count)
        if reply is None:
            return None
        return _fields(reply[1]) if reply[0] == 1 else reply[1]

    def _deliver(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]],
                 reclaimed: bool, skip: Collection[bytes] = ()) -> None:
        """Hands entries to the worker, but none of `skip` (open here when they were read);
        reads everything it needs from Redis before the first hand-over, so that a failure here
        can be retried without handing anything over twice."""
        entries = [(i, f) for i, f in entries if f and i not in skip]
        if not entries:
            return
        done: list[bytes | None] = [None] * len(entries)
        if reclaimed:
            done = self.client.hmget(self.done_key, [i for i, _ in entries])
            self.reclaimed += len(entries)
        drop: list[bytes] = []
        for (entry_id, f), mark in zip(entries, done):
            try:
                e = decode_entry(entry_id, f)
            except (KeyError, ValueError) as exc:
                log.error("shard %d: dropping undecodable entry %r: %s", self.shard, entry_id, exc)
                drop.append(entry_id)
                continue
            if e.shards != self.shards and not self._warned_shards:
                self._warned_shards = True
                log.error("shard %d: the supervisor runs %d shards, this worker was started with "
                          "--shards %d; give every worker the supervisor's --shards",
                          self.shard, e.shards, self.shards)
            n = len(e.lines)
            flags = bytearray(mark) if mark is not None and len(mark) == n else bytearray(n)
            keep = [j for j in range(n) if not flags[j]]
            if not keep:  # everything was durable already; only the XACK was lost
                drop.append(entry_id)
                continue
            full = isinstance(e.idxs, range) and e.idxs.start == 0
            slot = None if full else {idx: j for j, idx in enumerate(e.idxs)}
            local = self._next_local
            self._next_local += 1
            read_time = time.monotonic() - max(0.0, time.time() - e.read_wall)
            with self._cond:
                self.open[local] = _Open(entry_id, e.run, e.batch_id, slot, flags, len(keep))
            self._sources[local] = e.source
            if len(keep) == n:
                msg = ("batch", local, read_time, e.idxs, e.positions, e.lines)
            else:
                msg = ("batch", local, read_time, [e.idxs[j] for j in keep],
                       [e.positions[j] for j in keep], [e.lines[j] for j in keep])
            self._put(msg)
        if drop:
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.xack(self.stream, GROUP, *drop)
                pipe.xdel(self.stream, *drop)
                pipe.hdel(self.done_key, *drop)
                pipe.execute()
            except redis.RedisError as exc:  # still pending: the next claim drops them again
                log.warning("redis: dropping %d entries failed: %s", len(drop), exc)

    def _forget_idle_consumers(self) -> None:
        """Dead workers' consumer names, once their entries are ours (none pending)."""
        try:
            for c in self.client.xinfo_consumers(self.stream, GROUP):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name != self.consumer and not c["pending"]:
                    self.client.xgroup_delconsumer(self.stream, GROUP, name)
        except redis.RedisError as exc:
            log.debug("redis: tidying consumers failed: %s", exc)


# ----- one worker per shard ------------------------------------------------------------------

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class ShardLock:
    """`SET pipeline:shard:<k>:lock <token> NX PX ttl`, renewed every ttl/3 by a thread.

    A worker that finds the lock taken by someone else while running calls `on_lost` (the CLI
    exits at once: another worker owns the shard now)."""

    def __init__(self, client: redis.Redis, shard: int, ttl: float = DEFAULT_LOCK_TTL,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.client = client
        self.key = lock_key(shard)
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}".encode()
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name="redis-lock", daemon=True)
        self._thread.start()
        return True

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode(errors="replace") if value else None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    continue
                # Gone (expired while Redis was away, or Redis restarted empty): take it back
                # unless another worker has it.
                if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                    continue
                log.error("%s is held by %s now: this worker stops", self.key, self.holder())
                if self.on_lost is not None:
                    self.on_lost()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis: renewing %s failed (%s)", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError:
            pass
