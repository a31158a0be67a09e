"""CAR archives of repository blocks, decoded by libipld and checked against their CIDs."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import libipld

from .datamodel import CID_LENGTH, DAG_CBOR_PREFIX, cid_str
from .errors import VerificationError

Blocks = dict[bytes, Any]  # binary CID -> decoded DAG-CBOR value


def read_car(data: bytes) -> tuple[list[bytes], Blocks]:
    """The roots and decoded blocks of a CAR; raises VerificationError("car") for a bad one."""
    try:
        header, blocks = libipld.decode_car(data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise VerificationError("car", str(exc)[:200]) from None
    roots = header.get("roots")
    if not isinstance(roots, list) or not all(isinstance(r, bytes) for r in roots):
        raise VerificationError("car", "CAR header without roots")
    return roots, blocks


def hashes_to(cid: bytes, value: Any) -> bool:
    """True when the canonical DAG-CBOR of `value` hashes (sha2-256) to `cid`.

    libipld's CAR reader gives decoded blocks, not their bytes. Re-encoding gives the one
    canonical encoding of the value, so what is checked is exactly what is then used; a block
    sent in another encoding fails, as atproto wants repository blocks canonical."""
    if len(cid) != CID_LENGTH or cid[:4] != DAG_CBOR_PREFIX:
        return False
    try:
        return hashlib.sha256(libipld.encode_dag_cbor(value)).digest() == cid[4:]
    except (ValueError, TypeError, RecursionError):
        return False


def check_blocks(blocks: Blocks, roles: dict[bytes, str], default: str) -> None:
    """Every block hashes to its CID; raises VerificationError naming the failed block's role
    (`roles[cid]`, else `default`: "commit hash", "record hash", "tree")."""
    encode, sha256 = libipld.encode_dag_cbor, hashlib.sha256
    for cid, value in blocks.items():
        try:  # hashes_to, inlined: this runs for every block of every commit
            if cid[:4] == DAG_CBOR_PREFIX and sha256(encode(value)).digest() == cid[4:]:
                continue
        except (ValueError, TypeError, RecursionError):
            pass
        raise VerificationError(roles.get(cid, default),
                                f"block {_name(cid)} does not hash to its CID")


def _name(cid: bytes) -> str:
    try:
        return cid_str(cid)
    except ValueError:
        return cid.hex()[:80]


def encode_car(roots: list[bytes], blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A CAR v1 of (CID, encoded block) pairs, for recordings and tests: libipld reads CARs but
    does not write them."""
    header = libipld.encode_dag_cbor({"roots": roots, "version": 1})
    out = bytearray(_varint(len(header)) + header)
    for cid, data in blocks:
        out += _varint(len(cid) + len(data))
        out += cid
        out += data
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
