"""What counts as one source of connections, for the per-source caps of our listeners.

The broker and the post-quantum channel both limit how many unfinished handshakes one
source may hold, so that one host cannot starve the others. A source is an IPv4 address, or
an IPv6 /64: one host usually holds a whole /64, so counting single IPv6 addresses would cap
nothing. An IPv4-mapped IPv6 address is its IPv4 address.
"""

from __future__ import annotations

import ipaddress


def source_key(host: str) -> str:
    """The unit of a per-source cap for a peer address (zone ids ignored)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
