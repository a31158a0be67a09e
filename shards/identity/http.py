"""Guarded HTTP GETs for identity documents: vetted and pinned addresses, size caps, timeouts.

Every fetch connects to an address it vetted itself (public only, unless allowed), keeping
the name in the Host header, TLS SNI and certificate check; so a DNS answer that changes
between check and connect (rebinding) cannot aim it inward. A vetted address is reused for
its DNS TTL (at most `address_ttl`), then looked up and vetted again.

The process's one requests Session owns the connection pools (keep-alive, one pool per pinned
address); a fetch goes straight to the pinned urllib3 pool, skipping requests' per-request
layers (preparation, hooks, cookies), which cost more CPU than the exchange itself.
"""
from __future__ import annotations

import http.cookiejar
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.util.ssl_ import create_urllib3_context

from .addresses import is_public_address, preferred_address
from .config import IdentityConfig
from .directory import AddressRefused, ResolutionFailed
from .dnsclient import DnsClient, is_ip_literal

POOL_MAXSIZE = 128  # keep-alive connections kept per upstream address
MAX_VETTED_HOSTS = 10_000  # vetted addresses remembered (oldest forgotten first)
_CHUNK = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_NO_RETRIES = urllib3.Retry(total=False, redirect=False, raise_on_redirect=False)
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)


class ResponseTooLarge(ResolutionFailed):
    """The body is over the cap for its kind; it was cut off, not read to the end."""


@dataclass(frozen=True)
class Fetched:
    """One final answer: the body is read (up to the cap) only for status 200."""

    url: str
    status: int
    body: bytes = b""


_session: requests.Session | None = None
_session_pid: int | None = None
_session_lock = threading.Lock()


