"""Network transports: ``tcp://`` (``pydist.net.tcp``) and its addresses (``pydist.net.address``).

Importing this package registers the ``tcp`` scheme with ``pydist.transport``.
"""
from __future__ import annotations

from .address import DEFAULT_HOST, TcpAddress, format_tcp_url, is_loopback, parse_tcp_url
from .tcp import TcpListener, TcpTransport, connect_tcp

__all__ = [
    "DEFAULT_HOST", "TcpAddress", "format_tcp_url", "is_loopback", "parse_tcp_url",
    "TcpListener", "TcpTransport", "connect_tcp",
]
