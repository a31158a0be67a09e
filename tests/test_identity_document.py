"""DID document parsing, did:web names and config parsing: no network."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.identity import INVALID_HANDLE, DIDMismatch, DIDNotFound, ResolutionFailed
from shards.identity.config import IdentityConfig, parse_server
from shards.identity.document import parse_document
from shards.identity.testing import did_document
from shards.identity.web import web_host

DATA = Path(__file__).parent / "data" / "identity"
PLC = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


@pytest.mark.parametrize("name", ["did_plc_doc.json", "did_plc_doc_legacy.json"])
def test_indigo_plc_documents(name: str) -> None:
    ident = parse_document(PLC, (DATA / name).read_bytes())
    assert (ident.did, ident.handle, ident.pds) == (PLC, "atproto.com", "https://bsky.social")
    assert ident.handle_verified is False


def test_indigo_web_document_has_no_handle_or_pds() -> None:
    ident = parse_document("did:web:discover.bsky.social", (DATA / "did_web_doc.json").read_bytes())
    assert ident.handle == INVALID_HANDLE
    assert ident.pds is None  # its only service is a feed generator


def test_first_valid_at_alias_lowercased() -> None:
    doc = did_document(PLC, also_known_as=["https://alice.test", "at://not a handle",
                                           "at://Alice.Example.COM", "at://second.test"])
    assert parse_document(PLC, json.dumps(doc).encode()).handle == "alice.example.com"


def test_no_valid_alias_is_invalid_handle() -> None:
    doc = did_document(PLC, also_known_as=["at://", "at://nodots", "x"])
    assert parse_document(PLC, json.dumps(doc).encode()).handle == INVALID_HANDLE
    doc["alsoKnownAs"] = "at://alice.test"  # not a list
    assert parse_document(PLC, json.dumps(doc).encode()).handle == INVALID_HANDLE


def test_pds_by_full_or_relative_id_and_type() -> None:
    doc = did_document(PLC, "alice.test", pds=None)
    doc["service"] = [
        {"id": "#atproto_pds", "type": "SomethingElse", "serviceEndpoint": "https://wrong"},
        {"id": f"{PLC}#atproto_pds", "type": "AtprotoPersonalDataServer",
         "serviceEndpoint": "https://pds.test"},
    ]
    assert parse_document(PLC, json.dumps(doc).encode()).pds == "https://pds.test"
    doc["service"][1]["serviceEndpoint"] = {"not": "a string"}
    assert parse_document(PLC, json.dumps(doc).encode()).pds is None


def test_other_id_is_mismatch() -> None:
    doc = did_document("did:plc:" + "b" * 24, "alice.test")
    with pytest.raises(DIDMismatch):
        parse_document(PLC, json.dumps(doc).encode())


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'{"id": 5}', b"\xff\xfe"])
def test_malformed_documents_fail(body: bytes) -> None:
    with pytest.raises(ResolutionFailed) as info:
        parse_document(PLC, body)
    assert not isinstance(info.value, DIDMismatch)


@pytest.mark.parametrize(
    ("did", "expected"),
    [("did:web:example.com", ("example.com", None)),
     ("did:web:Example.COM", ("example.com", None)),
     ("did:web:localhost%3A8080", ("localhost", 8080)),
     ("did:web:alice.test%3a1234", ("alice.test", 1234))],
)
def test_web_host(did: str, expected: tuple[str, int | None]) -> None:
    assert web_host(did) == expected


@pytest.mark.parametrize(
    "did",
    ["did:web:example.com:user:alice", "did:web:127.0.0.1", "did:web:nodots",
     "did:web:example.com%3A0", "did:web:example.com%3Ahttp", "did:web:ex%2Fample.com",
     "did:plc:abc"],
)
def test_web_host_rejects(did: str) -> None:
    with pytest.raises(DIDNotFound):
        web_host(did)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
     ("[::1]:5353", ("::1", 5353)), ("::1", ("::1", 53)), ("dns.test:54", ("dns.test", 54))],
)
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["", ":53", "host:0", "host:x", "[::1]x", "[nope]:53"])
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


@pytest.mark.parametrize(
    "overrides",
    [{"web_scheme": "ftp"}, {"plc_url": "plc.directory"}, {"read_timeout": 0},
     {"breaker_threshold": 0}, {"dns_server": "host:99999"}],
)
def test_config_validation(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        IdentityConfig(**overrides)  # type: ignore[arg-type]


def test_config_defaults_are_production_safe() -> None:
    cfg = IdentityConfig()
    assert cfg.plc_url == "https://plc.directory"
    assert cfg.web_scheme == "https" and cfg.web_port is None
    assert cfg.allow_private_addresses is False
    assert cfg.did_doc_max_bytes == 64 * 1024 and cfg.well_known_max_bytes == 4 * 1024
