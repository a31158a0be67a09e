"""Exact counts (post_stats, user_stats) against a real PostgreSQL: redelivered creates, deletes of
unseen records, moved subjects, a commit that fails and is retried, two transactions on the same
hot posts, and the fill of a database that held records before the counts existed."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import orjson
import psycopg
import pytest

from shards.events import BadEvent, Event, decode
from shards.store import counts, migrations
from shards.store.migrations import upgrade
from shards.store.writes import Changes, Writer, prepare_connection
from tests.conftest import assert_counts_exact, query, run_pipeline, wait_until
from tools.generate import generate_events

A = "did:plc:" + "a" * 24
B = "did:plc:" + "b" * 24
P1 = f"at://{B}/app.bsky.feed.post/1"
P2 = f"at://{B}/app.bsky.feed.post/2"
LIKE, REPOST, POST, FOLLOW = ("app.bsky.feed.like", "app.bsky.feed.repost", "app.bsky.feed.post",
                              "app.bsky.graph.follow")
_time = iter(range(1, 10**9))


def commit(did: str, op: str, collection: str, rkey: str, record: dict | None = None) -> Event:
    body: dict = {"rev": "r", "operation": op, "collection": collection, "rkey": rkey}
    if record is not None:
        body.update(record={"$type": collection, "createdAt": "2026-11-28T00:00:00Z", **record},
                    cid="bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a")
    n = next(_time)
    return decode(orjson.dumps({"did": did, "time_us": n, "kind": "commit", "commit": body}),
                  0, n, n)


def like(did: str, rkey: str, subject: str, op: str = "create", collection: str = LIKE) -> Event:
    return commit(did, op, collection, rkey, {"subject": {"uri": subject, "cid": "c"}})


def changes(*events: Event) -> Changes:
    out = Changes()
    for ev in events:
        out.add(ev)
    return out


def stats(dsn: str, uri: str) -> tuple[int, int, int] | None:
    rows = query(dsn, "SELECT likes, reposts, replies FROM post_stats WHERE uri = %s", (uri,))
    return rows[0] if rows else None


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """A writer's session (autocommit: every write is its own transaction)."""
    with psycopg.connect(dsn, autocommit=True, application_name="counts-writer") as c:
        upgrade(c)
        prepare_connection(c)
        yield c


def test_counts_follow_what_the_tables_hold(dsn: str, conn: psycopg.Connection) -> None:
    writer = Writer()
    first = changes(like(A, "l1", P1), like(A, "l2", P1), like(A, "l3", P2),
                    like(A, "r1", P1, collection=REPOST),
                    commit(A, "create", POST, "p1", {"text": "re", "reply": {
                        "parent": {"uri": P1, "cid": "c"}, "root": {"uri": P1, "cid": "c"}}}),
                    commit(A, "create", FOLLOW, "f1", {"subject": B}))
    writer.write(conn, first)
    assert stats(dsn, P1) == (2, 1, 1) and stats(dsn, P2) == (1, 0, 0)
    assert query(dsn, "SELECT did, followers, follows, posts FROM user_stats ORDER BY did") == [
        (A, 0, 1, 1), (B, 1, 0, 0)]
    assert_counts_exact(dsn)

    writer.write(conn, first)  # delivered again: every row is there already, nothing moves
    assert stats(dsn, P1) == (2, 1, 1) and stats(dsn, P2) == (1, 0, 0)

    # Deletes of records never seen change nothing; an update moves its like to another post.
    writer.write(conn, changes(commit(A, "delete", LIKE, "never"),
                               commit(A, "delete", POST, "never"),
                               commit(B, "delete", FOLLOW, "never"),
                               like(A, "l1", P2, op="update")))
    assert stats(dsn, P1) == (1, 1, 1) and stats(dsn, P2) == (2, 0, 0)
    assert_counts_exact(dsn)

    # A create and a delete of one like in one transaction: no row, no count.
    writer.write(conn, changes(like(A, "l9", P1), commit(A, "delete", LIKE, "l9")))
    assert stats(dsn, P1) == (1, 1, 1)

    # Once nothing refers to P1 any more, its row goes.
    writer.write(conn, changes(commit(A, "delete", LIKE, "l2"), commit(A, "delete", REPOST, "r1"),
                               commit(A, "delete", POST, "p1"), commit(A, "delete", FOLLOW, "f1")))
    assert stats(dsn, P1) is None
    assert query(dsn, "SELECT did, followers, follows, posts FROM user_stats") == []
    assert_counts_exact(dsn)


def _waiting(dsn: str, app: str) -> bool:
    return query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                      " AND wait_event_type = 'Lock'", (app,))[0][0] > 0


