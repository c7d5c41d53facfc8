"""SSRF guard: the one place that decides which addresses a caller-supplied URL (an image to fetch, a
webhook to call) may reach.

A host is resolved once, every address it resolves to is checked, and the fetcher then connects to
the checked address itself, so DNS cannot answer differently between the check and the connection
(DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence


class AddressRefused(Exception):
    """The host resolves to no address, or to one this server must not connect to. Each user of the guard
    words it for its caller (an image error, a webhook log line)."""

    def __init__(self, host: str, *, unresolved: bool = False):
        self.host, self.unresolved = host, unresolved
        what = "could not be resolved" if unresolved else "points to a non-public address"
        super().__init__(f"host {host!r} {what}")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# host, port -> the addresses it resolves to, as strings. Injectable so tests never need real DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _unmapped(ip: IPAddress) -> IPAddress:
    # ::ffff:10.0.0.5 reaches 10.0.0.5: judge (and allow-list) it as the IPv4 address it is.
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata), shared (CGNAT),
    multicast, reserved or unspecified, including those forms embedded in IPv6."""
    ip = _unmapped(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None and not is_public(ip.sixtofour):
        return False  # 2002:7f00:1:: is 6to4 for 127.0.0.1
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


class AddressGuard:
    def __init__(self, allow_networks: Sequence[IPNetwork], allow_hosts: Sequence[str], resolve: Resolver):
        self._networks = tuple(allow_networks)
        self._hosts = frozenset(allow_hosts)
        self._resolve = resolve

    async def address_for(self, host: str, port: int) -> str:
        """The address to connect to for `host`, after checking every address it resolves to."""
        try:
            addresses = [ipaddress.ip_address(host)]  # an IP literal needs no DNS
        except ValueError:
            addresses = await self._lookup(host, port)
        if host.lower().rstrip(".") not in self._hosts:
            for ip in addresses:
                if not is_public(ip) and not any(_unmapped(ip) in net for net in self._networks):
                    raise AddressRefused(host)
        return str(addresses[0])

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        try:
            addresses = [ipaddress.ip_address(a) for a in await self._resolve(host, port)]
        except (OSError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            raise AddressRefused(host, unresolved=True)
        return addresses
