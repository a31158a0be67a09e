"""Which IP addresses a resolver may connect to, and who named them.

Endpoints the operator names (--plc-url, --dns-server) are used as given; hosts that come from
the network's data (handles, did:web hosts, PDS endpoints, redirects) may only be public unicast
addresses unless --allow-private-addresses, so DIDs cannot aim the pipeline inward."""
from __future__ import annotations

import enum
import ipaddress

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: neither private nor global

PUBLIC = "public"


class Trust(enum.Enum):
    """Who named a destination, which decides whether its addresses are vetted."""

    OPERATOR = "operator"  # on the command line or in the environment: used as given
    NETWORK = "network"  # in the network's data, or a redirect: public addresses only


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in a mapped, 6to4 or Teredo IPv6 address, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _kind(ip: _Address) -> str:
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("shared", ip in _SHARED), ("reserved", ip.is_reserved),
              ("private", ip.is_private or not ip.is_global))
    return next((name for name, hit in checks if hit), PUBLIC)


def address_kind(address: str) -> str:
    """"public" for globally routable unicast addresses, else what the address is: loopback,
    private, link-local, shared (CGNAT), multicast, reserved, unspecified or invalid."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "invalid"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None and _kind(inner) != PUBLIC:
            return _kind(inner)
    return _kind(ip)


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses (and IPv6 forms embedding only such)."""
    return address_kind(address) == PUBLIC


def preferred_address(addresses: list[str]) -> str:
    """IPv4 first: IPv6 routes are more often broken than IPv4 ones on servers."""
    for address in addresses:
        if ":" not in address:
            return address
    return addresses[0]
