"""Firehose recordings replayed end to end: the same rows as Jetstream, verified, idempotent."""
from __future__ import annotations

import json
import uuid

import libipld

from tests.firehose_corpus import frames as corpus_frames
from tests.conftest import DATA, database, digest, fake_network, identity_args, query, run_pipeline
from tests.test_redis import procs, rds  # noqa: F401 -- fixtures

CORPUS = DATA / "expected_v1.jsonl"
FRAMES = DATA / "jetstream" / "frames.bin.zst"
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


def test_jetstream_commits_keep_to_the_revs_the_firehose_applied(dsn: str) -> None:
    """One rule for both formats: a Jetstream commit whose rev is not newer than the one its
    repository has in repo_revs is skipped, each operation of a multi-operation commit alike."""
    with fake_network(DOCS) as net:
        replay(dsn, net, FRAMES)
        before = digest(dsn)
        lines = replay(dsn, net, CORPUS)
    assert "committed         152" in lines.stdout, lines.stdout  # acknowledged, not written
    assert "stale rev: 150" in lines.stdout
    assert digest(dsn) == before


def _rebuild(header: dict, body: dict, root: bytes, blocks: dict[bytes, object],
             raw_blocks: dict[bytes, bytes] | None = None) -> bytes:
    """The frame again, with its CAR made of `blocks` (and of `raw_blocks` as they are)."""
    from tools.signed_frames import encode_car

    encoded = {cid: libipld.encode_dag_cbor(v) for cid, v in blocks.items()}
    encoded.update(raw_blocks or {})
    body = {**body, "blocks": encode_car(root, encoded), "commit": root}
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def forge(raw: bytes, how: str) -> bytes:
    """A real commit altered so that exactly one check fails."""
    from shards.firehose.datamodel import cid_for

    header, body = libipld.decode_dag_cbor_multi(raw)
    _, blocks = libipld.decode_car(body["blocks"])
    root = body["commit"]
    record_cid = body["ops"][0]["cid"]
    record = dict(blocks[record_cid])
    record["createdAt"] = "2001-01-01T00:00:00.000Z"
    if how == "signature":  # one flipped byte of the signature; the commit's CID follows it
        commit = dict(blocks.pop(root))
        commit["sig"] = bytes([commit["sig"][0] ^ 1]) + commit["sig"][1:]
        root = cid_for(commit)
        blocks[root] = commit
    elif how == "record hash":  # the record's bytes change under the same CID
        del blocks[record_cid]
        return _rebuild(header, body, root, blocks,
                        {record_cid: libipld.encode_dag_cbor(record)})
    elif how == "tree":  # record and CID swapped in the op and the CAR, not in the signed tree
        del blocks[record_cid]
        blocks[cid_for(record)] = record
        body["ops"] = [{**body["ops"][0], "cid": cid_for(record)}]
    return _rebuild(header, body, root, blocks)


def test_forged_commits_are_refused_and_the_rest_commits(dsn: str, tmp_path) -> None:
    from tools.signed_frames import multibase, private_key, recording

    frames = list(corpus_frames())
    creates = [i for i, f in enumerate(frames)
               if (b := libipld.decode_dag_cbor_multi(f)[1]).get("ops")
               and b["ops"][0]["action"] == "create"]
    forged = {creates[3]: "signature", creates[10]: "record hash", creates[20]: "tree"}
    for i, how in forged.items():
        frames[i] = forge(frames[i], how)
    honest = libipld.decode_dag_cbor_multi(frames[creates[30]])[1]["repo"]
    docs = json.loads(json.dumps(DOCS))
    for method in docs[honest]["verificationMethod"]:  # a document that names another key
        method["publicKeyMultibase"] = multibase(private_key("not the author's"))
    path = tmp_path / "forged.bin.zst"
    path.write_bytes(recording(frames))
    with fake_network(docs) as net:
        result = replay(dsn, net, path)
        assert net[0].requests_for(honest) == 2  # the key was fetched again before refusing
    assert "committed         146" in result.stdout, result.stdout
    assert "verification      failed record hash: 1, signature: 2, tree: 1" in result.stdout, \
        result.stdout
    errors = sorted(e.split(":")[0] for (e,) in query(dsn, "SELECT error FROM dead_letters"))
    assert errors == ["record hash", "signature", "signature", "tree"]
    for i in (*forged, creates[30]):
        body = libipld.decode_dag_cbor_multi(frames[i])[1]
        uri = f"at://{body['repo']}/{body['ops'][0]['path']}"
        assert query(dsn, "SELECT count(*) FROM (SELECT uri FROM likes UNION ALL SELECT uri"
                          " FROM posts UNION ALL SELECT uri FROM reposts UNION ALL SELECT uri"
                          " FROM follows UNION ALL SELECT uri FROM records) t WHERE uri = %s",
                     (uri,))[0][0] == 0


