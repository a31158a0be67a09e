"""`pipeline backfill` end to end: a real repository (tests/data/jetstream/repo.car) served by the
PDS stub, its DID document (with a key recovered from the commit's signature) by the PLC stub."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libipld
import orjson
import psycopg
import pytest

from shards.firehose.car import encode_car
from shards.firehose.datamodel import cid_bytes
from shards.identity.testing import did_document
from tests.conftest import (
    HOLD, digest, fake_network, identity_args, query, run_pipeline, start_pipeline, wait_until,
)
from tests.firehose_corpus import CORPUS, REPO_DID, recovered_keys
from tools.fake_dns import FakeDNS
from tools.fake_pds import FakePDS
from tools.fake_plc import FakePLC

CAR = (CORPUS / "repo.car").read_bytes()
REV = next(line.split(": ", 1)[1] for line in
           (CORPUS / "car_expected_commit.txt").read_text().splitlines()
           if line.startswith("Revision: "))
LISTING = [tuple(line.split("\t")) for line in
           (CORPUS / "car_expected_records.tsv").read_text().splitlines()]
TABLES = {"app.bsky.feed.post": "posts", "app.bsky.feed.like": "likes",
          "app.bsky.feed.repost": "reposts", "app.bsky.graph.follow": "follows",
          "app.bsky.graph.block": "blocks"}
OTHER = "did:plc:" + "o" * 24  # a DID whose PDS does not host it


def document(pds: FakePDS, did: str = REPO_DID, key: int = 0) -> dict:
    doc = did_document(did, f"{did[8:14]}.test", pds.url)
    doc["verificationMethod"] = [{"id": f"{did}#atproto", "type": "Multikey",
                                  "controller": did,
                                  "publicKeyMultibase": recovered_keys(CAR)[key].multibase()}]
    return doc


@contextmanager
def network(car: bytes = CAR, **pds_options: object) -> Iterator[tuple[FakePDS, FakePLC, FakeDNS]]:
    with FakePDS({}, {REPO_DID: car}, **pds_options) as pds:  # type: ignore[arg-type]
        docs = {REPO_DID: document(pds), OTHER: document(pds, OTHER)}
        with fake_network(docs) as (plc, dns):
            yield pds, plc, dns


def backfill(dsn: str, plc: FakePLC, dns: FakeDNS, *args: str):
    return run_pipeline("backfill", "--dsn", dsn, *identity_args(plc, dns), *args)


def written(dsn: str) -> list[tuple[str, str]]:
    """(collection/rkey, cid) of every record of REPO_DID in the database, like goat's listing."""
    found = []
    for collection, table in TABLES.items():
        found += [(uri.split("/", 3)[3], cid) for uri, cid in query(
            dsn, f"SELECT uri, cid FROM {table} WHERE author_did = %s", (REPO_DID,))]
    found += [(uri.split("/", 3)[3], cid) for uri, cid in query(
        dsn, "SELECT uri, cid FROM records WHERE author_did = %s", (REPO_DID,))]
    return sorted(found)


def forged() -> bytes:
    """The repository with one record's bytes changed (the profile's text) under its old CID."""
    header, blocks = libipld.decode_car(CAR)
    encoded = {cid: libipld.encode_dag_cbor(v) for cid, v in blocks.items()}
    profile = cid_bytes(LISTING[0][1])
    encoded[profile] = encoded[profile].replace(b"handle with spaces", b"handle with spices")
    return encode_car(header["roots"], encoded.items())


