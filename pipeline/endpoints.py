"""The endpoints the operator named, in one line at start, each with the kind of its address.

They are used as given, private or not (only hosts from the network's data are vetted), so the
line is where a typo shows: a PLC URL that resolves somewhere unexpected, or nowhere."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg

from shards.identity import IdentityConfig, IdentityError
from shards.identity.addresses import address_kind
from shards.identity.config import parse_server
from shards.identity.dnsclient import DnsClient, is_ip_literal

LOOKUP_WAIT = 2.0  # seconds the line waits for all its address lookups together


@dataclass(frozen=True)
class Endpoint:
    """What an endpoint is for, where it is (no credentials), and how to find its addresses
    (None: a local socket, nothing to look up)."""

    role: str
    where: str
    host: str | None = None
    lookup: Callable[[str], list[str]] | None = None


def _system_lookup(host: str) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in
                              socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


def identity_endpoints(config: IdentityConfig) -> list[Endpoint]:
    """The PLC directory (its host looked up as resolutions will) and the DNS servers."""
    dns = DnsClient(config)
    plc = urlsplit(config.plc_url)
    found = [Endpoint("PLC", config.plc_url, plc.hostname, dns.addresses)]
    server = parse_server(config.dns_server)[0] if config.dns_server else "system"
    found.append(Endpoint("DNS", config.dns_server or "system", server,
                          lambda _server: list(dns.servers())))
    return found


def database_endpoint(dsn: str) -> Endpoint:
    """host:port/dbname of a DSN; a socket directory (or none: the default one) is local."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return Endpoint("database", "(unreadable DSN)")
    host = str(info.get("host") or "")
    port, name = info.get("port"), info.get("dbname") or ""
    if not host or host.startswith("/"):
        return Endpoint("database", f"{name} (local socket{f' in {host}' if host else ''})")
    where = f"{host}{f':{port}' if port else ''}/{name}"
    return Endpoint("database", where, host.split(",")[0], _system_lookup)


def url_endpoint(role: str, url: str) -> Endpoint:
    """A URL without its user and password (Jetstream, Redis)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return Endpoint(role, f"{parts.scheme}://{netloc}{parts.path}", parts.hostname,
                    _system_lookup)


def _kinds(host: str, addresses: list[str]) -> str:
    """"loopback", or "10.0.0.5, private" for a name; public ones too, so every one says."""
    if not addresses:
        return "no address"
    kinds = list(dict.fromkeys(address_kind(a) for a in addresses))
    if is_ip_literal(host) or len(addresses) > 3:
        return ", ".join(kinds)
    return f"{', '.join(addresses)}: {', '.join(kinds)}"


def _look_up(endpoints: list[Endpoint]) -> dict[int, str]:
    """Each endpoint's address kinds, looked up at once on daemon threads, for LOOKUP_WAIT at most."""
    found: dict[int, str] = {}

    def one(i: int, e: Endpoint) -> None:
        assert e.host is not None and e.lookup is not None
        try:
            found[i] = _kinds(e.host, e.lookup(e.host))
        except (OSError, IdentityError, UnicodeError) as exc:
            found[i] = f"does not resolve: {str(exc).strip() or type(exc).__name__}"

    threads = [threading.Thread(target=one, args=(i, e), daemon=True, name="endpoint-lookup")
               for i, e in enumerate(endpoints) if e.host is not None and e.lookup is not None]
    for t in threads:
        t.start()
    deadline = time.monotonic() + LOOKUP_WAIT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(found)


def notice(endpoints: list[Endpoint], allow_private: bool) -> str:
    """The one start line: each endpoint with its address kinds, then the rule for the rest."""
    kinds = _look_up(endpoints)
    named = []
    for i, e in enumerate(endpoints):
        if e.host is not None and e.lookup is not None:
            named.append(f"{e.role} {e.where} ({kinds.get(i, f'not resolved in {LOOKUP_WAIT:g} s')})")
        else:
            named.append(f"{e.role} {e.where}")
    rule = ("private allowed (--allow-private-addresses)" if allow_private else
            "public addresses only (--allow-private-addresses is off)")
    return (f"endpoints named by the operator, used as given: {', '.join(named)};"
            f" hosts from the network's data: {rule}")


def start_line(identity: IdentityConfig, dsn: str, *, jetstream: str | None = None,
               redis: str | None = None) -> str:
    """The notice for a command that uses these endpoints."""
    endpoints = identity_endpoints(identity) + [database_endpoint(dsn)]
    if jetstream:
        endpoints.append(url_endpoint("Jetstream", jetstream))
    if redis:
        endpoints.append(url_endpoint("Redis", redis))
    return notice(endpoints, identity.allow_private_addresses)
