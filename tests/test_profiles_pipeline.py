"""Profiles from the PDS through the real command line: DID documents from the PLC stub point at
a PDS stub by host name (DNS stub), shard workers fetch in the background while a run goes on."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg

from shards.store.writes import profile_fields
from tests.conftest import HOLD, fake_network, identity_args, query, run_pipeline, \
    start_pipeline, wait_until
from tests.test_live import free_port, scrape
from tools.fake_dns import FakeDNS
from tools.fake_pds import FakePDS
from tools.fake_plc import FakePLC
from tools.generate import did_documents, pds_host, profile_records, write_replay

DIDS, SEED = 60, 21
PROFILE = "app.bsky.actor.profile"


@contextmanager
def network(pds: FakePDS) -> Iterator[tuple[FakePLC, FakeDNS]]:
    """PLC and DNS stubs: documents whose PDS is `http://<host>:<stub port>`, every host
    resolving to the stub."""
    docs = did_documents(DIDS, SEED, pds_port=pds.port)
    with fake_network(docs) as (plc, dns):
        for host in {pds_host(did) for did in docs}:
            dns.add_a(host, "127.0.0.1")
        yield plc, dns


def stream_profiles(path: Path) -> dict[str, tuple[object, ...]]:
    """The last profile each author's events in the replay leave (deleted: all None)."""
    found: dict[str, tuple[object, ...]] = {}
    for line in path.read_bytes().splitlines():
        ev = orjson.loads(line)
        commit = ev.get("commit") or {}
        if commit.get("collection") == PROFILE and commit.get("rkey") == "self":
            found[ev["did"]] = (profile_fields(commit["record"])
                                if commit["operation"] != "delete" else (None,) * 4)
    return found


def users(dsn: str) -> dict[str, tuple[object, ...]]:
    return {r[0]: r[1:] for r in query(
        dsn, "SELECT did, profile_source, display_name, description, avatar_cid, banner_cid"
             " FROM users")}


def everyone_but(dsn: str, last: str, authors: int) -> bool:
    """Every author but `last` is a user whose profile is known (the schema may not be there)."""
    try:
        got = users(dsn)
    except psycopg.Error:
        return False
    return len(got) == authors - 1 and all(v[0] is not None for v in got.values())


def test_every_user_ends_with_its_profile_or_none(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_replay(path, 3_000, DIDS, SEED)
    streamed = stream_profiles(path)
    profiles = profile_records(DIDS, SEED)
    authors = list(dict.fromkeys(orjson.loads(l)["did"] for l in path.read_bytes().splitlines()))
    limited = [d for d in authors if d not in streamed][:3]
    with FakePDS(profiles) as pds, network(pds) as (plc, dns):
        for did in limited:
            pds.fail(did, 429, times=1, retry_after=1)
        last = authors[-1]
        plc.hold(last)  # keeps the run going while the workers fetch in the background
        port = free_port()
        proc = start_pipeline("run", "--replay", str(path), "--dsn", dsn, "--shards", "2",
                              "--summary-json", str(tmp_path / "summary.json"),
                              "--metrics-port", str(port), *identity_args(plc, dns), *HOLD)
        host = f"{pds_host(limited[0])}:{pds.port}"
        try:
            wait_until(lambda: everyone_but(dsn, last, len(authors)), timeout=90)
            wait_until(lambda: scrape(port).get(f'pipeline_pds_rate_limited_total{{host="{host}"}}',
                                                0) >= 1, timeout=30)
            seen = scrape(port)
        finally:
            plc.release(last)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # The last author came as the run ended: its profile is left to the cron job.
        refresh = run_pipeline("refresh-users", "--due-only", "--dsn", dsn,
                               *identity_args(plc, dns))
        assert refresh.returncode == 0, refresh.stderr
        for did in limited:  # asked again once the host's pause was over, and answered
            first, second, *_ = pds.seen(did)
            assert second.at - first.at >= 1.0
        assert not any(pds.seen(did) for did in streamed)  # the stream's profile came first
        assert [len(pds.seen(d)) for d in authors if d not in limited and d not in streamed] \
            == [1] * (len(authors) - len(limited) - len(streamed))
    got = users(dsn)
    for did in authors:
        if did in streamed:
            assert got[did] == ("stream", *streamed[did]), did
        elif did in profiles:
            assert got[did] == ("pds", *profile_fields(profiles[did])), did
        else:
            assert got[did] == ("none", None, None, None, None), did
    assert seen['pipeline_pds_fetches_total{kind="profile",result="found"}'] > 0
    assert seen['pipeline_pds_fetches_total{kind="profile",result="later"}'] >= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["identity"]["pds.profile.later"] >= len(limited)
    assert "profiles fetched  absent" in out and "429s: " in out
    status = run_pipeline("status", "--dsn", dsn)
    assert status.returncode == 0, status.stderr
    assert f"{sum(1 for d in authors if d in streamed)} from the stream" in status.stdout
    assert "; 0 missing (0 due now, 0 without a PDS)" in status.stdout


def test_a_profile_from_the_stream_replaces_a_fetched_one(dsn: str, tmp_path: Path) -> None:
    docs = did_documents(2, SEED)
    a, b = docs
    profiles = {a: {"$type": PROFILE, "displayName": "Fetched"}}
    like = {"did": a, "time_us": 1, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2b", "operation": "create", "collection": "app.bsky.feed.like",
        "rkey": "3l3qo2vutsw2b", "cid": "bafyreilike",
        "record": {"$type": "app.bsky.feed.like", "createdAt": "2026-12-01T00:00:00Z",
                   "subject": {"uri": f"at://{b}/app.bsky.feed.post/1", "cid": "bafy"}}}}
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(orjson.dumps(like) + b"\n" + orjson.dumps({**like, "did": b}) + b"\n")
    profile = {"did": a, "time_us": 2, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2c", "operation": "update", "collection": PROFILE, "rkey": "self",
        "cid": "bafyreiprofile", "record": {"$type": PROFILE, "displayName": "Streamed"}}}
    second.write_bytes(orjson.dumps(profile) + b"\n")
    with FakePDS(profiles) as pds, network(pds) as net:
        # Fetched by `refresh-users` after a run that did not fetch: the cron way.
        run = run_pipeline("run", "--replay", str(first), "--dsn", dsn, "--no-fetch-profiles",
                           *identity_args(*net))
        assert run.returncode == 0, run.stderr
        assert pds.total_requests == 0
        refresh = run_pipeline("refresh-users", "--dsn", dsn, *identity_args(*net))
        assert refresh.returncode == 0, refresh.stderr
        assert "asked 2 PDS for profiles: 1 absent, 1 found; 0 users without a profile" \
            in refresh.stdout
        assert users(dsn)[a][:2] == ("pds", "Fetched")
        run = run_pipeline("run", "--replay", str(second), "--dsn", dsn, *identity_args(*net))
        assert run.returncode == 0, run.stderr
        assert users(dsn)[a][:2] == ("stream", "Streamed")
        again = run_pipeline("refresh-users", "--dsn", dsn, *identity_args(*net))
        assert "asked 0 PDS for profiles: none due" in again.stdout  # b's "none" holds a day
        assert pds.total_requests == 2
