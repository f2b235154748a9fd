"""The transport seam: how the cluster layer sees a connection, and the scheme registry.

A ``Transport`` moves *frames* (byte strings of any length, from zero up to
``max_frame``) between two processes, in order, reliably. It knows nothing of messages,
futures or process ids. Implementations: ``pydist.net.tcp`` (``tcp://``) and
``pydist.shm.transport`` (``shm://``). Every implementation passes the conformance suite
``pydist.testing.check_transport``.

Addresses are URLs: ``tcp://127.0.0.1:9000``, ``shm://@pydist-1f2e...`` (an abstract Unix
socket used only for the rendezvous). ``connect(url)`` and ``listen(url)`` dispatch on
the scheme to whatever registered it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .errors import TransportBroken, TransportClosed
from .wire.codec import DEFAULT_MAX_FRAME, HELLO_MAX_FRAME

__all__ = [
    "Buffer", "Transport", "Listener", "register_scheme", "connect", "listen", "schemes",
    "HELLO_MAX_FRAME", "DEFAULT_MAX_FRAME", "TransportClosed", "TransportBroken",
]

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Transport(Protocol):
    """One connection to one peer process.

    ``send_frame(parts)``: send the concatenation of ``parts`` as one frame; blocks until the
    transport has accepted all of it; safe to call from several threads (frames never
    interleave). Raises ``TransportClosed`` / ``TransportBroken`` when the connection is gone;
    a send that fails because the peer died leaves the receiving side as it was, so what the
    peer sent before it died is still received (then ``recv_frame`` raises).

    ``recv_frame()``: the next frame, as a memoryview the caller may keep. Only one thread
    receives. Raises ``TransportClosed`` on a clean end, ``TransportBroken`` on anything else
    (including a frame longer than ``max_frame``, checked before allocating).

    ``close()``: closes; idempotent; wakes a blocked ``recv_frame`` with ``TransportClosed``.
    ``abort()``: like close but never blocks (no flushing, no goodbye).

    ``poll(timeout)`` (optional): whether ``recv_frame`` would return or raise without
    blocking, after waiting up to ``timeout`` seconds; from the receiving thread only.
    Lets a thread that must stay responsive to signals read without blocking for long.
    """

    max_frame: int

    @property
    def closed(self) -> bool: ...

    @property
    def peer(self) -> str: ...

    def send_frame(self, parts: Sequence[Buffer]) -> None: ...

    def recv_frame(self) -> memoryview: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class Listener(Protocol):
    """Accepts incoming connections. ``address`` is the URL peers connect to.

    ``accept()`` blocks until a peer connects and returns its ``Transport``; raises
    ``TransportClosed`` once the listener is closed. ``close()`` is idempotent.
    """

    @property
    def address(self) -> str: ...

    def accept(self) -> Transport: ...

    def close(self) -> None: ...


ConnectFn = Callable[[str, "float | None"], Transport]
ListenFn = Callable[[str], Listener]

_SCHEMES: dict[str, tuple[ConnectFn, ListenFn]] = {}
# Schemes whose module registers itself on import; imported on first use.
_BUILTIN = {"tcp": "pydist.net.tcp", "shm": "pydist.shm.transport"}


def register_scheme(scheme: str, connect_fn: ConnectFn, listen_fn: ListenFn) -> None:
    """Make ``connect``/``listen`` handle URLs that start with ``scheme://``."""
    _SCHEMES[scheme] = (connect_fn, listen_fn)


def _lookup(url: str) -> tuple[ConnectFn, ListenFn]:
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"transport address {url!r} has no scheme; expected e.g. 'tcp://127.0.0.1:0'")
    if scheme not in _SCHEMES and scheme in _BUILTIN:
        importlib.import_module(_BUILTIN[scheme])
    try:
        return _SCHEMES[scheme]
    except KeyError:
        known = ", ".join(sorted(set(_SCHEMES) | set(_BUILTIN)))
        raise ValueError(f"unknown transport scheme {scheme!r} in {url!r}; known: {known}") from None


def connect(url: str, timeout: float | None = None) -> Transport:
    """Open a transport to the listener at ``url``."""
    return _lookup(url)[0](url, timeout)


def listen(url: str) -> Listener:
    """Start listening at ``url`` (port 0 / an empty name picks a free one)."""
    return _lookup(url)[1](url)


def schemes() -> list[str]:
    """The schemes that can be used (registered or built in)."""
    return sorted(set(_SCHEMES) | set(_BUILTIN))
