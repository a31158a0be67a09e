"""DNS lookups (TXT for handles, addresses for HTTP) that separate "no such name" from "no answer"."""
from __future__ import annotations

import ipaddress
import socket
import threading

import dns.exception
import dns.name
import dns.rdata
import dns.resolver

from .config import IdentityConfig, parse_server
from .directory import ResolutionFailed


class HostNotFound(ResolutionFailed):
    """NXDOMAIN or no address record: the name definitively does not exist (not a failure to retry)."""


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_localhost(host: str) -> bool:
    # RFC 6761: localhost names are loopback and never sent to DNS.
    return host == "localhost" or host.endswith(".localhost")


class DnsClient:
    """Queries the configured server (or the system's); thread-safe, no caching (the cache does)."""

    def __init__(self, config: IdentityConfig) -> None:
        self._config = config
        self.label = f"dns:{config.dns_server or 'system'}"
        self._lock = threading.Lock()
        self._resolver: dns.resolver.Resolver | None = None

    def _get_resolver(self) -> dns.resolver.Resolver:
        with self._lock:
            if self._resolver is None:
                self._resolver = self._make_resolver()
            return self._resolver

    def _make_resolver(self) -> dns.resolver.Resolver:
        cfg = self._config
        try:
            if cfg.dns_server is None:
                resolver = dns.resolver.Resolver(configure=True)
            else:
                host, port = parse_server(cfg.dns_server)
                if not is_ip_literal(host):  # a named server: find its address once
                    host = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [host]
                resolver.port = port
        except (OSError, dns.exception.DNSException) as exc:
            raise ResolutionFailed(f"no usable DNS server: {exc}", upstream=self.label) from exc
        resolver.cache = None
        resolver.timeout = cfg.dns_timeout / 2  # per attempt: one retry fits in the lifetime
        resolver.lifetime = cfg.dns_timeout
        return resolver

    def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Records of one query; [] when the name exists without them. Raises HostNotFound on NXDOMAIN."""
        resolver = self._get_resolver()
        try:
            qname = dns.name.from_text(name)
        except dns.name.NameTooLong as exc:  # e.g. "_atproto." + a 250-character handle
            raise HostNotFound(f"{name[:60]}...: name too long to exist") from exc
        except dns.exception.DNSException as exc:
            raise HostNotFound(f"{name!r} is not a DNS name") from exc
        try:
            answer = resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise HostNotFound(f"NXDOMAIN for {name}") from exc
        except dns.resolver.NoAnswer:
            return []
        except dns.exception.Timeout as exc:
            raise ResolutionFailed(f"DNS timeout for {name} {rdtype}", upstream=self.label) from exc
        except (dns.exception.DNSException, OSError) as exc:  # SERVFAIL, REFUSED, unreachable
            raise ResolutionFailed(
                f"DNS failure for {name} {rdtype}: {exc}", upstream=self.label
            ) from exc
        return list(answer)

    def txt(self, name: str) -> list[str]:
        """The TXT values of `name` (character-strings joined); [] when the name or record is absent."""
        try:
            records = self._query(name, "TXT")
        except HostNotFound:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]

    def needs_lookup(self, host: str) -> bool:
        """False for IP literals and localhost, which are never sent to a resolver."""
        return not (is_ip_literal(host) or _is_localhost(host))

    def addresses(self, host: str) -> list[str]:
        """IP addresses of `host`. Raises HostNotFound (definitive) or ResolutionFailed."""
        if is_ip_literal(host):
            return [host]
        if _is_localhost(host):
            return ["127.0.0.1"]
        if self._config.dns_server is None:
            return self._system_addresses(host)
        # A failing A query raises at once: asking AAAA of a failing server would double the wait.
        found = [r.address for r in self._query(host, "A")]
        try:
            found += [r.address for r in self._query(host, "AAAA")]
        except ResolutionFailed:
            if not found:
                raise
        if not found:
            raise HostNotFound(f"no address for {host}")
        return found

    def _system_addresses(self, host: str) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise HostNotFound(f"no address for {host}") from exc
            raise ResolutionFailed(f"address lookup of {host}: {exc}", upstream=self.label) from exc
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
