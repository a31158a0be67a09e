"""Exact counts end to end: a replay in which a few posts are liked from every shard and a few users
followed by many, with deletes of unseen records and updates that move a subject, through killed
workers (local and over Redis) and the same file replayed again from its start."""
from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from common.routing import shard_for
from pipeline.transport.redis import lock_key
from tests.conftest import (HOLD, WORKER_HOLD, assert_counts_exact, database, digest, held,
                            identity_args, kill_workers_midway, query, rows_committed,
                            run_pipeline, start_pipeline, wait_until)
from tests.test_redis import REDIS_URL, procs, rds, start_worker, stop_worker  # noqa: F401
from tools.generate import Hot, did_list, hot_targets, write_replay

EVENTS, DIDS, SEED = 30_000, 600, 31
HOT = Hot(posts=5, users=3, share=0.3)
HOT_POSTS = [p["uri"] for p in hot_targets(SEED, HOT)[0]]
HOT_USERS = hot_targets(SEED, HOT)[1]
SHARDS = 4
EDGE_AUTHORS = did_list(DIDS, SEED)[:40]


def _commit(did: str, op: str, collection: str, rkey: str, record: dict | None = None) -> bytes:
    body: dict = {"rev": "3mzzzzzzzzz22", "operation": op, "collection": collection, "rkey": rkey}
    if record is not None:
        body.update(record={"$type": collection, "createdAt": "2026-07-04T15:00:00.000Z", **record},
                    cid="bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a")
    return orjson.dumps({"did": did, "time_us": 1_783_180_000_000_000, "kind": "commit",
                         "commit": body})


