"""indigo's relay scenarios (seq and rev ordering, account lifecycle, deactivation, legacy
frames) replayed as recordings: the frames they mark dropped or invalid are refused, the others
applied."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shards.firehose.datamodel import from_json
from tests.conftest import DATA, fake_network, identity_args, query, run_pipeline
from tools.signed_frames import frame, recording

SCENARIOS = sorted((DATA / "relay-scenarios").glob("*.json"))


def did_document(identity: dict) -> dict:
    """A PLC document for a scenario account: its handle, PDS and #atproto key."""
    did = identity["did"]
    return {
        "id": did,
        "alsoKnownAs": identity.get("alsoKnownAs") or [f"at://{identity['handle']}"],
        "verificationMethod": [{
            "id": f"{did}#atproto", "type": "Multikey", "controller": did,
            "publicKeyMultibase": identity["keys"]["atproto"]["publicKeyMultibase"]}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                     "serviceEndpoint": identity["services"]["atproto_pds"]["url"]}],
    }


def refused(stdout: str) -> int:
    """Frames the run skipped or dead-lettered, from its summary."""
    dead = int(re.search(r"dead-lettered\s+(\d+)", stdout).group(1))
    skipped = re.search(r"^skipped\s+(.*)$", stdout, re.M)
    return dead + sum(int(n) for n in re.findall(r": (\d+)", skipped.group(1) if skipped else ""))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, dsn: str, tmp_path: Path) -> None:
    scenario = json.loads(path.read_text())
    frames, applied = [], []
    for message in scenario["messages"]:
        header, body = message["frame"]["header"], from_json(message["frame"]["body"])
        frames.append(frame(header["t"], body))
        if not (message["drop"] or message["invalid"]):
            applied.append((header["t"], body))
    recorded = tmp_path / f"{path.stem}.bin.zst"
    recorded.write_bytes(recording(frames))
    docs = {a["identity"]["did"]: did_document(a["identity"]) for a in scenario["accounts"]}
    with fake_network(docs) as net:
        result = run_pipeline("run", "--replay", str(recorded), "--dsn", dsn,
                              *identity_args(*net))
    assert result.returncode == 0, result.stderr
    assert refused(result.stdout) == len(frames) - len(applied), result.stdout
    # an invalid frame is a dead letter; a dropped one is skipped, or a dead letter when it
    # is also malformed (rev_ordering's rev "3lmxjza3nva00" is no TID)
    assert query(dsn, "SELECT count(*) FROM dead_letters")[0][0] >= sum(
        m["invalid"] for m in scenario["messages"])
    revs = [b["rev"] for t, b in applied if t in ("#commit", "#sync")]
    if revs:
        assert query(dsn, "SELECT did, rev FROM repo_revs") == [
            (scenario["accounts"][0]["identity"]["did"], max(revs))]
    accounts = [b for t, b in applied if t == "#account"]
    if accounts:
        assert query(dsn, "SELECT active, status FROM users") == [
            (accounts[-1]["active"], accounts[-1].get("status"))]
    # every record the applied commits leave is there, and nothing else
    records: dict[str, str | None] = {}
    for t, b in applied:
        for op in b.get("ops") or () if t == "#commit" else ():
            records[f"at://{b['repo']}/{op['path']}"] = None if op["action"] == "delete" else "x"
    expected = sorted(u for u, v in records.items() if v and "actor.profile" not in u)
    stored = sorted(r for (r,) in query(
        dsn, "SELECT uri FROM likes UNION ALL SELECT uri FROM posts UNION ALL SELECT uri"
             " FROM records"))
    assert stored == expected
