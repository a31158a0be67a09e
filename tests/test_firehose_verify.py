"""Commits and repositories verified: real relay frames, indigo's commits and relay scenarios,
and forgeries refused one check at a time."""
from __future__ import annotations

import dataclasses
from typing import Any

import libipld
import orjson
import pytest

from shards.firehose.car import encode_car
from shards.firehose.datamodel import cid_bytes, cid_for, from_json
from shards.firehose.errors import VerificationError
from shards.firehose.frames import BadFrame, parse_frame
from shards.firehose.keys import SigningKey, signing_key
from shards.firehose.verify import (
    Commit,
    read_commit,
    read_repo,
    read_sync,
    verify_ops,
    verify_signature,
)
from tests.firehose_corpus import (
    CORPUS,
    DATA,
    REPO_DID,
    did_docs,
    frames,
    jetstream_events,
    manifest,
    recovered_keys,
)


def commit_bodies() -> list[dict[str, Any]]:
    return [f.body for f in map(parse_frame, frames()) if f.kind == "#commit"]


def verified(body: dict[str, Any], key: SigningKey | None = None) -> Commit:
    commit = read_commit(body)
    verify_signature(commit, key or signing_key(did_docs()[commit.did]))
    verify_ops(commit)
    return commit


def test_every_recorded_commit_verifies() -> None:
    commits = [verified(body) for body in commit_bodies()]
    m = manifest()
    assert len(commits) == m["commit_frames"] == 148
    actions = [op.action for c in commits for op in c.ops]
    assert (actions.count("create"), actions.count("update"), actions.count("delete")) == (
        m["creates"], m["updates"], m["deletes"])
    assert all(c.rev > (c.since or "") and not c.too_big for c in commits)


def jetstream_order(value: Any) -> Any:
    """Jetstream's JSON key order: sorted (Go's encoding of maps), except a blob, which it
    writes in the field order of its Go struct."""
    if isinstance(value, dict):
        if value.get("$type") == "blob" and "ref" in value:
            order = ["$type", "ref", "mimeType", "size"]
            return {k: jetstream_order(value[k]) for k in order + sorted(set(value) - set(order))}
        return {k: jetstream_order(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [jetstream_order(v) for v in value]
    return value


def as_jetstream_writes(value: Any) -> bytes:
    """orjson's bytes with Jetstream's two habits: its key order, and Go's escapes of & < >
    and U+2028/U+2029 inside strings."""
    out = orjson.dumps(jetstream_order(value))
    for char, escape in ((b"&", b"\\u0026"), (b"<", b"\\u003c"), (b">", b"\\u003e"),
                         ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029")):
        out = out.replace(char, escape)
    return out


def test_records_are_what_jetstream_served_for_the_same_events() -> None:
    served = {}
    for line in (CORPUS / "expected_v1.jsonl").read_bytes().splitlines():
        event = orjson.loads(line)
        if event["kind"] == "commit":
            c = event["commit"]
            served[(event["did"], c["rev"], c["collection"], c["rkey"], c["operation"])] = (c, line)
    assert len(served) == 150 and len(jetstream_events()) == 152
    for body in commit_bodies():
        commit = read_commit(body)
        for op in commit.ops:
            expected, line = served.pop((commit.did, commit.rev, op.collection, op.rkey,
                                         op.action))
            assert (op.cid, op.record) == (expected.get("cid"), expected.get("record"))
            if op.record is not None:
                # byte for byte what Jetstream wrote, but for its key order and escapes (the
                # jsonb columns keep neither)
                assert b'"record":' + as_jetstream_writes(op.record) + b',"cid":' in line
    assert served == {}


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "indigo-commits").glob("*.json")))
def test_indigo_recorded_commits(name: str) -> None:
    body = from_json(orjson.loads((DATA / "indigo-commits" / name).read_bytes()))
    commit = read_commit(body)
    verify_ops(commit)
    # no DID documents come with them: one of the keys their signature recovers to signs them
    car = encode_car([body["commit"]], [(body["commit"], libipld.encode_dag_cbor(
        commit._signed))])
    assert any(key.verify(libipld.encode_dag_cbor(
        {k: v for k, v in commit._signed.items() if k != "sig"}), commit._signed["sig"])
        for key in recovered_keys(car))
    assert commit.ops and all(op.record["$type"] == op.collection for op in commit.ops)


