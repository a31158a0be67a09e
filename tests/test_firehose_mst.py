"""The repository tree against the atproto commit-proof vectors (tests/data/firehose, CC0)."""
from __future__ import annotations

import orjson
import pytest

from shards.firehose import mst
from shards.firehose.datamodel import cid_bytes, cid_for, cid_str
from shards.firehose.errors import VerificationError
from tests.firehose_corpus import DATA

PROOFS = orjson.loads((DATA / "firehose" / "commit-proof-fixtures.json").read_bytes())


def trees(fixture: dict) -> tuple[bytes, dict, bytes, dict, bytes]:
    leaf = cid_bytes(fixture["leafValue"])
    before = {k.encode(): leaf for k in fixture["keys"]}
    after = {**before, **{k.encode(): leaf for k in fixture["adds"]}}
    for k in fixture["dels"]:
        del after[k.encode()]
    return (*mst.build(before), *mst.build(after), leaf)


@pytest.mark.parametrize("fixture", PROOFS, ids=lambda f: f["comment"])
def test_commit_proofs(fixture: dict) -> None:
    root_before, _, root_after, nodes_after, leaf = trees(fixture)
    assert cid_str(root_before) == fixture["rootBeforeCommit"]
    assert cid_str(root_after) == fixture["rootAfterCommit"]
    # what a relay sends: only the nodes of the proof (those of the new tree)
    proof = {cid: nodes_after[cid] for cid in map(cid_bytes, fixture["blocksInProof"])
             if cid in nodes_after}
    assert proof
    for key in fixture["adds"]:
        assert mst.get(proof, root_after, key.encode()) == leaf
    for key in fixture["dels"]:
        assert mst.get(proof, root_after, key.encode()) is None
    keys = sorted((set(fixture["keys"]) | set(fixture["adds"])) - set(fixture["dels"]))
    assert [k.decode() for k, _ in mst.walk(nodes_after, root_after)] == keys
    with pytest.raises(VerificationError, match="^tree: a tree node on the path is missing"):
        mst.get({}, root_after, fixture["adds"][0].encode())


def test_heights_follow_leading_zero_bit_pairs() -> None:
    # values given in the atproto repository spec
    assert [mst.height(k.encode()) for k in (
        "2653ae71", "blue", "app.bsky.feed.post/454397e440ec", "app.bsky.feed.post/9adeb165882c",
    )] == [0, 1, 4, 8]


def test_the_empty_tree() -> None:
    root, nodes = mst.build({})
    assert cid_str(root) == "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    assert list(mst.walk(nodes, root)) == [] and mst.get(nodes, root, b"a/b") is None


def relinked(root: bytes, nodes: dict, change: object) -> tuple[bytes, dict]:
    """The root node changed by `change(node)`, stored under its new CID."""
    node = {**nodes[root], "e": [dict(e) for e in nodes[root]["e"]]}
    change(node)
    new = cid_for(node)
    return new, {**nodes, new: node}


def a_tree() -> tuple[bytes, dict]:
    leaf = cid_bytes("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")
    return mst.build({f"app.bsky.feed.like/{i:05d}".encode(): leaf for i in range(200)})


def test_a_well_formed_tree_walks_in_order() -> None:
    root, nodes = a_tree()
    # the root holds one key, of layer 3, between two subtrees
    assert [e["k"] for e in nodes[root]["e"]] == [b"app.bsky.feed.like/00127"]
    assert mst.height(b"app.bsky.feed.like/00127") == 3 != mst.height(b"app.bsky.feed.like/00999")
    keys = [k for k, _ in mst.walk(nodes, root)]
    assert keys == sorted(keys) and len(keys) == 200 and len(nodes) > 10


def swap_subtrees(node: dict) -> None:
    node["l"], node["e"][0]["t"] = node["e"][0]["t"], node["l"]


@pytest.mark.parametrize(("change", "detail"), [
    (swap_subtrees, "tree keys out of order"),
    (lambda n: n["e"].append({**n["e"][-1], "t": None, "p": 24, "k": b""}),
     "tree keys out of order"),  # the same key twice
    (lambda n: n["e"].append({**n["e"][-1], "t": None, "p": 21, "k": b"999"}),
     "a tree key on the wrong layer"),
    (lambda n: n["e"][0].update(p=99), "malformed tree node"),
    (lambda n: n["e"][0].pop("v"), "malformed tree node"),
    (lambda n: n.update(l="not a link"), "malformed tree node"),
])
def test_malformed_trees_are_refused(change: object, detail: str) -> None:
    root, nodes = relinked(*a_tree(), change)
    with pytest.raises(VerificationError) as err:
        list(mst.walk(nodes, root))
    assert (err.value.check, err.value.detail) == ("tree", detail)


def test_a_missing_subtree_is_refused() -> None:
    root, nodes = a_tree()
    nodes = {cid: node for cid, node in nodes.items() if cid == root}
    with pytest.raises(VerificationError, match="missing from the CAR"):
        list(mst.walk(nodes, root))
