"""Large frames skip the ring: they travel in a pooled shared segment that the receiver maps.

Through the ring a frame is copied twice: into the ring, and out of it into memory of the
receiver's own. A frame of ``THRESHOLD`` bytes or more is instead copied once, by the
sender, into a segment of its pool (``BigOut``), and only a small *descriptor* goes
through the ring; the receiver (``BigIn``) maps the segment (once: it keeps the mapping)
and hands out the frame as a view of it, so the numpy arrays decoded from the frame live
right there. When the last of them dies, the receiver gives the segment back, and the
sender may fill it again.

Segment layout (one frame at a time)::

    offset 0    u64 words: MAGIC, CAPACITY (data bytes), LENT, RETIRED, OPENED
    offset 64   data: the frame, ``length`` bytes (8-byte aligned, so arrays decode in place)

    descriptor (through the ring, the frame length word carrying ``FLAG``):
        name (32 bytes, NUL-padded) | capacity u64 | frame length u64

* ``LENT`` is set by the sender before it sends the descriptor and cleared by the receiver
  once nothing refers to the frame any more; only then is the segment written again. On
  x86 plain accesses order this (the receiver's reads and writes of the frame come before
  its clear; the sender's check before its writes). Elsewhere both take the ring's mutex
  semaphore around the access, as ``fence.py`` does for the ring itself.
* ``RETIRED`` is set by the sender when it drops a segment (idle for ``IDLE_SECONDS``, or
  too big to keep); the receiver then drops its mapping too.
* Names come from ``segment.py`` (a fixed prefix and 64 random bits, 0600, checked owner
  and size on attach, ``posix_fallocate``); the receiver unlinks each name as soon as it has
  opened it (and sets ``OPENED``). A sender that closes waits briefly for the receiver to
  open what it was sent, then unlinks whatever is left; so a name outlives its hand-over
  only if both ends die between the first frame in a new segment and its reading.
* The pool keeps at most ``POOL_BYTES`` per connection and direction; a larger frame gets a
  segment of its own, dropped once given back. Frames lent and not yet given back count
  against ``POOL_BYTES`` too: past it (a receiver that does not read, or keeps what it
  read), frames go through the ring, whose back-pressure then holds the sender. So does a
  frame for which no segment can be had (a full /dev/shm).

A fresh segment is slow to fill: the kernel allocates, zeroes and maps every page (about
0.5 ms per MiB here, five times the copy). So the first large frame of a connection does
three things besides, each through the ring as a *notice* (a descriptor of length 0):

1. before making its segment, the sender sends a *hint* (a descriptor without a name): the
   receiver, likely to answer with a frame as large, starts making a segment of that size
   for its own pool in a thread of its own (``prepare``), while the sender makes its own;
2. once made, a segment is *announced* (its name): the receiver opens it at once, and maps
   its pages while the sender maps them on its side and copies the frame in;
3. a sender whose only fitting segment is still lent waits a moment for it (up to a tenth
   of what making one costs: the receiver of an answer is often about to give the
   request's segment back) before making another.

Notices are only hints: one that finds the ring full is not sent, and a hint that would
take the receiver's pool past ``POOL_BYTES`` is ignored.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from . import segment as seg
from .copier import copier

__all__ = ["FLAG", "THRESHOLD", "POOL_BYTES", "IDLE_SECONDS", "DESC_SIZE", "BigOut", "Locked",
           "threshold", "populate", "hint", "announcement", "trimmer"]

FLAG = 1 << 63          # in a frame's length word: the payload is a descriptor
HEADER = 64
MAGIC, CAPACITY, LENT, RETIRED, OPENED = 0, 1, 2, 3, 4
_MAGIC = int.from_bytes(b"PYDBIG01", "little")
_DESC = struct.Struct("<32sQQ")
DESC_SIZE = _DESC.size
# Measured on a 2-vCPU machine (docs/benchmarks.md): one copy beats the ring's two from
# about 1 MiB on; below, the ring's pipelined copies and no mapping bookkeeping win.
THRESHOLD = 1 << 20
POOL_BYTES = 256 << 20
IDLE_SECONDS = 5.0
_ROUND = 1 << 20
_TICK = 1.0             # how often idle segments are looked for
# A sender waits for a lent segment to come back up to a tenth of what making one costs
# (about 0.5 ms per MiB here): seconds per byte.
_LENT_WAIT = 0.05e-3 / (1 << 20)
_PREPARE_WAIT = 5.0     # seconds at most for a segment being made in the background
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23   # Linux 5.14; elsewhere pages fault in


def threshold() -> int:
    """Frames of at least this many bytes skip the ring (``PYDIST_SHM_BIGBUF``: a size in
    bytes, or 0 to send everything through the ring)."""
    forced = os.environ.get("PYDIST_SHM_BIGBUF", "")
    if forced.strip():
        value = int(forced)
        return value if value > 0 else 1 << 62
    return THRESHOLD


def populate(buf: mmap.mmap, advice: int) -> None:
    """Map every page of ``buf`` now, in one call (faulting them in one by one costs about
    twice as much), without holding the GIL, split across the copier's threads when large;
    nothing where the kernel cannot."""
    copier().populate(buf, advice)


def hint(cap: int) -> bytes:
    """The notice asking the receiver to make a segment of ``cap`` bytes for its answers."""
    return _DESC.pack(b"", cap, 0)


def announcement(name: str, cap: int) -> bytes:
    """The notice telling the receiver to open segment ``name`` now (no frame in it yet)."""
    return _DESC.pack(name.encode(), cap, 0)


class Locked:
    """Runs a shared-word access inside the ring's mutex where plain accesses are not
    ordered (``mutex`` None on x86)."""

    def __init__(self, mutex: Any) -> None:
        self.mutex = mutex

    def store(self, words: memoryview, i: int, value: int) -> None:
        if self.mutex is None:
            words[i] = value
            return
        self.mutex.acquire(5.0)
        try:
            words[i] = value
        finally:
            self.mutex.release()

    def load(self, words: memoryview, i: int) -> int:
        if self.mutex is None:
            return words[i]
        self.mutex.acquire(5.0)
        try:
            return words[i]
        finally:
            self.mutex.release()


class _Out:
    """A segment of the sender's pool (``map_pages`` maps its pages at once)."""

    __slots__ = ("segment", "words", "data", "cap", "used", "keep", "fresh", "mapped")

    def __init__(self, cap: int, keep: bool) -> None:
        self.segment = seg.Segment.create(HEADER + cap, [])
        view = memoryview(self.segment.buf)
        self.words = view[:HEADER].cast("Q")
        self.data = view[HEADER:]
        self.cap, self.keep, self.used = cap, keep, time.monotonic()
        self.fresh = True   # not yet announced to the receiver
        self.mapped = False
        self.words[MAGIC], self.words[CAPACITY] = _MAGIC, cap

    def map_pages(self) -> _Out:
        """Map every page now, once (a fresh segment's pages fault in one by one otherwise)."""
        if not self.mapped:
            populate(self.segment.buf, MADV_POPULATE_WRITE)
            self.mapped = True
        return self

    def fits(self, n: int) -> bool:
        return n <= self.cap <= 2 * n + _ROUND

    def drop(self) -> None:
        self.words[RETIRED] = 1
        self.segment.unlink()  # gone already if the receiver opened it
        self.words.release()
        self.data.release()
        self.segment.close()


