"""Meeting a peer: the ``shm://`` listener, dialing it, and in-process pairs for tests.

``shm://@pydist-<hex>`` is an abstract Unix socket; ``shm:///path`` a socket file in a
private directory where abstract sockets do not exist. The rendezvous:

1. the dialer connects; each end checks the other's uid (``SO_PEERCRED``): same uid only;
2. the dialer creates the segment and semaphores and sends their names (one JSON line);
3. the acceptor attaches (checking owner and mode), unlinks the names, answers ``ok``;
4. the dialer unlinks the names too (it also does so on any failure).

The Unix connection then stays open as the connection's lifeline (``connection.py``).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import sys
import tempfile
import threading
import time

from ..errors import TransportBroken, TransportClosed, TransportError
from . import segment as seg
from .connection import ShmTransport, peer_creds
from .layout import (DEFAULT_CAPACITY, SEMS_PER_RING, check_capacity, check_header,
                     new_segment, segment_size)

__all__ = ["ShmListener", "connect_shm", "shm_pair", "RENDEZVOUS_TIMEOUT"]

log = logging.getLogger("pydist.shm")

RENDEZVOUS_TIMEOUT = 10.0  # seconds, when the caller gives none
_ABSTRACT = sys.platform.startswith("linux")
_OFFER_MAX = 4096
_ACCEPT_POLL_MS = 200


def _parse_url(url: str) -> str:
    """The Unix socket address named by ``url`` ('' when a fresh one should be picked)."""
    scheme, sep, rest = url.partition("://")
    if scheme != "shm" or not sep:
        raise ValueError(f"not a shared-memory address: {url!r}; expected 'shm://@name' "
                         "or 'shm:///path'")
    if rest in ("", "@"):
        return ""
    if rest.startswith("@") and _ABSTRACT:
        return "\0" + rest[1:]
    if rest.startswith("/"):
        return rest
    raise ValueError(f"bad shared-memory address {url!r}: expected 'shm://@name' (Linux) "
                     "or 'shm:///path/to/socket'")


def _url_of(address: str) -> str:
    return "shm://@" + address[1:] if address.startswith("\0") else "shm://" + address


def _check_peer_uid(sock: socket.socket, url: str) -> None:
    """Refuse a peer running as another user (where the OS tells us who it is)."""
    try:
        pid, uid = peer_creds(sock)
    except AttributeError:
        return  # no SO_PEERCRED; the socket file lives in a 0700 directory there
    if uid != os.geteuid():
        raise PermissionError(f"{url}: peer process {pid} runs as uid {uid}, not as us "
                              f"({os.geteuid()}); refusing it")


def _recv_line(sock: socket.socket, deadline: float, url: str) -> bytes:
    """One newline-terminated message of at most _OFFER_MAX bytes, before ``deadline``."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{url}: the shared-memory rendezvous timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(_OFFER_MAX)
        if not chunk:
            raise TransportBroken(f"{url}: the peer hung up during the rendezvous")
        data += chunk
        if len(data) > _OFFER_MAX:
            raise TransportBroken(f"{url}: oversized rendezvous message")
    return data[:-1]


def connect_shm(url: str, timeout: float | None = None, *, capacity: int = DEFAULT_CAPACITY,
                spin: bool | None = None) -> ShmTransport:
    """Dial the listener at ``url``: create the segment, hand it over, keep the lifeline."""
    address = _parse_url(url)
    if not address:
        raise ValueError(f"cannot connect to {url!r}: no socket name")
    deadline = time.monotonic() + (RENDEZVOUS_TIMEOUT if timeout is None else timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    segment: seg.Segment | None = None
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(address)
        _check_peer_uid(sock, url)
        segment = new_segment(capacity)
        offer = {"v": 1, "capacity": capacity, "shm": segment.name, "sems": segment.sem_names}
        sock.sendall(json.dumps(offer).encode() + b"\n")
        answer = _recv_line(sock, deadline, url)
        if answer != b"ok":
            raise TransportBroken(f"{url} refused the shared-memory segment: "
                                  f"{answer.decode(errors='replace')}")
        segment.unlink()
        sock.settimeout(None)
        return ShmTransport(segment, sock, dialer=True, peer=url, spin=spin)
    except BaseException as exc:
        if segment is not None:
            segment.unlink()
            segment.close()
        sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, TransportError):
            raise TransportBroken(f"shared-memory rendezvous with {url} failed: {exc}") from exc
        raise


