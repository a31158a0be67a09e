"""Syntax checks for AT Protocol identifiers, following the interop test vectors."""
from __future__ import annotations

import re

# fullmatch everywhere: `$` would also accept a trailing "\n".
_DID = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_HANDLE = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_NSID = re.compile(
    r"[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"(\.[a-zA-Z]([a-zA-Z0-9]{0,62})?)"
)
_RKEY = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")
_TID = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")

# Syntactically valid, but never resolvable as an atproto handle (atproto handle spec).
_DISALLOWED_TLDS = frozenset(
    {"alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion"}
)


def is_did(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 2048 and _DID.fullmatch(value) is not None


def is_handle(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and _HANDLE.fullmatch(value) is not None


def is_nsid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 317 and _NSID.fullmatch(value) is not None


_COLLECTIONS: set[str] = set()  # NSIDs already found valid as collections


def is_collection(value: object) -> bool:
    """is_nsid, remembered: an event's collection is one of a handful, checked per event."""
    if type(value) is str and value in _COLLECTIONS:
        return True
    if not is_nsid(value):
        return False
    if len(_COLLECTIONS) < 10_000:  # a handful in practice; bounded all the same
        _COLLECTIONS.add(value)  # type: ignore[arg-type]
    return True


def is_record_key(value: object) -> bool:
    if isinstance(value, str) and len(value) <= 512 and value.isascii() and value.isalnum():
        return True  # the common case (TIDs), without the regex
    return isinstance(value, str) and value not in (".", "..") and _RKEY.fullmatch(value) is not None


def is_tid(value: object) -> bool:
    """A timestamp identifier, as repository revisions are: 13 base32-sortable characters."""
    return isinstance(value, str) and len(value) == 13 and _TID.fullmatch(value) is not None


def handle_tld_allowed(handle: str) -> bool:
    """False for TLDs that can never resolve (.local, .onion...): such a handle is invalid at once."""
    return handle.rsplit(".", 1)[-1].lower() not in _DISALLOWED_TLDS