def test_backfilled_records_equal_goats_listing_and_twice_changes_nothing(dsn: str) -> None:
    with network() as (pds, plc, dns):
        first = backfill(dsn, plc, dns, REPO_DID)
        assert first.returncode == 0, first.stderr
        assert "repositories      1: 1 written" in first.stdout
        assert f"records           {len(LISTING)}" in first.stdout
        assert f"bytes             {len(CAR):,} fetched" in first.stdout
        profile_listing = [p for p in LISTING if p[0].startswith("app.bsky.actor.profile/")]
        assert written(dsn) == sorted(p for p in LISTING if p not in profile_listing)
        header, blocks = libipld.decode_car(CAR)
        record = blocks[cid_bytes(LISTING[0][1])]
        assert query(dsn, "SELECT display_name, description, profile_source, handle"
                          " FROM users WHERE did = %s", (REPO_DID,)) == [
            (record.get("displayName"), record.get("description"), "stream",
             f"{REPO_DID[8:14]}.test")]
        assert query(dsn, "SELECT rev FROM repo_revs WHERE did = %s", (REPO_DID,)) == [(REV,)]
        before = digest(dsn)
        again = backfill(dsn, plc, dns, REPO_DID)
        assert again.returncode == 0, again.stderr
        assert digest(dsn) == before
        assert [s.method for s in pds.seen(REPO_DID)] == ["getRepo", "getRepo"]


def test_posts_keep_the_streams_json(dsn: str) -> None:
    with network() as (_pds, plc, dns):
        assert backfill(dsn, plc, dns, REPO_DID, "--collections", "app.bsky.feed.post",
                        ).returncode == 0
    header, blocks = libipld.decode_car(CAR)
    posts = query(dsn, "SELECT uri, cid, text, created_at IS NOT NULL FROM posts")
    expected = [p for p in LISTING if p[0].startswith("app.bsky.feed.post/")]
    assert sorted((uri.split("/", 3)[3], cid) for uri, cid, _t, _c in posts) == expected
    for uri, cid, text, dated in posts:
        assert text == blocks[cid_bytes(cid)]["text"] and dated
    assert query(dsn, "SELECT count(*) FROM likes")[0][0] == 0  # --collections: posts only


def test_a_forged_repository_is_refused_whole(dsn: str) -> None:
    with network(forged()) as (_pds, plc, dns):
        result = backfill(dsn, plc, dns, REPO_DID)
    assert result.returncode == 1
    assert "1 refused" in result.stdout
    assert f"refused           {REPO_DID}: record hash:" in result.stdout
    assert written(dsn) == []
    assert query(dsn, "SELECT count(*) FROM users")[0][0] == 0
    assert query(dsn, "SELECT count(*) FROM repo_revs")[0][0] == 0
    [(source, error, size)] = query(dsn, "SELECT source, error, length(raw) FROM dead_letters")
    assert source == f"backfill:{REPO_DID}" and error.startswith("record hash: ")
    assert size == len(forged())
    # Not a stream line: a retry of the dead letters leaves it as it is.
    retry = run_pipeline("dead-letters", "--retry", "--dsn", dsn)
    assert retry.returncode == 0, retry.stderr
    assert "retried 0" in retry.stdout and "1 left alone" in retry.stdout
    assert query(dsn, "SELECT error FROM dead_letters") == [(error,)]


def test_every_did_is_tried_and_failures_make_the_exit_non_zero(dsn: str, tmp_path: Path) -> None:
    dids = tmp_path / "dids.txt"
    dids.write_text(f"# two repositories\n{OTHER}\n\n{REPO_DID}\n")
    with network() as (pds, plc, dns):
        pds.fail(REPO_DID, 429, times=1, retry_after=1)
        result = backfill(dsn, plc, dns, "--dids-file", str(dids))
        first, second = pds.seen(REPO_DID)
    assert result.returncode == 1
    assert "repositories      2: 1 written, 0 skipped (a newer rev already applied), 0 refused," \
           " 1 failed" in result.stdout
    assert f"failed            {OTHER}: not on its PDS (HTTP 404 RepoNotFound)" in result.stdout
    assert second.at - first.at >= 1.0  # the 429's Retry-After, then asked again
    assert len(written(dsn)) == len(LISTING) - 1


def test_an_older_snapshot_is_skipped_and_a_large_one_refused(dsn: str) -> None:
    with network() as (_pds, plc, dns):
        assert backfill(dsn, plc, dns, REPO_DID, "--max-repo-bytes", "4096").returncode == 1
        assert query(dsn, "SELECT error FROM dead_letters")[0][0].startswith("size: ")
        query(dsn, "INSERT INTO repo_revs (did, rev) VALUES (%s, 'zzzzzzzzzzzzz') RETURNING did",
              (REPO_DID,))
        result = backfill(dsn, plc, dns, REPO_DID)
    assert result.returncode == 0, result.stderr
    assert "0 written, 1 skipped" in result.stdout
    assert written(dsn) == []


