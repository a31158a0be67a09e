"""shards.syntax against the atproto interop vectors (tests/data/syntax, CC0)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shards.syntax import handle_tld_allowed, is_did, is_handle, is_nsid, is_record_key, is_tid

DATA = Path(__file__).parent / "data" / "syntax"

CHECKS: dict[str, Callable[[object], bool]] = {
    "did": is_did,
    "handle": is_handle,
    "nsid": is_nsid,
    "recordkey": is_record_key,
    "tid": is_tid,
}


def vectors(kind: str, validity: str) -> list[str]:
    """Lines as the vector files mean them: not stripped (spaces are part of some vectors)."""
    text = (DATA / f"{kind}_syntax_{validity}.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line and not line.startswith("#")]


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_valid_vectors_accepted(kind: str) -> None:
    lines = vectors(kind, "valid")
    assert len(lines) > (3 if kind == "tid" else 10)
    assert [v for v in lines if not CHECKS[kind](v)] == []


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_invalid_vectors_rejected(kind: str) -> None:
    lines = vectors(kind, "invalid")
    assert len(lines) > 5
    assert [v for v in lines if CHECKS[kind](v)] == []


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_trailing_newline_rejected(kind: str) -> None:
    valid = vectors(kind, "valid")[0]
    assert CHECKS[kind](valid)
    assert not CHECKS[kind](valid + "\n")


@pytest.mark.parametrize("value", [None, 42, b"did:plc:abc", ["did:plc:abc"]])
def test_non_strings_rejected(value: object) -> None:
    assert not any(check(value) for check in CHECKS.values())


@pytest.mark.parametrize(
    ("handle", "allowed"),
    [("alice.test", True), ("alice.bsky.social", True), ("laptop.local", False),
     ("x.onion", False), ("a.ARPA", False), ("b.internal", False), ("c.localhost", False)],
)
def test_handle_tld_allowed(handle: str, allowed: bool) -> None:
    assert is_handle(handle)
    assert handle_tld_allowed(handle) is allowed
