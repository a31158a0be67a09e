"""A `pipeline worker` that outlives its lease: frozen (SIGSTOP) with events in hand while a
successor takes its shard over, or while Redis is emptied under it, then resumed (SIGCONT).

Each round creates likes before the pause and deletes or rewrites them after it; the database
must end exactly as the events imply, every round: whatever the stale worker still had in hand
rolls back, and it exits 1. Batches are appended as the supervisor does (SupervisorTransport),
so the test decides what is sent before and after each pause."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import orjson
import psycopg
import pytest
import redis

from pipeline.transport.redis import (GROUP, RedisShardLink, SupervisorTransport, lock_key,
                                      shard_stream)
from tests.conftest import query, run_pipeline, wait_until
from tests.test_redis import REDIS_URL, procs, rds, start_worker, stop_worker  # noqa: F401
from tools.generate import did_list

DIDS, SEED = 12, 31
ROUNDS = 3
PER_BATCH = 24
LIKE = "app.bsky.feed.like"
APP = "pipeline-shard-0"
FENCED = "was taken over by another worker"
LOCK_LOST = "is held by"


def event(did: str, rkey: str, cid: str | None) -> bytes:
    """A like created (with `cid`) or deleted (None)."""
    commit: dict = {"rev": "3l3qo2vutsw2b", "operation": "delete" if cid is None else "create",
                    "collection": LIKE, "rkey": rkey}
    if cid is not None:
        commit |= {"cid": cid, "record": {
            "$type": LIKE, "createdAt": "2026-12-01T00:00:00.000Z",
            "subject": {"uri": f"at://{did}/app.bsky.feed.post/3l3qo2vutsa00", "cid": cid}}}
    return orjson.dumps({"did": did, "time_us": 1_700_000_000_000_000, "kind": "commit",
                         "commit": commit})


class History:
    """The batches sent to shard 0 and what they leave in `likes`: {uri: cid}."""

    def __init__(self, link: RedisShardLink) -> None:
        self.link = link
        self.dids = did_list(DIDS, SEED)
        self.expected: dict[str, str] = {}
        self.round: list[tuple] = []  # this round's batches, for a resend after Redis is emptied
        self.batch = 0
        self.position = 0
        self.made = 0

    def send(self, ops: list[tuple[str, str, str | None]]) -> list[str]:
        """Appends one batch of (did, rkey, cid or None); returns the URIs it creates."""
        lines, created = [], []
        for did, rkey, cid in ops:
            lines.append(event(did, rkey, cid))
            uri = f"at://{did}/{LIKE}/{rkey}"
            if cid is None:
                self.expected.pop(uri, None)
            else:
                self.expected[uri] = cid
                created.append(uri)
        positions = list(range(self.position, self.position + len(lines)))
        self.position += len(lines)
        self.batch += 1
        msg = ("batch", self.batch, time.monotonic(), range(len(lines)), positions, lines)
        self.round.append(msg)
        self.link.send(msg)
        return created

    def creates(self) -> list[str]:
        """A batch of new likes spread over every author."""
        ops = []
        for _ in range(PER_BATCH):
            self.made += 1
            ops.append((self.dids[self.made % DIDS], f"3l{self.made:011d}", f"bafyv1n{self.made}"))
        return self.send(ops)

    def undo(self, uris: list[str]) -> None:
        """After the pause: every other like of `uris` deleted, the rest rewritten."""
        ops = []
        for i, uri in enumerate(uris):
            did, _, rkey = uri[5:].partition(f"/{LIKE}/")
            ops.append((did, rkey, None if i % 2 == 0 else f"bafyv2n{rkey}"))
        self.send(ops)

    def resend(self) -> None:
        """What a restarted supervisor does once Redis came back empty: this round again."""
        again, self.round = self.round, []
        for msg in again:
            self.round.append(msg)
            self.link.send(msg)


def likes(dsn: str) -> dict[str, str]:
    return dict(query(dsn, "SELECT uri, cid FROM likes"))


def pending(rds: redis.Redis) -> set[bytes]:
    try:
        return {p["message_id"] for p in rds.xpending_range(shard_stream(0), GROUP, "-", "+", 100)}
    except redis.ResponseError:  # no group yet
        return set()


def freeze_with_events_in_hand(rds: redis.Redis, dsn: str, history: History,
                               worker: subprocess.Popen) -> list[str]:
    """SIGSTOPs the worker while it has taken a batch of creates and committed none of it, and
    is not in the middle of a statement; returns the URIs of what it holds."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "never caught the worker holding a batch"
        uris = history.creates()
        entry = rds.xrevrange(shard_stream(0), count=1)[0][0]
        wait_until(lambda: entry in pending(rds) or uris[0] in likes(dsn), every=0.005)
        worker.send_signal(signal.SIGSTOP)
        # A statement sent before the stop finishes on its own; then the session is idle.
        wait_until(lambda: query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE"
                                      " application_name = %s AND state = 'active'", (APP,))[0][0]
                   == 0, timeout=10)
        if entry in pending(rds) and not set(uris) & set(likes(dsn)):
            return uris
        worker.send_signal(signal.SIGCONT)
        wait_until(lambda: entry not in pending(rds))


