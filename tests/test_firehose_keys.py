"""Signing keys against the atproto crypto vectors (tests/data/crypto, CC0) and DID documents."""
from __future__ import annotations

import base64

import coincurve
import libipld
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shards.firehose.errors import VerificationError
from shards.firehose.keys import K256, P256, SigningKey, parse_did_key, signing_key
from tests.firehose_corpus import DATA, did_docs

CRYPTO = DATA / "crypto"
SIGNATURES = orjson.loads((CRYPTO / "signature-fixtures.json").read_bytes())


def unpadded(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("fixture", SIGNATURES, ids=lambda f: f"{f['algorithm']}-{f['tags']}")
def test_signature_vectors(fixture: dict) -> None:
    key = parse_did_key(fixture["publicKeyDid"])
    curve = K256 if fixture["algorithm"] == "ES256K" else P256
    assert key == SigningKey(curve, libipld.decode_multibase(fixture["publicKeyMultibase"])[1])
    assert key.curve == curve
    message, sig = unpadded(fixture["messageBase64"]), unpadded(fixture["signatureBase64"])
    assert key.verify(message, sig) is fixture["validSignature"]
    # the same document form, as an older DID document would carry it
    doc = {"id": "did:plc:x", "verificationMethod": [
        {"id": "#atproto", "type": fixture["didDocSuite"],
         "publicKeyMultibase": fixture["publicKeyMultibase"]}]}
    assert signing_key(doc) == key


def test_high_s_and_der_forms_are_each_refused_for_both_curves() -> None:
    tags = {(f["algorithm"], tuple(f["tags"])): f["validSignature"] for f in SIGNATURES}
    assert tags == {("ES256", ()): True, ("ES256K", ()): True,
                    ("ES256", ("high-s",)): False, ("ES256K", ("high-s",)): False,
                    ("ES256", ("der-encoded",)): False, ("ES256K", ("der-encoded",)): False}


def test_did_key_vectors_k256() -> None:
    vectors = orjson.loads((CRYPTO / "w3c_didkey_K256.json").read_bytes())
    assert len(vectors) == 5
    for v in vectors:
        public = coincurve.PrivateKey(bytes.fromhex(v["privateKeyBytesHex"])).public_key.format()
        key = SigningKey(K256, public)
        assert key.did_key() == v["publicDidKey"]
        assert parse_did_key(v["publicDidKey"]) == key


def test_did_key_vectors_p256() -> None:
    (v,) = orjson.loads((CRYPTO / "w3c_didkey_P256.json").read_bytes())
    secret = int.from_bytes(libipld.decode_multibase("z" + v["privateKeyBytesBase58"])[1], "big")
    public = ec.derive_private_key(secret, ec.SECP256R1()).public_key()
    key = SigningKey(P256, public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))
    assert key.did_key() == v["publicDidKey"]
    assert parse_did_key(v["publicDidKey"]) == key


def test_a_signature_made_here_verifies_and_nothing_else_does() -> None:
    private = coincurve.PrivateKey()
    key = SigningKey(K256, private.public_key.format(compressed=False))
    sig = private.sign_recoverable(b"data")[:64]  # libsecp256k1 signs low-S
    assert key.verify(b"data", sig)
    assert not key.verify(b"datA", sig)
    assert not key.verify(b"data", sig[:63])
    assert not key.verify(b"data", b"\xff" * 64)  # r and s beyond the group order


def test_current_and_legacy_documents_name_the_same_key() -> None:
    current = orjson.loads((DATA / "identity" / "did_plc_doc.json").read_bytes())
    legacy = orjson.loads((DATA / "identity" / "did_plc_doc_legacy.json").read_bytes())
    assert legacy["verificationMethod"][0]["type"] == "EcdsaSecp256k1VerificationKey2019"
    assert signing_key(current) == signing_key(legacy)
    published = current["verificationMethod"][0]["publicKeyMultibase"]
    assert signing_key(current).multibase() == published


def test_every_recorded_did_document_has_a_key() -> None:
    docs = did_docs()
    keys = {did: signing_key(doc) for did, doc in docs.items()}
    assert len(keys) == 148 and len(set(keys.values())) == 148
    assert all(k.curve == K256 for k in keys.values())


@pytest.mark.parametrize(("doc", "detail"), [
    ({"id": "did:web:x", "verificationMethod": []}, "the DID document has no #atproto key"),
    ({"id": "did:web:x"}, "the DID document has no #atproto key"),
    ({"id": "did:web:x", "verificationMethod": [{"id": "did:web:y#atproto", "type": "Multikey",
                                                 "publicKeyMultibase": "z"}]},
     "the DID document has no #atproto key"),
    ({"id": "did:web:x", "verificationMethod": [{"id": "#atproto", "type": "Ed25519"}]},
     "unknown verification method type Ed25519"),
    ({"id": "did:web:x", "verificationMethod": [{"id": "#atproto", "type": "Multikey",
                                                 "publicKeyMultibase": "uAAAA"}]},
     "publicKeyMultibase is not base58btc"),
    ({"id": "did:web:x", "verificationMethod": [{"id": "#atproto", "type": "Multikey",
                                                 "publicKeyMultibase": "z0OIl"}]},
     "publicKeyMultibase is not base58btc"),
    ({"id": "did:web:x", "verificationMethod": [{"id": "#atproto", "type": "Multikey",
                                                 "publicKeyMultibase": "z6MkhaXgBZDvotDkL5257fa"}]},
     "neither a secp256k1 nor a P-256 key"),
    ({"id": "did:web:x", "verificationMethod": [
        {"id": "#atproto", "type": "Multikey",
         "publicKeyMultibase": libipld.encode_multibase("z", b"\xe7\x01\x02" + bytes(32))}]},
     "not a point of secp256k1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_documents_without_a_usable_key(doc: dict, detail: str) -> None:
    with pytest.raises(VerificationError) as err:
        signing_key(doc)
    assert (err.value.check, err.value.detail) == ("key", detail)


def test_did_web_document_of_a_feed_generator_has_no_key() -> None:
    doc = orjson.loads((DATA / "identity" / "did_web_doc.json").read_bytes())
    with pytest.raises(VerificationError, match="^key: "):
        signing_key(doc)
    with pytest.raises(VerificationError, match="^key: not a did:key$"):
        parse_did_key("did:plc:abc")
