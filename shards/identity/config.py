"""Every knob of identity resolution in one frozen value, so each worker builds the same stack."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class IdentityConfig:
    """Where to resolve, how long to wait, how much to read and how long to remember.

    Times are seconds, sizes bytes. A TTL of 0 disables caching of that kind of answer."""

    plc_url: str = "https://plc.directory"
    # "HOST[:PORT]" ("[v6]:PORT" for IPv6) of the DNS server for TXT and address lookups;
    # None: /etc/resolv.conf for TXT, the system resolver (getaddrinfo) for addresses.
    dns_server: str | None = None
    # Off in production: hosts named by the network's data (handles, did:web hosts, PDS
    # endpoints, redirects) resolving to loopback, private, link-local, reserved... addresses
    # are refused. The operator's own plc_url and dns_server are used as given either way.
    allow_private_addresses: bool = False
    connect_timeout: float = 3.0
    read_timeout: float = 5.0  # per socket read
    total_timeout: float = 10.0  # one whole HTTP fetch, body and redirects included
    dns_timeout: float = 3.0  # one DNS lookup, retries included
    max_redirects: int = 2  # each hop re-vetted; 0 = never follow
    # A host's vetted address is reused for its DNS TTL, at most this long (0: vet every
    # fetch); then it is looked up and vetted again.
    address_ttl: float = 300.0
    did_doc_max_bytes: int = 64 * 1024
    well_known_max_bytes: int = 4 * 1024
    ca_bundle: str | None = None  # PEM bundle for TLS verification; None = certifi's
    user_agent: str = "atproto-pipeline-identity/0.1"

    cache_size: int = 100_000  # entries (DIDs and handle checks together)
    cache_ttl: float = 24 * 3600.0  # resolved identities and verified handles
    invalid_handle_ttl: float = 3600.0  # handles that definitively do not point back
    not_found_ttl: float = 120.0  # DIDNotFound
    failure_ttl: float = 60.0  # ResolutionFailed (circuit-open errors are never cached)

    breaker_threshold: int = 5  # consecutive failures of one upstream that open its circuit
    breaker_cooldown: float = 30.0  # open for this long, then one probe is let through

    # DEBUG/TEST ONLY: scheme of did:web and handle well-known fetches. Tests cannot serve
    # real TLS, so they set "http"; production must keep "https".
    web_scheme: str = "https"
    # DEBUG/TEST ONLY: port for did:web (when the DID names none) and handle well-known
    # fetches, since a handle cannot carry a port. None: the scheme's default port.
    web_port: int | None = None

    def __post_init__(self) -> None:
        if self.web_scheme not in ("http", "https"):
            raise ValueError(f"web_scheme must be http or https, not {self.web_scheme!r}")
        if not self.plc_url.startswith(("http://", "https://")):
            raise ValueError(f"plc_url must be an http(s) URL, not {self.plc_url!r}")
        for name in ("connect_timeout", "read_timeout", "total_timeout", "dns_timeout",
                     "breaker_cooldown"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.address_ttl < 0:
            raise ValueError("address_ttl must be >= 0")
        if self.breaker_threshold < 1 or self.cache_size < 1 or self.max_redirects < 0:
            raise ValueError("breaker_threshold and cache_size must be >= 1, max_redirects >= 0")
        if self.dns_server is not None:
            parse_server(self.dns_server)


def parse_server(value: str, default_port: int = 53) -> tuple[str, int]:
    """Splits "HOST[:PORT]", "[V6]:PORT" or a bare IPv6 address into host and port."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad server address {value!r}")
        ipaddress.IPv6Address(host)  # brackets only hold IPv6 addresses
    elif text.count(":") > 1:  # bare IPv6, no port
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"bad server address {value!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port in server address {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port in server address {value!r}")
    if ":" in host:
        ipaddress.IPv6Address(host)  # raises ValueError when not an address
    return host, port
