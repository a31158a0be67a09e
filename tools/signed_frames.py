"""Signed firehose frames, built the way a PDS builds them, for tests and the benchmark.

A commit frame holds a CAR of the records its operations write, the tree nodes that lead to
them (here the tree of just those records: one node per commit, as a small repository has)
and the commit object, signed with the author's secp256k1 key (low-S, over the DAG-CBOR of the
commit without `sig`). `recording` packs frames as `pipeline record` writes them."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import coincurve
import libipld
import zstandard

from shards.firehose import mst
from shards.firehose.datamodel import cid_for, from_json

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def private_key(material: str) -> coincurve.PrivateKey:
    """A deterministic secp256k1 key (tests and benchmarks only)."""
    return coincurve.PrivateKey(hashlib.sha256(f"key:{material}".encode()).digest())


def multibase(key: coincurve.PrivateKey) -> str:
    """The public key as a DID document's `publicKeyMultibase` (Multikey, secp256k1)."""
    data = b"\xe7\x01" + key.public_key.format(compressed=True)
    n, out = int.from_bytes(data, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "z" + out


def sign(key: coincurve.PrivateKey, unsigned: dict[str, Any]) -> bytes:
    """The 64-byte r||s signature (libsecp256k1 makes it low-S) of sha256(DAG-CBOR)."""
    return key.sign_recoverable(libipld.encode_dag_cbor(unsigned))[:64]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_car(root: bytes, blocks: dict[bytes, bytes]) -> bytes:
    """A CARv1 of already encoded blocks (CID -> bytes), `root` first in the header."""
    header = libipld.encode_dag_cbor({"roots": [root], "version": 1})
    parts = [_varint(len(header)), header]
    for cid, data in blocks.items():
        parts += [_varint(len(cid) + len(data)), cid, data]
    return b"".join(parts)


def frame(kind: str, body: dict[str, Any]) -> bytes:
    """A frame: the header {op: 1, t: kind}, then the body."""
    return libipld.encode_dag_cbor({"op": 1, "t": kind}) + libipld.encode_dag_cbor(body)


def commit_frame(key: coincurve.PrivateKey, did: str, rev: str, seq: int, time: str,
                 ops: Iterable[tuple[str, str, dict[str, Any] | None]],
                 since: str | None = None) -> bytes:
    """A signed #commit of `ops` ((action, "collection/rkey", record JSON or None)); each
    create or update is in the commit's tree, each delete is absent from it."""
    blocks: dict[bytes, bytes] = {}
    items: dict[bytes, bytes] = {}
    body_ops = []
    for action, path, record in ops:
        cid = None
        if record is not None:
            value = from_json(record)
            cid = cid_for(value)
            blocks[cid] = libipld.encode_dag_cbor(value)
            items[path.encode()] = cid
        body_ops.append({"action": action, "cid": cid, "path": path})
    root, nodes = mst.build(items)
    for cid, node in nodes.items():
        blocks[cid] = libipld.encode_dag_cbor(node)
    unsigned = {"data": root, "did": did, "prev": None, "rev": rev, "version": 3}
    signed = libipld.encode_dag_cbor({**unsigned, "sig": sign(key, unsigned)})
    commit = cid_for(libipld.decode_dag_cbor(signed))
    blocks[commit] = signed
    return frame("#commit", {
        "blobs": [], "blocks": encode_car(commit, blocks), "commit": commit, "ops": body_ops,
        "rebase": False, "repo": did, "rev": rev, "seq": seq, "since": since, "time": time,
        "tooBig": False})


def recording(frames: Iterable[bytes]) -> bytes:
    """Frames as a zstd recording: `[u32 LE length][frame]` records."""
    return zstandard.ZstdCompressor(level=3).compress(
        b"".join(len(f).to_bytes(4, "little") + f for f in frames))
