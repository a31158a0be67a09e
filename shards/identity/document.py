"""DID documents, fetched and read the same way for did:plc and did:web."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from ..syntax import is_handle
from .addresses import Trust
from .directory import (
    INVALID_HANDLE,
    AddressRefused,
    DIDMismatch,
    DIDNotFound,
    Identity,
    ResolutionFailed,
)
from .dnsclient import HostNotFound
from .http import HttpFetcher
from .metrics import Counters

DID_ACCEPT = "application/did+ld+json, application/json;q=0.9"


def parse_document(did: str, body: bytes) -> Identity:
    """The claimed (unverified) handle and PDS of a DID document whose `id` must be `did`.

    Raises DIDMismatch for another id, ResolutionFailed for anything that is not a document."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ResolutionFailed(f"DID document of {did} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
        raise ResolutionFailed(f"DID document of {did} has no id")
    if doc["id"] != did:
        raise DIDMismatch(f"asked for {did}, document is for {doc['id'][:200]!r}")
    methods = doc.get("verificationMethod")
    return Identity(did=did, handle=_handle(doc), pds=_pds(did, doc),
                    verification_methods=tuple(methods) if isinstance(methods, list) else ())


def _handle(doc: dict[str, Any]) -> str:
    """The first `at://` alias that is a valid handle, lowercased; else handle.invalid."""
    aliases = doc.get("alsoKnownAs")
    for alias in aliases if isinstance(aliases, list) else ():
        if isinstance(alias, str) and alias.startswith("at://") and is_handle(alias[5:]):
            return alias[5:].lower()
    return INVALID_HANDLE


def _pds(did: str, doc: dict[str, Any]) -> str | None:
    services = doc.get("service")
    for svc in services if isinstance(services, list) else ():
        if (isinstance(svc, dict)
                and svc.get("id") in ("#atproto_pds", f"{did}#atproto_pds")
                and svc.get("type") == "AtprotoPersonalDataServer"):
            endpoint = svc.get("serviceEndpoint")
            if isinstance(endpoint, str) and endpoint.startswith(("https://", "http://")):
                return endpoint
            return None
    return None


def fetch_identity(
    http: HttpFetcher,
    counters: Counters,
    method: str,
    did: str,
    url: str,
    max_bytes: int,
    *,
    missing_host_is_not_found: bool,
    upstream: str | None = None,
    trust: Trust = Trust.NETWORK,
) -> Identity:
    """GETs and parses one DID document, counting the outcome under `method`.

    404/410 (and NXDOMAIN when `missing_host_is_not_found`) raise DIDNotFound; everything else
    that is not a matching document raises ResolutionFailed or one of its subclasses.
    `upstream` is the URL's host[:port] (lowercase), when the caller knows it already; `trust`
    who named the URL (see HttpFetcher.get)."""
    upstream = upstream or urlsplit(url).netloc.lower()
    try:
        fetched = http.get(url, max_bytes=max_bytes, accept=DID_ACCEPT, trust=trust)
    except AddressRefused as exc:
        counters.refused(method, exc.kind)
        raise
    except HostNotFound as exc:
        if missing_host_is_not_found:
            counters.resolution(method, "not_found")
            raise DIDNotFound(f"{did}: {exc}") from exc
        counters.resolution(method, "failed")
        raise ResolutionFailed(str(exc), upstream=upstream) from exc
    except ResolutionFailed:
        counters.resolution(method, "failed")
        raise
    if fetched.status in (404, 410):
        counters.resolution(method, "not_found")
        raise DIDNotFound(f"{did}: HTTP {fetched.status} from {upstream}")
    if fetched.status != 200:
        counters.resolution(method, "failed")
        raise ResolutionFailed(f"{did}: HTTP {fetched.status} from {upstream}", upstream=upstream)
    try:
        ident = parse_document(did, fetched.body)
    except DIDMismatch:
        counters.resolution(method, "mismatch")
        raise
    except ResolutionFailed as exc:
        counters.resolution(method, "failed")
        raise ResolutionFailed(str(exc), upstream=upstream) from exc
    counters.resolution(method, "ok")
    return ident
