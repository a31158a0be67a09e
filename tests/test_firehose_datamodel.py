"""The atproto data model against the interop fixtures (tests/data/data-model, CC0)."""
from __future__ import annotations

import base64

import libipld
import orjson
import pytest

from shards.firehose.datamodel import cid_bytes, cid_for, cid_str, from_json, is_link, to_json
from tests.firehose_corpus import DATA

FIXTURES = orjson.loads((DATA / "data-model" / "data-model-fixtures.json").read_bytes())


def unpadded(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: f["cid"][-8:])
def test_cbor_and_json_are_the_same_value(fixture: dict) -> None:
    cbor = unpadded(fixture["cbor_base64"])
    assert to_json(libipld.decode_dag_cbor(cbor)) == fixture["json"]
    assert libipld.encode_dag_cbor(from_json(fixture["json"])) == cbor
    assert cid_str(cid_for(libipld.decode_dag_cbor(cbor))) == fixture["cid"]


def test_links_bytes_and_blobs_keep_their_shape() -> None:
    value = to_json(libipld.decode_dag_cbor(unpadded(FIXTURES[1]["cbor_base64"])))
    assert value["a"] == {"$link": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"}
    assert value["b"] == {"$bytes": "nFERjvLLiw9qm45JrqH9QTzyC2Lu1Xb4ne6+sBrCzI0"}  # no padding
    assert value["c"]["ref"] == {
        "$link": "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"}
    assert (value["c"]["$type"], value["c"]["size"]) == ("blob", 10000)


def test_bytes_read_as_a_link_only_when_they_are_exactly_one_cid() -> None:
    link = cid_bytes("bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a")
    assert is_link(link)
    assert not is_link(link + b"x") and not is_link(link[:-1])
    assert not is_link(b"\x01\x00\x00\x00extra")  # a CID prefix with bytes after it
    assert not is_link(b"\x12\x20" + bytes(32))  # CIDv0 is not an atproto link
    other = b"\x01\x71\x1e\x20" + bytes(32)  # CIDv1 with blake3: a link, if not a blessed one
    assert is_link(other) and to_json(other) == {"$link": libipld.encode_cid(other)}
    assert to_json(link + b"x") == {"$bytes": base64.b64encode(link + b"x").decode().rstrip("=")}


@pytest.mark.parametrize("bad", [{"$link": "."}, {"$link": "bafy"}, {"$bytes": "%%%"}])
def test_from_json_refuses_what_is_not_a_link_or_base64(bad: dict) -> None:
    with pytest.raises(ValueError):
        from_json({"a": bad})
