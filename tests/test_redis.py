"""The Redis Streams transport against a real Redis: `pipeline run --transport redis://...` with
`pipeline worker` processes started on their own, killed and started again.

Uses the database of REDIS_URL (default redis://127.0.0.1:6379/9), emptied before and after each
test (FLUSHDB): point it at a database number nothing else uses. Skipped when no Redis answers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from pipeline.transport.redis import (GROUP, RedisShardLink, RedisWorkerLink, ShardLock,
                                      SupervisorTransport, lock_key, shard_stream)
from tests.conftest import (HOLD, WORKER_HOLD, database, digest, held, identity_args, query,
                            rows_committed, run_pipeline, start_pipeline, wait_until)
from tools.generate import write_replay

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9")
EVENTS, DIDS, SEED = 30_000, 500, 23
BAD_LINES = [b"not json at all", b'{"did":"did:plc:nokind"}', b'["an", "array"]']
TOTAL = EVENTS + len(BAD_LINES)


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at REDIS_URL={REDIS_URL} ({exc})")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever is still running at its end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("redis") / "events.jsonl"
    write_replay(path, EVENTS, DIDS, seed=SEED)
    with open(path, "ab") as f:  # dead letters name their source: it must cross Redis too
        f.write(b"\n".join(BAD_LINES) + b"\n")
    return path


@pytest.fixture(scope="module")
def local_run(server_dsn: str, replay_file: Path, net: tuple) -> Iterator[tuple[str, dict]]:
    """What a local run (child processes, no Redis) leaves in the tables: (dsn, digest)."""
    with database(server_dsn, "t_redis_local") as dsn:
        result = run_pipeline("run", "--replay", str(replay_file), "--dsn", dsn,
                              *identity_args(*net), "--batch-size", "500", "--log-level", "WARNING")
        assert result.returncode == 0, result.stderr
        assert f"committed         {EVENTS}" in result.stdout
        assert f"dead-lettered     {len(BAD_LINES)}" in result.stdout
        yield dsn, digest(dsn)


USER_COLUMNS = ("did, handle, incomplete, handle_verified, pds, active, status, display_name,"
                " description, avatar_cid, banner_cid")


def assert_same_content(dsn: str, local: tuple[str, dict]) -> None:
    """The tables hold what the local run left; if not, the users that differ are shown."""
    got = digest(dsn)
    if got == local[1]:
        return
    ours = set(query(dsn, f"SELECT {USER_COLUMNS} FROM users"))
    theirs = set(query(local[0], f"SELECT {USER_COLUMNS} FROM users"))
    lines = [f"local {row}" for row in sorted(theirs - ours)[:10]]
    lines += [f"redis {row}" for row in sorted(ours - theirs)[:10]]
    pytest.fail(f"tables differ: {got} != {local[1]}\n" + "\n".join(lines))


def run_args(dsn: str, path: Path, net: tuple, *extra: str) -> list[str]:
    return ["run", "--replay", str(path), "--dsn", dsn, *identity_args(*net), "--transport",
            REDIS_URL, "--log-level", "WARNING", *extra]


def start_worker(procs: list, dsn: str, net: tuple, shard: int, shards: int,
                 *extra: str) -> subprocess.Popen:
    p = start_pipeline("worker", "--shard", str(shard), "--shards", str(shards), "--transport",
                       REDIS_URL, "--dsn", dsn, *identity_args(*net), "--lock-ttl", "2",
                       "--refresh-interval", "3600", "--log-level", "INFO", *extra)
    procs.append(p)
    return p


def stop_worker(p: subprocess.Popen) -> str:
    """SIGTERM: the worker drains and exits 0."""
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out


def test_workers_over_redis_one_killed_match_a_local_run(
        rds: redis.Redis, procs: list, dsn: str, replay_file: Path, net: tuple,
        gate: tuple[str, int], local_run: tuple[str, dict]) -> None:
    with held(net[0], gate[0]):  # the run cannot end before the kill
        run = start_pipeline(*run_args(dsn, replay_file, net, "--batch-size", "500",
                                       "--stream-limit", "6", *HOLD))
        procs.append(run)
        workers = {k: start_worker(procs, dsn, net, k, 4, *WORKER_HOLD) for k in range(4)}
        wait_until(lambda: run.poll() is not None or rows_committed(dsn) > 5_000)
        assert run.poll() is None, run.communicate()[1]

        # Kill shard 1's worker while it holds entries: frozen (SIGSTOP) it cannot acknowledge
        # them between the look and the kill.
        victim = workers[1]
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "shard 1 never held entries"
            victim.send_signal(signal.SIGSTOP)
            pending = rds.xpending(shard_stream(1), GROUP)["pending"]
            if pending:
                break
            victim.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        # A read the worker had already asked for may still hand it entries while it is frozen.
        held_entries = rds.xpending(shard_stream(1), GROUP)["pending"]
        assert held_entries >= pending
        wait_until(lambda: not rds.exists(lock_key(1)), timeout=15)  # its lock expires
        assert run.poll() is None, "the run cannot end while shard 1's entries are pending"
        workers[1] = start_worker(procs, dsn, net, 1, 4, *WORKER_HOLD)

    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert f"committed         {EVENTS}" in out
    assert f"dead-lettered     {len(BAD_LINES)}" in out
    assert_same_content(dsn, local_run)
    # The cursor is the low watermark over every shard: here, the whole file.
    assert query(dsn, "SELECT cursor FROM cursors")[0][0] == replay_file.stat().st_size
    for k in range(4):  # every entry acknowledged and deleted, nothing left pending
        assert rds.xlen(shard_stream(k)) == 0
        assert rds.xpending(shard_stream(k), GROUP)["pending"] == 0
    outs = {k: stop_worker(w) for k, w in workers.items()}
    taken = int(re.search(r"\((\d+) taken over", outs[1]).group(1))
    assert taken == held_entries


def test_a_second_worker_of_a_shard_exits_zero_at_once(rds: redis.Redis, procs: list, dsn: str,
                                                       net: tuple) -> None:
    both = [start_worker(procs, dsn, net, 0, 1), start_worker(procs, dsn, net, 0, 1)]
    wait_until(lambda: any(p.poll() is not None for p in both), timeout=30)
    loser = next(p for p in both if p.poll() is not None)
    winner = next(p for p in both if p is not loser)
    out, _err = loser.communicate()
    assert loser.returncode == 0
    assert "shard 0 already has a worker" in out
    assert f":{winner.pid}:" in rds.get(lock_key(0)).decode()

    started = time.monotonic()  # and so does the next one cron starts, at once
    third = run_pipeline("worker", "--shard", "0", "--shards", "1", "--transport", REDIS_URL,
                         "--dsn", dsn, *identity_args(*net), timeout=30)
    assert third.returncode == 0 and "already has a worker" in third.stdout
    assert time.monotonic() - started < 10
    assert winner.poll() is None
    stop_worker(winner)
    assert not rds.exists(lock_key(0)), "a stopped worker releases its lock"


def test_reader_waits_while_a_stream_is_full(rds: redis.Redis, procs: list, dsn: str,
                                             replay_file: Path, net: tuple,
                                             local_run: tuple[str, dict]) -> None:
    limit = 3
    run = start_pipeline(*run_args(dsn, replay_file, net, "--shards", "1", "--batch-size", "200",
                                   "--stream-limit", str(limit)))
    procs.append(run)
    stream = shard_stream(0)
    wait_until(lambda: rds.exists(stream) and rds.xlen(stream) >= limit, timeout=30)
    # With no worker the stream stays at the limit: nothing more is appended, the run waits.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert rds.xlen(stream) == limit
        assert rds.xinfo_stream(stream)["entries-added"] == limit
        time.sleep(0.1)
    assert run.poll() is None
    assert rows_committed(dsn) == 0

    worker = start_worker(procs, dsn, net, 0, 1)
    longest = 0
    deadline = time.monotonic() + 90
    while run.poll() is None:
        longest = max(longest, rds.xlen(stream))
        assert time.monotonic() < deadline, "the run did not finish once the worker started"
        time.sleep(0.05)
    out, err = run.communicate()
    assert run.returncode == 0, err
    assert longest <= limit
    assert rds.xinfo_stream(stream)["entries-added"] > 10 * limit  # it did resume
    assert f"committed         {EVENTS}" in out
    assert_same_content(dsn, local_run)
    stop_worker(worker)


def test_redis_connections_killed_midway_lose_nothing(
        rds: redis.Redis, procs: list, dsn: str, replay_file: Path, net: tuple,
        gate: tuple[str, int], local_run: tuple[str, dict]) -> None:
    """Every client of the test database is disconnected (CLIENT KILL) a few times mid-run:
    the supervisor and the workers reconnect, append nothing twice and lose nothing."""
    with held(net[0], gate[0]):  # the run cannot end before the kills
        run = start_pipeline(*run_args(dsn, replay_file, net, "--batch-size", "200",
                                       "--stream-limit", "8", *HOLD))
        procs.append(run)
        workers = [start_worker(procs, dsn, net, k, 4, *WORKER_HOLD) for k in range(4)]
        me, db, kills = rds.client_id(), str(rds.connection_pool.connection_kwargs.get("db", 0)), 0
        for threshold in (3_000, 8_000, 13_000):
            wait_until(lambda: rows_committed(dsn) > threshold)
            for client in rds.client_list():
                if client["db"] == db and int(client["id"]) != me:
                    try:
                        kills += rds.client_kill_filter(_id=client["id"])
                    except redis.ResponseError:
                        pass  # gone already
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert kills >= 5
    assert f"committed         {EVENTS}" in out
    assert_same_content(dsn, local_run)
    for w in workers:
        stop_worker(w)


@contextmanager
def shard_zero(consumer: str,
               ttl: float = 15.0) -> Iterator[tuple[RedisShardLink, RedisWorkerLink]]:
    """The supervisor's link to shard 0, and a worker's link holding the shard's lock (its
    connections are named `consumer` in CLIENT LIST)."""
    transport = SupervisorTransport(REDIS_URL, 1, "replay:test", stream_limit=10)
    client = redis.Redis.from_url(REDIS_URL, client_name=consumer)
    lock = ShardLock(client, 0, ttl=ttl)
    assert lock.acquire()
    worker = RedisWorkerLink(client, 0, 1, lock, consumer=consumer)
    try:
        yield transport.link(0), worker
    finally:
        worker.close()
        lock.release()
        transport.close()
        client.close()


def test_an_entry_finished_while_a_claim_was_on_its_way_is_not_handed_over_again(
        rds: redis.Redis) -> None:
    """After a lost connection the worker claims every pending entry; one it finishes while that
    claim's reply is on its way is still in the reply, and must not be redone (per-DID order)."""
    with shard_zero("only") as (link, worker):
        lines = [b'{"did":"did:plc:a%d"}' % i for i in range(3)]
        link.send(("batch", 1, time.monotonic(), range(3), [10, 20, 30], lines))
        wait_until(worker.poll, timeout=10)
        first = worker.recv()
        claims: list[list] = []
        real_claim = worker._claim

        def claim_then_finish(cursor: bytes, count: int) -> tuple | None:
            reply = real_claim(cursor, count)
            claims.append([entry_id for entry_id, _ in reply[1]])
            if len(claims) == 1:  # the entry is finished here, after Redis answered the claim
                worker.send(("ack", 0, {first[1]: ([0, 1, 2], [])}))
            return reply

        worker._claim = claim_then_finish  # type: ignore[method-assign]

        def waiting() -> str | None:  # the worker's connection, waiting for a new entry
            return next((c["id"] for c in rds.client_list()
                         if c["name"] == "only" and c["cmd"] == "xread"), None)

        wait_until(lambda: waiting() is not None, timeout=10)
        rds.client_kill_filter(_id=waiting())
        wait_until(lambda: bool(claims), timeout=10)
        link.send(("batch", 2, time.monotonic(), range(1), [40], [b'{"did":"did:plc:b"}']))
        wait_until(worker.poll, timeout=10)
        assert len(claims[0]) == 1  # the claim did return the open entry
        assert worker.recv()[5] == [b'{"did":"did:plc:b"}']  # the next batch, not the first again
        wait_until(link.poll, timeout=10)
        assert link.recv() == ("ack", 0, {1: ([0, 1, 2], [])})