def scenario_messages() -> list[tuple[str, dict[str, Any], SigningKey]]:
    out = []
    for path in sorted((DATA / "relay-scenarios").glob("*.json")):
        scenario = orjson.loads(path.read_bytes())
        keys = {}
        for account in scenario["accounts"]:
            did, key = account["identity"]["did"], account["identity"]["keys"]["atproto"]
            keys[did] = signing_key({"id": did, "verificationMethod": [{"id": "#atproto", **key}]})
        for m in scenario["messages"]:
            kind, body = m["frame"]["header"]["t"], from_json(m["frame"]["body"])
            if kind in ("#commit", "#sync") and not m["drop"]:
                out.append((kind, body, keys[body.get("repo", body.get("did"))]))
    return out


def test_relay_scenarios_commits_and_syncs_that_a_relay_keeps_verify() -> None:
    messages = scenario_messages()
    assert len(messages) == 22
    for kind, body, key in messages:
        if kind == "#sync":
            sync = read_sync(body)
            verify_signature(sync, key)
            assert sync.ops == [] and sync.rev == body["rev"]
        else:
            verified(body, key)


# --- forgeries: each refused by the check it breaks ---------------------------------------

def first_create() -> dict[str, Any]:
    return next(b for b in commit_bodies() if b["ops"][0]["action"] == "create"
                and b["ops"][0]["path"].startswith("app.bsky.feed.like/"))


def blocks_of(body: dict[str, Any]) -> dict[bytes, bytes]:
    _, blocks = libipld.decode_car(body["blocks"])
    return {cid: libipld.encode_dag_cbor(value) for cid, value in blocks.items()}


def with_blocks(body: dict[str, Any], blocks: dict[bytes, bytes], **changes: Any) -> dict[str, Any]:
    return {**body, "blocks": encode_car([changes.get("commit", body["commit"])],
                                         blocks.items()), **changes}


def refused(body: dict[str, Any], key: SigningKey | None = None) -> VerificationError:
    with pytest.raises(VerificationError) as err:
        verified(body, key)
    return err.value


def test_the_forgery_helpers_change_nothing_by_themselves() -> None:
    body = first_create()
    assert verified(with_blocks(body, blocks_of(body))).ops == verified(body).ops


def test_a_flipped_signature_byte_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    signed = libipld.decode_dag_cbor(blocks.pop(body["commit"]))
    signed["sig"] = bytes([signed["sig"][0] ^ 1]) + signed["sig"][1:]
    forged = cid_for(signed)  # the frame's commit CID is not signed: a relay can change it
    blocks[forged] = libipld.encode_dag_cbor(signed)
    err = refused(with_blocks(body, blocks, commit=forged))
    assert (err.check, str(err)) == ("signature",
                                     "signature: does not verify with the #atproto key")


def test_a_record_whose_bytes_no_longer_hash_to_its_cid_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    cid = body["ops"][0]["cid"]
    blocks[cid] = blocks[cid].replace(b"2026-07-04T", b"2026-07-05T")
    assert libipld.decode_dag_cbor(blocks[cid])["createdAt"].startswith("2026-07-05T")
    err = refused(with_blocks(body, blocks))
    assert err.check == "record hash" and "does not hash to its CID" in err.detail


def test_a_record_swapped_with_its_cid_but_not_in_the_signed_tree_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    record = libipld.decode_dag_cbor(blocks.pop(body["ops"][0]["cid"]))
    record["subject"]["uri"] = "at://did:plc:someoneelse/app.bsky.feed.post/3mpsjbtci2c2o"
    swapped = cid_for(record)
    blocks[swapped] = libipld.encode_dag_cbor(record)
    forged = with_blocks(body, blocks, ops=[{**body["ops"][0], "cid": swapped}])
    commit = read_commit(forged)  # every block hashes to its CID, the signature holds
    verify_signature(commit, signing_key(did_docs()[commit.did]))
    assert commit.ops[0].record["subject"]["uri"].startswith("at://did:plc:someoneelse/")
    err = refused(forged)
    assert (err.check, err.detail) == ("tree", f"{body['ops'][0]['path']} does not lead to its "
                                               "CID in the signed tree")


