"""Frames of the relay firehose: the real recording, and every way a frame can be bad."""
from __future__ import annotations

import collections

import libipld
import pytest

from shards.firehose.frames import MAX_FRAME_BYTES, BadFrame, parse_frame, route_key
from tests.firehose_corpus import frames, manifest


def frame(header: object, body: object) -> bytes:
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def test_the_recording_parses_with_contiguous_seqs_and_its_kinds() -> None:
    parsed = [parse_frame(raw) for raw in frames()]
    kinds = collections.Counter(f.kind for f in parsed)
    m = manifest()
    assert kinds == {"#commit": m["commit_frames"], "#identity": m["identity"],
                     "#account": m["account"]}
    assert [f.seq for f in parsed] == list(range(m["seq_first"], m["seq_last"] + 1))
    commits = [f for f in parsed if f.kind == "#commit"]
    assert sorted({f.did for f in commits}) == sorted(m["commit_dids"])
    assert all(f.did == f.body["repo"] and f.time.endswith("Z") for f in commits)
    account = next(f for f in parsed if f.kind == "#account")
    assert account.body["active"] is True and account.did.startswith("did:plc:")


def test_route_key_agrees_with_parse_frame() -> None:
    for raw in frames():
        f = parse_frame(raw)
        assert route_key(raw) == (f.seq, f.did.encode())


def test_kinds_the_pipeline_does_not_apply() -> None:
    info = parse_frame(frame({"op": 1, "t": "#info"}, {"name": "OutdatedCursor"}))
    assert (info.kind, info.seq, info.did, info.body["name"]) == ("#info", None, None,
                                                                "OutdatedCursor")
    error = parse_frame(frame({"op": -1}, {"error": "FutureCursor", "message": "ahead"}))
    assert (error.kind, error.body["error"]) == ("error", "FutureCursor")
    unknown = parse_frame(frame({"op": 1, "t": "#labels"}, {"seq": 7, "labels": []}))
    assert (unknown.kind, unknown.seq, unknown.did) == ("#labels", 7, None)
    sync = parse_frame(frame({"op": 1, "t": "#sync"},
                             {"seq": 9, "did": "did:plc:abc", "time": "2026-01-01T00:00:00Z",
                              "rev": "3lmxrbvasth2t", "blocks": b""}))
    assert (sync.kind, sync.seq, sync.did) == ("#sync", 9, "did:plc:abc")
    assert route_key(frame({"op": 1, "t": "#sync"}, sync.body)) == (9, b"did:plc:abc")


def commit_body() -> dict[str, object]:
    return dict(parse_frame(frames()[0]).body)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty frame"),
    (b"\xff\xfe", "not CBOR: Unsupported major type"),
    (b"\xa2ab", "truncated frame"),
    (libipld.encode_dag_cbor({"op": 1, "t": "#commit"}), "truncated frame"),
    (frame({"op": 1, "t": "#commit"}, {}) + b"\x01", "trailing data after the frame body"),
    (frame([1], {}), "frame header is not a map"),
    (frame({"op": 1, "t": "#commit"}, [1]), "frame body is not a map"),
    (frame({"op": 2, "t": "#commit"}, {}), "unknown frame op 2"),
    (frame({"op": 1}, {}), "frame header missing t"),
    (frame({"op": 1, "t": "#info"}, {}), "info missing name"),
    (frame({"op": 1, "t": "#identity"}, {"did": "did:plc:abc", "time": "t"}),
     "identity missing seq"),
    (frame({"op": 1, "t": "#identity"}, {"seq": 1, "did": "plc:abc", "time": "t"}),
     "identity missing or invalid did"),
    (frame({"op": 1, "t": "#account"}, {"seq": 1, "did": "did:plc:abc", "time": "t"}),
     "account missing active"),
    (frame({"op": 1, "t": "#sync"}, {"seq": 1, "did": "did:plc:abc", "time": "t",
                                     "rev": "3lmxrbvasth2t"}), "sync missing blocks"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_frames_are_refused_with_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadFrame) as err:
        parse_frame(raw)
    assert str(err.value) == reason
    route_key(raw)  # never raises


@pytest.mark.parametrize("field", ["seq", "repo", "time", "rev", "commit", "blocks", "ops"])
def test_a_commit_missing_a_field_is_refused(field: str) -> None:
    body = commit_body()
    del body[field]
    reason = "commit missing or invalid repo" if field == "repo" else f"commit missing {field}"
    with pytest.raises(BadFrame, match=f"^{reason}$"):
        parse_frame(frame({"op": 1, "t": "#commit"}, body))


def test_every_truncation_of_a_real_frame_is_refused_and_routes_to_nothing() -> None:
    raw = frames()[3]
    for cut in range(0, len(raw), 7):
        with pytest.raises(BadFrame, match="^(truncated frame|empty frame)$"):
            parse_frame(raw[:cut])
        assert route_key(raw[:cut]) == (None, b"")


def test_route_key_never_raises() -> None:
    nested = b"\x81" * 100_000 + b"\x01"  # a list in a list ... deeper than the recursion limit
    for raw in (b"", b"\x00", nested, frame({"op": 1, "t": "#commit"}, {"seq": "1", "repo": 5}),
                frame({"op": 1, "t": "#commit"}, []), frame([], {}), bytes(range(256))):
        assert route_key(raw) == (None, b"")
    with pytest.raises(BadFrame, match="^not CBOR"):
        parse_frame(nested)


def test_oversized_frames_are_refused() -> None:
    with pytest.raises(BadFrame, match="^frame over 5 MiB$"):
        parse_frame(b"\x00" * (MAX_FRAME_BYTES + 1))
