"""Guarded HTTP GETs for identity documents and PDS answers: vetted and pinned addresses, size
caps, timeouts.

Every fetch connects to an address it looked up itself, keeping the name in the Host header,
TLS SNI and certificate check; so a DNS answer that changes between check and connect
(rebinding) cannot aim it inward. Each request says who named its destination: the operator's
own endpoints (Trust.OPERATOR) are used as given, anything else, and any redirect away from an
operator's endpoint, is vetted (public only, unless allowed). An address is reused for its DNS
TTL (at most `address_ttl`), then looked up and vetted again.

A fetch is a GET of a small document over a keep-alive socket kept per pinned address: the
request is two header lines and a target checked for anything that could split it, and the
answer is framed by httptools (llhttp: status, headers, Content-Length or chunked bodies).
General clients (requests and urllib3, or h11 in pure Python) cost several times the CPU of
the exchange itself per fetch, which dominated a replay whose authors are new.
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import certifi
import httptools

from .addresses import PUBLIC, Trust, address_kind, preferred_address
from .config import IdentityConfig
from .directory import AddressRefused, ResolutionFailed
from .dnsclient import DnsClient
from .sockets import expired, set_timeout

POOL_MAXSIZE = 128  # idle keep-alive connections kept per upstream address
MAX_VETTED_HOSTS = 10_000  # vetted addresses remembered (oldest forgotten first)
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_TRANSPORT_ERRORS = (OSError, httptools.HttpParserError)  # OSError: timeouts and TLS too
_UNSAFE = re.compile(r"[^\x21-\x7e]")  # what must never reach a request line or header


class ResponseTooLarge(ResolutionFailed):
    """The body is over the cap for its kind; it was cut off, not read to the end."""


@dataclass(frozen=True)
class Fetched:
    """One final answer: the body is read (up to the cap) for status 200, and for other statuses
    only when asked to (`error_bytes`); header names are lowercase."""

    url: str
    status: int
    body: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Certificates required and checked against the name (SAN only) given at connect."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.hostname_checks_common_name = False
    location = ca_bundle or certifi.where()
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    return context


@dataclass
class _Connection:
    """One keep-alive connection to a pinned address. Plain ones have the kernel keep their
    timeouts (`timeout`: what it gives a call); TLS ones keep Python's, because OpenSSL retries a
    read on a blocking socket that the kernel's timeout ended, forever."""

    sock: socket.socket
    timeout: float | None  # None: TLS, Python's timeout set before each call
    reused: bool = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Response:
    """httptools' callbacks for one answer: status, the headers a fetch needs, the body."""

    def __init__(self, max_bytes: int) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_bytes = max_bytes
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.messages = 0  # a second one means the server sent more than it was asked

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.headers_done = True  # the parser tells these only until the message ends
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if len(self.body) <= self.max_bytes:  # past the cap it is refused anyway
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class HttpFetcher:
    """GETs one URL under the config's address policy, timeouts, redirect bound and a size cap.

    Thread-safe: many threads may fetch at once through one fetcher."""

    def __init__(
        self, config: IdentityConfig, dns: DnsClient, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._dns = dns
        self._clock = clock
        self._lock = threading.Lock()
        # (host, named by the operator) -> (expires, address)
        self._vetted: dict[tuple[str, bool], tuple[float, str]] = {}
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}
        self._idle_pid = os.getpid()
        self._tls: ssl.SSLContext | None = None
        if _UNSAFE.search(config.user_agent.replace(" ", "")):
            raise ValueError(f"unusable User-Agent {config.user_agent!r}")
        self._user_agent = config.user_agent

    def get(self, url: str, *, max_bytes: int, accept: str = "application/json",
            trust: Trust = Trust.NETWORK, error_bytes: int = 0,
            timeout: float | None = None) -> Fetched:
        """Fetches `url`. Non-200 statuses come with their body only when it is at most
        `error_bytes` (an error message); `timeout` replaces the config's total timeout (a
        repository download); each read still gives up after the read timeout.

        `trust` says who named the URL: only Trust.OPERATOR skips vetting its host's addresses,
        and only for as long as redirects stay on its scheme, host and port.

        Raises AddressRefused, HostNotFound (the name does not exist), ResponseTooLarge or
        ResolutionFailed (DNS, transport, timeout, too many redirects)."""
        deadline = time.monotonic() + (timeout or self._config.total_timeout)
        first = url
        for _ in range(self._config.max_redirects + 1):
            if time.monotonic() > deadline:
                raise ResolutionFailed(f"GET {url}: out of time", upstream=urlsplit(url).netloc)
            fetched, location = self._get_once(url, (max_bytes, error_bytes), accept, deadline,
                                               trust is Trust.OPERATOR)
            if location is None:
                return fetched
            url = self._next_url(url, location)
            if trust is Trust.OPERATOR and _origin(url) != _origin(first):
                trust = Trust.NETWORK  # redirected elsewhere: data, no longer the operator's
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
    def _vetted_address(self, host: str, operator: bool) -> str:
        """The address to connect to for `host`: vetted now (unless the operator named it), or
        within its TTL. Operator-named hosts are remembered apart: never vetted, they vouch for
        nothing the network names."""
        now = self._clock()
        key = (host, operator)
        entry = self._vetted.get(key)  # a plain read: dict lookups are atomic
        if entry is not None and entry[0] > now:
            return entry[1]
        addresses = self._dns.addresses(host)
        if not operator and not self._config.allow_private_addresses:
            for candidate in addresses:
                kind = address_kind(candidate)
                if kind != PUBLIC:
                    raise AddressRefused(host, candidate, kind)
        address = preferred_address(addresses)
        # Unknown TTL (a DnsClient not saying): vetted for this fetch only.
        ttl = min(getattr(addresses, "ttl", 0.0), self._config.address_ttl)
        if ttl > 0:
            with self._lock:
                self._vetted.pop(key, None)  # re-inserted last: oldest first in the dict
                self._vetted[key] = (now + ttl, address)
                while len(self._vetted) > MAX_VETTED_HOSTS:
                    del self._vetted[next(iter(self._vetted))]
        return address

    def forget(self, host: str) -> None:
        """Drops the vetted address of `host`: the next fetch looks it up and vets it again."""
        with self._lock:
            for operator in (False, True):
                self._vetted.pop((host, operator), None)

    # -- connections ----------------------------------------------------------------------
    def _checkout(self, key: tuple[str, str, int, str]) -> _Connection | None:
        """An idle keep-alive connection for `key`, most recently used first; a forked child
        never reuses its parent's."""
        with self._lock:
            if self._idle_pid != os.getpid():
                self._idle, self._idle_pid = {}, os.getpid()
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _checkin(self, key: tuple[str, str, int, str], conn: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, []) if self._idle_pid == os.getpid() else None
            if idle is not None and len(idle) < POOL_MAXSIZE:
                conn.reused = True
                idle.append(conn)
                return
        conn.close()

    def _connect(self, scheme: str, address: str, port: int, name: str) -> _Connection:
        sock = socket.create_connection((address, port), timeout=self._config.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":  # connect to the address, do TLS for the name
                sock = self._tls_context().wrap_socket(sock, server_hostname=name)
                return _Connection(sock, None)
            set_timeout(sock, self._config.read_timeout)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, self._config.read_timeout)

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:  # one context, shared by every connection and never changed after
            if self._tls is None:
                self._tls = _tls_context(self._config.ca_bundle)
            return self._tls

    # -- one request ----------------------------------------------------------------------
    def _get_once(
        self, url: str, caps: tuple[int, int], accept: str, deadline: float, operator: bool
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
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        if _UNSAFE.search(target) or _UNSAFE.search(parts.netloc):
            raise ResolutionFailed(f"unsupported URL {url!r}")
        address = self._vetted_address(name, operator)
        request = (f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"  # the name, not the address
                   f"Accept: {accept}\r\nAccept-Encoding: identity\r\n"
                   f"User-Agent: {self._user_agent}\r\n\r\n").encode()
        key = (parts.scheme, address, port, name)
        while True:
            try:
                conn = self._checkout(key) or self._connect(parts.scheme, address, port, name)
                return self._exchange(key, conn, request, url, upstream, caps, deadline)
            except _Stale:
                continue  # the server closed an idle connection: the GET is sent again, afresh
            except _TRANSPORT_ERRORS as exc:
                self.forget(name)  # the host may have moved: look it up again next time
                why = "timed out" if expired(exc) else exc
                raise ResolutionFailed(f"GET {url}: {why}", upstream=upstream) from exc

    def _exchange(
        self, key: tuple[str, str, int, str], conn: _Connection, request: bytes,
        url: str, upstream: str, caps: tuple[int, int], deadline: float,
    ) -> tuple[Fetched, str | None]:
        """Sends the GET and reads the answer; the connection goes back to the pool only after a
        complete exchange, and is closed otherwise (an unread body is never drained).
        `caps`: the most body bytes read for status 200, and for any other status."""
        kept = False
        max_bytes, error_bytes = caps
        answer = _Response(max_bytes)
        try:
            self._timeout(conn, deadline, url, upstream)
            try:
                conn.sock.sendall(request)
                closed = self._read(conn, answer, url, upstream, deadline,
                                    lambda: answer.headers_done)
            except ConnectionError:
                if conn.reused:
                    raise _Stale from None
                raise
            if not answer.headers_done:
                if conn.reused and not answer.messages:
                    raise _Stale
                raise ResolutionFailed(f"GET {url}: closed without an answer", upstream=upstream)
            status = answer.status
            location = answer.headers.get(b"location")
            if status in _REDIRECTS and location is not None:
                return Fetched(url, status), location.decode("latin-1")
            if status != 200:
                if not error_bytes:
                    return Fetched(url, status, headers=answer.headers), None
                answer.max_bytes = max_bytes = error_bytes
            declared = answer.headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(f"{url}: Content-Length {declared.decode()} > {max_bytes}",
                                       upstream=upstream)
            if not closed:
                closed = self._read(conn, answer, url, upstream, deadline,
                                    lambda: answer.complete)
            if len(answer.body) > max_bytes:
                raise ResponseTooLarge(f"{url}: body over {max_bytes} bytes", upstream=upstream)
            if not answer.complete:
                # Only a body without length or chunks may end with the connection.
                if not closed or declared or b"transfer-encoding" in answer.headers:
                    raise ResolutionFailed(f"GET {url}: connection closed mid-body",
                                           upstream=upstream)
            kept = answer.keep_alive and not closed and answer.messages == 1
            return Fetched(url, status, bytes(answer.body), answer.headers), None
        finally:
            if kept:
                self._checkin(key, conn)
            else:
                conn.close()

    def _read(self, conn: _Connection, answer: _Response, url: str, upstream: str,
              deadline: float, enough: Callable[[], bool]) -> bool:
        """Feeds the parser until `enough()` or the body is over the cap; True if the server
        closed the connection."""
        while not enough() and len(answer.body) <= answer.max_bytes:
            self._timeout(conn, deadline, url, upstream)
            data = conn.sock.recv(_CHUNK)
            if not data:
                return True
            answer.parser.feed_data(data)
        return False

    def _timeout(self, conn: _Connection, deadline: float, url: str, upstream: str) -> None:
        """The next call may wait for the read timeout, or for what is left of the fetch; on a
        plain connection only the latter, near the end, costs a system call to tell the kernel."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ResolutionFailed(f"{url}: not answered in time", upstream=upstream)
        if conn.timeout is None:
            conn.sock.settimeout(min(self._config.read_timeout, remaining))
        elif remaining < conn.timeout:
            set_timeout(conn.sock, remaining)
            conn.timeout = remaining


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port: where a redirect may go and still be the operator's endpoint."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


class _Stale(Exception):
    """A reused keep-alive connection turned out closed before any answer."""