def _ref(uri: str) -> dict:
    return {"uri": uri, "cid": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"}


def moved_to(i: int) -> str:
    """Where the i-th edge-case author's like, repost and reply end up."""
    return HOT_POSTS[(i + 1) % 5]


def edge_cases(authors: list[str]) -> list[bytes]:
    """Per author: deletes of records never seen, creates delivered twice, and updates that move
    a like, a repost, a follow and a reply to another subject."""
    lines = []
    for i, did in enumerate(authors):
        hot = HOT_POSTS[i % 5]
        lines += [
            _commit(did, "delete", "app.bsky.feed.like", "3never00like"),
            _commit(did, "delete", "app.bsky.feed.repost", "3never0repost"),
            _commit(did, "delete", "app.bsky.feed.post", "3never00post"),
            _commit(did, "delete", "app.bsky.graph.follow", "3never0follow"),
            *[_commit(did, "create", "app.bsky.feed.like", "3edge0000like",
                      {"subject": _ref(hot)})] * 2,
            _commit(did, "create", "app.bsky.feed.repost", "3edge00repost", {"subject": _ref(hot)}),
            _commit(did, "create", "app.bsky.graph.follow", "3edge00follow",
                    {"subject": HOT_USERS[i % 3]}),
            _commit(did, "create", "app.bsky.feed.post", "3edge0000post", {
                "text": "re", "reply": {"parent": _ref(hot), "root": _ref(hot)}}),
        ]
    for i, did in enumerate(authors):  # later, so mostly in another transaction than the creates
        other = moved_to(i)
        lines += [
            _commit(did, "update", "app.bsky.feed.like", "3edge0000like", {"subject": _ref(other)}),
            _commit(did, "update", "app.bsky.feed.repost", "3edge00repost",
                    {"subject": _ref(other)}),
            _commit(did, "update", "app.bsky.graph.follow", "3edge00follow",
                    {"subject": HOT_USERS[(i + 1) % 3]}),
            _commit(did, "update", "app.bsky.feed.post", "3edge0000post", {
                "text": "re", "reply": {"parent": _ref(other), "root": _ref(other)}}),
        ]
    return lines


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("counts") / "events.jsonl"
    write_replay(path, EVENTS, DIDS, seed=SEED, hot=HOT)
    with open(path, "ab") as f:
        f.write(b"\n".join(edge_cases(EDGE_AUTHORS)) + b"\n")
    return path


def args(dsn: str, path: Path, net: tuple, *extra: str) -> list[str]:
    return ["run", "--replay", str(path), "--dsn", dsn, *identity_args(*net), "--shards",
            str(SHARDS), "--batch-size", "300", "--log-level", "WARNING", *extra]


@pytest.fixture(scope="module")
def clean(server_dsn: str, replay_file: Path, net: tuple) -> Iterator[tuple[str, dict]]:
    """A clean run: (dsn, digest) with counts exact, the hot posts liked from every shard."""
    with database(server_dsn, "t_counts_clean") as dsn:
        result = run_pipeline(*args(dsn, replay_file, net))
        assert result.returncode == 0, result.stderr
        assert_counts_exact(dsn)
        yield dsn, digest(dsn)


def test_a_clean_replay_counts_what_the_tables_hold(clean: tuple[str, dict]) -> None:
    dsn = clean[0]
    for uri in HOT_POSTS:
        likers = {r[0] for r in query(dsn, "SELECT author_did FROM likes WHERE subject_uri = %s",
                                      (uri,))}
        assert {shard_for(d, SHARDS) for d in likers} == set(range(SHARDS))
    top = query(dsn, "SELECT uri FROM post_stats ORDER BY likes DESC LIMIT 5")
    assert {r[0] for r in top} == set(HOT_POSTS)
    top = query(dsn, "SELECT did FROM user_stats ORDER BY followers DESC LIMIT 3")
    assert {r[0] for r in top} == set(HOT_USERS)
    # The edge cases were applied: every moved like is at its new subject.
    assert dict(query(dsn, "SELECT author_did, subject_uri FROM likes"
                           " WHERE uri LIKE '%%/3edge0000like'")) == {
        did: moved_to(i) for i, did in enumerate(EDGE_AUTHORS)}


def test_status_shows_the_most_liked_posts_and_most_followed_users(
        clean: tuple[str, dict]) -> None:
    dsn = clean[0]
    text = run_pipeline("status", "--dsn", dsn, "--shards", str(SHARDS))
    assert text.returncode == 0, text.stderr
    likes = dict(query(dsn, "SELECT uri, likes FROM post_stats WHERE uri = ANY(%s)",
                       (HOT_POSTS,)))
    out = text.stdout
    assert "most liked posts" in out and "most followed users" in out
    for uri, n in likes.items():
        assert any(uri in line and str(n) in line for line in out.splitlines()), uri
    data = json.loads(run_pipeline("status", "--dsn", dsn, "--json").stdout)
    assert [p["uri"] for p in data["top_posts"]][:5] == [
        r[0] for r in query(dsn, "SELECT uri FROM post_stats ORDER BY likes DESC, uri LIMIT 5")]
    assert {u["did"] for u in data["top_users"][:3]} == set(HOT_USERS)
    assert data["counts"] == {"exact": True, "filling": []}


def test_workers_killed_then_the_file_replayed_again_counts_stay_exact(
        dsn: str, replay_file: Path, net: tuple, gate: tuple[str, int],
        clean: tuple[str, dict]) -> None:
    with held(net[0], gate[0]):
        proc = start_pipeline(*args(dsn, replay_file, net, *HOLD))
        kill_workers_midway(proc, dsn, kills=3, rows_between=5_000, seed=3)
        assert proc.poll() is None
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert_counts_exact(dsn)
    assert digest(dsn) == clean[1]
    again = run_pipeline(*args(dsn, replay_file, net, "--from-start"))
    assert again.returncode == 0, again.stderr
    assert f"committed         {len(replay_file.read_bytes().splitlines())}" in again.stdout
    assert_counts_exact(dsn)
    assert digest(dsn) == clean[1]


def test_workers_over_redis_killed_then_the_file_replayed_again_counts_stay_exact(
        rds: redis.Redis, procs: list, dsn: str, replay_file: Path, net: tuple,
        gate: tuple[str, int], clean: tuple[str, dict]) -> None:
    run_args = [*args(dsn, replay_file, net), "--transport", REDIS_URL, "--stream-limit", "6"]
    with held(net[0], gate[0]):
        run = start_pipeline(*run_args, *HOLD)
        procs.append(run)
        shard_workers = {k: start_worker(procs, dsn, net, k, SHARDS, *WORKER_HOLD)
                         for k in range(SHARDS)}
        wait_until(lambda: run.poll() is not None or rows_committed(dsn) > 8_000)
        assert run.poll() is None, run.communicate()[1]
        shard_workers[2].send_signal(signal.SIGKILL)
        shard_workers[2].wait(timeout=10)
        wait_until(lambda: not rds.exists(lock_key(2)), timeout=15)
        shard_workers[2] = start_worker(procs, dsn, net, 2, SHARDS, *WORKER_HOLD)
    _out, err = run.communicate(timeout=180)
    assert run.returncode == 0, err
    assert_counts_exact(dsn)
    assert digest(dsn) == clean[1]
    again = run_pipeline(*run_args, "--from-start")
    assert again.returncode == 0, again.stderr
    assert_counts_exact(dsn)
    assert digest(dsn) == clean[1]
    for w in shard_workers.values():
        stop_worker(w)