class ShmListener:
    """Accepts shared-memory connections at ``address`` (a ``shm://`` URL)."""

    def __init__(self, url: str = "shm://", *, spin: bool | None = None) -> None:
        address = _parse_url(url)
        self._tmpdir: str | None = None
        if not address:
            if _ABSTRACT:
                address = "\0pydist-" + secrets.token_hex(8)
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="pydist-")  # mode 0700
                address = os.path.join(self._tmpdir, "rendezvous.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(address)
            self._sock.listen(64)
            self._sock.setblocking(False)  # accept only after poll() said a peer waits
        except OSError as exc:
            self._sock.close()
            raise TransportBroken(f"cannot listen at {_url_of(address)}: "
                                  f"{exc.strerror or exc}") from exc
        self._address = _url_of(address)
        self._path = None if address.startswith("\0") else address
        self._spin = spin
        self._closed = False
        self._users = 0  # threads inside accept(); the socket is closed when the last leaves
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self) -> ShmTransport:
        """Wait for the next peer and complete its rendezvous; TransportClosed once closed.

        A peer that fails the rendezvous (wrong uid, bad offer, timeout) is dropped and
        logged, and the wait goes on.
        """
        with self._lock:
            if self._closed:
                raise TransportClosed(f"the listener at {self._address} was closed")
            self._users += 1
        try:
            while True:
                conn = self._next_connection()
                try:
                    return self._rendezvous(conn)
                except (OSError, ValueError) as exc:
                    log.warning("shm rendezvous at %s failed: %s", self._address, exc)
                    conn.close()
        finally:
            with self._lock:
                self._users -= 1
                self._release_if_idle()

    def close(self) -> None:
        """Stop listening; wakes a blocked ``accept``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked poll/accept on Linux
            except OSError:
                pass
            self._release_if_idle()
        if self._path is not None:
            _remove_quietly(self._path, self._tmpdir)

    def __enter__(self) -> ShmListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ShmListener {self._address}{' closed' if self._closed else ''}>"

    def _release_if_idle(self) -> None:
        # Only once no thread is inside accept(), so none can use a recycled descriptor.
        if self._closed and not self._users:
            self._sock.close()

    def _next_connection(self) -> socket.socket:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            if self._closed:
                raise TransportClosed(f"the listener at {self._address} was closed")
            # The timeout is only a backstop where shutdown() does not wake poll().
            if not poller.poll(_ACCEPT_POLL_MS) or self._closed:
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError:
                if self._closed:
                    continue
                raise
            conn.setblocking(True)
            return conn

    def _rendezvous(self, conn: socket.socket) -> ShmTransport:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
        _check_peer_uid(conn, self._address)
        offer = json.loads(_recv_line(conn, deadline, self._address))
        if not isinstance(offer, dict) or offer.get("v") != 1:
            raise ValueError(f"unknown rendezvous offer {offer!r:.200}")
        capacity = check_capacity(offer.get("capacity"))
        sems = offer.get("sems")
        if not isinstance(sems, list) or len(sems) != 2 * len(SEMS_PER_RING):
            raise ValueError("rendezvous offer lists the wrong number of semaphores")
        try:
            segment = seg.Segment.attach(offer.get("shm"), sems, segment_size(capacity))
        except OSError as exc:
            conn.sendall(f"cannot attach: {exc}".encode()[:_OFFER_MAX - 1] + b"\n")
            raise
        try:
            segment.unlink()  # both ends hold it now
            if check_header(segment) != capacity:
                raise ValueError("segment header and offer disagree on the capacity")
            conn.sendall(b"ok\n")
            conn.settimeout(None)
            return ShmTransport(segment, conn, dialer=False, peer=self._address, spin=self._spin)
        except BaseException:
            segment.close()
            raise


def _remove_quietly(path: str, directory: str | None) -> None:
    for remove, target in ((os.unlink, path), (os.rmdir, directory)):
        if target is not None:
            try:
                remove(target)
            except OSError:
                pass


def shm_pair(capacity: int = DEFAULT_CAPACITY, *, spin: bool | None = None,
             tso: bool | None = None) -> tuple[ShmTransport, ShmTransport]:
    """Two connected ends in this process (each with its own mapping), for tests."""
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    created = new_segment(capacity)
    try:
        attached = seg.Segment.attach(created.name, created.sem_names, segment_size(capacity))
    finally:
        created.unlink()
    a = ShmTransport(created, a_sock, dialer=True, peer="shm://pair", spin=spin, tso=tso)
    b = ShmTransport(attached, b_sock, dialer=False, peer="shm://pair", spin=spin, tso=tso)
    return a, b