def _capacity(n: int) -> int:
    return -(-n // _ROUND) * _ROUND


class BigOut:
    """The sending side: frames copied into pooled segments (one per connection end).

    ``notify(desc, locked)`` sends a notice through the ring without blocking (False if it
    could not); it is called with the transport's send lock held (``stage``: ``locked``
    True) or not (a segment made by ``prepare``), and takes the lock itself in the second
    case (``locked`` None: only if it is free at once, as when a segment just made is
    announced: a sender may be holding the lock while it waits for that very segment).
    """

    def __init__(self, mutex: Any = None,
                 notify: Callable[[bytes, bool | None], bool] | None = None) -> None:
        self._locked = Locked(mutex)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pool: list[_Out] = []
        self._making: list[int] = []   # capacities being made by prepare()
        self._closed = False
        self._no_room_until = 0.0   # /dev/shm was full: the ring until then
        self._notify = notify

    def stage(self, parts: Sequence[memoryview | bytes], total: int) -> bytes | None:
        """Copy the frame into a free segment and lend it; the descriptor to send, or None
        when no segment can be had (send through the ring then). Under the send lock."""
        out = self._take(total)
        if out is None:
            return None
        try:
            self._announce(out, locked=True)   # the receiver maps a new one meanwhile
            out.map_pages()
            copier().copy(out.data, parts)   # in two threads when large (copier.py)
        except BaseException:
            self._locked.store(out.words, LENT, 0)
            raise
        return _DESC.pack(out.segment.name.encode(), out.cap, total)

    def _announce(self, out: _Out, locked: bool | None) -> None:
        """Tell the receiver to open ``out`` now, once (a second notice would be harmless:
        the receiver keeps what it opened)."""
        if self._notify is None:
            return
        with self._lock:
            fresh, out.fresh = out.fresh and not out.words[OPENED], False
        if fresh:
            if not self._notify(announcement(out.segment.name, out.cap), locked):
                out.fresh = True   # not sent: the first descriptor naming it opens it

    def _take(self, n: int) -> _Out | None:
        deadline = time.monotonic() + n * _LENT_WAIT
        with self._lock:
            while True:
                if self._closed:
                    return None
                self._trim_locked(time.monotonic(), idle=False)
                out = next((o for o in self._pool if o.fits(n) and not self._lent(o)), None)
                if out is not None:
                    return self._lend(out)
                if not self._wait_locked(n, deadline):
                    break
            cap = _capacity(n)
            lent = sum(o.cap for o in self._pool if self._lent(o))
            if lent and lent + cap > POOL_BYTES:
                return None   # the receiver holds enough already: the ring holds us back
            keep = sum(o.cap for o in self._pool) + sum(self._making) + cap <= POOL_BYTES
            if time.monotonic() < self._no_room_until:
                return None
        if self._notify is not None:   # the receiver makes one for its answer meanwhile
            self._notify(hint(cap), True)
        try:
            out = _Out(cap, keep)
        except OSError:
            self._no_room_until = time.monotonic() + IDLE_SECONDS
            return None
        with self._lock:
            self._pool.append(out)
            self._lend(out)
        _trimmer.watch(self)
        return out   # announced, then its pages mapped, by stage()

    def _wait_locked(self, n: int, deadline: float) -> bool:
        """Wait a little for a fitting segment to come back or be made; whether to look
        again (False: make one now)."""
        now = time.monotonic()
        if any(n <= c <= 2 * n + _ROUND for c in self._making):
            return self._changed.wait(_PREPARE_WAIT) or True
        if now >= deadline or not any(o.fits(n) for o in self._pool):
            return False
        self._changed.wait(min(1e-4, deadline - now))   # the receiver stores, not notifies
        return True

    def prepare(self, cap: int) -> None:
        """Make a segment of ``cap`` bytes in the background, unless the pool has one that
        fits or has no room for it (the peer's hint that a frame that large will follow)."""
        if cap <= 0 or cap % _ROUND:
            return
        with self._lock:
            if self._closed or cap in self._making or any(o.fits(cap) for o in self._pool):
                return
            if sum(o.cap for o in self._pool) + sum(self._making) + cap > POOL_BYTES:
                return
            self._making.append(cap)
        threading.Thread(target=self._make, args=(cap,), name="pydist-shm-prepare",
                         daemon=True).start()

    def _make(self, cap: int) -> None:
        try:
            out: _Out | None = _Out(cap, True)
        except OSError:
            out = None
        if out is not None:   # the receiver maps it while we do (unless a send is under way:
            self._announce(out, locked=None)   # then once it is in the pool, as below)
            out.map_pages()
        with self._lock:
            self._making.remove(cap)
            if out is not None and not self._closed:
                self._pool.append(out)
            elif out is not None:
                out.drop()
                out = None
            self._changed.notify_all()
        if out is not None:
            _trimmer.watch(self)
            with self._lock:
                idle = out in self._pool and not self._lent(out)
            if idle:   # not taken meanwhile by a sender, who announces it itself
                self._announce(out, locked=False)

    def _lend(self, out: _Out) -> _Out:
        out.words[LENT] = 1   # read back only by this side, after the receiver clears it
        out.used = time.monotonic()
        return out

    def _lent(self, out: _Out) -> bool:
        return self._locked.load(out.words, LENT) != 0

    def _trim_locked(self, now: float, idle: bool = True) -> None:
        keep = []
        for out in self._pool:
            stale = not out.keep or (idle and now - out.used > IDLE_SECONDS)
            # One announced stays until the receiver has opened it (it may not read for a
            # while), so that an announcement it reads names a segment still there.
            waiting = not out.fresh and not out.words[OPENED]
            if stale and not waiting and not self._lent(out):
                out.drop()
            else:
                keep.append(out)
        self._pool = keep

    def trim(self) -> bool:
        """Drop segments given back and idle; whether any remain (or are being made)."""
        with self._lock:
            self._trim_locked(time.monotonic())
            return bool(self._pool or self._making)

    def stats(self) -> tuple[int, int]:
        """(segments, bytes) in the pool."""
        with self._lock:
            return len(self._pool), sum(o.cap for o in self._pool)

    def settle(self, timeout: float, peer_gone: Any) -> None:
        """Wait up to ``timeout`` seconds, or until ``peer_gone()``, for the receiver to open
        every segment it was sent (a clean close: what was sent is still read)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not peer_gone():
            with self._lock:
                waiting = [o for o in self._pool if self._lent(o) and not o.words[OPENED]]
            if not waiting:
                return
            time.sleep(0.005)

    def close(self) -> None:
        """Drop every segment and remove any name the receiver never opened (one being made
        is dropped once made). Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
            self._changed.notify_all()
        for out in pool:
            out.drop()


class _Trimmer:
    """One daemon thread per process that trims every pool each second, alive only while
    some pool holds a segment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._dirty = False   # a pool was watched since the current pass began

    def watch(self, pool: Any) -> None:
        with self._lock:
            self._pools.add(pool)
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="pydist-shm-bigbuf")
                self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(_TICK)
            with self._lock:
                self._dirty = False
            busy = False
            for pool in list(self._pools):
                try:
                    busy = pool.trim() or busy
                except Exception:  # a pool closing under us: the next round sees it gone
                    busy = True
            with self._lock:
                if not busy and not self._dirty:
                    self._thread = None
                    return


_trimmer = _Trimmer()


def trimmer() -> _Trimmer:
    """This process's trimmer (a fresh one after a fork)."""
    return _trimmer


def _forget_after_fork() -> None:
    global _trimmer
    _trimmer = _Trimmer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
