"""Asking a user's PDS for its profile record, through the guarded fetcher identity lookups use.

Every request goes through HttpFetcher (vetted and pinned addresses, TLS checks, timeouts, size
caps), a circuit breaker per host, and the host's limits (rate, requests in flight, 429
pauses). Each answer is told apart as the profile, no profile, come back later, or failed."""
from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from shards.events import has_nul
from shards.identity.addresses import Trust
from shards.identity.breaker import CircuitBreakers, CircuitOpen
from shards.identity.config import IdentityConfig
from shards.identity.directory import AddressRefused, ResolutionFailed
from shards.identity.dnsclient import DnsClient, HostNotFound
from shards.identity.http import Fetched, HttpFetcher, ResponseTooLarge
from shards.identity.metrics import Counters
from shards.store.writes import PROFILE, profile_fields

from .config import PdsConfig
from .hosts import HostLimits

log = logging.getLogger("pipeline.pds")

# XRPC error names (status 400 or 404) that mean the record or the repository is not there.
ABSENT_ERRORS = frozenset(("RecordNotFound", "RepoNotFound", "RepoTakendown", "RepoDeactivated",
                           "RepoSuspended"))
# The reference PDS says InvalidRequest with these messages for a missing record or repository.
_ABSENT_MESSAGES = ("Could not locate record", "Could not find repo", "Could not find user")
_EPOCH_AFTER = 1_000_000_000
CAR_TYPE = "application/vnd.ipld.car"  # a RateLimit-Reset this large is a Unix time, not a delay

FOUND, ABSENT, LATER, FAILED, REFUSED, BAD = "found", "absent", "later", "failed", "refused", "bad"
RESULTS = (FOUND, ABSENT, LATER, FAILED, REFUSED, BAD)


class EndpointRefused(ValueError):
    """A PDS endpoint the pipeline will not ask: not https (unless private addresses are
    allowed), or not a plain origin."""


@dataclass(frozen=True)
class Answer:
    """What one request for a user's profile came to.

    `result`: found (with `fields`), absent, later (ask again in `retry_in` seconds: the host's
    rate, a 429, an open circuit), failed (5xx, timeouts: back off), refused (an endpoint or
    address the pipeline will not ask), bad (an answer that is no profile: a dead letter)."""

    result: str
    fields: tuple[Any, ...] | None = None
    retry_in: float = 0.0
    detail: str = ""
    raw: bytes = b""


def pds_origin(endpoint: str, allow_plain_http: bool) -> tuple[str, str]:
    """The base URL (scheme://host[:port]) and the host (its breaker and limits key) of a PDS
    endpoint. Raises EndpointRefused."""
    try:
        parts = urlsplit(endpoint.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise EndpointRefused(f"malformed PDS endpoint {endpoint[:200]!r}") from None
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_plain_http):
        raise EndpointRefused(f"PDS endpoint {endpoint[:200]!r} is not https "
                              "(plain http only with --allow-private-addresses)")
    if (not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment
            or parts.path not in ("", "/")):
        raise EndpointRefused(f"PDS endpoint {endpoint[:200]!r} is not a plain origin")
    host = parts.netloc.lower()
    return f"{parts.scheme}://{host}", host


def retry_after(headers: dict[bytes, bytes], default: float, most: float,
                now: Callable[[], float] = time.time) -> float:
    """Seconds a 429 asks to wait: Retry-After (seconds or an HTTP date), else RateLimit-Reset
    (a Unix time, as Bluesky's hosts send it, or seconds), else `default`; within 1..`most`."""
    wait: float | None = None
    value = headers.get(b"retry-after", b"").decode("latin-1").strip()
    if value.isdigit():
        wait = float(value)
    elif value:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - now()
        except (TypeError, ValueError, OverflowError):
            wait = None
    if wait is None:
        reset = headers.get(b"ratelimit-reset", b"").decode("latin-1").strip()
        if reset.isdigit():
            wait = float(reset) - now() if int(reset) > _EPOCH_AFTER else float(reset)
    if wait is None:
        wait = default
    return min(max(wait, 1.0), most)


