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
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
import weakref
from typing import Any, Sequence

from . import segment as seg
from .fence import tso_by_default
from .layout import SEMS_PER_RING

__all__ = ["FLAG", "THRESHOLD", "POOL_BYTES", "IDLE_SECONDS", "DESC_SIZE", "BigOut", "BigIn",
           "threshold", "ends"]

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


def threshold() -> int:
    """Frames of at least this many bytes skip the ring (``PYDIST_SHM_BIGBUF``: a size in
    bytes, or 0 to send everything through the ring)."""
    forced = os.environ.get("PYDIST_SHM_BIGBUF", "")
    if forced.strip():
        value = int(forced)
        return value if value > 0 else 1 << 62
    return THRESHOLD


def ends(segment: seg.Segment, dialer: bool, tso: bool | None) -> tuple[BigOut, BigIn]:
    """The sending and receiving pools of one connection end; where plain accesses are not
    ordered (``tso`` False), each uses the mutex semaphore of the ring it goes along."""
    mutex = None if (tso_by_default() if tso is None else tso) else len(SEMS_PER_RING) - 1
    tx_ring = 0 if dialer else 1

    def sem(ring: int) -> Any:
        return None if mutex is None else segment.sems[len(SEMS_PER_RING) * ring + mutex]
    return BigOut(sem(tx_ring)), BigIn(sem(1 - tx_ring))


class _Locked:
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
    """A segment of the sender's pool."""

    __slots__ = ("segment", "words", "data", "cap", "used", "keep")

    def __init__(self, cap: int, keep: bool) -> None:
        self.segment = seg.Segment.create(HEADER + cap, [])
        view = memoryview(self.segment.buf)
        self.words = view[:HEADER].cast("Q")
        self.data = view[HEADER:]
        self.cap, self.keep, self.used = cap, keep, time.monotonic()
        self.words[MAGIC], self.words[CAPACITY] = _MAGIC, cap

    def drop(self) -> None:
        self.words[RETIRED] = 1
        self.segment.unlink()  # gone already if the receiver opened it
        self.words.release()
        self.data.release()
        self.segment.close()


