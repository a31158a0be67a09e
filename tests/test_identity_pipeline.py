"""Identity inside the pipeline: outages cost a fast fallback, the refresher completes users later."""
from __future__ import annotations

import time
from pathlib import Path

import orjson

from tests.conftest import fake_network, identity_args, query, run_pipeline
from tools.generate import did_documents, write_replay


def test_plc_down_falls_back_fast_then_refresh_completes_everyone(dsn: str, tmp_path: Path) -> None:
    dids, timeout = 1_000, 5.0
    path = tmp_path / "new-users.jsonl"
    write_replay(path, 3_000, dids, seed=5)
    docs = did_documents(dids, seed=5)
    with fake_network(docs, profile="down") as (plc, dns):
        started = time.monotonic()
        result = run_pipeline("run", "--replay", str(path), "--dsn", dsn,
                              *identity_args(plc, dns), "--resolve-timeout", str(timeout))
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert elapsed < 60 < dids * timeout
        rows = query(dsn, "SELECT did, handle, incomplete, resolve_error FROM users")
        assert len(rows) == dids
        assert all(handle == did and incomplete for did, handle, incomplete, _ in rows)
        # Each says why: the directory refused connections, then its circuit opened.
        assert {error.split(":")[0] for *_, error in rows} <= {"lookup failed", "circuit open"}

        plc.up()
        refresh = run_pipeline("refresh-users", "--dsn", dsn, *identity_args(plc, dns))
        assert refresh.returncode == 0, refresh.stderr
        assert "0 incomplete in all" in refresh.stdout
    rows = query(dsn, "SELECT did, handle, handle_verified, pds, incomplete, resolve_error"
                      " FROM users")
    for did, handle, verified, pds, incomplete, error in rows:
        doc = docs[did]
        assert handle == doc["alsoKnownAs"][0][5:]
        assert verified and not incomplete and error is None
        assert pds == doc["service"][0]["serviceEndpoint"]


def test_account_and_identity_events(dsn: str, tmp_path: Path) -> None:
    docs = did_documents(2, seed=9)
    a, b = sorted(docs)
    lines = [
        {"did": a, "time_us": 1, "kind": "account",
         "account": {"active": False, "did": a, "seq": 1, "status": "deactivated", "time": "x"}},
        {"did": b, "time_us": 2, "kind": "identity", "identity": {"did": b, "seq": 2}},
    ]
    path = tmp_path / "lifecycle.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(l) for l in lines) + b"\n")
    with fake_network(docs) as net:
        result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net))
        assert result.returncode == 0, result.stderr
        assert query(dsn, "SELECT active, status FROM users WHERE did = %s", (a,)) == [
            (False, "deactivated")]
        # The identity event asks for a fresh resolution: the user is due for the refresher.
        assert query(dsn, "SELECT incomplete, resolve_error FROM users WHERE did = %s", (b,)) == [
            (True, "identity event: to be resolved again")]
        refresh = run_pipeline("refresh-users", "--dsn", dsn, *identity_args(*net))
        assert refresh.returncode == 0, refresh.stderr
    assert query(dsn, "SELECT handle, incomplete FROM users WHERE did = %s", (b,)) == [
        (docs[b]["alsoKnownAs"][0][5:], False)]
