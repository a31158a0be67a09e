"""The network-facing Directory: did:plc, did:web and handle checks, no caching, no breaker."""
from __future__ import annotations

from dataclasses import replace

from ..syntax import handle_tld_allowed, is_did, is_handle
from .config import IdentityConfig
from .directory import INVALID_HANDLE, DIDNotFound, Identity
from .dnsclient import DnsClient
from .handle import HandleVerifier
from .http import HttpFetcher
from .metrics import Counters
from .plc import PlcResolver
from .web import WebResolver, web_host


class BaseDirectory:
    """Resolves straight from upstream; wrap it in a breaker and a cache (see build_directory)."""

    def __init__(self, config: IdentityConfig, counters: Counters | None = None) -> None:
        self.config = config
        self.counters = counters or Counters()
        self._dns = DnsClient(config)
        http = HttpFetcher(config, self._dns)
        self._plc = PlcResolver(config, http, self.counters)
        self._web = WebResolver(config, http, self.counters)
        self._handles = HandleVerifier(config, self._dns, http, self.counters)
        self._plc_upstreams = self._upstreams(self._plc.host, self._plc.upstream)

    def resolve_did(self, did: str) -> Identity:
        """Raises DIDNotFound for bad syntax and methods other than plc and web."""
        if not is_did(did):
            raise DIDNotFound(f"{did[:200]!r} is not a DID")
        if did.startswith("did:plc:"):
            return self._plc.resolve(did)
        if did.startswith("did:web:"):
            return self._web.resolve(did)
        raise DIDNotFound(f"{did}: DID method not supported by atproto")

    def verify(self, ident: Identity) -> Identity:
        handle = ident.handle.lower()
        # Uncheckable handles need no look-up: definitively invalid.
        ok = _checkable(handle) and self._handles.check(ident.did, handle)
        return replace(ident, handle=handle if ok else INVALID_HANDLE, handle_verified=ok)

    def purge(self, did: str) -> None:
        """Nothing is kept here."""

    def did_upstreams(self, did: str) -> tuple[str, ...]:
        """The upstreams (breaker keys) a resolution of `did` depends on, in order of use."""
        if did.startswith("did:plc:"):
            return self._plc_upstreams
        if did.startswith("did:web:"):
            try:
                host, port = web_host(did)
            except DIDNotFound:
                return ()
            port = port or self.config.web_port
            upstream = f"{host}:{port}" if port else host
        else:
            return ()
        return self._upstreams(host, upstream)

    def _upstreams(self, host: str, upstream: str) -> tuple[str, ...]:
        if self._dns.needs_lookup(host):
            return (self._dns.label, upstream)
        return (upstream,)

    def handle_upstreams(self, handle: str) -> tuple[str, ...]:
        """Handle checks share one upstream, DNS (TXT, and the well-known host's address).

        Well-known hosts get no circuit of their own: each serves one handle, which the cache
        already keeps from being asked twice."""
        if not _checkable(handle.lower()):
            return ()
        return (self._dns.label,)

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot()


def _checkable(handle: str) -> bool:
    """False for handles that are invalid without asking anyone."""
    return handle != INVALID_HANDLE and is_handle(handle) and handle_tld_allowed(handle)
