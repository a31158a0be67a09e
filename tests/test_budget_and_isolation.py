"""The connection budget holds under load, and a hung resolution delays only its own DID."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import orjson

from tests.conftest import DATA, fake_network, identity_args, query, run_pipeline, start_pipeline
from tools.generate import did_documents, write_replay


def test_budget_caps_connections_during_a_busy_run(dsn: str, server_dsn: str,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "busy.jsonl"
    write_replay(path, 60_000, 3_000, seed=7)
    docs = did_documents(3_000, seed=7)
    samples: list[int] = []
    stop = threading.Event()
    dbname = dsn.rsplit("dbname=", 1)[-1].split()[0]

    def sample() -> None:
        while not stop.is_set():
            samples.append(query(server_dsn, "SELECT count(*) FROM pg_stat_activity"
                                 " WHERE application_name LIKE 'pipeline%%' AND datname = %s",
                                 (dbname,))[0][0])
            stop.wait(0.05)

    with fake_network(docs) as net:
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, "--shards", "16",
                                  "--pool-budget", "20", *identity_args(*net),
                                  "--batch-size", "200")
        finally:
            stop.set()
            sampler.join()
    assert result.returncode == 0, result.stderr
    assert max(samples) > 16  # every shard really was connected while sampling
    assert max(samples) <= 20
    assert query(dsn, "SELECT count(*) FROM users") == [(3_000,)]


def test_more_shards_than_budget_is_refused(dsn: str) -> None:
    result = run_pipeline("run", "--replay", str(DATA / "expected_v1.jsonl"), "--dsn", dsn,
                          "--shards", "64", "--pool-budget", "20")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pool-budget 20" in lines[0] and "64 shards" in lines[0]


def _hung_corpus(tmp_path: Path, first: bool) -> tuple[dict, str, Path]:
    """The corpus' commits of authors with documents, those of one of them (the first or the
    last author in the file, to hang) moved to the front or the end: docs, that DID, the file."""
    docs = json.loads((DATA / "did_docs.json").read_text())
    corpus = [l for l in (DATA / "expected_v1.jsonl").read_bytes().splitlines()
              if orjson.loads(l)["kind"] == "commit" and orjson.loads(l)["did"] in docs]
    hung = orjson.loads(corpus[0 if first else -1])["did"]
    hung_lines = [l for l in corpus if orjson.loads(l)["did"] == hung]
    others = [l for l in corpus if orjson.loads(l)["did"] != hung]
    path = tmp_path / ("hung-first.jsonl" if first else "hung-last.jsonl")
    path.write_bytes(b"\n".join(hung_lines + others if first else others + hung_lines) + b"\n")
    return docs, hung, path


def test_hung_resolution_delays_only_its_own_did(dsn: str, tmp_path: Path) -> None:
    docs, hung, path = _hung_corpus(tmp_path, first=True)
    timeout = 8.0
    with fake_network(docs, hang_dids={hung}) as net:
        started = time.monotonic()
        proc = start_pipeline("run", "--replay", str(path), "--dsn", dsn, "--shards", "2",
                              "--pool-budget", "3", *identity_args(*net),
                              "--resolve-timeout", str(timeout), "--end-wait", str(timeout),
                              "--batch-size", "10")
        seen: list[tuple[float, int, int]] = []  # (seconds since start, others' rows, hung's rows)
        deadline = started + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if _ready(dsn):
                counts = dict(query(dsn, f"SELECT author_did = %s, count(*) FROM ({ALL_ROWS}) t"
                                         " GROUP BY 1", (hung,)))
                seen.append((time.monotonic() - started, counts.get(False, 0), counts.get(True, 0)))
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = dict(query(dsn, f"SELECT author_did = %s, count(*) FROM ({ALL_ROWS}) t GROUP BY 1",
                       (hung,)))
    assert final[True] > 0 and final[False] > 0
    # Counted from the first commit, so that start-up (server, migrations, workers) on a busy
    # machine does not count as waiting on the hung author.
    first_commit = min(t for t, o, h in seen if o + h)
    others_done = min(t for t, o, _ in seen if o == final[False])
    hung_done = min((t for t, _, h in seen if h == final[True]), default=float("inf"))
    assert others_done - first_commit < timeout / 2, (others_done, first_commit, err)
    assert hung_done >= timeout
    assert query(dsn, "SELECT handle, incomplete FROM users WHERE did = %s", (hung,)) == [(hung, True)]


def test_the_end_of_a_replay_waits_for_a_hung_author_only_end_wait_more(dsn: str,
                                                                       tmp_path: Path) -> None:
    docs, hung, path = _hung_corpus(tmp_path, first=False)  # nothing overlaps its wait
    with fake_network(docs, hang_dids={hung}) as net:
        started = time.monotonic()
        result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, "--shards", "2",
                              *identity_args(*net), "--resolve-timeout", "60", "--end-wait", "1")
        took = time.monotonic() - started
        assert net[0].requests_for(hung) == 1
    assert result.returncode == 0, result.stderr
    assert took < 20 < 60, result.stdout  # not the 60 s the hung lookup could have had
    assert "(1 with the DID as fallback handle" in result.stdout
    assert query(dsn, "SELECT handle, incomplete FROM users WHERE did = %s", (hung,)) == [(hung, True)]
    assert query(dsn, "SELECT count(*) FROM users WHERE did <> %s AND incomplete", (hung,)) == [(0,)]


ALL_ROWS = " UNION ALL ".join(f"SELECT author_did FROM {t}" for t in
                              ("posts", "likes", "reposts", "follows", "blocks", "records"))


def _ready(dsn: str) -> bool:
    return bool(query(dsn, "SELECT to_regclass('records') IS NOT NULL")[0][0])
