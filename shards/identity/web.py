"""did:web: the document is `https://{host}/.well-known/did.json` (hostname-level did:web only)."""
from __future__ import annotations

from urllib.parse import unquote

from ..syntax import is_handle
from .config import IdentityConfig
from .directory import DIDNotFound, Identity
from .document import fetch_identity
from .http import HttpFetcher
from .metrics import Counters

_PREFIX = "did:web:"


def web_host(did: str) -> tuple[str, int | None]:
    """The hostname (lowercased) and optional port of a did:web.

    Raises DIDNotFound for path-based did:web (extra `:` segments), which atproto does not
    allow, and for anything that is not a hostname (IP literals included)."""
    if not did.startswith(_PREFIX):
        raise DIDNotFound(f"{did} is not a did:web")
    ident = did[len(_PREFIX):]
    if ":" in ident:
        raise DIDNotFound(f"{did}: path-based did:web is not supported by atproto")
    host, _, port_text = unquote(ident).lower().partition(":")
    if not (host == "localhost" or is_handle(host)):
        raise DIDNotFound(f"{did}: {host!r} is not a hostname")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DIDNotFound(f"{did}: bad port {port_text!r}")
    return host, int(port_text)


class WebResolver:
    """Resolves did:web identifiers from their own hosts."""

    def __init__(self, config: IdentityConfig, http: HttpFetcher, counters: Counters) -> None:
        self._config = config
        self._http = http
        self._counters = counters

    def url(self, did: str) -> str:
        host, port = web_host(did)
        port = port or self._config.web_port
        netloc = f"{host}:{port}" if port else host
        return f"{self._config.web_scheme}://{netloc}/.well-known/did.json"

    def resolve(self, did: str) -> Identity:
        """Raises DIDNotFound (404/410, NXDOMAIN, unsupported form) or ResolutionFailed."""
        return fetch_identity(
            self._http, self._counters, "web", did, self.url(did),
            self._config.did_doc_max_bytes, missing_host_is_not_found=True,
        )
