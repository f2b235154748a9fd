"""``tcp://host:port`` addresses: parsing, formatting and the loopback test.

Accepted forms::

    tcp://127.0.0.1:9000     an IPv4 address
    tcp://[::1]:9000         an IPv6 address, always in brackets (with an optional %zone)
    tcp://node7.local:9000   a host name (resolved only when connecting or binding)
    tcp://:9000, tcp://      no host: the loopback address 127.0.0.1

A missing port means 0 ("any free port") when listening and is an error when connecting.
The default host is loopback on purpose: a listener is reachable from other machines only
when the caller names an interface (``tcp://0.0.0.0:0`` or a routable address).

Every malformed address raises ``ValueError`` naming the address and what is wrong with it.
"""
from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

__all__ = ["SCHEME", "DEFAULT_HOST", "TcpAddress", "parse_tcp_url", "format_tcp_url", "is_loopback"]

SCHEME = "tcp"
DEFAULT_HOST = "127.0.0.1"
_PREFIX = SCHEME + "://"

# One DNS label: letters, digits, '-' and '_' (seen in real host names), no leading or
# trailing '-', at most 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_FORBIDDEN = set("/?#@ \t\r\n")


class TcpAddress(NamedTuple):
    """A parsed TCP address; ``host`` is an IP literal (IPv6 without brackets) or a name."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The address as a ``tcp://`` URL."""
        return format_tcp_url(self.host, self.port)

    def __str__(self) -> str:
        return self.url


def parse_tcp_url(url: str, *, listen: bool = False) -> TcpAddress:
    """Parse ``tcp://host:port``; with ``listen=True`` the port may be omitted (it is 0).

    A missing host is ``DEFAULT_HOST`` (loopback). Raises ``ValueError`` naming ``url``.
    """
    if not isinstance(url, str):
        raise ValueError(f"TCP address must be a string like 'tcp://127.0.0.1:9000', not {url!r}")
    if not url.startswith(_PREFIX):
        raise ValueError(f"TCP address {url!r} must start with {_PREFIX!r}")
    rest = url[len(_PREFIX):]
    bad = sorted(_FORBIDDEN.intersection(rest))
    if bad:
        raise ValueError(f"TCP address {url!r} contains {bad[0]!r}; expected only 'tcp://host:port'")
    host, port_text = _split_host_port(url, rest)
    host = _check_host(url, host) if host else DEFAULT_HOST
    port = _check_port(url, port_text, listen)
    return TcpAddress(host, port)


def _split_host_port(url: str, rest: str) -> tuple[str, str]:
    """Split ``rest`` (the URL without its scheme) into host text and port text."""
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"TCP address {url!r} has an unclosed '[' around its IPv6 host")
        if not host:
            raise ValueError(f"TCP address {url!r} has empty brackets where the IPv6 host belongs")
        if after and not after.startswith(":"):
            raise ValueError(f"TCP address {url!r} has {after!r} after its IPv6 host; expected ':port'")
        _check_ipv6(url, host)
        return host, after[1:]
    if rest.count(":") > 1:
        raise ValueError(
            f"TCP address {url!r} looks like an IPv6 address without brackets; "
            f"write it as 'tcp://[::1]:9000'")
    host, _, port_text = rest.partition(":")
    return host, port_text


def _check_ipv6(url: str, host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"TCP address {url!r}: {host!r} in brackets is not an IPv6 address") from None


def _check_host(url: str, host: str) -> str:
    """Validate an IPv4 literal or a host name (IPv6 was checked when split)."""
    if ":" in host:
        return host  # a bracketed IPv6 literal, already validated
    if all(c.isdigit() or c == "." for c in host):
        # Only digits and dots: must be a full dotted quad, never a name like "10.1".
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"TCP address {url!r}: {host!r} is not a valid IPv4 address") from None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"TCP address {url!r}: {host!r} is not a valid host name")
    return host


def _check_port(url: str, text: str, listen: bool) -> int:
    if not text:
        if listen:
            return 0
        raise ValueError(f"TCP address {url!r} has no port; expected e.g. 'tcp://127.0.0.1:9000'")
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"TCP address {url!r}: port {text!r} is not a number")
    port = int(text)
    if port > 65535:
        raise ValueError(f"TCP address {url!r}: port {port} is out of range (0-65535)")
    if port == 0 and not listen:
        raise ValueError(f"TCP address {url!r}: port 0 can be listened on but not connected to")
    return port


def format_tcp_url(host: str, port: int) -> str:
    """``tcp://host:port``, with IPv6 hosts in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{_PREFIX}{host}:{port}"


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address or ``localhost``; names are not resolved."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    # An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is loopback when its IPv4 part is.
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(mapped and mapped.is_loopback)