def test_a_reclaimed_entry_skips_what_the_dead_worker_committed(rds: redis.Redis) -> None:
    """Per-DID order across a worker's death: only the events not yet durable are redone."""
    transport = SupervisorTransport(REDIS_URL, 1, "replay:test", stream_limit=10)
    try:
        link = transport.link(0)
        lines = [b'{"did":"did:plc:a%d"}' % i for i in range(6)]
        link.send(("batch", 7, time.monotonic(), range(6), [10, 20, 30, 40, 50, 60], lines))

        first_lock = ShardLock(rds, 0)
        assert first_lock.acquire()
        first = RedisWorkerLink(rds, 0, 1, first_lock, consumer="first")
        wait_until(first.poll, timeout=10)
        msg = first.recv()
        assert msg[0] == "batch" and list(msg[3]) == list(range(6)) and msg[5] == lines
        first.send(("ack", 0, {msg[1]: ([0, 2], [1])}))
        first.close()  # dies with the entry half done, and its lock expires
        first_lock.release()
        wait_until(link.poll, timeout=10)
        assert link.recv() == ("ack", 0, {7: ([0, 2], [1])})

        second_lock = ShardLock(rds, 0)
        assert second_lock.acquire()
        second = RedisWorkerLink(rds, 0, 1, second_lock, consumer="second")
        wait_until(second.poll, timeout=10)
        msg = second.recv()
        assert (list(msg[3]), msg[4], msg[5]) == ([3, 4, 5], [40, 50, 60], lines[3:])
        assert second.reclaimed == 1
        second.send(("ack", 0, {msg[1]: ([3, 5], [4])}))
        assert rds.xlen(shard_stream(0)) == 0
        assert rds.xpending(shard_stream(0), GROUP)["pending"] == 0
        assert not rds.exists("pipeline:shard:0:done")
        wait_until(link.poll, timeout=10)
        assert link.recv() == ("ack", 0, {7: ([3, 5], [4])})
        second.close()
        second_lock.release()
    finally:
        transport.close()


