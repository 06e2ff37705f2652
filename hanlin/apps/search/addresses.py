"""Which network addresses a web fetch may connect to, and resolving host names within a deadline."""

from __future__ import annotations

import ipaddress
import socket
import threading

from hanlin.apps.search.errors import FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address ("loopback", "private", ...), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = non_public_reason(embedded)
            return f"{reason} (IPv4 {embedded} inside IPv6)" if reason else None
    for reason, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return reason
    if not ip.is_global:  # shared address space 100.64.0.0/10 and the like
        return "non-global"
    return None


def parse_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally ("10.0.0.1", "::1", "[::1]"), or None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def resolve(host: str, port: int, *, timeout: float) -> list[IPAddress]:
    """The addresses `host` resolves to (in the resolver's order); FetchError when it does not resolve.

    getaddrinfo has no timeout of its own, so it runs in a daemon thread that is abandoned on timeout.
    """
    literal = parse_ip(host)
    if literal is not None:
        return [literal]
    outcome: dict[str, object] = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            outcome["error"] = error

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(max(timeout, 0.0))
    if worker.is_alive():
        raise FetchError(f"DNS lookup of {host} timed out after {timeout:.1f}s")
    if "error" in outcome:
        raise FetchError(f"could not resolve {host}: {outcome['error']}")
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in outcome["infos"]:  # type: ignore[union-attr]
        ip = ipaddress.ip_address(str(sockaddr[0]))  # may carry an IPv6 scope ("fe80::1%eth0")
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise FetchError(f"could not resolve {host}: no addresses")
    return addresses


def checked_addresses(host: str, port: int, *, allow_private: bool, timeout: float,
                      url: str = "") -> list[IPAddress]:
    """The addresses of `host` to connect to; FetchError if any of them is not public (unless allowed).

    A name with even one private address is refused: public DNS has no business pointing there.
    """
    addresses = resolve(host, port, timeout=timeout)
    if not allow_private:
        for ip in addresses:
            reason = non_public_reason(ip)
            if reason:
                where = f"{host} resolves to {ip}" if parse_ip(host) is None else str(ip)
                for_url = f" for {url}" if url else ""
                raise FetchError(f"refused {reason} address: {where}{for_url} (private addresses are not "
                                 "fetched unless allowed)")
    return addresses
