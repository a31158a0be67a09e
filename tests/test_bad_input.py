"""Bad lines land in dead_letters with a reason, exactly once, and never stop the run."""
from __future__ import annotations

import json
from pathlib import Path

import orjson

from tests.conftest import DATA, fake_network, identity_args, query, run_pipeline

GOOD_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


def like(rkey: str, **commit: object) -> dict:
    return {"did": GOOD_DID, "time_us": 1, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2b", "operation": "create", "collection": "app.bsky.feed.like",
        "rkey": rkey, "cid": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a",
        "record": {"$type": "app.bsky.feed.like", "createdAt": "2024-09-09T19:46:02.102Z",
                   "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}},
        **commit}}


BAD: list[tuple[bytes, str]] = [
    (b'{"did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "kind": ', "invalid JSON"),
    (b'{"did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "x": "\xff\xfe"}', "not UTF-8"),
    (b'["a list", 1]', "not a JSON object"),
    (b'{"kind": "commit"}', "missing or invalid did"),
    (b'{"did": "not a did", "kind": "commit"}', "missing or invalid did"),
    (orjson.dumps({"did": GOOD_DID, "kind": "sync"}), "unknown kind"),
    (orjson.dumps({"did": GOOD_DID, "kind": "commit", "commit": {"operation": "create"}}),
     "commit with missing or invalid collection"),
    (orjson.dumps(like("3l3qo2vutsw23", collection=["app.bsky.feed.like"])),
     "commit with missing or invalid collection"),
    (orjson.dumps(like("3l3qo2vutsw20", cid=None)), "commit missing cid"),
    (orjson.dumps(like("3l3qo2vutsw21", record="just text")), "record is not an object"),
    (orjson.dumps(like("3l3qo2vutsw22", record={"text": "a\u0000b"})), "NUL character in text"),
    (b'{"did":"' + GOOD_DID.encode() + b'","pad":"' + b"x" * (1 << 20) + b'"}', "line over 1 MiB"),
]


def test_every_kind_of_bad_line_is_dead_lettered_once(dsn: str, tmp_path: Path) -> None:
    docs = {GOOD_DID: json.loads((DATA / "identity" / "did_plc_doc.json").read_text())}
    good = [orjson.dumps(like(f"3l3qo2vutsx{i:02d}")) for i in range(len(BAD) + 1)]
    lines: list[bytes] = []
    for i, (bad, _reason) in enumerate(BAD):
        lines += [good[i], bad]
    lines.append(good[-1])
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with fake_network(docs) as net:
        for _ in range(2):  # a second full replay adds no duplicate dead letters
            result = run_pipeline("run", "--replay", str(path), "--dsn", dsn, *identity_args(*net),
                                  "--from-start", "--batch-size", "4")
            assert result.returncode == 0, result.stderr
            assert f"committed         {len(good)}" in result.stdout
            assert f"dead-lettered     {len(BAD)}" in result.stdout
    assert query(dsn, "SELECT count(*) FROM likes") == [(len(good),)]
    rows = query(dsn, "SELECT position, error FROM dead_letters ORDER BY position")
    assert len(rows) == len(BAD)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    bad_offsets = [offsets[2 * i + 1] for i in range(len(BAD))]
    assert [r[0] for r in rows] == bad_offsets
    for (position, error), (_bad, reason) in zip(rows, BAD):
        assert error.startswith(reason), (position, error, reason)