def _batch(link: RedisShardLink, batch_id: int, did: str) -> None:
    line = b'{"did":"%s"}' % did.encode()
    link.send(("batch", batch_id, time.monotonic(), range(1), [batch_id], [line]))


def test_a_worker_takes_nothing_once_the_lock_is_not_its_own(rds: redis.Redis) -> None:
    """Every read and claim checks the lock in the same script: a worker whose successor holds
    the lock cannot take an entry the successor's claim at start would not see."""
    with shard_zero("stale") as (link, worker):
        rds.set(lock_key(0), b"successor")
        _batch(link, 1, "did:plc:a")
        assert worker._read(10) is None
        assert worker._claim(b"0-0", 10) is None
        assert worker._sweep(10) is None
        assert rds.xpending(shard_stream(0), GROUP)["pending"] == 0
        assert not worker.poll()
        rds.set(lock_key(0), worker.lock.token)  # the worker's again (its heartbeat took it)
        wait_until(worker.poll, timeout=10)
        assert worker.recv()[5] == [b'{"did":"did:plc:a"}']


def test_a_running_worker_takes_over_what_a_gone_consumer_left_pending(rds: redis.Redis) -> None:
    """Not only at start: an entry pending on another consumer for longer than the lease is
    claimed by the worker holding the lock, so nothing waits forever behind a dead consumer."""
    with shard_zero("live", ttl=1.0) as (link, worker):
        for batch_id in (1, 2):  # the worker's queue is full: it reads no more for now
            _batch(link, batch_id, f"did:plc:a{batch_id}")
        wait_until(lambda: rds.xpending(shard_stream(0), GROUP)["pending"] == 2, timeout=10)
        _batch(link, 3, "did:plc:gone")
        started = time.monotonic()
        taken = rds.xreadgroup(GROUP, "gone", {shard_stream(0): ">"}, count=1)
        assert len(taken[0][1]) == 1
        received: list[list[bytes]] = []

        def take() -> bool:
            while worker.poll():
                received.append(worker.recv()[5])
            return len(received) == 3

        wait_until(take, timeout=15)
        assert received[2] == [b'{"did":"did:plc:gone"}']
        assert time.monotonic() - started >= 1.0  # once idle for the lease
        assert worker.reclaimed == 1
        consumers = {c["name"]: c["pending"] for c in rds.xinfo_consumers(shard_stream(0), GROUP)}
        assert consumers == {b"live": 3}  # the gone consumer's name is forgotten too