def test_frames_over_redis_give_the_local_tables(server_dsn: str, rds, procs) -> None:
    from tests.test_redis import REDIS_URL, start_worker, stop_worker

    with database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as local, \
            database(server_dsn, f"t_{uuid.uuid4().hex[:12]}") as remote, \
            fake_network(DOCS) as net:
        replay(local, net, FRAMES, "--shards", "2")
        workers = [start_worker(procs, remote, net, k, 2) for k in range(2)]
        result = replay(remote, net, FRAMES, "--shards", "2", "--transport", REDIS_URL)
        assert "committed         150" in result.stdout, result.stdout
        for w in workers:
            stop_worker(w)
        assert digest(remote) == digest(local)


def test_a_key_that_cannot_be_had_in_time_refuses_the_commit_until_a_retry(dsn: str) -> None:
    from tests.conftest import held

    body = libipld.decode_dag_cbor_multi(corpus_frames()[0])[1]
    did, uri = body["repo"], f"at://{body['repo']}/{body['ops'][0]['path']}"
    with fake_network(DOCS) as net:
        with held(net[0], did):
            first = replay(dsn, net, FRAMES, "--resolve-timeout", "0.5")
        assert "committed         149" in first.stdout, first.stdout
        assert query(dsn, "SELECT error FROM dead_letters") == [("key unavailable",)]
        assert query(dsn, "SELECT count(*) FROM likes WHERE uri = %s", (uri,)) == [(0,)]
        retry = run_pipeline("dead-letters", "--retry", "--dsn", dsn, *identity_args(*net))
        assert retry.returncode == 0, retry.stderr
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM likes WHERE uri = %s", (uri,)) == [(1,)]
    assert query(dsn, "SELECT rev FROM repo_revs WHERE did = %s", (did,)) == [(body["rev"],)]


def test_bad_frames_are_dead_letters_at_their_byte_offset(dsn: str, tmp_path) -> None:
    from tools.signed_frames import frame, recording

    good = list(corpus_frames()[:3])
    bad = [b"\xff\x00 not CBOR", good[1][:200],  # not CBOR; cut short
           frame("#commit", {"repo": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"}),  # no fields
           frame("#newKind", {"note": "a kind this pipeline does not know"})]
    big = libipld.decode_dag_cbor_multi(good[2])[1]  # a commit whose blocks the relay left out
    bad.append(frame("#commit", {**big, "tooBig": True, "blocks": b"", "ops": [],
                                 "seq": big["seq"] - 1}))
    path = tmp_path / "bad.bin.zst"
    path.write_bytes(recording([good[0], *bad, good[2]]))
    offsets, at = [], 0
    for f in [good[0], *bad]:
        offsets.append(at)
        at += 4 + len(f)
    with fake_network(DOCS) as net:
        result = replay(dsn, net, path)
    assert "committed         3" in result.stdout, result.stdout  # two commits, one unknown kind
    assert "kind #newKind: 1" in result.stdout
    letters = query(dsn, "SELECT position, error FROM dead_letters ORDER BY position")
    assert [p for p, _ in letters] == [*offsets[1:4], offsets[5]]
    assert letters[0][1].startswith("not CBOR") and letters[1][1] == "truncated frame"
    assert letters[2][1].startswith("commit missing")
    assert letters[3][1].startswith("tooBig")
