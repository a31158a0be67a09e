"""Handle -> DID (DNS TXT `_atproto.{handle}`, else HTTPS well-known), to check a handle points back.

Each lookup answers a DID, None ("definitely none here") or raises ResolutionFailed ("could not
check"); `check` only says False when the answer is definitive."""
from __future__ import annotations

from ..syntax import is_did
from .config import IdentityConfig
from .directory import AddressRefused, ResolutionFailed
from .dnsclient import DnsClient, HostNotFound
from .http import HttpFetcher, ResponseTooLarge
from .metrics import Counters


class HandleVerifier:
    """Bidirectional handle check: DNS first (authoritative when it answers), HTTPS as fallback."""

    def __init__(
        self, config: IdentityConfig, dns: DnsClient, http: HttpFetcher, counters: Counters
    ) -> None:
        self._config = config
        self._dns = dns
        self._http = http
        self._counters = counters

    def lookup_dns(self, handle: str) -> str | None:
        """The DID of exactly one `did=` TXT value; None if absent, ambiguous or malformed."""
        values = self._dns.txt(f"_atproto.{handle}")
        dids = [v[4:].strip() for v in values if v.startswith("did=")]
        if len(dids) != 1 or not is_did(dids[0]):
            return None
        return dids[0]

    def well_known_url(self, handle: str) -> str:
        port = self._config.web_port
        netloc = f"{handle}:{port}" if port else handle
        return f"{self._config.web_scheme}://{netloc}/.well-known/atproto-did"

    def lookup_https(self, handle: str) -> str | None:
        """The DID on the first line of the well-known file; None when the host, file or DID is absent.

        An answer that is not a DID (an HTML catch-all page, even one over the cap) is a
        definitive "no"; statuses other than 200/404/410 and transport errors raise."""
        url = self.well_known_url(handle)
        try:
            fetched = self._http.get(url, max_bytes=self._config.well_known_max_bytes,
                                     accept="text/plain")
        except (HostNotFound, ResponseTooLarge):
            return None
        if fetched.status in (404, 410):
            return None
        if fetched.status != 200:
            raise ResolutionFailed(f"HTTP {fetched.status} from {url}",
                                   upstream=url.split("/", 3)[2])
        lines = fetched.body.decode("utf-8", "replace").splitlines()
        candidate = lines[0].strip() if lines else ""
        return candidate if is_did(candidate) else None

    def check(self, did: str, handle: str) -> bool:
        """True if the handle points to `did`, False if it definitively does not.

        Raises ResolutionFailed when neither method could give a definitive answer."""
        dns_error: ResolutionFailed | None = None
        try:
            found = self.lookup_dns(handle)
        except ResolutionFailed as exc:
            self._counters.resolution("dns", "failed")
            dns_error = exc
        else:
            if found is not None:  # DNS answered: it takes precedence over HTTPS
                self._counters.resolution("dns", "ok" if found == did else "mismatch")
                return found == did
            self._counters.resolution("dns", "not_found")
        try:
            found = self.lookup_https(handle)
        except AddressRefused as exc:
            self._counters.refused("https", exc.kind)
            raise dns_error or exc
        except ResolutionFailed as exc:
            self._counters.resolution("https", "failed")
            raise dns_error or exc
        if found == did:
            self._counters.resolution("https", "ok")
            return True
        self._counters.resolution("https", "not_found" if found is None else "mismatch")
        if dns_error is not None:  # DNS might have held the answer: not definitive
            raise dns_error
        return False
