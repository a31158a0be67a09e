"""The atproto data model between libipld's Python values and JSON ($link, $bytes, blobs).

libipld (3.x) decodes a CID link and a byte string alike to `bytes` (a link without its 0x00
multibase prefix), and encodes `bytes` that begin with a valid CID as a link. So a byte string
that is exactly one CID reads as a link here too: the same rule both ways, and links in atproto
records (blob refs) are always such CIDs."""
from __future__ import annotations

import base64
import hashlib
from typing import Any

import libipld

# CIDv1, sha2-256: DAG-CBOR for repository blocks, raw for blobs (atproto's "blessed" formats).
DAG_CBOR_PREFIX = b"\x01\x71\x12\x20"
RAW_PREFIX = b"\x01\x55\x12\x20"
CID_LENGTH = 36
_SCALARS = frozenset({str, int, bool, float, type(None)})  # the same in JSON


def is_link(value: bytes) -> bool:
    """True when `value` is exactly one binary CID (what libipld gives for a DAG-CBOR link)."""
    if len(value) == CID_LENGTH and value[:4] in (DAG_CBOR_PREFIX, RAW_PREFIX):
        return True
    if len(value) < 4 or value[0] != 1:
        return False
    try:  # another CIDv1 form: it is one if its canonical binary form is the whole value
        return libipld.decode_multibase(libipld.encode_cid(value))[1] == value
    except ValueError:
        return False


def cid_str(cid: bytes) -> str:
    """The string form (base32 "bafy...") of a binary CID."""
    return libipld.encode_cid(cid)


def cid_bytes(cid: str) -> bytes:
    """The binary form of a CID string; raises ValueError when it is not one."""
    libipld.decode_cid(cid)
    return libipld.decode_multibase(cid)[1]


def cid_for(value: Any) -> bytes:
    """The CID (DAG-CBOR, sha2-256) of a value, from its canonical DAG-CBOR encoding."""
    return DAG_CBOR_PREFIX + hashlib.sha256(libipld.encode_dag_cbor(value)).digest()


def to_json(value: Any) -> Any:
    """libipld's Python values as atproto JSON: links {"$link": str}, bytes {"$bytes": base64}.

    Blobs keep their shape ({"$type": "blob", "ref": {"$link": ...}, "mimeType", "size"});
    map keys keep their DAG-CBOR order (JSON consumers and jsonb do not depend on it)."""
    kind = type(value)
    if kind is dict:  # strings and numbers, most values, are kept without a call
        return {k: v if type(v) in _SCALARS else to_json(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _SCALARS else to_json(v) for v in value]
    if kind is bytes:
        if is_link(value):
            return {"$link": libipld.encode_cid(value)}
        return {"$bytes": base64.b64encode(value).rstrip(b"=").decode("ascii")}
    return value


def from_json(value: Any) -> Any:
    """The inverse of to_json, for data served as JSON (XRPC, test fixtures); raises ValueError
    for a $link that is not a CID or $bytes that are not base64."""
    if isinstance(value, dict):
        if len(value) == 1:
            if isinstance(value.get("$link"), str):
                return cid_bytes(value["$link"])
            if isinstance(value.get("$bytes"), str):
                text = value["$bytes"]
                return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
