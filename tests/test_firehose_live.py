"""The firehose live: a local relay that drops connections and sends error and #info frames,
`pipeline record` against it, and the recording replayed."""
from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

from pipeline.sources.firehose import FirehoseSource, firehose_url
from tests.conftest import (DATA, database, digest, fake_network, identity_args, query,
                            run_pipeline, start_pipeline, wait_until)
from tests.test_live import free_port, scrape
from tools.fake_relay import FakeRelay

FRAMES = DATA / "jetstream" / "frames.bin.zst"
DOCS = json.loads((DATA / "did_docs.json").read_text())
FIRST_SEQ, LAST_SEQ = 31527015322, 31527015471


def frames_committed(dsn: str) -> int:
    try:
        return sum(v for (v,) in query(
            dsn, "SELECT count(*) FROM repo_revs UNION ALL SELECT count(*) FROM users"
                 " WHERE NOT active IS NULL AND did = 'did:plc:hqvhxrowqbemo5e4wjnj6zao'"))
    except Exception:  # noqa: BLE001 -- before the schema exists
        return 0


def test_url_gets_the_subscribe_path() -> None:
    assert firehose_url("wss://bsky.network") == \
        "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
    assert firehose_url("https://pds.example.com/") == \
        "wss://pds.example.com/xrpc/com.atproto.sync.subscribeRepos"
    assert firehose_url("ws://127.0.0.1:9/custom") == "ws://127.0.0.1:9/custom"


def test_error_frames_end_the_connection_and_it_resumes_from_the_last_seq() -> None:
    with FakeRelay(FRAMES, error_after={1: ("ConsumerTooSlow", 30)},
                   drop_after=[1000, 20]) as relay:
        source = FirehoseSource(relay.url, initial_backoff=0.01, max_backoff=0.05)
        seqs = []
        for item in source.events(None):
            if item is not None:
                seqs.append(item[0])
            if len(seqs) == 150:
                source.close()
    assert seqs == list(range(FIRST_SEQ, LAST_SEQ + 1))
    assert relay.cursors[:3] == [None, FIRST_SEQ + 29, FIRST_SEQ + 49]
    assert "ConsumerTooSlow" in (source.infos or [""])[0]
    # a cursor the relay has not reached yet: an error frame, then a reconnect
    with FakeRelay(FRAMES) as relay:
        source = FirehoseSource(relay.url, initial_backoff=0.01, max_backoff=0.05)
        stream = source.events(LAST_SEQ + 11)
        wait_until(lambda: next(stream) is None and relay.wait_for_connections(2, 0))
        source.close()
    assert relay.cursors[:2] == [LAST_SEQ + 10, LAST_SEQ + 10]
    assert source.stats.failures >= 1 and "FutureCursor" in source.stats.last_error


def test_live_firehose_with_drops_commits_everything_once(server_dsn: str, tmp_path: Path) -> None:
    recorded = tmp_path / "recorded.bin.zst"
    with database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as live, \
            database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as replayed, \
            database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as reference, \
            fake_network(DOCS) as net, FakeRelay(FRAMES, drop_after=[60, 40]) as relay:
        port = free_port()
        proc = start_pipeline("run", "--firehose", relay.url, "--dsn", live,
                              *identity_args(*net), "--batch-size", "10",
                              "--metrics-port", str(port))
        try:
            wait_until(lambda: query(live, "SELECT cursor FROM cursors") == [(LAST_SEQ + 1,)]
                       if frames_committed(live) >= 149 else False)
            commits = 'pipeline_events_total{kind="#commit",result="committed"}'
            wait_until(lambda: scrape(port).get(commits) == 148)  # figures come each second
            metrics = scrape(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert relay.cursors[:3] == [None, FIRST_SEQ + 59, FIRST_SEQ + 99]
        assert relay.sent[:3] == [60, 40, 50]
        assert "committed         150" in out and "dead-lettered     0" in out, out
        source = f"firehose:{relay.url}/xrpc/com.atproto.sync.subscribeRepos"
        assert metrics[f'pipeline_cursor{{source="{source}"}}'] == LAST_SEQ + 1
        # the recorded frames are from 2026-07-04: the lag is their age
        assert metrics[f'pipeline_cursor_lag_seconds{{source="{source}"}}'] > 86_400
        status = json.loads(run_pipeline("status", "--dsn", live, "--json").stdout)
        cursor = next(c for c in status["cursors"] if c["name"] == source)
        assert cursor["kind"] == "firehose" and cursor["lag_seconds"] > 86_400
        # `pipeline record` from before the first seq: the relay says the cursor is outdated
        rec = run_pipeline("record", "--firehose", relay.url, "--out", str(recorded),
                           "--events", "150", "--cursor", str(FIRST_SEQ - 100))
        assert rec.returncode == 0, rec.stderr
        assert "recorded 150 frames" in rec.stdout and "OutdatedCursor" in rec.stderr
        for dsn, path in ((replayed, recorded), (reference, FRAMES)):
            result = run_pipeline("run", "--replay", str(path), "--dsn", dsn,
                                  *identity_args(*net))
            assert result.returncode == 0, result.stderr
        assert digest(live) == digest(replayed) == digest(reference)
