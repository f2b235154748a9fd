"""The ``shm://`` transport: frames through two shared-memory rings, one per direction.

Segment layout (one per connection)::

    offset 0      header: magic u64, ring capacity u64
    offset 64     ring 0 control (dialer -> acceptor), 128 bytes
    offset 192    ring 1 control (acceptor -> dialer), 128 bytes
    offset 4096   ring 0 data, `capacity` bytes
    ...           ring 1 data, `capacity` bytes

    semaphores, per ring r:  3r "data" (consumer sleeps on it), 3r+1 "space" (producer
    sleeps on it), 3r+2 "mutex" (orders accesses where the CPU does not; see ring.py)

Each frame is ``codec.frame_header(length)`` then the payload, streamed through the ring: a
frame larger than the ring passes through in pieces, so memory stays bounded.

Rendezvous (``shm://@pydist-<hex>`` is an abstract Unix socket; ``shm:///path`` a socket file
in a private directory where abstract sockets do not exist):

1. the dialer connects; each end checks the other's uid (``SO_PEERCRED``): same uid only;
2. the dialer creates the segment and semaphores and sends their names (one JSON line);
3. the acceptor attaches (checking owner and mode), unlinks the names, answers ``ok``;
4. the dialer unlinks the names too (it also does so on any failure).

The Unix connection then stays open as a *lifeline*: a watcher thread on each end waits for
its EOF. EOF after the peer marked its rings closed is a clean close; EOF without that mark
means the peer died, and every blocked and later call raises ``TransportBroken``.

Waiting spins briefly before sleeping only when the peer is pinned to other vCPUs than ours
(see ``_spin_wanted``; ``PYDIST_SHM_SPIN=0``/``1`` forces it off/on).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import select
import socket
import struct
import sys
import tempfile
import threading
import time
import weakref
from typing import Sequence

from .. import codec, transport
from ..errors import DecodeError, TransportBroken, TransportClosed, TransportError
from . import segment as seg
from .ring import CTL_SIZE, LinkState, RingReader, RingWriter, SpinPolicy

__all__ = ["ShmTransport", "ShmListener", "connect_shm", "shm_pair", "DEFAULT_CAPACITY"]

log = logging.getLogger("pydist.shm")

# Per direction. 1, 4 and 16 MiB rings moved 128 MiB equally fast here (within noise), but a
# connection costs 2, 11 and 48 ms to set up (the pages are reserved and pre-faulted) and
# 2x the ring in RAM; 4 MiB leaves slack for a briefly descheduled reader.
DEFAULT_CAPACITY = 4 << 20
MAX_CAPACITY = 1 << 30
RENDEZVOUS_TIMEOUT = 10.0  # seconds, when the caller gives none
_MAGIC = int.from_bytes(b"PYDSHM01", "little")
_HEADER = struct.Struct("<QQ")
_DATA_OFFSET = 4096
_SEMS_PER_RING = (0, 0, 1)  # initial values: data, space, mutex
_ABSTRACT = sys.platform.startswith("linux")
_PEERCRED = getattr(socket, "SO_PEERCRED", None)
_OFFER_MAX = 4096
_ACCEPT_POLL_MS = 200
_SMALL = 4096  # bytes parts up to this size are written as they are, without a memoryview


def _spin_wanted(lifeline: socket.socket) -> bool:
    """Spin before sleeping only where it was measured to help: when the peer is pinned to
    other vCPUs than ours. Sharing a vCPU, a spin only delays the peer (and in one process
    the spinning thread holds the GIL the peer needs); unpinned, Linux co-locates a pair
    that blocks often, and spinning made the median no better and the p99 twice as bad."""
    forced = os.environ.get("PYDIST_SHM_SPIN", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        pid = _peer_creds(lifeline)[0]
        if pid in (0, os.getpid()):
            return False
        return not os.sched_getaffinity(0) & os.sched_getaffinity(pid)
    except (OSError, AttributeError):  # no SO_PEERCRED / sched_getaffinity here
        return False


def _peer_creds(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (Linux)."""
    if _PEERCRED is None:
        raise AttributeError("SO_PEERCRED is not available on this platform")
    creds = sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


