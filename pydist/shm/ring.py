"""A single-producer/single-consumer byte ring in shared memory.

Layout of one ring (``ctl`` is 128 bytes, two 64-byte cache lines, viewed as u64 words;
``data`` is ``capacity`` bytes, a power of two)::

    ctl line 0, written only by the producer:  HEAD  WRITER_SLEEP  WRITER_CLOSED  WRITER_CPU
    ctl line 1, written only by the consumer:  TAIL  READER_SLEEP  READER_CLOSED
    data:  byte ``i`` of the stream lives at ``data[i % capacity]``

``HEAD`` and ``TAIL`` count bytes written and read since the start; they only grow
(2**64 bytes never wrap). ``HEAD - TAIL`` bytes are readable, ``capacity - (HEAD - TAIL)``
writable. Each end keeps its own counter in a local variable and never trusts the shared
copy of it; the peer's counter is validated on every read (``TAIL <= HEAD <= TAIL +
capacity``, never moving backwards), and every index is masked, so a scribbled word raises
``TransportBroken`` and can never make an end touch memory outside its ``data`` slice.

A sleep word holds ``episode * 2 + 1`` while that end sleeps (or is about to) on its
semaphore and ``episode * 2`` while it is awake. The other end posts the semaphore after
publishing progress, at most once per sleep episode, so an awake peer costs no syscall.
``WRITER_CPU`` is the vCPU the producing process last ran on, plus one: a hint for the
spin (``wait.py``), never trusted for anything else. Why the accesses are ordered
correctly on every machine is ``fence.py``'s story.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import TransportBroken, TransportClosed
from ..wire.codec import FRAME_HEADER as _FRAME
from .buffers import LARGE, receive_buffer
from .fence import Fence, LockedFence, TsoFence, tso_by_default
from .wait import WAIT_TIMEOUT, LinkState, SpinPolicy, Waiter

__all__ = [
    "CTL_SIZE", "WAIT_TIMEOUT", "CHUNK", "LinkState", "SpinPolicy", "RingWriter", "RingReader",
    "tso_by_default", "TsoFence", "LockedFence",
]

HEAD, WRITER_SLEEP, WRITER_CLOSED, WRITER_CPU = 0, 1, 2, 3
TAIL, READER_SLEEP, READER_CLOSED = 8, 9, 10
CTL_SIZE = 128
CHUNK = 256 * 1024  # publish progress at least this often, so the two ends pipeline
_HEADER_SIZE = _FRAME.size
_pack_header = _FRAME.pack_into
_unpack_header = _FRAME.unpack_from

Bytes = bytes | memoryview  # a part as the transport hands it over: 1-D, byte-sized items


class _End:
    """What both ends of a ring share: the views, the fence and the waiter."""

    def __init__(self, ctl: memoryview, data: memoryview, fence: Fence, waiter: Waiter,
                 state: LinkState) -> None:
        capacity = len(data)
        if capacity < 64 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= 64, not {capacity}")
        if ctl.format != "Q":
            raise ValueError("the control block must be viewed as u64 words")
        self._ctl = ctl
        self._data = data
        self._cap = capacity
        self._mask = capacity - 1
        self._chunk = min(CHUNK, capacity // 4)
        self._state = state
        self.waiter = waiter
        # Bound once: these sit on the per-frame path.
        self._load = fence.load
        self._store = fence.store
        self._store_load = fence.store_load
        self._wake_peer = waiter.wake_peer

    def _broken(self, what: str) -> TransportBroken:
        reason = f"shared-memory ring corrupted: {what}"
        self._state.broken = reason
        return TransportBroken(reason)

    def detach(self) -> None:
        """Drop our views of the shared memory, so the mapping can be closed; any later use
        raises ValueError instead of touching unmapped memory."""
        self._ctl.release()
        self._data.release()

    def _wait(self, watch: int, seen: int, sleep_word: int, closed_word: int,
              check: Callable[[], None]) -> None:
        self.waiter.wait(watch, seen, sleep_word, closed_word, check)


class RingWriter(_End):
    """The producer end: ``write(parts)`` streams bytes in, waiting for space as needed."""

    def __init__(self, ctl: memoryview, data: memoryview, fence: Fence, waiter: Waiter,
                 state: LinkState) -> None:
        super().__init__(ctl, data, fence, waiter, state)
        # Both counters start at zero in a fresh segment; never trust the shared copies.
        self._head = self._published = self._tail = 0

    @property
    def position(self) -> int:
        """Bytes written so far (published or not)."""
        return self._head

    def peer_closed(self) -> bool:
        """A cheap hint that the consumer has closed (no fence: a stale answer is harmless)."""
        return self._ctl[READER_CLOSED] != 0

    def try_write_frame(self, parts: Sequence[Bytes], total: int, word: int | None = None) -> bool:
        """Fast path: write a length header (``word`` if given, else ``total``) and ``parts``
        (``total`` bytes) and publish them, if they fit in the contiguous free space now;
        False (nothing written) otherwise."""
        n = _HEADER_SIZE + total
        head = self._head
        idx = head & self._mask
        ctl = self._ctl
        if idx + n > self._cap or ctl[READER_CLOSED]:
            return False
        if self._cap - (head - self._tail) < n and self._refresh() < n:
            return False
        data = self._data
        _pack_header(data, idx, total if word is None else word)
        pos = idx + _HEADER_SIZE
        for part in parts:
            k = len(part)
            data[pos:pos + k] = part
            pos += k
        self._head = head = head + n
        # flush(), inlined; `_published` moves only once HEAD is stored, so a flush after
        # an interruption here still publishes.
        sleep = self._store_load(HEAD, head, READER_SLEEP)
        self._published = head
        if sleep & 1:
            self._wake_peer(sleep)
        return True

    def write(self, parts: Sequence[Bytes]) -> None:
        """Append the bytes of ``parts`` (1-D byte views); blocks while the ring is full."""
        data, cap, mask, chunk = self._data, self._cap, self._mask, self._chunk
        for src in parts:
            off, n = 0, len(src)
            while off < n:
                free = cap - (self._head - self._tail)
                if free == 0:
                    free = self._make_room()
                idx = self._head & mask
                k = min(n - off, free, cap - idx, chunk)
                data[idx:idx + k] = src[off:off + k]
                off += k
                self._head += k
                if self._head - self._published >= chunk:
                    self.flush()

    def flush(self) -> None:
        """Publish everything written so far, waking the consumer if it sleeps."""
        head = self._head
        if head != self._published:
            self._published = head
            sleep = self._store_load(HEAD, head, READER_SLEEP)
            if sleep & 1:
                self._wake_peer(sleep)

    def mark_closed(self) -> None:
        """Tell the consumer no more bytes will come (after the ones published)."""
        self._store(WRITER_CLOSED, 1)

    def _refresh(self) -> int:
        tail = self._load(TAIL)
        if tail < self._tail or tail > self._published:
            raise self._broken(f"read counter {tail} outside [{self._tail}, {self._published}]")
        self._tail = tail
        return self._cap - (self._head - tail)

    def _make_room(self) -> int:
        self.flush()  # the consumer must see our bytes before we wait for it to take them
        free = self._refresh()
        while free == 0:
            self._wait(TAIL, self._tail, WRITER_SLEEP, READER_CLOSED, self._check)
            free = self._refresh()
        return free

    def _check(self) -> None:
        self._state.check()
        if self._load(READER_CLOSED):
            raise TransportClosed("the peer closed the shared-memory transport")


class RingReader(_End):
    """The consumer end: ``read_into(dst)`` fills ``dst``, waiting for bytes as needed."""

    def __init__(self, ctl: memoryview, data: memoryview, fence: Fence, waiter: Waiter,
                 state: LinkState) -> None:
        super().__init__(ctl, data, fence, waiter, state)
        self._tail = self._published = self._head = 0

    @property
    def position(self) -> int:
        """Bytes consumed so far (released or not)."""
        return self._tail

    def peer_closed(self) -> bool:
        """A cheap hint that the producer has closed (more bytes may still be readable)."""
        return self._ctl[WRITER_CLOSED] != 0

    def read_into(self, dst: memoryview, start: int) -> None:
        """Fill ``dst`` (a writable 1-D byte view) with stream bytes ``start ..`` on.

        Progress is our own read counter, so a call cut short by an exception (say a
        ``KeyboardInterrupt`` while waiting) is resumed by calling again with the same
        arguments: a chunk copied but not yet counted is simply copied again.
        """
        data, cap, mask, chunk = self._data, self._cap, self._mask, self._chunk
        n = len(dst)
        while (off := self._tail - start) < n:
            avail = self._head - self._tail
            if avail == 0:
                avail = self._await_bytes()
            idx = self._tail & mask
            k = min(n - off, avail, cap - idx, chunk)
            dst[off:off + k] = data[idx:idx + k]
            self._tail += k
            if self._tail - self._published >= chunk:
                self.release()

    def try_read_frame(self, limit: int) -> memoryview | None:
        """Fast path: the next whole frame (length header + payload) in a buffer of its own
        (``buffers.py``) if it is readable, contiguous and within ``limit``; None (nothing
        consumed) otherwise. The caller must ``release()`` afterwards."""
        tail = self._tail
        idx = tail & self._mask
        if idx + _HEADER_SIZE > self._cap:
            return None
        avail = self._head - tail
        if avail < _HEADER_SIZE:
            avail = self._refresh()
            if avail < _HEADER_SIZE:
                return None
        (length,) = _unpack_header(self._data, idx)
        start = idx + _HEADER_SIZE
        end = start + length
        if length > limit or end > self._cap or _HEADER_SIZE + length > avail:
            return None
        if length < LARGE:
            frame = memoryview(bytearray(self._data[start:end]))
        else:
            try:
                frame = receive_buffer(length)
            except MemoryError:
                return None  # the streaming path says so, and breaks the link
            frame[:] = self._data[start:end]
        self._tail = tail + _HEADER_SIZE + length  # no call between this and the return
        return frame

    def readable(self, timeout: float) -> bool:
        """Whether a byte is readable or reading would raise at once, waiting up to
        ``timeout`` seconds for that (spinning first where that pays)."""
        try:
            if self._head != self._tail or self._refresh():
                return True
            return self.waiter.wait(HEAD, self._head, READER_SLEEP, WRITER_CLOSED,
                                    self._check, timeout)
        except (TransportBroken, TransportClosed):
            return True

    def wait_readable(self) -> None:
        """Block until at least one byte is readable (or raise why none ever will be)."""
        if self._head == self._tail:
            self._await_bytes()

    def release(self) -> None:
        """Publish what we consumed, so the producer may reuse the space."""
        tail = self._tail
        if tail != self._published:
            self._published = tail
            sleep = self._store_load(TAIL, tail, WRITER_SLEEP)
            if sleep & 1:
                self._wake_peer(sleep)

    def mark_closed(self) -> None:
        """Tell the producer nobody will read any more."""
        self._store(READER_CLOSED, 1)

    def _refresh(self) -> int:
        head = self._load(HEAD)
        if head < self._head or head - self._tail > self._cap:
            raise self._broken(f"write counter {head} outside [{self._head}, "
                               f"{self._tail + self._cap}]")
        self._head = head
        return head - self._tail

    def _await_bytes(self) -> int:
        avail = self._refresh()
        if avail:
            return avail
        self.release()  # the producer may be waiting for exactly this space
        while avail == 0:
            self._wait(HEAD, self._head, READER_SLEEP, WRITER_CLOSED, self._check)
            avail = self._refresh()
        return avail

    def _check(self) -> None:
        self._state.check()
        closed = self._load(WRITER_CLOSED)
        if closed and self._load(HEAD) == self._head:  # closed first, then empty
            if closed != 1:
                raise self._broken(f"closed flag holds {closed}")
            raise TransportClosed("the peer closed the shared-memory transport")
