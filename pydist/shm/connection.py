"""``ShmTransport``: frames through two shared-memory rings, one per direction.

Each frame is ``codec.frame_header(length)`` then the payload (``layout.py`` gives the
segment). A frame that fits the free contiguous space of the ring is written and read in
one step; a larger one streams through the ring in pieces, so memory stays bounded.

Every call survives an exception from a signal handler: a receive keeps what it read and
the next call resumes the frame; a send finishes its frame before raising.

The Unix connection of the rendezvous (``rendezvous.py``) stays open as a *lifeline*: a
watcher thread on each end waits for its EOF. EOF after the peer marked its rings closed is
a clean close; EOF without that mark means the peer died: every blocked and later send raises
``TransportBroken``, and so does a receive once it has read what the peer sent before it
died (a failed send leaves that to be read: only the receiver's error aborts this end).

Waiting spins briefly before sleeping when the peer runs on another vCPU (``wait.py``,
``placement.py``; ``PYDIST_SHM_SPIN=0``/``1`` forces it off/on), never between two threads
of one process. A large frame lands in reused memory (``buffers.py``).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from threading import get_ident
from typing import Any

from .. import transport
from ..errors import DecodeError, TransportBroken, TransportClosed, TransportError
from ..wire import codec
from . import segment as seg
from .bigbuf import DESC_SIZE
from .bigbuf import FLAG as _BIG
from .bigbuf import threshold as big_threshold
from .bigin import BigIn
from .bigin import ends as big_ends
from .buffers import byte_views as _byte_views
from .buffers import receive_buffer
from .buffers import skip as _skip
from .layout import make_ends
from .wait import LinkState, spin_mode

__all__ = ["ShmTransport", "peer_creds"]

_PEERCRED = getattr(socket, "SO_PEERCRED", None)


def peer_creds(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (Linux)."""
    if _PEERCRED is None:
        raise AttributeError("SO_PEERCRED is not available on this platform")
    creds = sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def _peer_info(lifeline: socket.socket) -> tuple[bool, frozenset[int] | None]:
    """(the peer is this very process, the peer's CPU affinity) as far as the OS tells."""
    try:
        pid = peer_creds(lifeline)[0]
    except (OSError, AttributeError):
        return False, None
    if pid in (0, os.getpid()):
        return True, None
    try:
        return False, frozenset(os.sched_getaffinity(pid))
    except (OSError, AttributeError):  # gone already, or no sched_getaffinity here
        return False, None


