"""The recorded relay frames and what comes with them (tests/data/jetstream, MIT OR Apache-2.0)."""
from __future__ import annotations

import struct
from functools import cache
from pathlib import Path
from typing import Any

import coincurve
import libipld
import orjson
import zstandard

from shards.firehose.keys import K256, SigningKey

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "jetstream"
REPO_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"


@cache
def frames() -> tuple[bytes, ...]:
    """The 150 frames of frames.bin.zst: zstd of [u32 LE length][frame] records."""
    data = zstandard.ZstdDecompressor().decompress(
        (CORPUS / "frames.bin.zst").read_bytes(), max_output_size=64 << 20)
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    return tuple(out)


@cache
def did_docs() -> dict[str, dict[str, Any]]:
    return orjson.loads((DATA / "did_docs.json").read_bytes())


@cache
def manifest() -> dict[str, Any]:
    return orjson.loads((CORPUS / "manifest.json").read_bytes())


def jetstream_events() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (CORPUS / "expected_v1.jsonl").read_bytes().splitlines()]


def recovered_keys(car: bytes) -> list[SigningKey]:
    """The two secp256k1 keys that a CAR's root commit signature can be recovered to."""
    header, blocks = libipld.decode_car(car)
    commit = blocks[header["roots"][0]]
    unsigned = libipld.encode_dag_cbor({k: v for k, v in commit.items() if k != "sig"})
    return [SigningKey(K256, coincurve.PublicKey.from_signature_and_message(
        commit["sig"] + bytes([recid]), unsigned).format()) for recid in (0, 1)]