def test_an_honest_commit_checked_against_another_accounts_key_is_refused() -> None:
    body = first_create()
    other = next(doc for did, doc in did_docs().items() if did != body["repo"])
    err = refused(body, signing_key(other))
    assert err.check == "signature"


def test_a_commit_relabelled_for_another_repo_is_refused() -> None:
    body = first_create()
    err = refused({**body, "repo": "did:plc:2a7ygipkrbh544aqhcav53oy"})
    assert (err.check, err.detail) == ("repo", f"the commit is signed for {body['repo']}")
    assert refused({**body, "rev": "3mptbypluud2b"}).check == "repo"


def test_a_commit_block_that_is_not_the_frames_commit_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    blocks[body["commit"]] = blocks[body["commit"]].replace(b"3mptb", b"3mptc")
    assert refused(with_blocks(body, blocks)).check == "commit hash"
    del blocks[body["commit"]]
    assert refused(with_blocks(body, blocks)).check == "commit hash"


def test_a_tree_node_that_does_not_hash_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    node = next(cid for cid, data in blocks.items() if data.startswith(b"\xa2ae"))
    blocks[node] = blocks[node].replace(b"app.bsky", b"app.bskz", 1)
    assert refused(with_blocks(body, blocks)).check == "tree"


def test_a_delete_of_a_record_still_in_the_tree_is_refused() -> None:
    body = first_create()
    op = body["ops"][0]
    err = refused({**body, "ops": [{"action": "delete", "path": op["path"], "cid": None}]})
    assert (err.check, err.detail) == ("tree", f"{op['path']} is still in the tree")


def test_a_create_whose_record_or_path_is_missing_is_refused() -> None:
    body = first_create()
    blocks = blocks_of(body)
    del blocks[body["ops"][0]["cid"]]
    assert refused(with_blocks(body, blocks)).check == "record hash"
    blocks = blocks_of(body)
    path_nodes = [cid for cid, data in blocks.items() if data.startswith(b"\xa2ae")]
    for cid in path_nodes:
        del blocks[cid]
    err = refused(with_blocks(body, blocks))
    assert (err.check, err.detail) == ("tree", "a tree node on the path is missing from the CAR")


@pytest.mark.parametrize(("ops", "reason"), [
    ([{"action": "move", "path": "app.bsky.feed.like/3k", "cid": None}],
     "commit op with missing or unknown action"),
    ([{"action": "create", "path": "app.bsky.feed.like", "cid": None}],
     "commit op with missing or invalid path"),
    ([{"action": "create", "path": "app.bsky.feed.like/3k"}], "commit create without a cid"),
    (["x"], "commit op with missing or unknown action"),
])
def test_malformed_ops_are_bad_frames(ops: list[Any], reason: str) -> None:
    with pytest.raises(BadFrame, match=f"^{reason}$"):
        read_commit({**first_create(), "ops": ops})


def test_a_record_nested_too_deep_for_python_is_a_bad_frame() -> None:
    body = first_create()
    blocks = blocks_of(body)
    deep: Any = "x"
    for _ in range(900):  # within what libipld decodes, beyond what converts without recursing
        deep = [deep]
    record = {"$type": "app.bsky.feed.like", "x": deep}
    blocks[cid_for(record)] = libipld.encode_dag_cbor(record)
    with pytest.raises(BadFrame, match="^record nested too deep$"):
        read_commit(with_blocks(body, blocks, ops=[{**body["ops"][0], "cid": cid_for(record)}]))


def test_a_car_that_is_not_one_is_refused() -> None:
    err = refused({**first_create(), "blocks": b"\x0a not a car"})
    assert err.check == "car"


def test_a_too_big_commit_is_returned_unread() -> None:
    body = {**first_create(), "tooBig": True, "blocks": b"", "ops": []}
    commit = read_commit(body)
    assert (commit.too_big, commit.ops, commit.did) == (True, [], body["repo"])
    with pytest.raises(VerificationError):
        verify_signature(commit, signing_key(did_docs()[commit.did]))


# --- whole repositories ------------------------------------------------------------------

def repo_car() -> bytes:
    return (CORPUS / "repo.car").read_bytes()


