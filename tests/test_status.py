"""`pipeline status` and `pipeline dead-letters` over what a real run left in the database."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import psycopg
import pytest

from common.routing import shard_for
from shards.store.fence import take_over
from tests.conftest import DATA, fake_network, identity_args, like, query, run_pipeline

DOCS = json.loads((DATA / "did_docs.json").read_text())
UNKNOWN_DID = "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz"  # the PLC stub answers 404
BAD_JSON = b'{"did": "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz", "kind": '
BAD_KIND = b'{"did": "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz", "kind": "sync"}'


@pytest.fixture
def ran(dsn: str, tmp_path: Path):
    """One real run over good events, two bad lines and an author the PLC does not know."""
    corpus = [l for l in (DATA / "expected_v1.jsonl").read_bytes().splitlines()
              if orjson.loads(l)["did"] in DOCS][:12]
    lines = [*corpus[:6], BAD_JSON, like(UNKNOWN_DID, "3l3qo2vutsa01"), *corpus[6:], BAD_KIND,
             like(UNKNOWN_DID, "3l3qo2vutsa02")]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with fake_network(DOCS) as net:
        result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net),
                              "--shards", "2")
        assert result.returncode == 0, result.stderr
        assert "dead-lettered     2" in result.stdout
        yield path, corpus, net


def test_status_shows_cursor_dead_letters_incomplete_users_and_shards(dsn: str, ran) -> None:
    path, corpus, _net = ran
    size = path.stat().st_size
    text = run_pipeline("status", "--dsn", dsn, "--shards", "2")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"replay:{path}#" in out
    assert f"byte {size} of {size} (100.0%)" in out  # the run read the file to its end
    # New incomplete users are first due for the refresher a minute after their creation.
    assert "incomplete users  1 (0 due for refresh)\n         1  not found\n" in out
    assert "dead letters      2" in out
    assert "       1  invalid JSON" in out and "       1  unknown kind" in out

    data = json.loads(run_pipeline("status", "--dsn", dsn, "--shards", "2", "--json").stdout)
    [cursor] = data["cursors"]
    assert cursor["kind"] == "replay" and cursor["cursor"] == size and cursor["percent"] == 100.0
    assert data["incomplete_users"] == {"total": 1, "due": 0, "by_reason": {"not found": 1}}
    assert data["dead_letters"] == {"total": 2, "by_reason": {"invalid JSON": 1, "unknown kind": 1}}
    authors = [orjson.loads(l)["did"] for l in corpus] + [UNKNOWN_DID, UNKNOWN_DID]
    assert [s["users"] for s in data["shards"]] == [
        len({d for d in authors if shard_for(d, 2) == k}) for k in range(2)]
    for table in ("posts", "likes", "reposts", "follows", "blocks", "records"):
        owners = [shard_for(r[0], 2) for r in query(dsn, f"SELECT author_did FROM {table}")]
        assert [s[table] for s in data["shards"]] == [owners.count(k) for k in range(2)], table
    assert sum(s["total"] for s in data["shards"]) == 13  # 14 good events, one a delete
    assert sum(s["likes"] for s in data["shards"]) >= 2  # the unknown author's among them
    assert [s["epoch"] for s in data["shards"]] == [None, None]  # local workers take no epoch
    assert "epoch" not in out

    # The same figures from the environment, as for every other command.
    env = run_pipeline("status", "--json", env={"PIPELINE_DSN": dsn, "PIPELINE_SHARDS": "2"})
    assert env.returncode == 0, env.stderr
    assert json.loads(env.stdout) == data


def test_status_shows_the_epoch_of_each_shard_a_redis_worker_took_over(dsn: str, ran) -> None:
    with psycopg.connect(dsn) as conn:
        for holder in ("host-a:1:x", "host-b:2:y"):
            take_over(conn, 1, holder)
    out = run_pipeline("status", "--dsn", dsn, "--shards", "2").stdout
    table = out.split("per shard", 1)[1].splitlines()
    assert table[1].split()[-1] == "epoch"
    assert [line.split()[-1] for line in table[3:5]] == ["-", "2"]
    data = json.loads(run_pipeline("status", "--dsn", dsn, "--shards", "2", "--json").stdout)
    assert [s["epoch"] for s in data["shards"]] == [None, 2]


def test_status_of_a_jetstream_cursor_and_a_vanished_file(dsn: str, ran) -> None:
    import time

    now_us = int(time.time() * 1e6)
    query(dsn, "INSERT INTO cursors (name, cursor) VALUES ('jetstream:wss://x/subscribe', %s),"
               " ('replay:/nonexistent/file.jsonl#0123456789abcdef', 42) RETURNING name",
          (now_us - 200_000_000,))
    data = json.loads(run_pipeline("status", "--dsn", dsn, "--json").stdout)
    by_name = {c["name"]: c for c in data["cursors"]}
    assert 200 <= by_name["jetstream:wss://x/subscribe"]["lag_seconds"] < 200 + 60
    gone = by_name["replay:/nonexistent/file.jsonl#0123456789abcdef"]
    assert gone["percent"] is None and gone["note"] == "file gone"
    out = run_pipeline("status", "--dsn", dsn).stdout
    assert "lag 3m 2" in out  # 200 s plus the few seconds this test took at most
    assert "byte 42 (file gone)" in out


def test_dead_letters_list_and_retry(dsn: str, ran) -> None:
    path, _corpus, net = ran
    listing = run_pipeline("dead-letters", "--dsn", dsn)
    assert listing.returncode == 0, listing.stderr
    assert "2 dead letters shown" in listing.stdout
    assert listing.stdout.count(f"replay:{path}#") == 2
    assert "invalid JSON" in listing.stdout and "unknown kind: sync" in listing.stdout
    assert '{"did": "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz", "kind": ' in listing.stdout
    only = run_pipeline("dead-letters", "--dsn", dsn, "--source", f"replay:{path}", "--limit", "1")
    assert "1 dead letters shown, 1 more (raise --limit)" in only.stdout
    assert only.returncode == 0, only.stderr

    # Lines that are valid now: one of an author the PLC knows (not seen by the run), one of
    # the unknown author (already a user), one whose write the database refuses, and one that
    # is still bad but was stored with a stale reason. Its raw bytes also test safe display.
    known = next(d for d in DOCS if not query(dsn, "SELECT 1 FROM users WHERE did = %s", (d,)))
    handle = next(a[5:] for a in DOCS[known]["alsoKnownAs"] if a.startswith("at://")).lower()
    refused = like(UNKNOWN_DID, "3l3qo2vutsa09")
    with psycopg.connect(dsn) as conn:
        conn.execute("""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.uri LIKE '%3l3qo2vutsa09' THEN RAISE EXCEPTION 'no thanks'; END IF;
            RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON likes"
                     " FOR EACH ROW EXECUTE FUNCTION refuse()")
    rows = [("manual", 1, like(known, "3l3qo2vutsa03"), "rejected by database: was fixed"),
            ("manual", 2, like(UNKNOWN_DID, "3l3qo2vutsa04"), "bug: fixed since"),
            ("manual", 3, refused, "rejected by database: earlier"),
            ("manual", 4, b'{"did": "x\xff", "kind": \x1b[31m', "old reason")]
    for row in rows:
        query(dsn, "INSERT INTO dead_letters (source, position, raw, error) VALUES (%s, %s, %s, %s)"
                   " RETURNING id", row)
    shown = run_pipeline("dead-letters", "--dsn", dsn, "--source", "manual").stdout
    assert "4 dead letters shown" in shown
    assert '{"did": "x\\xff", "kind": \\x1b[31m' in shown and "\x1b" not in shown

    result = run_pipeline("dead-letters", "--retry", "--dsn", dsn, *identity_args(*net))
    assert result.returncode == 0, result.stderr
    assert "retried 6: 2 committed, 4 still bad; 1 users created" in result.stdout
    left = query(dsn, "SELECT source, position, error FROM dead_letters ORDER BY source, position")
    assert [(s, p) for s, p, _e in left if s == "manual"] == [("manual", 3), ("manual", 4)]
    errors = {p: e for s, p, e in left if s == "manual"}
    assert errors[3].startswith("rejected by database: no thanks")
    assert errors[4] == "not UTF-8"
    assert sorted(e.split(":")[0] for s, _p, e in left if s != "manual") == [
        "invalid JSON", "unknown kind"]
    assert query(dsn, "SELECT handle, incomplete FROM users WHERE did = %s", (known,)) == [
        (handle, False)]
    assert query(dsn, "SELECT author_did FROM likes WHERE uri LIKE %s ORDER BY right(uri, 13)",
                 ("%/3l3qo2vutsa0_",)) == [(UNKNOWN_DID,), (UNKNOWN_DID,), (known,), (UNKNOWN_DID,)]
    again = run_pipeline("dead-letters", "--retry", "--dsn", dsn, *identity_args(*net))
    assert "retried 4: 0 committed, 4 still bad; 0 users created" in again.stdout


def test_user_mistakes_are_one_line(dsn: str) -> None:
    bad = run_pipeline("dead-letters", "--retry", "--dsn", dsn, "--plc-url", "ftp://x")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "plc_url must be an http(s) URL" in bad.stderr
    down = run_pipeline("status", "--dsn", "postgresql://nobody@127.0.0.1:1/none")
    assert down.returncode == 3 and "cannot connect to the database" in down.stderr
    assert "Traceback" not in down.stderr


def test_status_of_an_empty_database(dsn: str) -> None:
    result = run_pipeline("status", "--dsn", dsn, "--shards", "3")
    assert result.returncode == 0, result.stderr
    assert "cursors\n  (none)" in result.stdout
    assert "incomplete users  0 (0 due for refresh)" in result.stdout
    assert "per shard (of 3, by DID)" in result.stdout
    data = json.loads(run_pipeline("status", "--dsn", dsn, "--shards", "3", "--json").stdout)
    assert data["cursors"] == [] and data["dead_letters"] == {"total": 0, "by_reason": {}}
    assert [s["shard"] for s in data["shards"]] == [0, 1, 2]
    assert all(s["users"] == 0 and s["total"] == 0 for s in data["shards"])
