"""Which IP addresses a resolver may connect to: public unicast only, so DIDs cannot aim us inward."""
from __future__ import annotations

import ipaddress

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in a mapped, 6to4 or Teredo IPv6 address, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _public(ip: _Address) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses; False for loopback, private, link-local,
    CGNAT, multicast, reserved and documentation ranges (and IPv6 forms embedding them)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None and not _public(inner):
            return False
    return _public(ip)


def preferred_address(addresses: list[str]) -> str:
    """IPv4 first: IPv6 routes are more often broken than IPv4 ones on servers."""
    for address in addresses:
        if ":" not in address:
            return address
    return addresses[0]
