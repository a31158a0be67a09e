"""Guarded HTTP GETs for identity documents: vetted and pinned addresses, size caps, timeouts.

Every fetch resolves the host itself, refuses non-public addresses (unless allowed), and then
connects to the address it vetted, keeping the name in the Host header, TLS SNI and certificate
check; so a DNS answer that changes between check and connect (rebinding) cannot aim it inward.
"""
from __future__ import annotations

import http.cookiejar
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from .addresses import is_public_address, preferred_address
from .config import IdentityConfig
from .directory import AddressRefused, ResolutionFailed
from .dnsclient import DnsClient, is_ip_literal

POOL_MAXSIZE = 128  # keep-alive connections kept per upstream address
_CHUNK = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ResponseTooLarge(ResolutionFailed):
    """The body is over the cap for its kind; it was cut off, not read to the end."""


@dataclass(frozen=True)
class Fetched:
    """One final answer: the body is read (up to the cap) only for status 200."""

    url: str
    status: int
    body: bytes = b""


class _PinnedAdapter(HTTPAdapter):
    """Connects to the IP in the URL but does TLS (SNI, certificate) for the name in `Host`."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name = _host_name(request.headers.get("Host", ""))
        if (host_params["scheme"] == "https" and name and not is_ip_literal(name)
                and is_ip_literal(host_params["host"].strip("[]"))):
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name
        return host_params, pool_kwargs


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if ":" in host_header else host_header


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
            adapter = _PinnedAdapter(pool_connections=64, pool_maxsize=POOL_MAXSIZE, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            _session, _session_pid = s, os.getpid()
        return _session


class HttpFetcher:
    """GETs one URL under the config's address policy, timeouts, redirect bound and a size cap."""

    def __init__(self, config: IdentityConfig, dns: DnsClient) -> None:
        self._config = config
        self._dns = dns

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

    def _vetted_address(self, host: str) -> str:
        addresses = self._dns.addresses(host)
        if not self._config.allow_private_addresses:
            bad = [a for a in addresses if not is_public_address(a)]
            if bad:
                raise AddressRefused(f"{host} resolves to non-public address {bad[0]} "
                                     "(allowed only with --allow-private-addresses)")
        return preferred_address(addresses)

    def _get_once(
        self, url: str, max_bytes: int, accept: str, deadline: float
    ) -> tuple[Fetched, str | None]:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
            raise ResolutionFailed(f"unsupported URL {url!r}")
        upstream = parts.netloc.lower()
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ResolutionFailed(f"bad port in {url!r}") from exc
        address = self._vetted_address(parts.hostname)
        host_for_url = f"[{address}]" if ":" in address else address
        path = parts.path or "/"
        pinned = f"{parts.scheme}://{host_for_url}:{port}{path}"
        if parts.query:
            pinned += f"?{parts.query}"
        headers = {
            "Host": parts.netloc,  # the name, not the pinned address
            "Accept": accept,
            "Accept-Encoding": "identity",
            "User-Agent": self._config.user_agent,
        }
        cfg = self._config
        try:
            resp = session().get(
                pinned, headers=headers, stream=True, allow_redirects=False,
                timeout=(cfg.connect_timeout, cfg.read_timeout),
                verify=cfg.ca_bundle or True,
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ResolutionFailed(f"GET {url}: {exc}", upstream=upstream) from exc
        try:
            if resp.is_redirect:
                return Fetched(url, resp.status_code), resp.headers["Location"]
            if resp.status_code != 200:
                return Fetched(url, resp.status_code), None
            return Fetched(url, 200, _read_capped(resp, url, upstream, max_bytes, deadline)), None
        finally:
            resp.close()  # an unread body closes the connection rather than draining it


def _read_capped(
    resp: requests.Response, url: str, upstream: str, max_bytes: int, deadline: float
) -> bytes:
    """Reads at most max_bytes (+ one chunk) and gives up past the deadline."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(f"{url}: Content-Length {declared} > {max_bytes}", upstream=upstream)
    body = bytearray()
    try:
        for chunk in resp.iter_content(chunk_size=min(_CHUNK, max_bytes + 1)):
            body += chunk
            if len(body) > max_bytes:
                raise ResponseTooLarge(f"{url}: body over {max_bytes} bytes", upstream=upstream)
            if time.monotonic() > deadline:
                raise ResolutionFailed(f"{url}: body not read in time", upstream=upstream)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ResolutionFailed(f"GET {url}: {exc}", upstream=upstream) from exc
    return bytes(body)
