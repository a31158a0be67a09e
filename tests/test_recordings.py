"""Recordings on disk: compression and format told apart by content, frames read back at their
byte offsets, a replay resumed part-way, and `pipeline record` of a Jetstream."""
from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import pytest
import zstandard

from pipeline.sources.recording import RecordingSource
from pipeline.sources.streams import sniff
from tests.conftest import DATA, database, digest, fake_network, identity_args, run_pipeline
from tests.firehose_corpus import frames as corpus_frames
from tools.fake_jetstream import FakeJetstream

CORPUS = DATA / "expected_v1.jsonl"
DOCS = json.loads((DATA / "did_docs.json").read_text())
COMPRESS = {"plain": lambda b: b, "gzip": gzip.compress,
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}


def framed(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in frames)


@pytest.mark.parametrize("kind", COMPRESS)
def test_compression_and_format_are_told_by_content(kind: str, tmp_path: Path) -> None:
    lines, frames = tmp_path / "events", tmp_path / "frames"
    lines.write_bytes(COMPRESS[kind](CORPUS.read_bytes()))
    frames.write_bytes(COMPRESS[kind](framed(list(corpus_frames()))))
    assert sniff(str(lines)) == (kind, "jetstream")
    assert sniff(str(frames)) == (kind, "firehose")


@pytest.mark.parametrize("kind", COMPRESS)
def test_frames_come_back_at_their_offsets_and_resume_part_way(kind: str, tmp_path: Path) -> None:
    frames = list(corpus_frames())
    path = tmp_path / "frames"
    path.write_bytes(COMPRESS[kind](framed(frames)))
    got = list(RecordingSource(str(path)).events(None))
    assert [raw for _, raw in got] == frames
    offsets = [sum(4 + len(f) for f in frames[:i]) for i in range(len(frames))]
    assert [pos for pos, _ in got] == offsets
    source = RecordingSource(str(path))
    assert [raw for _, raw in source.events(offsets[100])] == frames[100:]
    assert source.next_position == offsets[-1] + 4 + len(frames[-1])


def test_repeated_seqs_are_skipped(tmp_path: Path) -> None:
    frames = list(corpus_frames())
    path = tmp_path / "frames"
    path.write_bytes(framed([*frames[:10], *frames[5:12]]))
    source = RecordingSource(str(path))
    assert [raw for _, raw in source.events(None)] == frames[:12]
    assert source.skipped == 5


def test_a_recorded_jetstream_replays_like_its_source(server_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl.zst"
    with FakeJetstream(CORPUS) as js:
        rec = run_pipeline("record", "--jetstream", js.url, "--out", str(out), "--events", "152")
    assert rec.returncode == 0, rec.stderr
    assert "recorded 152 events" in rec.stdout
    assert sniff(str(out)) == ("zstd", "jetstream")
    with database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as recorded, \
            database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as original, \
            fake_network(DOCS) as net:
        for dsn, path in ((recorded, out), (original, CORPUS)):
            result = run_pipeline("run", "--replay", str(path), "--dsn", dsn,
                                  *identity_args(*net))
            assert result.returncode == 0, result.stderr
            assert "committed         152" in result.stdout
        assert digest(recorded) == digest(original)