@pytest.mark.parametrize("args, message", [
    ((), "give the DIDs to backfill"),
    (("not-a-did",), "'not-a-did' is not a DID"),
    ((REPO_DID, "--collections", "no"), "--collections 'no' is not an NSID"),
    (("--dids-file", "/nonexistent/dids"), "cannot read --dids-file"),
])
def test_usage_mistakes_are_one_line(dsn: str, args: tuple[str, ...], message: str) -> None:
    result = run_pipeline("backfill", "--dsn", dsn, *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"pipeline: {message}" or result.stderr.startswith(
        f"pipeline: {message}")
    assert "Traceback" not in result.stderr


def like(did: str, rkey: str, rev: str, operation: str = "create") -> bytes:
    commit: dict = {"rev": rev, "operation": operation, "collection": "app.bsky.feed.like",
                    "rkey": rkey}
    if operation != "delete":
        commit["cid"] = "bafyreilive"
        commit["record"] = {"$type": "app.bsky.feed.like", "createdAt": "2026-12-01T00:00:00Z",
                            "subject": {"uri": f"at://{OTHER}/app.bsky.feed.post/1", "cid": "b"}}
    return orjson.dumps({"did": did, "time_us": 1, "kind": "commit", "commit": commit})


def test_new_users_are_backfilled_in_order_with_their_live_commits(dsn: str,
                                                                   tmp_path: Path) -> None:
    older, newer = "3aaaaaaaaaaaa", "3zzzzzzzzzzzz"  # around the snapshot's rev
    assert older < REV < newer
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(like(REPO_DID, "3live0000000a", older) + b"\n"
                      + like(OTHER, "3live0000000b", older) + b"\n")
    snapshot_like = next(p for p, _cid in LISTING if p.startswith("app.bsky.feed.like/"))
    second.write_bytes(b"\n".join([
        like(REPO_DID, "3live0000000c", older),  # in the snapshot's past: skipped
        like(REPO_DID, snapshot_like.split("/")[1], older, "delete"),  # skipped too
        like(REPO_DID, "3live0000000d", newer),  # after it: written
    ]) + b"\n")
    with network() as (pds, plc, dns):
        plc.hold(OTHER)  # the run goes on until the repository is in
        proc = start_pipeline("run", "--replay", str(first), "--dsn", dsn, "--shards", "2",
                              "--backfill-new-users", *identity_args(plc, dns), *HOLD)
        try:
            wait_until(lambda: repo_rev(dsn) == REV, timeout=60)
        finally:
            plc.release(OTHER)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # OTHER came as the run ended: its PDS's 404 may or may not be in before the end
        assert "repositories      done 1" in out and "new users backfilled" in out
        rows = dict(written(dsn))
        assert {p: rows.get(p) for p, _cid in LISTING[1:]} == dict(LISTING[1:])
        assert "app.bsky.feed.like/3live0000000a" in rows  # live, before the snapshot
        again = run_pipeline("run", "--replay", str(second), "--dsn", dsn,
                             "--backfill-new-users", *identity_args(plc, dns))
        assert again.returncode == 0, again.stderr
        assert "committed         3" in again.stdout
    rows = dict(written(dsn))
    assert "app.bsky.feed.like/3live0000000c" not in rows
    assert snapshot_like in rows
    assert "app.bsky.feed.like/3live0000000d" in rows
    # Known now: its repository is not fetched again; its profile is the repository's.
    assert len(pds.seen(REPO_DID, "getRepo")) == 1
    assert query(dsn, "SELECT profile_source FROM users WHERE did = %s", (REPO_DID,)) == [
        ("stream",)]


def repo_rev(dsn: str) -> str | None:
    try:
        found = query(dsn, "SELECT rev FROM repo_revs WHERE did = %s", (REPO_DID,))
    except psycopg.Error:
        return None
    return found[0][0] if found else None