def session() -> requests.Session:
    """The process's one Session, shared by all threads; a forked child makes its own."""
    global _session, _session_pid
    with _session_lock:
        if _session is None or _session_pid != os.getpid():
            s = requests.Session()
            s.trust_env = False  # no proxies or .netrc from the environment: we pin addresses
            s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            adapter = HTTPAdapter(pool_connections=64, pool_maxsize=POOL_MAXSIZE, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            _session, _session_pid = s, os.getpid()
        return _session


def _pool_manager() -> urllib3.PoolManager:
    """The pinned pools of the process's Session (one per address, port and TLS name)."""
    adapter = session().get_adapter("https://")
    manager: urllib3.PoolManager = adapter.poolmanager  # type: ignore[attr-defined]
    return manager


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Certificates required, checked against the name (urllib3 matches it, see assert_hostname)."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    # One context is shared by every pool and thread, so it is never changed after this:
    # urllib3 matches the certificate against assert_hostname (the name, SAN only) itself.
    context.check_hostname = False
    context.hostname_checks_common_name = False
    location = ca_bundle or DEFAULT_CA_BUNDLE_PATH
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    return context


class HttpFetcher:
    """GETs one URL under the config's address policy, timeouts, redirect bound and a size cap.

    Thread-safe: many threads may fetch at once through one fetcher."""

    def __init__(
        self, config: IdentityConfig, dns: DnsClient, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._dns = dns
        self._clock = clock
        self._timeout = urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout)
        self._lock = threading.Lock()
        self._vetted: dict[str, tuple[float, str]] = {}  # host -> (expires, address)
        self._manager: urllib3.PoolManager | None = None
        self._manager_pid = 0
        self._pools: dict[tuple[str, str, int, str], Any] = {}
        self._tls: ssl.SSLContext | None = None

    def get(self, url: str, *, max_bytes: int, accept: str = "application/json") -> Fetched:
        """Fetches `url`. Non-200 statuses are returned without their body.

        Raises AddressRefused, HostNotFound (the name does not exist), ResponseTooLarge or
        ResolutionFailed (DNS, transport, timeout, too many redirects)."""
        deadline = time.monotonic() + self._config.total_timeout
        for _ in range(self._config.max_redirects + 1):
            if time.monotonic() > deadline:
                raise ResolutionFailed(f"GET {url}: out of time", upstream=urlsplit(url).netloc)
            fetched, location = self._get_once(url, max_bytes, accept, deadline)
            if location is None:
                return fetched
            url = self._next_url(url, location)
        raise ResolutionFailed(f"more than {self._config.max_redirects} redirects from {url}",
                               upstream=urlsplit(url).netloc)

    @staticmethod
    def _next_url(url: str, location: str) -> str:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
        if scheme not in _DEFAULT_PORTS or (urlsplit(url).scheme == "https" and scheme != "https"):
            raise ResolutionFailed(f"refusing redirect from {url} to {target}",
                                   upstream=urlsplit(url).netloc)
        return target

    # -- addresses ------------------------------------------------------------------------
    def _vetted_address(self, host: str) -> str:
        """The address to connect to for `host`: vetted now, or within its TTL."""
        now = self._clock()
        entry = self._vetted.get(host)  # a plain read: dict lookups are atomic
        if entry is not None and entry[0] > now:
            return entry[1]
        addresses = self._dns.addresses(host)
        if not self._config.allow_private_addresses:
            bad = [a for a in addresses if not is_public_address(a)]
            if bad:
                raise AddressRefused(f"{host} resolves to non-public address {bad[0]} "
                                     "(allowed only with --allow-private-addresses)")
        address = preferred_address(addresses)
        # Unknown TTL (a DnsClient not saying): vetted for this fetch only.
        ttl = min(getattr(addresses, "ttl", 0.0), self._config.address_ttl)
        if ttl > 0:
            with self._lock:
                self._vetted.pop(host, None)  # re-inserted last: oldest first in the dict
                self._vetted[host] = (now + ttl, address)
                while len(self._vetted) > MAX_VETTED_HOSTS:
                    del self._vetted[next(iter(self._vetted))]
        return address

    def forget(self, host: str) -> None:
        """Drops the vetted address of `host`: the next fetch looks it up and vets it again."""
        with self._lock:
            self._vetted.pop(host, None)

    # -- pools ----------------------------------------------------------------------------
    def _pool(self, scheme: str, address: str, port: int, name: str) -> Any:
        """The keep-alive pool for one pinned address (and TLS name), from the Session's manager.

        Remembered here, which saves the manager's key building on every fetch; a pool the
        manager has since dropped (and closed) is asked for again."""
        key = (scheme, address, port, name)
        pool = self._pools.get(key)
        if pool is not None and pool.pool is not None and self._manager_pid == os.getpid():
            return pool
        with self._lock:
            if self._manager is None or self._manager_pid != os.getpid():
                self._manager, self._manager_pid = _pool_manager(), os.getpid()
                self._pools.clear()
            manager = self._manager
        if scheme == "http":
            pool = manager.connection_from_host(address, port, "http")
        else:
            pool = manager.connection_from_host(address, port, "https",
                                                pool_kwargs=self._tls_pool_kwargs(name))
        with self._lock:
            if len(self._pools) >= MAX_VETTED_HOSTS:
                self._pools.clear()
            self._pools[key] = pool
        return pool

    def _tls_pool_kwargs(self, name: str) -> dict[str, Any]:
        with self._lock:
            if self._tls is None:
                self._tls = _tls_context(self._config.ca_bundle)
            kwargs: dict[str, Any] = {"ssl_context": self._tls, "cert_reqs": "CERT_REQUIRED"}
        if not is_ip_literal(name):  # connect to the address, do TLS for the name
            kwargs["server_hostname"] = name
            kwargs["assert_hostname"] = name
        return kwargs

    # -- one request ----------------------------------------------------------------------
    def _get_once(
        self, url: str, max_bytes: int, accept: str, deadline: float
    ) -> tuple[Fetched, str | None]:
        parts = urlsplit(url)
        name = parts.hostname
        if parts.scheme not in _DEFAULT_PORTS or not name or "@" in parts.netloc:
            raise ResolutionFailed(f"unsupported URL {url!r}")
        upstream = parts.netloc.lower()
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ResolutionFailed(f"bad port in {url!r}") from exc
        address = self._vetted_address(name)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        headers = {
            "Host": parts.netloc,  # the name, not the pinned address
            "Accept": accept,
            "Accept-Encoding": "identity",
            "User-Agent": self._config.user_agent,
        }
        try:
            pool = self._pool(parts.scheme, address, port, name)
            resp = pool.urlopen(
                "GET", target, headers=headers, retries=_NO_RETRIES, redirect=False,
                assert_same_host=False, timeout=self._timeout, preload_content=False,
                release_conn=False,
            )
        except _TRANSPORT_ERRORS as exc:
            self.forget(name)  # the host may have moved: look it up again next time
            raise ResolutionFailed(f"GET {url}: {exc}", upstream=upstream) from exc
        complete = False
        try:
            status = resp.status
            if status in _REDIRECTS:
                location = resp.headers.get("Location")
                if location is not None:
                    return Fetched(url, status), location
            if status != 200:
                return Fetched(url, status), None
            body = _read_capped(resp, url, upstream, max_bytes, deadline)
            complete = True
            return Fetched(url, 200, body), None
        finally:
            if not complete:
                resp.close()  # an unread body closes the connection rather than draining it
            resp.release_conn()  # a fully read one goes back to the pool, kept alive


def _read_capped(resp: Any, url: str, upstream: str, max_bytes: int, deadline: float) -> bytes:
    """Reads at most max_bytes (+ one chunk) and gives up past the deadline."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(f"{url}: Content-Length {declared} > {max_bytes}", upstream=upstream)
    chunk_size = min(_CHUNK, max_bytes + 1)
    body = bytearray()
    try:
        while True:
            chunk = resp.read(chunk_size)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise ResponseTooLarge(f"{url}: body over {max_bytes} bytes", upstream=upstream)
            if time.monotonic() > deadline:
                raise ResolutionFailed(f"{url}: body not read in time", upstream=upstream)
    except _TRANSPORT_ERRORS as exc:
        raise ResolutionFailed(f"GET {url}: {exc}", upstream=upstream) from exc
    return bytes(body)
