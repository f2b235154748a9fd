"""Meeting a peer: the ``shm://`` listener, dialing it, and in-process pairs for tests.

``shm://@pydist-<hex>`` is an abstract Unix socket; ``shm:///path`` a socket file in a
private directory where abstract sockets do not exist. The rendezvous (the lines on the
socket are in ``handover.py``):

1. the dialer connects; each end checks the other's uid (``SO_PEERCRED``): same uid only;
2. the dialer picks every name and sends them (the *intent*) before it creates anything;
   from here on the acceptor unlinks them if the rendezvous does not complete;
3. the dialer creates the segment and semaphores (exclusively, mode 0600) and says
   ``ready``; a name found taken is replaced, and the acceptor told, before creating;
4. the acceptor opens them all (checking owner and mode), unlinks the names, answers
   ``opened``; the dialer unlinks them too (it also does so on any failure);
5. the acceptor maps the segment, checks its header and answers ``ok``.

So the names outlive the rendezvous only if both ends die inside it. Closing a listener
ends the rendezvous still in progress there, and returns once they have unlinked what
they were told of (a worker closes its listeners just before it exits). The Unix
connection then stays open as the connection's lifeline (``connection.py``).
"""
from __future__ import annotations

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
from . import handover
from . import segment as seg
from .connection import ShmTransport, peer_creds
from .handover import OK, OPENED, READY, Claim, LineReader
from .layout import DEFAULT_CAPACITY, SEM_COUNT, check_capacity, check_header, new_segment, segment_size

__all__ = ["ShmListener", "connect_shm", "shm_pair", "RENDEZVOUS_TIMEOUT"]

log = logging.getLogger("pydist.shm")

RENDEZVOUS_TIMEOUT = 10.0  # seconds, when the caller gives none
_ABSTRACT = sys.platform.startswith("linux")
_ACCEPT_POLL_MS = 200
# How long close() waits for the rendezvous in progress to unlink their names. They end at
# once (close shuts their sockets down); this only bounds a pathological stall.
_CLOSE_WAIT = 1.0


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


def connect_shm(url: str, timeout: float | None = None, *, capacity: int = DEFAULT_CAPACITY,
                spin: bool | None = None) -> ShmTransport:
    """Dial the listener at ``url``: announce the names, create the segment, hand it over,
    keep the lifeline."""
    address = _parse_url(url)
    if not address:
        raise ValueError(f"cannot connect to {url!r}: no socket name")
    check_capacity(capacity)
    deadline = time.monotonic() + (RENDEZVOUS_TIMEOUT if timeout is None else timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    segment: seg.Segment | None = None
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(address)
        _check_peer_uid(sock, url)
        plan = seg.NamePlan(SEM_COUNT, lambda taken, fresh: sock.sendall(
            handover.instead_line(taken, fresh)))
        sock.sendall(handover.intent_line(capacity, plan))
        segment = new_segment(capacity, plan)
        sock.sendall(READY + b"\n")
        reader = LineReader(sock, url)
        _expect(reader.line(deadline), OPENED, url)
        segment.unlink()  # the acceptor has every object open (and unlinked the names)
        _expect(reader.line(deadline), OK, url)
        reader.expect_end()
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


def _expect(answer: bytes, word: bytes, url: str) -> None:
    if answer != word:
        raise TransportBroken(f"{url} refused the shared-memory segment: "
                              f"{answer.decode(errors='replace')}")


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
        self._idle = threading.Condition(self._lock)  # notified as a thread leaves accept()
        # Rendezvous in progress: their sockets, and the names they must unlink if they fail.
        self._serving: dict[socket.socket, Claim | None] = {}

    @property
    def address(self) -> str:
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self) -> ShmTransport:
        """Wait for the next peer and complete its rendezvous; TransportClosed once closed.

        A peer that fails the rendezvous (wrong uid, bad intent, hung up, timeout) is
        dropped and logged, the names it announced are unlinked, and the wait goes on.
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
                    if not self._closed:
                        log.warning("shm rendezvous at %s failed: %s", self._address, exc)
                    conn.close()
        finally:
            with self._lock:
                self._users -= 1
                self._idle.notify_all()
                self._release_if_idle()

    def close(self) -> None:
        """Stop listening; wakes a blocked ``accept``. Idempotent.

        A rendezvous still in progress fails, and has unlinked the names it was told of
        when this returns; so has one whose peer still waited to be accepted.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked poll/accept on Linux
            except OSError:
                pass
            self._settle_backlog()
            for conn in self._serving:
                _shutdown(conn)  # its rendezvous fails now, and unlinks what it claimed
            self._idle.wait_for(lambda: not self._users, _CLOSE_WAIT)
            for claim in self._serving.values():
                if claim is not None:  # a thread that did not finish in time
                    claim.settle()
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

    def _settle_backlog(self) -> None:
        """Close the connections nobody accepted yet, unlinking the names they announced
        (a dialer that died after its intent; a live one sees the end and cleans up)."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # BlockingIOError: the backlog is empty
            try:
                _settle_unread(conn, self._address)
            finally:
                conn.close()

    def _rendezvous(self, conn: socket.socket) -> ShmTransport:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT
        with self._lock:
            closed = self._closed
            if not closed:
                self._serving[conn] = None
        if closed:  # accepted just as close() emptied the backlog
            _settle_unread(conn, self._address)
            raise TransportClosed(f"the listener at {self._address} was closed")
        claim: Claim | None = None
        try:
            _check_peer_uid(conn, self._address)
            reader = LineReader(conn, self._address)
            claim = Claim.from_intent(reader.line(deadline))
            with self._lock:
                self._serving[conn] = claim
            while not claim.follow(reader.line(deadline)):
                pass
            reader.expect_end()
            segment = self._attach(conn, claim)
            try:
                if check_header(segment) != claim.capacity:
                    raise ValueError("segment header and intent disagree on the capacity")
                with self._lock:
                    if self._closed:
                        raise TransportClosed(f"the listener at {self._address} was closed")
                    del self._serving[conn]  # a lifeline from here on: close() leaves it be
                conn.sendall(OK + b"\n")
                conn.settimeout(None)
                return ShmTransport(segment, conn, dialer=False, peer=self._address,
                                    spin=self._spin)
            except BaseException:
                segment.close()
                raise
        finally:
            if claim is not None:
                claim.settle()  # a no-op once the names were unlinked on opening
            with self._lock:
                self._serving.pop(conn, None)

    def _attach(self, conn: socket.socket, claim: Claim) -> seg.Segment:
        """Open what ``claim`` names, unlink the names at once, say so, then map."""
        def opened() -> None:
            claim.settle()  # both ends hold every object now: the names can go
            conn.sendall(OPENED + b"\n")
        try:
            return seg.Segment.attach(claim.shm, claim.sems, segment_size(claim.capacity),
                                      opened=opened)
        except OSError as exc:
            try:
                conn.sendall(f"cannot attach: {exc}".encode()[:handover.MAX_LINE - 1] + b"\n")
            except OSError:
                pass
            raise


def _settle_unread(conn: socket.socket, where: str) -> None:
    """Unlink what a peer we will not serve announced so far, if it is of our uid."""
    try:
        _check_peer_uid(conn, where)
    except OSError:
        return  # another uid, or the socket failed: trust nothing
    data = b""
    while len(data) <= 4 * handover.MAX_LINE:
        try:
            chunk = conn.recv(handover.MAX_LINE, socket.MSG_DONTWAIT)
        except OSError:  # nothing more has come (or the peer reset): what came counts
            break
        if not chunk:
            break
        data += chunk
    handover.settle_buffered(data)


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
