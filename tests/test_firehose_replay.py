"""Firehose recordings replayed end to end: the same rows as Jetstream, verified, idempotent."""
from __future__ import annotations

import json
import uuid

from tests.conftest import DATA, database, digest, fake_network, identity_args, query, run_pipeline

CORPUS = DATA / "expected_v1.jsonl"
FRAMES = DATA / "frames.bin.zst"
DOCS = json.loads((DATA / "did_docs.json").read_text())


def replay(dsn: str, net: tuple, path: object, *extra: str):
    result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net),
                          *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_frames_give_the_rows_of_their_jetstream_lines(server_dsn: str) -> None:
    with database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as js, \
            database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as fh, fake_network(DOCS) as net:
        replay(js, net, CORPUS)
        first = replay(fh, net, FRAMES)
        assert "events read       150" in first.stdout, first.stdout
        assert "committed         150" in first.stdout
        assert "dead-lettered     0" in first.stdout
        assert digest(fh) == digest(js)
        assert query(fh, "SELECT count(*) FROM repo_revs")[0][0] == 148
        again = replay(fh, net, FRAMES, "--from-start")
        assert "stale rev: 148" in again.stdout, again.stdout
        assert digest(fh) == digest(js)