class ShmTransport:
    """One shared-memory connection (see the ``transport.Transport`` protocol)."""

    def __init__(self, segment: seg.Segment, lifeline: socket.socket, *, dialer: bool,
                 peer: str, spin: bool | None = None, tso: bool | None = None) -> None:
        self.max_frame = transport.HELLO_MAX_FRAME
        self._seg = segment
        self._peer = peer
        self._state = LinkState()
        self._tx, self._rx = _make_ends(segment, 0 if dialer else 1, self._state,
                                        _spin_wanted(lifeline) if spin is None else spin, tso)
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
                start = tx.position
                try:
                    if not tx.try_write_frame(views, total):
                        self._send_slow(views, total)
                except TransportError as exc:
                    self._after_error(exc, "send")
                    raise
                except BaseException as exc:
                    if tx.position != start:
                        self._finish_frame(views, total, start, exc)
                    raise
        finally:
            if state.closed:
                self._release_if_idle()

    def _send_slow(self, views: list, total: int) -> None:
        """Stream a frame that does not fit the free contiguous space (under the send lock)."""
        tx = self._tx
        if tx.peer_closed():
            raise TransportClosed(f"{self._peer} closed the connection")
        tx.write([codec.frame_header(total), *views])
        tx.flush()

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
        """The next frame, copied once out of the ring into a fresh buffer.

        An exception from a signal handler while receiving keeps what was read: the next
        call resumes the same frame."""
        self._receiving = True
        state = self._state
        try:
            if state.closed:
                state.check()
            if self._ready is None:
                try:
                    self._next_frame()
                except TransportError as exc:
                    self._after_error(exc, "receive")
                    raise
            frame, self._ready = self._ready, None
            return frame
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
        try:
            length = codec.parse_frame_header(header, self.max_frame)
        except DecodeError as exc:
            raise self._break(f"{exc} (from {self._peer})") from None
        try:
            return memoryview(bytearray(length))
        except MemoryError:
            raise self._break(f"no memory for a frame of {length} bytes "
                              f"from {self._peer}") from None

    def _finish_frame(self, views: list, total: int, start: int, exc: BaseException) -> None:
        """Write the rest of a frame an exception interrupted (further such exceptions are
        held back too), so the stream stays whole; the caller then raises ``exc``."""
        tx = self._tx
        parts = [codec.frame_header(total), *views]
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
        clean close seen by the receiver closes this end too (seen by a sender it does not,
        so the receiver can still drain what the peer sent before closing)."""
        if self._state.closed:
            return
        if isinstance(exc, TransportBroken):
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
        for sem in (self._rx._own_sem, self._tx._own_sem):
            _post(sem)

    def _wake_peer(self) -> None:
        for sem in (self._tx._peer_sem, self._rx._peer_sem):
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
        self._seg.close()

    def _lifeline_ended(self) -> None:
        """Called by the watcher on EOF: the peer closed (marked in its ring) or died."""
        self._watching = True
        try:
            if self._state.closed:
                return
            if not self._rx.peer_closed():
                self._state.broken = (f"the peer at {self._peer} died or vanished "
                                      "(its lifeline closed without a goodbye)")
            self._wake_own()
        finally:
            self._watching = False
            self._release_if_idle()


def _make_ends(segment: seg.Segment, side: int, state: LinkState, spin: bool,
               tso: bool | None) -> tuple[RingWriter, RingReader]:
    """Our writer on ring ``side`` and our reader on the other ring."""
    capacity = _check_header(segment)
    view = memoryview(segment.buf)

    def end(cls: type, ring: int, own: int, peer: int) -> RingWriter | RingReader:
        ctl = view[64 + ring * CTL_SIZE: 64 + (ring + 1) * CTL_SIZE]
        start = _DATA_OFFSET + ring * capacity
        sems = segment.sems[3 * ring: 3 * ring + 3]
        return cls(ctl, view[start:start + capacity], own_sem=sems[own], peer_sem=sems[peer],
                   mutex=sems[2], state=state, policy=SpinPolicy(spin), tso=tso)

    return end(RingWriter, side, 1, 0), end(RingReader, 1 - side, 0, 1)


def _segment_size(capacity: int) -> int:
    return _DATA_OFFSET + 2 * capacity


def _check_capacity(capacity: object) -> int:
    if not isinstance(capacity, int) or not 64 <= capacity <= MAX_CAPACITY \
            or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in [64, {MAX_CAPACITY}], "
                         f"not {capacity!r}")
    return capacity


def _check_header(segment: seg.Segment) -> int:
    magic, capacity = _HEADER.unpack_from(segment.buf, 0)
    if magic != _MAGIC or _segment_size(_check_capacity(capacity)) > segment.size:
        raise TransportBroken(f"shared-memory segment {segment.name} has a bad header")
    return capacity


def _new_segment(capacity: int) -> seg.Segment:
    segment = seg.Segment.create(_segment_size(_check_capacity(capacity)), _SEMS_PER_RING * 2)
    _HEADER.pack_into(segment.buf, 0, _MAGIC, capacity)
    return segment


def _post(sem: object) -> None:
    try:
        sem.release()  # type: ignore[attr-defined]
    except Exception:  # closed handle: nobody is waiting on it any more
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watch(sock: socket.socket, ref: weakref.ref) -> None:
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


def _skip(parts: list, n: int) -> list:
    """``parts`` without their first ``n`` bytes."""
    out = []
    for part in parts:
        size = len(part)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(part)[n:] if n else part)
        n = 0
    return out


def _byte_views(parts: Sequence[transport.Buffer]) -> tuple[list[memoryview], int]:
    """1-D byte views of ``parts`` and their total size, checked before anything is sent."""
    views, total = [], 0
    for i, part in enumerate(parts):
        if type(part) is bytes and len(part) <= _SMALL:  # slicing a small bytes is cheap
            if part:
                views.append(part)
                total += len(part)
            continue
        view = memoryview(part)
        if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous or view.format != "B":
            try:
                view = pickle.PickleBuffer(view).raw()  # any C- or Fortran-contiguous buffer
            except BufferError as exc:
                raise ValueError(f"frame part {i} is not a contiguous buffer: {exc}") from None
        if view.nbytes:
            views.append(view)
            total += view.nbytes
    return views, total


# -- rendezvous -----------------------------------------------------------------------------

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
    if _PEERCRED is None:
        return  # the socket file lives in a 0700 directory there
    pid, uid = _peer_creds(sock)
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
        segment = _new_segment(capacity)
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
        capacity = _check_capacity(offer.get("capacity"))
        sems = offer.get("sems")
        if not isinstance(sems, list) or len(sems) != 2 * len(_SEMS_PER_RING):
            raise ValueError("rendezvous offer lists the wrong number of semaphores")
        try:
            segment = seg.Segment.attach(offer.get("shm"), sems, _segment_size(capacity))
        except OSError as exc:
            conn.sendall(f"cannot attach: {exc}".encode()[:_OFFER_MAX - 1] + b"\n")
            raise
        try:
            segment.unlink()  # both ends hold it now
            if _check_header(segment) != capacity:
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
    created = _new_segment(capacity)
    try:
        attached = seg.Segment.attach(created.name, created.sem_names, _segment_size(capacity))
    finally:
        created.unlink()
    a = ShmTransport(created, a_sock, dialer=True, peer="shm://pair", spin=spin, tso=tso)
    b = ShmTransport(attached, b_sock, dialer=False, peer="shm://pair", spin=spin, tso=tso)
    return a, b


transport.register_scheme("shm", connect_shm, ShmListener)