def test_a_commit_that_fails_is_retried_without_counting_twice(dsn: str,
                                                                conn: psycopg.Connection) -> None:
    writer = Writer()
    writer.write(conn, changes(like(A, "l1", P1)))
    again = changes(like(A, "l2", P1))
    holder = psycopg.connect(dsn)
    holder.execute("SELECT 1 FROM post_stats WHERE uri = %s FOR UPDATE", (P1,))
    failed: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(failed, lambda: writer.write(conn, again)))
    thread.start()
    try:
        wait_until(lambda: _waiting(dsn, "counts-writer"), timeout=30)  # its commit waits on P1
        assert query(dsn, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'counts-writer'") == [(True,)]
        thread.join(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    assert len(failed) == 1 and isinstance(failed[0], psycopg.OperationalError), failed
    assert stats(dsn, P1) == (1, 0, 0)  # the failed commit took its delta with it
    writer.write(conn, again)  # what a shard worker does with an OperationalError
    assert stats(dsn, P1) == (2, 0, 0)
    assert_counts_exact(dsn)


def _catch(failed: list[BaseException], work) -> None:
    try:
        work()
    except BaseException as exc:  # reported by the main thread
        failed.append(exc)


def test_two_transactions_on_the_same_hot_posts_lock_them_in_one_order(
        dsn: str, conn: psycopg.Connection) -> None:
    """T1 likes P2 then P1, T2 likes P1 then P2: applied at commit in key order, both wait for P1
    before they touch P2, so neither can hold what the other waits for (no deadlock)."""
    Writer().write(conn, changes(like(A, "l1", P1), like(A, "l2", P2)))
    sessions = {name: psycopg.connect(dsn, application_name=name) for name in ("t1", "t2")}
    for name, order in (("t1", (P2, P1)), ("t2", (P1, P2))):
        sessions[name].execute("SELECT 1")  # opens the transaction: the writes are savepoints
        for subject in order:  # one statement each, as a writer's deletes and COPYs are
            Writer().write(sessions[name], changes(like(A, f"{name}-{subject[-1]}", subject)))
    holder = psycopg.connect(dsn)
    holder.execute("SELECT 1 FROM post_stats WHERE uri = %s FOR UPDATE", (P1,))
    failed: list[BaseException] = []
    threads = []
    try:
        for name, session in sessions.items():
            threads.append(threading.Thread(target=lambda s=session: _catch(failed, s.commit)))
            threads[-1].start()
            wait_until(lambda: _waiting(dsn, name) or failed, timeout=30)
            with psycopg.connect(dsn) as other:  # P2 is still free
                other.execute("SELECT 1 FROM post_stats WHERE uri = %s FOR UPDATE NOWAIT", (P2,))
    finally:
        holder.rollback()
        holder.close()
        for t in threads:
            t.join(timeout=30)
        for session in sessions.values():
            session.close()
    assert not failed
    assert stats(dsn, P1) == (3, 0, 0) and stats(dsn, P2) == (3, 0, 0)
    assert_counts_exact(dsn)


def _older_database(dsn: str, events: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records written by the schema without the counts (every migration but 0004), deletes
    among them."""
    every = migrations.available()
    with monkeypatch.context() as patch, psycopg.connect(dsn, autocommit=True) as c:
        patch.setattr(migrations, "available", lambda: [m for m in every if m[0] != 4])
        upgrade(c)
        prepare_connection(c)
        _write_generated(c, events, seed=41)


def _write_generated(conn: psycopg.Connection, events: int, seed: int,
                     stop: threading.Event | None = None, tally: list[int] | None = None) -> None:
    """Writes a generated replay, a transaction every 300 likes; `tally` gets a 1 per commit."""
    writer, batch = Writer(), Changes()
    for i, line in enumerate(generate_events(events, events // 20, seed=seed)):
        try:
            batch.add(decode(line, 0, i, i))
        except BadEvent:
            continue
        if len(batch.upserts.get("likes", {})) >= 300:
            writer.write(conn, batch)
            batch = Changes()
            if tally is not None:
                tally.append(1)
            if stop is not None and stop.is_set():
                return
    writer.write(conn, batch)


def test_db_upgrade_fills_the_counts_of_an_older_database(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _older_database(dsn, 20_000, monkeypatch)
    assert query(dsn, "SELECT count(*) FROM likes")[0][0] > 10_000
    result = run_pipeline("db", "upgrade", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "applied 0004_stats.sql" in result.stdout
    filled = int(query(dsn, "SELECT count(*) FROM post_stats")[0][0])
    assert filled > 5_000 and f"filled post_stats: {filled} rows" in result.stdout
    assert query(dsn, "SELECT name, after, done FROM stats_fill ORDER BY name") == [
        ("post_stats", None, True), ("user_stats", None, True)]
    assert_counts_exact(dsn)
    names = {r[0] for r in query(dsn, "SELECT indexname FROM pg_indexes")}
    assert set(counts.INDEXES) <= names
    again = run_pipeline("db", "upgrade", "--dsn", dsn)
    assert again.returncode == 0 and again.stdout.strip() == "schema is up to date"


def test_the_fill_stays_exact_while_writers_commit(dsn: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _older_database(dsn, 10_000, monkeypatch)
    with psycopg.connect(dsn) as c:
        upgrade(c)
    stop, committed = threading.Event(), []
    seen: list[int] = []  # transactions the writer had committed when each range was written

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            prepare_connection(c)
            for seed in range(42, 10**6):  # records there already (merged), then new ones
                for s in (41, seed):
                    _write_generated(c, 4_000, seed=s, stop=stop, tally=committed)
                    if stop.is_set():
                        return

    failed: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(failed, write))
    thread.start()
    try:
        wait_until(lambda: committed or failed, timeout=60)
        with psycopg.connect(dsn) as c:
            result = counts.fill(c, batch_rows=40,
                                 on_range=lambda _t, _k: seen.append(len(committed)))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failed and not result.busy
    assert result.ranges["post_stats"] > 50 and result.ranges["user_stats"] > 5
    assert seen[-1] > seen[0], "no writer committed while the counts were being filled"
    assert_counts_exact(dsn)