def _xrpc_error(body: bytes) -> tuple[str, str]:
    """The `error` and `message` of an XRPC error body, empty when it has none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    error, message = data.get("error"), data.get("message")
    return (error if isinstance(error, str) else "", message if isinstance(message, str) else "")


class PdsClient:
    """Asks PDS hosts for one process; thread-safe. Its `limits` are the hosts' (rate, requests
    in flight, pauses): callers hold a slot of the host around each request."""

    def __init__(self, identity: IdentityConfig, config: PdsConfig,
                 counters: Counters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.counters = counters or Counters()
        self.allow_plain_http = identity.allow_private_addresses
        self._http = HttpFetcher(identity, DnsClient(identity))
        self._breakers = CircuitBreakers(config.breaker_threshold, config.breaker_cooldown,
                                         self.counters, clock)
        self.limits = HostLimits(config.rate, config.host_concurrency, clock)

    def origin(self, pds: str) -> tuple[str, str]:
        """The base URL and host of a PDS endpoint; raises EndpointRefused."""
        return pds_origin(pds, self.allow_plain_http)

    def profile(self, did: str, base: str, host: str) -> Answer:
        """The profile record of `did` from the PDS at `base` (the caller holds a slot)."""
        query = urlencode({"repo": did, "collection": PROFILE, "rkey": "self"})
        url = f"{base}/xrpc/com.atproto.repo.getRecord?{query}"
        got = self._get(url, host, self.config.profile_max_bytes, "application/json")
        if isinstance(got, Answer):
            answer = self._bad(got.detail, got.raw) if got.result == BAD else got
        else:
            answer = self._read_profile(host, got)
        self.counters.inc(f"pds.profile.{answer.result}")
        return answer

    def repo(self, did: str, base: str, host: str, max_bytes: int) -> Answer:
        """The repository of `did` as a CAR (the `raw` of a found answer) from the PDS at
        `base`, at most `max_bytes` (the caller holds a slot)."""
        url = f"{base}/xrpc/com.atproto.sync.getRepo?{urlencode({'did': did})}"
        got = self._get(url, host, max_bytes, CAR_TYPE, self.config.repo_timeout)
        if isinstance(got, Answer):
            answer = got
        elif got.status == 200:
            answer = Answer(FOUND, raw=got.body)
        else:
            answer = self._status(host, got) or Answer(FAILED, detail=f"HTTP {got.status}"
                                                                       f" from {host}")
        self.counters.inc(f"pds.repo.{answer.result}")
        return answer

    def _get(self, url: str, host: str, max_bytes: int, accept: str,
             timeout: float | None = None) -> Fetched | Answer:
        """One GET through the host's circuit: the answer when it is one for every kind of
        request (transport failures, 5xx, refused addresses, oversized bodies, open circuit)."""
        try:
            ticket = self._breakers.enter(f"pds:{host}")
        except CircuitOpen:
            self.limits.pause(host, self.config.breaker_cooldown)
            return Answer(LATER, retry_in=self.config.breaker_cooldown,
                          detail=f"circuit open for {host}")
        try:  # a PDS endpoint comes from a DID document: the network's data, always vetted
            fetched = self._http.get(url, max_bytes=max_bytes, accept=accept, trust=Trust.NETWORK,
                                     error_bytes=self.config.error_max_bytes, timeout=timeout)
        except AddressRefused as exc:
            self._breakers.abandon(ticket)
            self.counters.inc(f"refused.{exc.kind}")
            return Answer(REFUSED, retry_in=self.config.absent_retry, detail=str(exc))
        except ResponseTooLarge:
            self._breakers.success(ticket)
            return Answer(BAD, retry_in=self.config.absent_retry,
                          detail=f"answer over {max_bytes} bytes", raw=url.encode())
        except HostNotFound as exc:
            self._breakers.abandon(ticket)
            return Answer(FAILED, detail=str(exc))
        except ResolutionFailed as exc:
            self._breakers.failure(ticket)
            return Answer(FAILED, detail=str(exc))
        if fetched.status >= 500:
            self._breakers.failure(ticket)
            return Answer(FAILED, detail=f"HTTP {fetched.status} from {host}")
        self._breakers.success(ticket)
        return fetched

    def _status(self, host: str, fetched: Fetched) -> Answer | None:
        """What a 429 or an XRPC "not there" error means, for any kind of request."""
        status = fetched.status
        if status == 429:
            wait = retry_after(fetched.headers, self.config.rate_limited_wait,
                               self.config.max_rate_limited_wait)
            self.limits.pause(host, wait)
            self.counters.inc(f"pds.rate_limited.{host}")
            log.info("PDS %s answered 429: pausing it for %.0f s", host, wait)
            return Answer(LATER, retry_in=wait, detail=f"HTTP 429 from {host}")
        if status in (400, 404):
            error, message = _xrpc_error(fetched.body)
            if status == 404 or error in ABSENT_ERRORS or message.startswith(_ABSENT_MESSAGES):
                return Answer(ABSENT, retry_in=self.config.absent_retry,
                              detail=f"HTTP {status} {error}".rstrip())
        return None

    def _read_profile(self, host: str, fetched: Fetched) -> Answer:
        if fetched.status != 200:
            return self._status(host, fetched) or Answer(
                FAILED, detail=f"HTTP {fetched.status} from {host}")
        try:
            data = orjson.loads(fetched.body)
        except orjson.JSONDecodeError as exc:
            return self._bad(f"answer is not JSON: {exc}", fetched.body)
        value = data.get("value") if isinstance(data, dict) else None
        if not isinstance(value, dict):
            return self._bad("answer has no record value", fetched.body)
        if value.get("$type", PROFILE) != PROFILE:
            return self._bad(f"answer is a {str(value.get('$type'))[:80]}", fetched.body)
        if b"\\u0000" in fetched.body and has_nul(value):
            return self._bad("NUL character in text", fetched.body)
        return Answer(FOUND, fields=profile_fields(value))

    def _bad(self, why: str, body: bytes) -> Answer:
        return Answer(BAD, retry_in=self.config.absent_retry, detail=f"profile: {why}", raw=body)
