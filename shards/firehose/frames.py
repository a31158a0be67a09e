"""One `com.atproto.sync.subscribeRepos` frame: a DAG-CBOR header {op, t} then a DAG-CBOR body."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libipld

from shards.syntax import is_did

MAX_FRAME_BYTES = 5 << 20  # a relay's commits carry at most 2 MB of blocks

# Fields each known kind must have, with their types, beyond seq, the DID and time.
_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "#commit": (("rev", str), ("commit", bytes), ("blocks", bytes), ("ops", list)),
    "#sync": (("rev", str), ("blocks", bytes)),
    "#identity": (),
    "#account": (("active", bool),),
}
_DID_FIELD = {"#commit": "repo", "#sync": "did", "#identity": "did", "#account": "did"}


class BadFrame(ValueError):
    """The frame cannot be read; the message is the dead-letter reason."""


@dataclass(slots=True)
class Frame:
    """A decoded frame: its kind, where it is in the stream, whose it is, and its body."""

    kind: str  # "#commit", "#identity", "#account", "#sync", "#info", "error", or the type given
    seq: int | None
    did: str | None  # body["repo"] for #commit, body["did"] for #sync, #identity, #account
    time: str | None
    body: dict[str, Any]  # DAG-CBOR as libipld gives it: CIDs and byte strings as bytes


def _decode(raw: bytes) -> list[Any]:
    if len(raw) > MAX_FRAME_BYTES:
        raise BadFrame(f"frame over {MAX_FRAME_BYTES >> 20} MiB")
    try:
        return libipld.decode_dag_cbor_multi(raw)
    except RecursionError:
        raise BadFrame("not CBOR: nested too deep") from None
    except ValueError as exc:
        message = str(exc)
        if "end of data" in message or "exceeds remaining data" in message:
            raise BadFrame("truncated frame") from None
        detail = message.removeprefix("Failed to decode DAG-CBOR. ")[:120]
        raise BadFrame(f"not CBOR: {detail}") from None


def check_body(kind: str, body: dict[str, Any]) -> None:
    """Raises BadFrame ("commit missing blocks") unless a known kind's body has its fields."""
    name = kind[1:]
    if type(body.get("seq")) is not int:
        raise BadFrame(f"{name} missing seq")
    if not is_did(body.get(_DID_FIELD[kind])):
        raise BadFrame(f"{name} missing or invalid {_DID_FIELD[kind]}")
    if not isinstance(body.get("time"), str):
        raise BadFrame(f"{name} missing time")
    for field, kind_type in _FIELDS[kind]:
        if type(body.get(field)) is not kind_type:
            raise BadFrame(f"{name} missing {field}")


def parse_frame(raw: bytes) -> Frame:
    """Decodes and checks a frame; raises BadFrame ("not CBOR", "truncated frame", ...).

    Known kinds are checked for the fields the pipeline uses; unknown ones come back as they are,
    for the caller to skip and count."""
    parts = _decode(raw)
    if len(parts) < 2:
        raise BadFrame("truncated frame" if parts else "empty frame")
    if len(parts) > 2:
        raise BadFrame("trailing data after the frame body")
    header, body = parts
    if not isinstance(header, dict):
        raise BadFrame("frame header is not a map")
    if not isinstance(body, dict):
        raise BadFrame("frame body is not a map")
    op = header.get("op")
    if op == -1:
        return Frame("error", None, None, None, body)
    if op != 1:
        raise BadFrame(f"unknown frame op {str(op)[:20]}")
    kind = header.get("t")
    if not isinstance(kind, str) or not kind:
        raise BadFrame("frame header missing t")
    seq = body.get("seq")
    seq = seq if type(seq) is int else None
    time = body.get("time")
    time = time if isinstance(time, str) else None
    if kind in _FIELDS:
        check_body(kind, body)
        return Frame(kind, seq, body[_DID_FIELD[kind]], time, body)
    if kind == "#info" and not isinstance(body.get("name"), str):
        raise BadFrame("info missing name")
    return Frame(kind, seq, None, time, body)


def route_key(raw: bytes) -> tuple[int | None, bytes]:
    """(seq, DID as bytes) of a frame, (None, b"") for what is missing; never raises.

    The supervisor's only look inside a frame: the shard that owns the DID parses it whole."""
    try:
        header, body = libipld.decode_dag_cbor_multi(raw)
        seq = body.get("seq")
        did = body.get(_DID_FIELD.get(header.get("t"), "did"))
        return (seq if type(seq) is int else None,
                did.encode() if isinstance(did, str) else b"")
    except Exception:  # anything at all: the shard dead-letters it with the reason
        return None, b""
