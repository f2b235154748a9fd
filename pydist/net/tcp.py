"""The ``tcp://`` transport: frames over a TCP stream socket.

On the wire each frame is ``codec.frame_header(len(payload))`` followed by the payload (see
``pydist.codec`` for the layout). Sending is one vectored ``sendmsg`` of the header and every
part, under a per-connection lock, so large parts are never copied and frames from several
threads never interleave. Receiving reads through a small read-ahead buffer, so a burst of
small frames costs one ``recv`` rather than two per frame; a payload that does not fit there
is read straight into its own buffer, allocated once after its length has been checked
against ``max_frame``.

A send that fails because the peer is gone (reset, or closed and then reset) does not shut
the socket: frames the peer sent before it went are still in the socket's buffer, and the
receiver reads them first; its own end of the stream (EOF or the reset) shuts the socket.
Later sends raise at once.

Closing is a ``shutdown`` followed by a ``close``: the shutdown wakes any thread of this
process blocked in ``recv``/``send``/``accept`` on the socket, and the descriptor itself is
closed only once no thread is inside a call on it, so a recycled descriptor number can never
be read by a thread that woke late.

Both directions survive an exception raised by a signal handler (``KeyboardInterrupt`` from
``interrupt()`` or Ctrl-C) in the middle of a frame: a receive keeps what it has read and the
next ``recv_frame`` resumes it; a send that has put part of a frame on the wire finishes the
frame and then raises. So interrupting a thread that is reading or writing never costs the
connection.
"""
from __future__ import annotations

import errno
import pickle
import select
import socket
import struct
import threading
from collections.abc import Sequence
from typing import NoReturn

from .. import transport
from ..errors import DecodeError, TransportBroken, TransportClosed, TransportError
from ..wire import codec
from .address import format_tcp_url, parse_tcp_url

__all__ = ["TcpTransport", "TcpListener", "connect_tcp"]

_HEADER = codec.FRAME_HEADER_SIZE
_READ_AHEAD = 64 * 1024
_IOV_MAX = 512  # well under Linux's 1024 iovecs per sendmsg
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)  # an EPIPE error, never a SIGPIPE
_RECV_FLAGS = getattr(socket, "MSG_WAITALL", 0)
_ACCEPT_POLL = 0.5  # seconds; the shutdown in close() wakes accept at once on Linux
_ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN}
_PEER_GONE = {errno.EPIPE, errno.ECONNRESET}  # a failed send that leaves the receiving side whole


class _SocketState:
    """Who may use a socket, and why it can no longer be used.

    ``enter()`` before every blocking call on the socket, ``leave()`` after. ``shut(error)``
    records the first reason, shuts the socket down (waking blocked calls) and closes the
    descriptor as soon as the last caller has left.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.error: TransportError | None = None
        self._users = 0
        self._released = False
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.error is not None:
                raise type(self.error)(str(self.error))
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            self._release_if_idle()

    def shut(self, error: TransportError, *, linger0: bool = False) -> None:
        """Make the socket unusable for ``error``'s reason; never blocks; idempotent."""
        with self._lock:
            if self.error is None:
                self.error = error
            if self._released:
                return
            try:
                if linger0:  # close() then resets the connection instead of flushing it
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or already reset by the peer
            self._release_if_idle()

    def raise_error(self, fallback: TransportError) -> NoReturn:
        """Raise the recorded reason if there is one (this side closed first), else ``fallback``."""
        self.shut(fallback, linger0=isinstance(fallback, TransportBroken))
        error = self.error if self.error is not None else fallback   # (shut() has set it)
        raise type(error)(str(error))

    def _release_if_idle(self) -> None:
        if self.error is not None and self._users == 0 and not self._released:
            self._released = True
            self.sock.close()


