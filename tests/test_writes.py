"""shards.store.writes against a real PostgreSQL: direct COPY, and the merge it falls back to."""
from __future__ import annotations

import orjson
import psycopg
import pytest

from shards.events import decode
from shards.store.migrations import upgrade
from shards.store import writes
from shards.store.writes import Changes, Writer, prepare_connection
from tests.conftest import query

DID = "did:plc:" + "w" * 24


def _like(rkey: str, subject: str, n: int) -> bytes:
    return orjson.dumps({"did": DID, "time_us": n, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": "app.bsky.feed.like", "rkey": rkey,
        "cid": f"bafy{n}", "record": {"$type": "app.bsky.feed.like",
                                      "subject": {"uri": subject, "cid": "c"},
                                      "createdAt": "2026-11-28T00:00:00Z"}}})


def _changes(*lines: bytes, user: bool = False) -> Changes:
    changes = Changes()
    if user:
        changes.users.append((DID, "w.test", False, True, None, None))
    for i, raw in enumerate(lines):
        changes.add(decode(raw, 0, i, i))
    return changes


def _connect(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn)
    upgrade(conn)
    conn.commit()
    prepare_connection(conn)
    return conn


def test_rows_already_there_are_merged_not_refused(dsn: str) -> None:
    writer = Writer()
    with _connect(dsn) as conn:
        writer.write(conn, _changes(_like("a", "at://x/1", 1), _like("b", "at://x/2", 2), user=True))
        # The same user and like "a" again, with a new subject: the direct COPY meets their keys,
        # the transaction merges instead, and like "c" (new) is written all the same.
        writer.write(conn, _changes(_like("a", "at://x/9", 3), _like("c", "at://x/3", 4), user=True))
        # While merging, new rows still go in.
        writer.write(conn, _changes(_like("d", "at://x/4", 5)))
    likes = query(dsn, "SELECT uri, subject_uri FROM likes ORDER BY uri")
    assert likes == [(f"at://{DID}/app.bsky.feed.like/{k}", s) for k, s in
                     [("a", "at://x/9"), ("b", "at://x/2"), ("c", "at://x/3"), ("d", "at://x/4")]]
    assert query(dsn, "SELECT count(*), min(refresh_after) > now() FROM users") == [(1, True)]


def test_new_rows_are_copied_directly_and_a_conflict_merges_for_a_while(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged: list[int] = []
    merge = writes._merge
    monkeypatch.setattr(writes, "_merge", lambda cur, ch: (merged.append(1), merge(cur, ch)))
    writer = Writer()
    with _connect(dsn) as conn:
        writer.write(conn, _changes(_like("a", "at://x/1", 1), user=True))
        assert merged == []  # all new: straight into the tables
        writer.write(conn, _changes(_like("a", "at://x/1", 1)))
        assert merged == [1]  # a key met: merged instead
        writer.write(conn, _changes(_like("b", "at://x/2", 2)))
        assert merged == [1, 1]  # and the next ones merge without trying first
    assert query(dsn, "SELECT count(*) FROM likes") == [(2,)]
