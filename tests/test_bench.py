"""The benchmark harness runs end to end on a small replay and reports sane figures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).parent.parent


def test_bench_runs_end_to_end_and_reports_sane_figures(server_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    budget = 20
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--events", "3000", "--dids", "300", "--runs", "1",
         "--shards", "2", "--pool-budget", str(budget), "--dsn", server_dsn,
         "--data", str(tmp_path / "data"), "--json", str(out), "--profiles", "alternate"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("run 1/1 profiles on:", "run 1/1 profiles off:", "median of 1 profiles on:",
                 "median of 1 profiles off:", "of the events/s without (medians; pairs "):
        assert line in proc.stdout, proc.stdout

    report = orjson.loads(out.read_bytes())
    run, off = report["runs"]
    assert (run["fetch_profiles"], off["fetch_profiles"]) == (True, False)
    assert off["pds"] == {} and off["committed"] == 3000
    assert run["events_read"] == 3000
    assert run["committed"] + run["dead_letters"] == 3000
    assert run["events_per_second"] > 0
    assert run["latency_p50_ms"] is not None and run["latency_p50_ms"] >= 0
    assert run["latency_p99_ms"] >= run["latency_p50_ms"]
    assert 1 <= run["max_connections"] <= budget
    assert run["copy_rows"] == 3000 and run["copy_rows_per_second"] > 0
    assert run["ratio"] > 0
    # the schema-shaped COPY takes every row the run wrote: its users and their records
    assert run["schema_copy_rows"] > run["users_created"] > 0
    assert run["schema_ratio"] == run["events_per_second"] / run["schema_copy_rows_per_second"]
    assert run["supervisor_peak_rss_mb"] > 0 and run["max_worker_peak_rss_mb"] > 0
    assert run["workers_seen"] == 2
    assert report["medians"]["profiles on"]["events_per_second"] == run["events_per_second"]
    assert report["medians"]["profiles off"]["events_per_second"] == off["events_per_second"]

    # The generated files are cached, and the runs' databases are gone (others' benchmarks on
    # the same server may have theirs).
    assert (tmp_path / "data" / "events-3000-300-0.jsonl").exists()
    names = [r["database"] for r in report["runs"]]
    assert len(set(names)) == 2 and all(n.startswith("bench_") for n in names)
    with psycopg.connect(server_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (names,))
        assert left.fetchone()[0] == 0


def test_bench_replays_the_same_events_as_verified_frames(server_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--events", "2000", "--dids", "200", "--runs", "1",
         "--shards", "2", "--pool-budget", "20", "--format", "both", "--dsn", server_dsn,
         "--data", str(tmp_path / "data"), "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run 1/1 firehose:" in proc.stdout and "verified firehose" in proc.stdout, proc.stdout
    report = orjson.loads(out.read_bytes())
    jetstream, firehose = report["runs"]
    assert (jetstream["format"], firehose["format"]) == ("jetstream", "firehose")
    assert firehose["events_read"] == 2000 and firehose["dead_letters"] == 0
    assert firehose["committed"] == 2000 and firehose["users_created"] == 200
    assert set(report["medians"]) == {"jetstream", "firehose"}


def test_bench_runs_each_plc_profile_in_turn_and_compares_with_healthy(
        server_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--events", "1000", "--dids", "100", "--runs", "1",
         "--shards", "2", "--pool-budget", "20", "--profile", "healthy", "--profile", "down",
         "--dsn", server_dsn, "--data", str(tmp_path / "data"), "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run 1/1 PLC healthy:" in proc.stdout and "run 1/1 PLC down:" in proc.stdout
    report = orjson.loads(out.read_bytes())
    healthy, down = report["runs"]
    assert (healthy["profile"], down["profile"]) == ("healthy", "down")
    assert healthy["users_fallback"] == 0 and down["users_fallback"] == 100
    share = down["events_per_second"] / healthy["events_per_second"]
    assert f"PLC down {share:.0%} of healthy's events/s (medians; pairs {share:.0%})" in proc.stdout
    assert set(report["medians"]) == {"PLC healthy", "PLC down"}
