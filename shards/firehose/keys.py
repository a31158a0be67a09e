"""Public keys of atproto accounts (secp256k1 or P-256), from DID documents and did:key strings."""
from __future__ import annotations

import hashlib
from typing import Any

import coincurve
import libipld
from coincurve._libsecp256k1 import lib as secp256k1
from coincurve.context import GLOBAL_CONTEXT
from coincurve.ecdsa import deserialize_compact
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import VerificationError

K256 = "secp256k1"
P256 = "p256"
# Multicodec varints that tag a compressed public key in Multikey and did:key form.
_MULTICODEC = {K256: b"\xe7\x01", P256: b"\x80\x24"}
# Verification method types of older DID documents: the key bytes without a multicodec tag.
_LEGACY_TYPES = {
    "EcdsaSecp256k1VerificationKey2019": K256,
    "EcdsaSecp256r1VerificationKey2019": P256,
}
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class SigningKey:
    """A parsed public key that checks atproto signatures: 64 bytes r||s over sha256 of the
    data, low-S only (a high-S or DER signature is refused, as the atproto spec requires)."""

    __slots__ = ("curve", "compressed", "_k256", "_p256")
    curve: str  # K256 or P256
    compressed: bytes  # the 33-byte SEC1 compressed point

    def __init__(self, curve: str, key: bytes) -> None:
        """`key` compressed (33 bytes) or uncompressed (65); raises VerificationError("key")."""
        if not ((len(key) == 33 and key[0] in (2, 3)) or (len(key) == 65 and key[0] == 4)):
            raise VerificationError("key", f"not a public key ({len(key)} bytes)")
        if curve not in _MULTICODEC:
            raise VerificationError("key", f"unknown curve {curve}")
        self.curve = curve
        self._k256: coincurve.PublicKey | None = None
        self._p256: ec.EllipticCurvePublicKey | None = None
        try:
            if curve == K256:
                self._k256 = coincurve.PublicKey(key)
                self.compressed = self._k256.format(compressed=True)
            else:
                self._p256 = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)
                self.compressed = self._p256.public_bytes(Encoding.X962,
                                                          PublicFormat.CompressedPoint)
        except ValueError:
            raise VerificationError("key", f"not a point of {curve}") from None

    def verify(self, data: bytes, sig: bytes) -> bool:
        """True when `sig` is this key's low-S signature of sha256(data)."""
        if len(sig) != 64:
            return False
        if self._k256 is not None:
            # libsecp256k1 itself accepts only low-S signatures. Called past coincurve's
            # verify(), which wants DER: the round trip through DER cost 1-2 us of the 27.
            try:
                parsed = deserialize_compact(sig)
            except ValueError:
                return False
            return secp256k1.secp256k1_ecdsa_verify(
                GLOBAL_CONTEXT.ctx, parsed, hashlib.sha256(data).digest(),
                self._k256.public_key) == 1
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        if self._p256 is None or not (0 < r < _P256_ORDER and 0 < s <= _P256_ORDER // 2):
            return False
        try:
            self._p256.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True

    def multibase(self) -> str:
        """The Multikey `publicKeyMultibase` form: base58btc of the multicodec-tagged key."""
        return libipld.encode_multibase("z", _MULTICODEC[self.curve] + self.compressed)

    def did_key(self) -> str:
        return "did:key:" + self.multibase()

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SigningKey)
                and (self.curve, self.compressed) == (other.curve, other.compressed))

    def __hash__(self) -> int:
        return hash(self.compressed)

    def __repr__(self) -> str:
        return f"SigningKey({self.did_key()})"


def _multibase(value: Any) -> bytes:
    if not isinstance(value, str) or not value.startswith("z"):
        raise VerificationError("key", "publicKeyMultibase is not base58btc")
    try:
        return libipld.decode_multibase(value)[1]
    except ValueError:
        raise VerificationError("key", "publicKeyMultibase is not base58btc") from None


def _tagged(data: bytes) -> SigningKey:
    for curve, tag in _MULTICODEC.items():
        if data.startswith(tag):
            return SigningKey(curve, data[len(tag):])
    raise VerificationError("key", "neither a secp256k1 nor a P-256 key")


def parse_did_key(did_key: str) -> SigningKey:
    """The key of a `did:key:z...` string; raises VerificationError("key")."""
    if not isinstance(did_key, str) or not did_key.startswith("did:key:"):
        raise VerificationError("key", "not a did:key")
    return _tagged(_multibase(did_key[8:]))


def signing_key(did_document: dict[str, Any]) -> SigningKey:
    """The `#atproto` verification method of a DID document; raises VerificationError("key").

    Multikey (multicodec-tagged compressed key) and the older
    EcdsaSecp256k1VerificationKey2019 / EcdsaSecp256r1VerificationKey2019 (untagged) forms."""
    did = did_document.get("id") if isinstance(did_document, dict) else None
    methods = did_document.get("verificationMethod") if isinstance(did_document, dict) else None
    for method in methods if isinstance(methods, list) else ():
        if not isinstance(method, dict) or method.get("id") not in ("#atproto", f"{did}#atproto"):
            continue
        kind = method.get("type")
        if kind == "Multikey":
            return _tagged(_multibase(method.get("publicKeyMultibase")))
        if kind in _LEGACY_TYPES:
            return SigningKey(_LEGACY_TYPES[kind], _multibase(method.get("publicKeyMultibase")))
        raise VerificationError("key", f"unknown verification method type {str(kind)[:60]}")
    raise VerificationError("key", "the DID document has no #atproto key")
