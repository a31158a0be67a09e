"""The spine end to end: the recorded corpus replayed through real shard processes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import orjson

from tests.conftest import DATA, digest, fake_network, identity_args, query, run_pipeline

CORPUS = DATA / "expected_v1.jsonl"
DOCS = json.loads((DATA / "did_docs.json").read_text())
TABLE_OF = {
    "app.bsky.feed.post": "posts", "app.bsky.feed.like": "likes",
    "app.bsky.feed.repost": "reposts", "app.bsky.graph.follow": "follows",
    "app.bsky.graph.block": "blocks",
}


def expected_rows(lines: list[bytes]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per table, uri -> (cid, author) that the events imply, applied in file order."""
    tables: dict[str, dict[str, tuple[str, str]]] = {t: {} for t in (*TABLE_OF.values(), "records")}
    for line in lines:
        ev = orjson.loads(line)
        if ev["kind"] != "commit" or ev["commit"]["collection"] == "app.bsky.actor.profile":
            continue
        c = ev["commit"]
        table = TABLE_OF.get(c["collection"], "records")
        uri = f"at://{ev['did']}/{c['collection']}/{c['rkey']}"
        if c["operation"] == "delete":
            tables[table].pop(uri, None)
        else:
            tables[table][uri] = (c["cid"], ev["did"])
    return tables


def first_handle(doc: dict) -> str:
    return next(a[5:] for a in doc["alsoKnownAs"] if a.startswith("at://")).lower()


def replay(dsn: str, net: tuple, path: Path, *extra: str, timeout: float = 240):
    result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net),
                          *extra, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def test_corpus_rows_users_and_idempotence(dsn: str) -> None:
    lines = CORPUS.read_bytes().splitlines()
    with fake_network(DOCS) as net:
        first = replay(dsn, net, CORPUS)
        assert "committed         152" in first.stdout
        expected = expected_rows(lines)
        for table, rows in expected.items():
            got = {r[0]: (r[1], r[2]) for r in query(dsn, f"SELECT uri, cid, author_did FROM {table}")}
            assert got == rows, table
        users = {r[0]: r[1] for r in query(dsn, "SELECT did, handle FROM users")}
        assert set(users) == {orjson.loads(l)["did"] for l in lines}
        for did, doc in DOCS.items():
            assert users[did] == first_handle(doc)
        before = digest(dsn)
        again = replay(dsn, net, CORPUS)  # from the saved cursor: nothing left to read
        assert "events read       0" in again.stdout
        full = replay(dsn, net, CORPUS, "--from-start")  # every event applied a second time
        assert "events read       152" in full.stdout
        assert digest(dsn) == before


def test_unanswered_resolutions_overlap_and_fall_back(dsn: str) -> None:
    lines = CORPUS.read_bytes().splitlines()
    authors = {orjson.loads(l)["did"] for l in lines}
    timeout = 2.0
    with fake_network(DOCS, profile="never") as net:
        started = time.monotonic()
        replay(dsn, net, CORPUS, "--resolve-timeout", str(timeout))
        elapsed = time.monotonic() - started
    assert elapsed < 10 * timeout < len(authors) * timeout
    rows = query(dsn, "SELECT did, handle, incomplete FROM users")
    assert {r[0] for r in rows} == authors
    assert all(handle == did and incomplete for did, handle, incomplete in rows)


def test_one_request_per_unknown_did(dsn: str, tmp_path: Path) -> None:
    corpus = CORPUS.read_bytes().splitlines()
    did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    doc = {"id": did, "alsoKnownAs": ["at://many.example.com"], "service": []}
    lines = []
    for i in range(1000):
        lines.append(orjson.dumps({
            "did": did, "time_us": 1_700_000_000_000_000 + i, "kind": "commit",
            "commit": {"rev": "3l3qo2vutsw2b", "operation": "create",
                       "collection": "app.bsky.feed.like", "rkey": f"3l3qo2vuts{i:03d}",
                       "cid": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a",
                       "record": {"$type": "app.bsky.feed.like",
                                  "createdAt": "2024-09-09T19:46:02.102Z",
                                  "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1",
                                              "cid": "bafy"}}}}))
        lines.append(corpus[i % len(corpus)])
    path = tmp_path / "one-did.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with fake_network({**DOCS, did: doc}) as net:
        replay(dsn, net, path, "--batch-size", "50")
        assert net[0].requests_for(did) == 1
    assert query(dsn, "SELECT handle FROM users WHERE did = %s", (did,)) == [("many.example.com",)]
    assert query(dsn, "SELECT count(*) FROM likes WHERE author_did = %s", (did,)) == [(1000,)]


def test_creates_then_deletes_leave_nothing(dsn: str, tmp_path: Path) -> None:
    creates = [l for l in CORPUS.read_bytes().splitlines()
               if orjson.loads(l)["kind"] == "commit"
               and orjson.loads(l)["commit"]["operation"] == "create"]
    deletes = []
    for line in creates:
        ev = orjson.loads(line)
        c = ev["commit"]
        deletes.append(orjson.dumps({
            "did": ev["did"], "time_us": ev["time_us"] + 1, "kind": "commit",
            "commit": {"rev": c["rev"], "operation": "delete", "collection": c["collection"],
                       "rkey": c["rkey"]}}))
    path = tmp_path / "churn.jsonl"
    path.write_bytes(b"\n".join(creates + deletes) + b"\n")
    with fake_network(DOCS) as net:
        replay(dsn, net, path, "--batch-size", "7")
    for table in (*TABLE_OF.values(), "records"):
        assert query(dsn, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert query(dsn, "SELECT count(*) FROM users") == [(len({orjson.loads(l)["did"] for l in creates}),)]
