"""CAR v1 archives of repository blocks: each block's bytes checked against its CID, and decoded
(libipld) only when a check or a record needs it.

The sections are split here rather than by libipld.decode_car, which decodes every block and
gives back values, not bytes: hashing then meant encoding each value again. Split and hashed as
sent, a recorded relay frame's blocks take 11 us instead of 27 (README, the verification cost)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import libipld

from .datamodel import CID_LENGTH, DAG_CBOR_PREFIX, RAW_PREFIX, cid_str
from .errors import VerificationError

Blocks = Mapping[bytes, Any]  # binary CID -> decoded DAG-CBOR value
_REPO_PREFIXES = (DAG_CBOR_PREFIX, RAW_PREFIX)  # the CIDs of an atproto repository's blocks
_MAX_HEADER_BYTES = 1 << 16


class CarBlocks(Mapping[bytes, Any]):
    """The blocks of one CAR by binary CID, each decoded once, the first time it is read.

    A block that is not DAG-CBOR raises VerificationError("car") when read."""

    __slots__ = ("raw", "_decoded")

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self.raw = raw  # CID -> the block's bytes, as the CAR holds them
        self._decoded: dict[bytes, Any] = {}

    def get(self, cid: bytes, default: Any = None) -> Any:  # type: ignore[override]
        value = self._decoded.get(cid, self)
        if value is not self:
            return value
        data = self.raw.get(cid)
        if data is None:
            return default
        try:
            value = libipld.decode_dag_cbor(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise VerificationError("car", f"block {_name(cid)} is not DAG-CBOR: "
                                           f"{str(exc)[:120]}") from None
        self._decoded[cid] = value
        return value

    def __getitem__(self, cid: bytes) -> Any:
        if cid not in self.raw:
            raise KeyError(cid)
        return self.get(cid)

    def __contains__(self, cid: object) -> bool:
        return cid in self.raw

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 varint at `pos` and the position after it; raises IndexError when
    the data ends inside it, ValueError when it is over 9 bytes."""
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 56:
            raise ValueError("varint over 9 bytes")


def _cid_length(data: bytes, pos: int) -> int:
    """The length of the binary CID at `pos`: CIDv0 (a bare sha2-256 multihash) or CIDv1."""
    if data[pos:pos + 2] == b"\x12\x20":
        return 34
    version, at = _uvarint(data, pos)
    if version != 1:
        raise ValueError(f"unsupported CID version {version}")
    _, at = _uvarint(data, at)  # codec
    _, at = _uvarint(data, at)  # multihash function
    size, at = _uvarint(data, at)
    return at + size - pos


def read_car(data: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """The roots of a CAR v1 and its blocks' bytes by binary CID, unchecked; raises
    VerificationError("car") for anything that is not one."""
    try:
        size, pos = _uvarint(data, 0)
        if size > _MAX_HEADER_BYTES or pos + size > len(data):
            raise ValueError("the header is cut short or too long")
        header = libipld.decode_dag_cbor(data[pos:pos + size])
        if not isinstance(header, dict) or header.get("version") != 1:
            raise ValueError("not a CAR v1 header")
        roots = header.get("roots")
        if not isinstance(roots, list) or not all(type(r) is bytes for r in roots):
            raise ValueError("CAR header without roots")
        pos += size
        end = len(data)
        blocks: dict[bytes, bytes] = {}
        while pos < end:  # runs for every block of every commit: the usual cases inline
            size = data[pos]
            if size < 0x80:
                pos += 1
            elif data[pos + 1] < 0x80:
                size = size & 0x7F | data[pos + 1] << 7
                pos += 2
            else:
                size, pos = _uvarint(data, pos)
            stop = pos + size
            cid_end = pos + (CID_LENGTH if data[pos:pos + 4] in _REPO_PREFIXES
                             else _cid_length(data, pos))
            if stop > end or cid_end > stop:
                raise ValueError("a section is cut short")
            blocks[data[pos:cid_end]] = data[cid_end:stop]
            pos = stop
    except IndexError:
        raise VerificationError("car", "the CAR is cut short") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise VerificationError("car", str(exc)[:200]) from None
    return roots, blocks


def hashes_to(cid: bytes, data: bytes) -> bool:
    """True when the block `data` hashes (sha2-256) to the DAG-CBOR CID `cid`."""
    return (len(cid) == CID_LENGTH and cid[:4] == DAG_CBOR_PREFIX
            and hashlib.sha256(data).digest() == cid[4:])


def check_blocks(blocks: dict[bytes, bytes], role: Callable[[bytes], str]) -> None:
    """Every block's bytes hash to its CID; raises VerificationError naming the failed block's
    role (`role(cid)`: "commit hash", "record hash", "tree"), asked only then."""
    sha256 = hashlib.sha256
    for cid, data in blocks.items():
        if cid[:4] != DAG_CBOR_PREFIX or sha256(data).digest() != cid[4:]:
            raise VerificationError(role(cid), f"block {_name(cid)} does not hash to its CID")


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