class ShmTransport:
    """One shared-memory connection (see the ``transport.Transport`` protocol)."""

    def __init__(self, segment: seg.Segment, lifeline: socket.socket, *, dialer: bool,
                 peer: str, spin: bool | None = None, tso: bool | None = None) -> None:
        self.max_frame = transport.HELLO_MAX_FRAME
        self._seg = segment
        self._peer = peer
        self._state = LinkState()
        same_process, peer_cpus = _peer_info(lifeline)
        self._tx, self._rx = make_ends(segment, 0 if dialer else 1, self._state,
                                       spin_mode(spin, same_process), tso, peer_cpus)
        self._big_min = big_threshold()  # larger frames skip the ring (bigbuf.py)
        self._big_out, self._big_in = big_ends(segment, dialer, tso, _notifier(weakref.ref(self)))
        self._big_next = False  # the frame being read is a descriptor
        self._send_lock = threading.Lock()
        self._close_lock = threading.Lock()
        # Who may be touching the segment besides senders (who hold the send lock). Each flag
        # has one writer thread; close() reads them after setting `closed`, and each user
        # re-checks `closed` after setting its flag, so one of the two always sees the other.
        self._receiving = False
        self._watching = False
        self._shut_done = False  # _shut() has finished using the semaphores
        self._ready: memoryview | None = None  # a frame read but not yet handed out
        self._partial: tuple[memoryview, int, bool] | None = None  # a frame being read
        self._released = False
        self._peer_died = False  # set by the lifeline watcher: the peer ended without a goodbye
        self._lifeline = lifeline
        # If the object is dropped unclosed, the peer still learns of it through the lifeline.
        self._finalizer = weakref.finalize(self, _shutdown, lifeline)
        self._watcher = threading.Thread(target=_watch, args=(lifeline, weakref.ref(self)),
                                         name="pydist-shm-lifeline", daemon=True)
        self._watcher.start()

    # -- the Transport protocol ---------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._state.closed

    def send_frame(self, parts: Sequence[transport.Buffer]) -> None:
        """Send the concatenation of ``parts`` as one frame; thread-safe; blocks while the
        ring is full. An exception from a signal handler before the first byte cancels the
        frame; after it, the frame is finished first and the exception raised then."""
        views, total = _byte_views(parts)
        state, tx = self._state, self._tx
        try:
            with self._send_lock:
                if state.closed or state.broken is not None:
                    state.check()
                state.sender = get_ident()  # the thread that will wait for an answer
                start = tx.position
                big = None
                try:
                    if total >= self._big_min:
                        try:
                            big = self._stage_big(views, total)
                        finally:  # notices sent meanwhile are whole frames, not this one's
                            start = tx.position
                    if big is not None:
                        tx.write(big)
                        tx.flush()
                    elif not tx.try_write_frame(views, total):
                        self._send_slow(views, total)
                except TransportError as exc:
                    self._after_error(exc, "send")
                    raise
                except BaseException as exc:
                    if tx.position != start:
                        self._finish_frame(big or [codec.frame_header(total), *views], start,
                                           exc)
                    raise
        finally:
            if state.closed:
                self._release_if_idle()

    def _send_slow(self, views: list[bytes | memoryview], total: int) -> None:
        """Stream a frame that does not fit the free contiguous space (under the send lock)."""
        tx = self._tx
        if tx.peer_closed():
            raise TransportClosed(f"{self._peer} closed the connection")
        tx.write([codec.frame_header(total), *views])
        tx.flush()

    def _stage_big(self, views: list[bytes | memoryview], total: int) -> list[bytes] | None:
        """Copy a large frame into a pooled segment (under the send lock): the descriptor
        frame to send through the ring instead, or None to send the frame itself."""
        if self.max_frame <= transport.HELLO_MAX_FRAME or self._tx.peer_closed():
            return None
        desc = self._big_out.stage(views, total)
        if desc is None:
            return None
        return [codec.FRAME_HEADER.pack(_BIG | len(desc)), desc]

    def poll(self, timeout: float) -> bool:
        """Whether ``recv_frame`` would return (or raise) without waiting, after waiting up to
        ``timeout`` seconds for that. Call from the receiving thread only."""
        if self._ready is not None or self._state.closed or self._state.broken is not None:
            return True
        self._receiving = True
        try:
            if self._state.closed:  # re-checked after announcing ourselves (see _release)
                return True
            return self._rx.readable(timeout)
        except TransportError:
            return True
        finally:
            self._receiving = False
            if self._state.closed:
                self._release_if_idle()

    def recv_frame(self) -> memoryview:
        """The next frame, copied once out of the ring into a buffer of its own (``buffers``).

        An exception from a signal handler while receiving keeps what was read: the next
        call resumes the same frame."""
        self._receiving = True
        state = self._state
        try:
            if state.closed:
                state.check()
            while True:
                if self._ready is None:
                    try:
                        self._next_frame()
                    except TransportError as exc:
                        self._after_error(exc, "receive")
                        raise
                frame, self._ready = self._ready, None
                assert frame is not None   # (_next_frame put it there)
                if not self._big_next:
                    return frame
                self._big_next = False
                big = self._open_big(frame)
                if not isinstance(big, int):
                    return big
                if big:  # a hint: the peer sent a frame this large; our answer may be too
                    self._big_out.prepare(big)
        finally:
            self._receiving = False
            if state.closed:
                self._release_if_idle()

    def close(self) -> None:
        """Close both directions; the peer drains what was sent, then sees TransportClosed."""
        self._shut(goodbye=True)

    def abort(self) -> None:
        """Close at once, without a goodbye (the peer sees TransportBroken); never blocks."""
        self._shut(goodbye=False)

    def __enter__(self) -> ShmTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ShmTransport {self._peer} {'closed' if self.closed else 'open'}>"

    # -- frames ---------------------------------------------------------------------------

    def _next_frame(self) -> None:
        """Put the next frame in ``_ready``; every step can be interrupted and resumed.

        A frame is first looked for whole (the fast path); otherwise its header and then its
        payload are streamed out, with ``_partial`` holding (buffer, stream position of its
        first byte, is-payload) so that the ring's read counter alone says how far we got.
        The frame lands in ``_ready`` before anything that may raise is called.
        """
        rx = self._rx
        if self._partial is None:
            frame = rx.try_read_frame(self.max_frame)
            if frame is None:
                rx.wait_readable()
                frame = rx.try_read_frame(self.max_frame)
            if frame is not None:
                self._ready = frame
                rx.release()
                return
            self._partial = (memoryview(bytearray(codec.FRAME_HEADER_SIZE)), rx.position, False)
        view, start, is_payload = self._partial
        rx.read_into(view, start)
        if not is_payload:
            view, start = self._payload_buffer(view), start + codec.FRAME_HEADER_SIZE
            self._partial = (view, start, True)
            rx.read_into(view, start)
        self._ready = view
        self._partial = None
        rx.release()

    def _payload_buffer(self, header: memoryview) -> memoryview:
        """A buffer for the payload announced by ``header``, after checking its length."""
        (raw,) = codec.FRAME_HEADER.unpack(header)
        if raw == _BIG | DESC_SIZE:
            self._big_next = True  # a descriptor: the frame is in a segment (bigbuf.py)
            return memoryview(bytearray(DESC_SIZE))
        try:
            length = codec.parse_frame_header(header, self.max_frame)
        except DecodeError as exc:
            raise self._break(f"{exc} (from {self._peer})") from None
        try:
            return receive_buffer(length)
        except MemoryError:
            raise self._break(f"no memory for a frame of {length} bytes "
                              f"from {self._peer}") from None

    def _open_big(self, desc: memoryview) -> memoryview | int:
        """The large frame a descriptor stands for, a view of the sender's segment; for a
        notice, what ``BigIn.open`` says."""
        length = BigIn.length(desc)
        if length == 0 and self.max_frame <= transport.HELLO_MAX_FRAME:
            return 0   # a notice before large frames may come: nothing to do
        if length > self.max_frame or self.max_frame <= transport.HELLO_MAX_FRAME:
            raise self._break(f"frame of {length} bytes announced, over the limit of "
                              f"{self.max_frame} bytes (from {self._peer}, in a segment)")
        try:
            return self._big_in.open(desc, self.max_frame)
        except (OSError, ValueError) as exc:
            raise self._break(f"bad large-frame descriptor from {self._peer}: {exc}") from None

    def _notice(self, desc: bytes, locked: bool | None) -> bool:
        """Send a notice (``bigbuf.py``) if the ring has room for it now; whether it went.
        ``locked``: the caller holds the send lock (else it is taken here; None: only if
        it is free at once)."""
        if not locked and not self._send_lock.acquire(timeout=1.0 if locked is False else 0):
            return False
        try:
            if self._state.closed or self._state.broken is not None:
                return False
            return self._tx.try_write_frame([desc], len(desc), _BIG | len(desc))
        except TransportError:
            return False
        finally:
            if not locked:
                self._send_lock.release()
                if self._state.closed:
                    self._release_if_idle()

    def _finish_frame(self, parts: Sequence[bytes | memoryview], start: int, exc: BaseException) -> None:
        """Write the rest of a frame (``parts``, its header first) an exception interrupted
        (further such exceptions are held back too), so the stream stays whole; the caller
        then raises ``exc``."""
        tx = self._tx
        while True:
            try:
                tx.write(_skip(parts, tx.position - start))
                tx.flush()
                return
            except TransportError as err:
                self._after_error(err, "send")
                raise err from exc
            except BaseException:
                continue

    def _after_error(self, exc: TransportError, what: str) -> None:
        """Shut this end when an error leaves it unusable: a broken link aborts; the peer's
        clean close seen by the receiver closes this end too. A sender that meets either
        the peer's close or its death leaves this end open, so the receiver can still drain
        what the peer sent before it closed or died (and then shuts this end itself)."""
        if self._state.closed:
            return
        if isinstance(exc, TransportBroken) and not (what == "send" and self._peer_died):
            self.abort()
        elif isinstance(exc, TransportClosed) and what == "receive":
            self.close()

    def _break(self, reason: str) -> TransportBroken:
        self._state.broken = reason
        self.abort()
        return TransportBroken(reason)

    # -- closing --------------------------------------------------------------------------

    def _shut(self, *, goodbye: bool) -> None:
        with self._close_lock:
            if self._state.closed:
                return
            self._state.closed = True
        self._wake_own()  # our blocked threads re-check, see `closed`, and leave
        locked = self._send_lock.acquire(timeout=1.0 if goodbye else 0)
        if goodbye:  # frames sent in segments of their own are still read after a goodbye
            self._big_out.settle(2.0, lambda: self._state.broken is not None)
        try:
            if goodbye and self._state.broken is None:
                try:  # after the send lock: no frame is half-written now
                    self._tx.mark_closed()
                    self._rx.mark_closed()
                except TransportError:
                    pass
            self._wake_peer()
        finally:
            if locked:
                self._send_lock.release()
        _shutdown(self._lifeline)
        self._shut_done = True
        self._release_if_idle()

    def _wake_own(self) -> None:
        for sem in (self._rx.waiter.own_sem, self._tx.waiter.own_sem):
            _post(sem)

    def _wake_peer(self) -> None:
        for sem in (self._tx.waiter.peer_sem, self._rx.waiter.peer_sem):
            _post(sem)

    def _release_if_idle(self) -> None:
        """Unmap once closed and no thread can touch the segment; otherwise the last user
        (or the garbage collector) does it."""
        if (not self._shut_done or self._released or self._receiving or self._watching
                or self._send_lock.locked()):
            return
        with self._close_lock:
            if self._released:
                return
            self._released = True
        self._tx.detach()
        self._rx.detach()
        self._big_out.close()
        self._big_in.close()
        self._seg.close()

    def _lifeline_ended(self) -> None:
        """Called by the watcher on EOF: the peer closed (marked in its ring) or died."""
        self._watching = True
        try:
            if self._state.closed:
                return
            if not self._rx.peer_closed():
                self._peer_died = True
                self._state.broken = (f"the peer at {self._peer} died or vanished "
                                      "(its lifeline closed without a goodbye)")
            self._wake_own()
        finally:
            self._watching = False
            self._release_if_idle()


def _notifier(ref: weakref.ref[ShmTransport]) -> Callable[[bytes, bool | None], bool]:
    """``ShmTransport._notice`` of the transport ``ref`` names, if it is still alive (the
    pools must not keep their transport alive)."""
    def notify(desc: bytes, locked: bool | None) -> bool:
        t = ref()
        return t is not None and t._notice(desc, locked)
    return notify


def _post(sem: Any) -> None:   # a posix_ipc.Semaphore (the package has no type hints)
    try:
        sem.release()
    except Exception:  # closed handle: nobody is waiting on it any more
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watch(sock: socket.socket, ref: weakref.ref[ShmTransport]) -> None:
    """Lifeline watcher: wait for EOF (the peer never writes), then tell the transport."""
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass
    finally:
        sock.close()  # only this thread closes it, so no other thread reads a reused fd
    owner = ref()
    if owner is not None:
        owner._lifeline_ended()