def goat_listing() -> list[tuple[str, str]]:
    lines = (CORPUS / "car_expected_records.tsv").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines]


def test_a_repository_matches_goats_listing_with_either_recovered_key() -> None:
    expected = (CORPUS / "car_expected_commit.txt").read_text()
    for key in recovered_keys(repo_car()):
        repo = read_repo(repo_car(), REPO_DID, key)
        assert [(f"{c}/{k}", cid) for c, k, cid, _ in repo.records] == goat_listing()
        assert f"DID: {repo.did}\n" in expected and f"Data CID: {repo.data_cid}\n" in expected
        assert f"Revision: {repo.rev}\n" in expected
        assert repo.commit_cid.startswith("bafyrei")
    profile = repo.records[0]
    assert profile[:2] == ("app.bsky.actor.profile", "self")
    assert profile[3]["avatar"]["ref"] == {
        "$link": "bafkreibpjlal3phb4p7di3xyhmffvrazdnnw56cl4iqk74x637crmyyaxe"}
    assert all(record["$type"] == collection for collection, _, _, record in repo.records)


def test_a_repository_read_for_some_collections() -> None:
    key = recovered_keys(repo_car())[0]
    repo = read_repo(repo_car(), REPO_DID, key, {"app.bsky.feed.like"})
    expected = [(p, c) for p, c in goat_listing() if p.startswith("app.bsky.feed.like/")]
    assert [(f"{c}/{k}", cid) for c, k, cid, _ in repo.records] == expected and expected


def test_a_forged_repository_is_refused_whole() -> None:
    header, blocks = libipld.decode_car(repo_car())
    encoded = {cid: libipld.encode_dag_cbor(v) for cid, v in blocks.items()}
    key = recovered_keys(repo_car())[0]
    assert read_repo(encode_car(header["roots"], encoded.items()), REPO_DID, key).records
    profile = cid_bytes(goat_listing()[0][1])
    encoded[profile] = encoded[profile].replace(b"handle with spaces", b"handle with spices")
    with pytest.raises(VerificationError) as err:
        read_repo(encode_car(header["roots"], encoded.items()), REPO_DID, key)
    assert err.value.check == "record hash"


def test_a_repository_missing_a_record_or_with_a_tree_node_changed_is_refused() -> None:
    header, blocks = libipld.decode_car(repo_car())
    encoded = {cid: libipld.encode_dag_cbor(v) for cid, v in blocks.items()}
    key = recovered_keys(repo_car())[0]
    without = {cid: data for cid, data in encoded.items()
               if cid != cid_bytes(goat_listing()[5][1])}
    with pytest.raises(VerificationError) as err:
        read_repo(encode_car(header["roots"], without.items()), REPO_DID, key)
    assert (err.value.check, err.value.detail) == (
        "record hash", f"the record of {goat_listing()[5][0]} is missing from the CAR")
    # a record left out of the collections read may be missing: it is not written
    read_repo(encode_car(header["roots"], without.items()), REPO_DID, key,
              {"app.bsky.actor.profile"})
    node = next(cid for cid, data in encoded.items()
                if data.startswith(b"\xa2ae") and b"app.bsky.feed.like/" in data)
    encoded[node] = encoded[node].replace(b"app.bsky.feed.like/", b"app.bsky.feed.lik3/", 1)
    with pytest.raises(VerificationError, match="^tree: "):
        read_repo(encode_car(header["roots"], encoded.items()), REPO_DID, key)


def test_a_repository_of_another_did_or_key_is_refused() -> None:
    key = recovered_keys(repo_car())[0]
    with pytest.raises(VerificationError, match="^repo: "):
        read_repo(repo_car(), "did:plc:2a7ygipkrbh544aqhcav53oy", key)
    other = signing_key(next(iter(did_docs().values())))
    with pytest.raises(VerificationError, match="^signature: "):
        read_repo(repo_car(), REPO_DID, other)
    with pytest.raises(VerificationError, match="^car: "):
        read_repo(repo_car()[:-10], REPO_DID, key)


def test_commit_and_repo_are_plain_values() -> None:
    commit = verified(first_create())
    assert dataclasses.asdict(commit.ops[0]).keys() >= {"action", "collection", "rkey", "cid",
                                                        "record"}
    assert "_blocks" not in repr(commit)