class BigOut:
    """The sending side: frames copied into pooled segments (one per connection end)."""

    def __init__(self, mutex: Any = None) -> None:
        self._locked = _Locked(mutex)
        self._lock = threading.Lock()
        self._pool: list[_Out] = []
        self._closed = False
        self._no_room_until = 0.0   # /dev/shm was full: the ring until then

    def stage(self, parts: Sequence[memoryview | bytes], total: int) -> bytes | None:
        """Copy the frame into a free segment and lend it; the descriptor to send, or None
        when no segment can be had (send through the ring then)."""
        out = self._take(total)
        if out is None:
            return None
        try:
            pos = 0
            data = out.data
            for part in parts:
                n = len(part)
                data[pos:pos + n] = part
                pos += n
        except BaseException:
            self._locked.store(out.words, LENT, 0)
            raise
        return _DESC.pack(out.segment.name.encode(), out.cap, total)

    def _take(self, n: int) -> _Out | None:
        with self._lock:
            if self._closed:
                return None
            self._trim_locked(time.monotonic(), idle=False)
            lent = 0
            for out in self._pool:
                if not self._lent(out):
                    if n <= out.cap <= 2 * n + _ROUND:
                        return self._lend(out)
                else:
                    lent += out.cap
            cap = -(-n // _ROUND) * _ROUND
            if lent and lent + cap > POOL_BYTES:
                return None   # the receiver holds enough already: the ring holds us back
            keep = sum(o.cap for o in self._pool) + cap <= POOL_BYTES
            if time.monotonic() < self._no_room_until:
                return None
            try:
                out = _Out(cap, keep)
            except OSError:
                self._no_room_until = time.monotonic() + IDLE_SECONDS
                return None
            self._pool.append(out)
            self._lend(out)
        _trimmer.watch(self)
        return out

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
            if stale and not self._lent(out):
                out.drop()
            else:
                keep.append(out)
        self._pool = keep

    def trim(self) -> bool:
        """Drop segments given back and idle; whether any remain."""
        with self._lock:
            self._trim_locked(time.monotonic())
            return bool(self._pool)

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
        """Drop every segment and remove any name the receiver never opened. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for out in pool:
            out.drop()


class _In:
    """The receiver's mapping of one of the sender's segments."""

    __slots__ = ("segment", "words", "data", "cap")

    def __init__(self, name: str, cap: int) -> None:
        self.cap = cap
        self.segment = seg.Segment.attach(name, [], HEADER + cap)
        self.segment.unlink()   # opened: the name has done its job
        view = memoryview(self.segment.buf)
        self.words = view[:HEADER].cast("Q")
        self.data = view[HEADER:HEADER + cap]
        if self.words[MAGIC] != _MAGIC or self.words[CAPACITY] != cap:
            self.drop()
            raise seg.SegmentError(f"large-frame segment {name} has a bad header")
        self.words[OPENED] = 1

    def drop(self) -> None:
        # Frames still alive keep the mapping alive; it goes with the last of them.
        self.segment.close()


def _give_back(locked: _Locked, words: memoryview) -> None:
    """The last view of a received frame died: the sender may fill its segment again."""
    try:
        locked.store(words, LENT, 0)
    except Exception:  # the connection is gone, and the segment with it
        pass


class BigIn:
    """The receiving side: descriptors turned into frames that are views of the segment."""

    def __init__(self, mutex: Any = None) -> None:
        self._locked = _Locked(mutex)
        self._lock = threading.Lock()
        self._maps: dict[str, _In] = {}
        self._closed = False

    @staticmethod
    def length(desc: memoryview | bytes) -> int:
        """The frame length a descriptor announces (0 for a malformed one)."""
        return _DESC.unpack(desc)[2] if len(desc) == DESC_SIZE else 0

    def open(self, desc: memoryview | bytes, limit: int) -> memoryview:
        """The frame a descriptor stands for; SegmentError/ValueError for a bad one."""
        if len(desc) != DESC_SIZE:
            raise ValueError(f"a large-frame descriptor has {DESC_SIZE} bytes, not {len(desc)}")
        raw, cap, length = _DESC.unpack(desc)
        name = raw.rstrip(b"\0").decode("ascii", "replace")
        if not seg.valid_name(name):
            raise ValueError(f"large-frame descriptor names {name!r}, not a pydist segment")
        if length > cap or length > limit or cap > limit + _ROUND:
            raise ValueError(f"large-frame descriptor announces {length} bytes in a segment of "
                             f"{cap}, over the limit of {limit}")
        with self._lock:
            if self._closed:
                raise ValueError("the connection is closed")
            m = self._maps.get(name)
            fresh = m is None or m.cap != cap
            if fresh:
                m = self._maps[name] = _In(name, cap)
        if fresh:
            _trimmer.watch(self)
        # A fresh exporter per frame: every view of the frame, and every array decoded from
        # it, refers to it, so it dies with the last of them (memoryviews and PickleBuffers
        # do not: their slices refer to the mapping itself). One ctypes type per capacity.
        lease = (ctypes.c_ubyte * m.cap).from_buffer(m.data)
        weakref.finalize(lease, _give_back, self._locked, m.words)
        return memoryview(lease).cast("B")[:length]

    def trim(self) -> bool:
        """Drop mappings of segments the sender retired; whether any remain."""
        with self._lock:
            for name, m in list(self._maps.items()):
                if m.words[RETIRED]:
                    del self._maps[name]
                    m.drop()
            return bool(self._maps)

    def close(self) -> None:
        """Drop every mapping (frames still alive keep theirs). Idempotent."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, {}
        for m in maps.values():
            m.drop()


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


def _forget_after_fork() -> None:
    global _trimmer
    _trimmer = _Trimmer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
