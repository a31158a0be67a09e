"""Which shard owns a DID: stable across processes, restarts, machines and languages."""
from __future__ import annotations

from hashlib import sha256


def shard_for(did: str | bytes, n: int) -> int:
    """The first 6 bytes of sha256(did), read big-endian, modulo n."""
    data = did.encode() if isinstance(did, str) else did
    return int.from_bytes(sha256(data).digest()[:6], "big") % n


def sql_shard_expr(column: str, n: int) -> str:
    """The same rule in SQL, for queries that group or filter rows by shard."""
    return (
        f"(('x' || substr(encode(sha256(convert_to({column}, 'UTF8')), 'hex'), 1, 12))"
        f"::bit(48)::bigint % {int(n)})"
    )