class TcpTransport:
    """One TCP connection carrying frames (see the ``transport.Transport`` protocol)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out at once
        self.max_frame = transport.HELLO_MAX_FRAME
        self._sock = sock
        self._peer = peer
        self._state = _SocketState(sock)
        self._send_lock = threading.Lock()
        self._send_error: str | None = None  # why sending failed while receiving goes on
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0  # unread bytes are _rbuf[_rpos:_rend]
        self._rend = 0
        self._partial: tuple[bytearray, int] | None = None  # a payload being received, and its fill
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    # -- the Transport protocol ---------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._state.error is not None

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (for identifying the peer; do not read or write it)."""
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_frame(self, parts: Sequence[transport.Buffer]) -> None:
        """Send the concatenation of ``parts`` as one frame; thread-safe."""
        bufs, total = _as_buffers(parts)
        bufs.insert(0, codec.frame_header(total))
        total += _HEADER
        with self._send_lock:
            if self._send_error is not None:
                raise TransportBroken(self._send_error)
            self._state.enter()
            try:
                self._send_all(bufs, total)
            except OSError as e:
                why = f"sending to {self._peer} failed: {_why(e)}"
                if e.errno not in _PEER_GONE:
                    self._state.raise_error(TransportBroken(why))
                # The peer is gone, but what it sent before is still to be read: the
                # receiver drains it, reaches the end and shuts the socket then.
                self._send_error = why
                raise TransportBroken(why) from None
            finally:
                self._state.leave()

    def poll(self, timeout: float) -> bool:
        """Whether ``recv_frame`` would return (or raise) without waiting, after waiting up to
        ``timeout`` seconds for that. Call from the receiving thread only."""
        if self._rend > self._rpos or self._partial is not None or self._state.error is not None:
            return True
        try:
            return bool(self._poller.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True   # the socket is gone: recv_frame will say why

    def recv_frame(self) -> memoryview:
        """The next frame, in a buffer of its own. Call from one thread at a time."""
        self._state.enter()
        try:
            return self._read_frame()
        except TransportError as e:
            self._state.raise_error(e)
        except OSError as e:
            self._state.raise_error(TransportBroken(f"receiving from {self._peer} failed: {_why(e)}"))
        finally:
            self._state.leave()

    def close(self) -> None:
        """Close the connection (queued data is still delivered); idempotent."""
        self._state.shut(TransportClosed(f"the connection to {self._peer} was closed"))

    def abort(self) -> None:
        """Reset the connection without flushing; never blocks; idempotent."""
        self._state.shut(TransportClosed(f"the connection to {self._peer} was aborted"), linger0=True)

    def __enter__(self) -> TcpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<TcpTransport {self._peer} {state}>"

    # -- sending ------------------------------------------------------------------------

    def _send_all(self, bufs: list[bytes | memoryview], total: int) -> None:
        """Write all ``total`` bytes of ``bufs``, resuming after partial writes without copying.

        An exception from a signal handler before the first byte cancels the frame; after it,
        the frame is finished first (no byte left the call that raised) and then it is raised.
        """
        sock = self._sock
        started, deferred = False, None
        while True:
            try:
                sent = sock.sendmsg(bufs if len(bufs) <= _IOV_MAX else bufs[:_IOV_MAX], (), _SEND_FLAGS)
            except OSError:
                raise
            except BaseException as e:
                if not started:
                    raise
                deferred = deferred or e
                continue
            started = True
            total -= sent
            if not total:
                break
            bufs = _advance(bufs, sent)
        if deferred is not None:
            raise deferred

    # -- receiving ----------------------------------------------------------------------

    def _read_frame(self) -> memoryview:
        if self._partial is not None:  # an interrupted receive: resume it
            out, have = self._partial
            self._recv_exactly(out, have)
            return memoryview(out)
        if not self._buffer_at_least(_HEADER):
            raise TransportClosed(f"{self._peer} closed the connection")
        start = self._rpos + _HEADER
        n = self._frame_length(self._rview[self._rpos:start])
        have = self._rend - start
        if n <= have:  # the whole frame is already buffered
            self._rpos = start + n
            return memoryview(bytearray(self._rview[start:start + n]))
        try:
            out = bytearray(n)
        except MemoryError:
            raise TransportBroken(f"no memory for a frame of {n} bytes from {self._peer}") from None
        out[:have] = self._rview[start:self._rend]
        self._rpos = self._rend = 0
        self._recv_exactly(out, have)
        return memoryview(out)

    def _frame_length(self, header: memoryview) -> int:
        try:
            return codec.parse_frame_header(header, self.max_frame)
        except DecodeError as e:
            raise TransportBroken(f"from {self._peer}: {e}; connection aborted") from None

    def _buffer_at_least(self, need: int) -> bool:
        """Read ahead until ``need`` bytes are buffered; False on EOF with nothing buffered."""
        if self._rend - self._rpos >= need:
            return True
        leftover = self._rbuf[self._rpos:self._rend]  # fewer than `need` bytes: cheap to copy
        self._rbuf[:len(leftover)] = leftover
        self._rpos, self._rend = 0, len(leftover)
        while self._rend < need:
            got = self._sock.recv_into(self._rview[self._rend:])
            if not got:
                if self._rend == 0:
                    return False
                raise self._eof_mid_frame(self._rend, need)
            self._rend += got
        return True

    def _recv_exactly(self, out: bytearray, have: int) -> None:
        """Fill ``out[have:]`` straight from the socket; progress is kept in ``_partial``
        so that an interrupted receive resumes where it stopped."""
        total = len(out)
        view = memoryview(out)
        self._partial = (out, have)
        while have < total:
            got = self._sock.recv_into(view[have:], 0, _RECV_FLAGS)
            if not got:
                self._partial = None
                raise self._eof_mid_frame(have, total)
            have += got
            self._partial = (out, have)
        self._partial = None

    def _eof_mid_frame(self, got: int, total: int) -> TransportError:
        if self._state.error is not None:  # woken by our own close()
            return type(self._state.error)(str(self._state.error))
        return TransportBroken(
            f"{self._peer} closed the connection in the middle of a frame "
            f"(received {got} of {total} bytes)")


def _as_buffers(parts: Sequence[transport.Buffer]) -> tuple[list[bytes | memoryview], int]:
    """Flat byte views of ``parts`` (empty ones dropped) and their total length.

    Checked before anything is sent, so a bad part cannot leave half a frame on the wire.
    """
    bufs: list[bytes | memoryview] = []
    total = 0
    for i, part in enumerate(parts):
        if type(part) is bytes:
            n = len(part)
        else:
            part = memoryview(part)
            if part.ndim != 1 or part.itemsize != 1 or not part.c_contiguous:
                try:
                    part = pickle.PickleBuffer(part).raw()  # any C- or Fortran-contiguous buffer
                except BufferError as e:
                    raise ValueError(f"frame part {i} is not a contiguous buffer: {e}") from None
            n = part.nbytes
        if n:
            bufs.append(part)
            total += n
    return bufs, total


def _advance(bufs: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """``bufs`` without their first ``sent`` bytes (a partly sent buffer becomes a view)."""
    i = 0
    while i < len(bufs):
        buf = bufs[i]
        n = buf.nbytes if type(buf) is memoryview else len(buf)
        if sent < n:
            break
        sent -= n
        i += 1
    rest = bufs[i:]
    if sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _peer_url(sock: socket.socket) -> str:
    host, port = sock.getpeername()[:2]
    return format_tcp_url(host, port)


class TcpListener:
    """Accepts TCP connections at ``url`` (host defaults to 127.0.0.1, port 0 = any free)."""

    def __init__(self, url: str, backlog: int = 128) -> None:
        host, port = parse_tcp_url(url, listen=True)
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            raise TransportBroken(f"cannot listen at {url}: {_why(e)}") from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise TransportBroken(f"cannot listen at {url}: {_why(e)}") from e
        # A timed accept is a fallback waker where shutdown() does not wake accept().
        sock.settimeout(_ACCEPT_POLL)
        self._sock = sock
        self._address = format_tcp_url(*sock.getsockname()[:2])
        self._state = _SocketState(sock)

    @property
    def address(self) -> str:
        return self._address

    @property
    def closed(self) -> bool:
        return self._state.error is not None

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> TcpTransport:
        """Wait for the next connection; ``TransportClosed`` once the listener is closed."""
        while True:
            self._state.enter()
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._state.error is not None:
                    raise type(self._state.error)(str(self._state.error)) from None
                if e.errno in _ACCEPT_RETRY:
                    continue
                raise TransportBroken(f"accepting a connection at {self._address} failed: {_why(e)}") from e
            finally:
                self._state.leave()
            try:
                return TcpTransport(sock, _peer_url(sock))
            except OSError:
                sock.close()  # the peer vanished between accept() and getpeername()

    def close(self) -> None:
        """Stop listening; wakes a blocked ``accept``; idempotent."""
        self._state.shut(TransportClosed(f"the listener at {self._address} was closed"))

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TcpListener {self._address}{' closed' if self.closed else ''}>"


def connect_tcp(url: str, timeout: float | None = None) -> TcpTransport:
    """Connect to the listener at ``url``; ``TransportBroken`` naming ``url`` on failure.

    ``timeout`` bounds the connection attempt only; the transport itself is blocking.
    """
    host, port = parse_tcp_url(url)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError as e:
        raise TransportBroken(f"cannot connect to {url}: no answer within {timeout} s") from e
    except socket.gaierror as e:
        raise TransportBroken(f"cannot connect to {url}: cannot resolve {host!r} ({_why(e)})") from e
    except OSError as e:
        raise TransportBroken(f"cannot connect to {url}: {_why(e)}") from e
    try:
        return TcpTransport(sock, _peer_url(sock))
    except OSError as e:
        sock.close()
        raise TransportBroken(f"cannot connect to {url}: {_why(e)}") from e


transport.register_scheme("tcp", connect_tcp, TcpListener)