def took_over(dsn: str, worker: subprocess.Popen) -> bool:
    """The worker has raised the shard's epoch (so the schema is there too)."""
    try:
        rows = query(dsn, "SELECT holder FROM shard_epochs WHERE shard = 0")
    except psycopg.Error:
        return False
    return bool(rows) and f":{worker.pid}:" in rows[0][0]


def settled(rds: redis.Redis, dsn: str, history: History) -> bool:
    """Every entry acknowledged, and the likes exactly as the events imply."""
    return (rds.exists(shard_stream(0)) and rds.xlen(shard_stream(0)) == 0 and not pending(rds)
            and likes(dsn) == history.expected)


def resumed(stale: subprocess.Popen, dsn: str, history: History) -> str:
    """SIGCONTs a frozen worker that was replaced; it exits 1 with one line saying why."""
    stale.send_signal(signal.SIGCONT)
    try:
        out, err = stale.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stale.kill()
        stale.communicate()
        got = likes(dsn)
        pytest.fail(f"the replaced worker went on after it was resumed; likes it brought back or "
                    f"left: {sorted(set(got.items()) ^ set(history.expected.items()))[:5]}")
    assert stale.returncode == 1, err
    assert FENCED in err or LOCK_LOST in err, err
    assert "Traceback" not in err, err
    return err


def one_round(rds: redis.Redis, procs: list, dsn: str, net: tuple, history: History,
              live: subprocess.Popen, empty_redis: bool, stop_successor: bool,
              ) -> tuple[subprocess.Popen, bool]:
    """Freezes `live` with creates in hand; a successor takes the shard over and applies the
    deletes that follow; then `live` resumes. Returns the worker now in charge, and whether the
    epoch (rather than the lock) stopped the frozen one."""
    history.round = []
    in_hand = freeze_with_events_in_hand(rds, dsn, history, live)
    if empty_redis:
        rds.flushdb()  # the lock vanishes while the frozen worker's lease still runs
    else:
        wait_until(lambda: not rds.exists(lock_key(0)), timeout=15)  # its lease runs out
    successor = start_worker(procs, dsn, net, 0, 1)
    if empty_redis:
        wait_until(lambda: took_over(dsn, successor))
        history.resend()
    history.undo(in_hand)
    wait_until(lambda: settled(rds, dsn, history), timeout=60)
    if stop_successor:
        # The lock is free when the frozen worker resumes: it takes the lock back, and only the
        # epoch in PostgreSQL stops its commit.
        stop_worker(successor)
    err = resumed(live, dsn, history)
    if stop_successor:
        assert FENCED in err
        successor = start_worker(procs, dsn, net, 0, 1)
    history.round = []
    history.creates()  # the worker in charge goes on, and the frozen one undid nothing
    wait_until(lambda: settled(rds, dsn, history), timeout=60)
    return successor, FENCED in err


@pytest.fixture
def history(rds: redis.Redis) -> Iterator[History]:
    transport = SupervisorTransport(REDIS_URL, 1, "replay:takeover", stream_limit=1000)
    try:
        yield History(transport.link(0))
    finally:
        transport.close()


@pytest.mark.parametrize("empty_redis", [False, True], ids=["lease-expired", "redis-emptied"])
def test_a_frozen_worker_cannot_undo_its_successor(rds: redis.Redis, procs: list, dsn: str,
                                                   net: tuple, history: History,
                                                   empty_redis: bool) -> None:
    live = start_worker(procs, dsn, net, 0, 1)
    wait_until(lambda: took_over(dsn, live))
    fenced = 0
    for r in range(ROUNDS):
        live, by_epoch = one_round(rds, procs, dsn, net, history, live, empty_redis,
                                   stop_successor=r == 1)
        fenced += by_epoch
    assert fenced >= 1
    # One take-over at the start, one per round, and one after the stopped successor.
    shown = run_pipeline("status", "--dsn", dsn, "--shards", "1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout)["shards"][0]["epoch"] == ROUNDS + 2
    assert query(dsn, "SELECT count(*) FROM users")[0][0] == DIDS
    assert query(dsn, "SELECT count(*) FROM dead_letters")[0][0] == 0
    stop_worker(live)
