"""Decoding and validating one Jetstream v1 line; every way it can be bad has a reason."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shards.syntax import is_collection, is_did, is_record_key

MAX_LINE_BYTES = 1 << 20
KINDS = ("commit", "identity", "account")
OPERATIONS = ("create", "update", "delete")


class BadEvent(ValueError):
    """The line cannot be applied; the message is the dead-letter reason."""


@dataclass(slots=True)
class Event:
    """One valid event, with where it came from so it can be acknowledged."""

    batch: int
    idx: int
    position: int
    raw: bytes
    did: str
    kind: str
    operation: str | None = None
    collection: str | None = None
    rkey: str | None = None
    cid: str | None = None
    record: dict[str, Any] | None = None
    active: bool | None = None
    status: str | None = None
    rev: str | None = None  # the repository revision of a commit

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


def has_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds a NUL anywhere: PostgreSQL text and jsonb cannot."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_LINE_BYTES:
        raise BadEvent("line over 1 MiB")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent("not UTF-8") from None
        raise BadEvent(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadEvent("not a JSON object")
    # PostgreSQL text and jsonb cannot hold NUL; look closer only when the escape is present.
    if b"\\u0000" in raw and has_nul(data):
        raise BadEvent("NUL character in text")
    return data


def decode(raw: bytes, batch: int, idx: int, position: int) -> Event:
    """Parses and validates one line; raises BadEvent with the reason."""
    data = _parse(raw)
    did = data.get("did")
    if not is_did(did):
        raise BadEvent("missing or invalid did")
    kind = data.get("kind")
    event = Event(batch, idx, position, raw, did, kind)
    if kind == "commit":
        commit = data.get("commit")
        if not isinstance(commit, dict):
            raise BadEvent("commit missing")
        op = commit.get("operation")
        if op not in OPERATIONS:
            raise BadEvent("commit with missing or unknown operation")
        if not is_collection(commit.get("collection")):
            raise BadEvent("commit with missing or invalid collection")
        if not is_record_key(commit.get("rkey")):
            raise BadEvent("commit with missing or invalid rkey")
        event.operation, event.collection, event.rkey = op, commit["collection"], commit["rkey"]
        if op != "delete":
            record = commit.get("record")
            if not isinstance(record, dict):
                raise BadEvent("record is not an object")
            cid = commit.get("cid")
            if not isinstance(cid, str) or not cid:
                raise BadEvent("commit missing cid")
            event.record, event.cid = record, cid
        rev = commit.get("rev")
        event.rev = rev if isinstance(rev, str) else None
    elif kind == "account":
        account = data.get("account")
        if not isinstance(account, dict) or not isinstance(account.get("active"), bool):
            raise BadEvent("account event missing active")
        status = account.get("status")
        event.active = account["active"]
        event.status = status if isinstance(status, str) else None
    elif kind == "identity":
        pass
    else:
        raise BadEvent(f"unknown kind: {str(kind)[:40]}")
    return event
