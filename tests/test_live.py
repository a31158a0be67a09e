"""Operating live: a Jetstream source with dropped connections, and metrics scraped mid-run."""
from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

import orjson

from tests.conftest import (DATA, fake_network, identity_args, query, rows_committed,
                            start_pipeline, wait_until)
from tests.test_replay import expected_rows
from tools.fake_jetstream import FakeJetstream
from tools.generate import did_documents, write_replay

CORPUS = DATA / "expected_v1.jsonl"
DOCS = json.loads((DATA / "did_docs.json").read_text())






def test_jetstream_with_two_drops_commits_everything_once(dsn: str) -> None:
    lines = CORPUS.read_bytes().splitlines()
    expected = expected_rows(lines)
    total = len(expected["likes"]) + len(expected["posts"])
    last_time_us = max(orjson.loads(l)["time_us"] for l in lines)
    with fake_network(DOCS) as net, FakeJetstream(CORPUS, drop_after=[50, 40]) as js:
        proc = start_pipeline("run", "--jetstream", js.url, "--dsn", dsn, *identity_args(*net),
                              "--batch-size", "10")
        try:
            wait_until(lambda: rows_committed(dsn) >= total and js.connection_count >= 3)
            wait_until(lambda: query(dsn, "SELECT cursor FROM cursors") == [(last_time_us,)])
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert [c.dropped for c in js.connections[:2]] == [True, True]
    for table, rows in expected.items():
        got = {r[0]: (r[1], r[2]) for r in query(dsn, f"SELECT uri, cid, author_did FROM {table}")}
        assert got == rows, table
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(dsn, "SELECT cursor FROM cursors WHERE name LIKE 'jetstream:%%'") == [
        (last_time_us,)]
    assert "dead-lettered     0" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_scraped_during_a_run(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_replay(path, 60_000, 3_000, seed=4)
    port = free_port()
    with fake_network(did_documents(3_000, seed=4)) as net:
        proc = start_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net),
                              "--shards", "3", "--metrics-port", str(port), "--batch-size", "200")
        try:
            seen: dict[str, float] = {}

            def events_flowing() -> bool:
                nonlocal seen
                try:
                    seen = scrape(port)
                except OSError:
                    return False
                return sum(v for k, v in seen.items()
                           if k.startswith("pipeline_events_total{") and 'result="committed"' in k) > 0

            wait_until(events_flowing)
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    for shard in range(3):
        assert f'pipeline_active_user_creations{{shard="{shard}"}}' in seen
        assert f'pipeline_pending_user_creation_dedup{{shard="{shard}"}}' in seen
    per_shard = [seen[f'pipeline_shard_committed_total{{shard="{k}"}}'] for k in range(3)]
    committed = sum(v for k, v in seen.items()
                    if k.startswith("pipeline_events_total{") and 'result="committed"' in k)
    assert committed == sum(per_shard) > 0
    assert seen["pipeline_read_to_commit_seconds_count"] > 0
