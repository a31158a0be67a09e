"""A user's mistakes get one clear line and a non-zero exit, never a stack trace."""
from __future__ import annotations

import orjson
import pytest

from tests.conftest import DATA, fake_network, identity_args, run_pipeline

CORPUS = str(DATA / "expected_v1.jsonl")


@pytest.mark.parametrize(("args", "code", "words"), [
    (["run", "--replay", "no/such/file.jsonl", "--dsn", "postgresql://unused"], 4, "no such file"),
    (["run", "--replay", CORPUS, "--dsn", "postgresql://nobody@127.0.0.1:1/x"], 3,
     "cannot connect to the database"),
    (["run"], 2, "exactly one of --replay PATH, --jetstream URL or --firehose URL"),
    (["run", "--firehose", "ftp://relay.example", "--dsn", "postgresql://unused"], 4,
     "wss://"),
    (["run", "--replay", "-", "--format", "firehose", "--dsn", "postgresql://unused"], 4,
     "cannot be read from stdin"),
    (["record", "--out", "/tmp/unused.bin.zst"], 2, "exactly one of --firehose URL or"),
    (["run", "--replay", CORPUS, "--jetstream", "ws://127.0.0.1:1/subscribe"], 2, "exactly one"),
    (["run", "--jetstream", "http://example.com/subscribe", "--dsn", "postgresql://unused"], 4,
     "ws"),
    (["run", "--replay", CORPUS, "--shards", "0"], 2, "--shards"),
    (["db", "upgrade", "--dsn", "postgresql://nobody@127.0.0.1:1/x"], 3, "cannot connect"),
])
def test_mistakes_get_one_line(args: list[str], code: int, words: str) -> None:
    result = run_pipeline(*args, timeout=60)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    if code != 2:  # click's own usage errors add a usage line and a hint
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_json_logs_and_unknown_environment_variables(dsn: str) -> None:
    with fake_network({}) as net:
        result = run_pipeline("run", "--replay", CORPUS, "--dsn", dsn, *identity_args(*net),
                              "--log-format", "json", "--resolve-timeout", "1",
                              env={"PIPELINE_SHARDZ": "3"})
    assert result.returncode == 0, result.stderr
    records = [orjson.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(r["message"] == "unknown environment variable PIPELINE_SHARDZ is ignored"
               and r["level"] == "WARNING" for r in records)
    assert all({"time", "level", "logger", "process", "message"} <= r.keys() for r in records)
