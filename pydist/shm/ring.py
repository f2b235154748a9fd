"""A single-producer/single-consumer byte ring in shared memory, and how its ends wait.

Layout of one ring (``ctl`` is 128 bytes, two 64-byte cache lines, viewed as u64 words;
``data`` is ``capacity`` bytes, a power of two)::

    ctl line 0, written only by the producer:  HEAD  WRITER_SLEEP  WRITER_CLOSED
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

Memory ordering. The producer copies data, then stores ``HEAD``; the consumer loads
``HEAD``, then copies data out, then stores ``TAIL``. Two orderings are needed: (1) data
stores become visible before the ``HEAD`` store that covers them (and the consumer's data
loads are not satisfied before its ``HEAD`` load), with the same for ``TAIL`` and the
overwriting of consumed bytes; (2) "store my sleep word, then load the peer's counter" on
one side against "store my counter, then load the peer's sleep word" on the other (a
Dekker pattern) must not both read stale values, or a wake-up is lost.

* On x86-64 (``TSO`` mode, chosen by the machine) each access is one C call at its own
  bytecode, so the compiler cannot reorder them, and every counter is an aligned 8-byte word
  read or written whole through a ``"Q"`` memoryview. The hardware keeps stores in order,
  loads in order, and loads before later stores, so (1) holds with plain accesses (glibc's
  memcpy ends its non-temporal path with ``sfence``; fast-string stores are not reordered
  with later stores). The per-frame fast path and the spin rely on exactly this, and on
  nothing else. x86 may still let a load pass an earlier store, so for (2) each end
  acquires and releases a ``threading.Lock`` between the two: a ``lock``-prefixed
  instruction, a full barrier on x86 (~80 ns).
* Elsewhere (aarch64, POWER: ``LOCKED`` mode) plain stores may be reordered, and a
  process-local lock's acquire/release pair is not a full fence there (accesses may move
  into the critical section), so we do not lean on it: every shared load or store of a
  counter, sleep word or closed flag happens inside a critical section of a process-shared
  semaphore (one per ring) used as a mutex. Its post is a release and its wait an acquire,
  so both orderings follow from mutual exclusion. Spinning reads ``HEAD`` with plain loads
  only as a hint and re-reads it under the mutex before touching data.
* In both modes a blocked end also wakes every ``WAIT_TIMEOUT`` and re-checks, so even a lost
  wake-up (which the above rules out) would cost latency, not a hang.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from typing import Callable, Sequence

import posix_ipc

from ..codec import FRAME_HEADER as _FRAME
from ..errors import TransportBroken, TransportClosed

__all__ = [
    "CTL_SIZE", "WAIT_TIMEOUT", "CHUNK", "LinkState", "SpinPolicy", "RingWriter", "RingReader",
    "tso_by_default",
]

HEAD, WRITER_SLEEP, WRITER_CLOSED = 0, 1, 2
TAIL, READER_SLEEP, READER_CLOSED = 8, 9, 10
CTL_SIZE = 128
WAIT_TIMEOUT = 0.1  # seconds; every semaphore wait is bounded by this
CHUNK = 256 * 1024  # publish progress at least this often, so the two ends pipeline
_POLLS_PER_CLOCK = 32  # counter polls between two clock reads while spinning
_TSO_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}

Bytes = bytes | memoryview  # a part as the transport hands it over: 1-D, byte-sized items


def tso_by_default() -> bool:
    """True where plain loads/stores give the ordering the ring needs (x86)."""
    forced = os.environ.get("PYDIST_SHM_FENCE", "").lower()
    if forced in ("tso", "locked"):
        return forced == "tso"
    return platform.machine().lower() in _TSO_MACHINES


class LinkState:
    """Flags one transport shares with its ring ends: this side closed, or link broken."""

    __slots__ = ("closed", "broken")

    def __init__(self) -> None:
        self.closed = False
        self.broken: str | None = None

    def check(self) -> None:
        """Raise if this side closed or the link is broken."""
        if self.broken is not None:
            raise TransportBroken(self.broken)
        if self.closed:
            raise TransportClosed("the shared-memory transport is closed")


class SpinPolicy:
    """Adaptive spin-then-block (start 20 µs, grow to 50 µs on short misses, after 3 misses
    in a row block and re-try spinning every 64 waits, halve after a wait over 200 µs)."""

    START_NS, MAX_NS, MIN_NS, LONG_NS = 20_000, 50_000, 5_000, 200_000
    MISSES_TO_BLOCK, RETRY_EVERY = 3, 64

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.budget_ns = self.START_NS
        self._misses = 0
        self._blocked_waits = 0

    def budget(self) -> int:
        """Nanoseconds to spin before sleeping on this wait (0: sleep at once)."""
        if not self.enabled:
            return 0
        if self._misses < self.MISSES_TO_BLOCK:
            return self.budget_ns
        self._blocked_waits += 1
        return self.budget_ns if self._blocked_waits % self.RETRY_EVERY == 0 else 0

    def hit(self) -> None:
        self._misses = 0

    def miss(self, waited_ns: int, spun: bool) -> None:
        if spun:
            self._misses += 1
        if waited_ns > self.LONG_NS:  # the peer was far away: spinning longer would not help
            self.budget_ns = max(self.MIN_NS, self.budget_ns // 2)
        else:  # the answer came soon after we gave up: a longer spin would have caught it
            self.budget_ns = min(self.MAX_NS, self.budget_ns * 3 // 2)


def _acquire(sem: posix_ipc.Semaphore, timeout: float) -> None:
    """One bounded wait; a timeout or a signal simply returns (the caller re-checks)."""
    try:
        sem.acquire(timeout)
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        pass


class _TsoFence:
    """Orderings on x86-64: plain accesses, plus a locked instruction for store→load."""

    def __init__(self, ctl: memoryview) -> None:
        self._ctl = ctl
        self._lock = threading.Lock()

    def load(self, i: int) -> int:
        return self._ctl[i]

    def store(self, i: int, value: int) -> None:
        self._ctl[i] = value

    def store_load(self, i: int, value: int, j: int) -> int:
        self._ctl[i] = value
        self._lock.acquire()  # lock cmpxchg: a full barrier between the store and the load
        self._lock.release()
        return self._ctl[j]


class _LockedFence:
    """Orderings anywhere: every shared access inside a process-shared mutex."""

    def __init__(self, ctl: memoryview, mutex: posix_ipc.Semaphore, state: LinkState) -> None:
        self._ctl = ctl
        self._mutex = mutex
        self._state = state

    def _enter(self) -> None:
        while True:
            try:
                self._mutex.acquire(WAIT_TIMEOUT)
                return
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                if self._state.broken is not None:  # the peer may have died holding it
                    raise TransportBroken(self._state.broken) from None

    def load(self, i: int) -> int:
        self._enter()
        try:
            return self._ctl[i]
        finally:
            self._mutex.release()

    def store(self, i: int, value: int) -> None:
        self._enter()
        try:
            self._ctl[i] = value
        finally:
            self._mutex.release()

    def store_load(self, i: int, value: int, j: int) -> int:
        self._enter()
        try:
            self._ctl[i] = value
            return self._ctl[j]
        finally:
            self._mutex.release()


class _End:
    """What both ends of a ring share: the views, the fence, and the spin-then-sleep wait."""

    def __init__(self, ctl: memoryview, data: memoryview, *, own_sem: posix_ipc.Semaphore,
                 peer_sem: posix_ipc.Semaphore, mutex: posix_ipc.Semaphore, state: LinkState,
                 policy: SpinPolicy | None = None, tso: bool | None = None) -> None:
        capacity = len(data)
        if capacity < 64 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= 64, not {capacity}")
        self._ctl = ctl if ctl.format == "Q" else ctl.cast("Q")
        self._data = data
        self._cap = capacity
        self._mask = capacity - 1
        self._chunk = min(CHUNK, capacity // 4)
        self._own_sem = own_sem  # we sleep on it
        self._peer_sem = peer_sem  # we post it when the peer sleeps
        self._state = state
        self._policy = policy or SpinPolicy()
        use_tso = tso_by_default() if tso is None else tso
        fence = _TsoFence(self._ctl) if use_tso else _LockedFence(self._ctl, mutex, state)
        # Bound once: these sit on the per-frame path.
        self._load = self._ctl.__getitem__ if use_tso else fence.load
        self._store = fence.store
        self._store_load = fence.store_load
        self._episode = 0
        self._last_woken = 0

    def _broken(self, what: str) -> TransportBroken:
        reason = f"shared-memory ring corrupted: {what}"
        self._state.broken = reason
        return TransportBroken(reason)

    def detach(self) -> None:
        """Drop our views of the shared memory, so the mapping can be closed; any later use
        raises ValueError instead of touching unmapped memory."""
        self._ctl.release()
        self._data.release()

    def _wake_peer(self, sleep: int) -> None:
        """Post the peer's semaphore if its sleep word says it sleeps (once per episode)."""
        if sleep & 1 and sleep != self._last_woken:
            self._last_woken = sleep
            self._peer_sem.release()

    def _wait(self, watch: int, seen: int, sleep_word: int, closed_word: int,
              check: Callable[[], None]) -> None:
        """Return once ``ctl[watch]`` has moved from ``seen`` (spin, then sleep)."""
        policy = self._policy
        if not policy.enabled:
            self._sleep(watch, seen, sleep_word, closed_word, check)
            return
        clock = time.perf_counter_ns
        start = clock()
        budget = policy.budget()
        if budget and self._spin(watch, seen, start + budget):
            policy.hit()
            return
        self._sleep(watch, seen, sleep_word, closed_word, check)
        policy.miss(clock() - start, budget > 0)

    def _spin(self, watch: int, seen: int, deadline: int) -> bool:
        # Plain loads are only a hint here; the caller re-reads through the fence. No
        # sched_yield: it would hand the vCPU to a busy process for a whole time slice.
        ctl, clock, polls = self._ctl, time.perf_counter_ns, range(_POLLS_PER_CLOCK)
        while True:
            for _ in polls:
                if ctl[watch] != seen:
                    return True
            if clock() >= deadline:
                return False

    def _sleep(self, watch: int, seen: int, sleep_word: int, closed_word: int,
               check: Callable[[], None]) -> None:
        ctl, state, sem = self._ctl, self._state, self._own_sem
        self._episode += 1
        asleep = (self._episode << 1) | 1
        try:
            while self._store_load(sleep_word, asleep, watch) == seen:
                if state.closed or state.broken is not None or ctl[closed_word]:
                    check()  # cheap test first: this path runs before every sleep
                _acquire(sem, WAIT_TIMEOUT)
                if ctl[watch] != seen:  # woken with news (the caller re-reads it fenced)
                    break
                check()
        finally:
            # A plain store: if the peer sees "asleep" a little longer it merely posts once.
            ctl[sleep_word] = asleep - 1


class RingWriter(_End):
    """The producer end: ``write(parts)`` streams bytes in, waiting for space as needed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Both counters start at zero in a fresh segment; never trust the shared copies.
        self._head = self._published = self._tail = 0

    @property
    def position(self) -> int:
        """Bytes written so far (published or not)."""
        return self._head

    def peer_closed(self) -> bool:
        """A cheap hint that the consumer has closed (no fence: a stale answer is harmless)."""
        return self._ctl[READER_CLOSED] != 0

    def try_write_frame(self, parts: Sequence[Bytes], total: int) -> bool:
        """Fast path: write a length header and ``parts`` (``total`` bytes) and publish them,
        if they fit in the contiguous free space now; False (nothing written) otherwise."""
        n = _FRAME.size + total
        head = self._head
        idx = head & self._mask
        if idx + n > self._cap or self._ctl[READER_CLOSED]:
            return False
        if self._cap - (head - self._tail) < n and self._refresh() < n:
            return False
        data = self._data
        _FRAME.pack_into(data, idx, total)
        pos = idx + _FRAME.size
        for part in parts:
            k = len(part)
            data[pos:pos + k] = part
            pos += k
        self._head = head + n
        self.flush()
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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
        """Fast path: the next whole frame (length header + payload) in a fresh buffer if it
        is readable, contiguous and within ``limit``; None (nothing consumed) otherwise.
        The caller must ``release()`` afterwards."""
        tail = self._tail
        idx = tail & self._mask
        if idx + _FRAME.size > self._cap:
            return None
        avail = self._head - tail
        if avail < _FRAME.size:
            avail = self._refresh()
            if avail < _FRAME.size:
                return None
        (length,) = _FRAME.unpack_from(self._data, idx)
        end = idx + _FRAME.size + length
        if length > limit or end > self._cap or _FRAME.size + length > avail:
            return None
        frame = memoryview(bytearray(self._data[idx + _FRAME.size:end]))
        self._tail = tail + _FRAME.size + length  # no call between this and the return
        return frame

    def readable(self, timeout: float) -> bool:
        """Whether a byte is readable or reading would raise at once, waiting up to
        ``timeout`` seconds for that (sleeping, never spinning)."""
        if self._head != self._tail or self._refresh():
            return True
        deadline = time.monotonic() + timeout
        ctl, sem, seen = self._ctl, self._own_sem, self._head
        self._episode += 1
        asleep = (self._episode << 1) | 1
        try:
            while self._store_load(READER_SLEEP, asleep, HEAD) == seen:
                try:
                    self._check()
                except (TransportBroken, TransportClosed):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                _acquire(sem, min(remaining, WAIT_TIMEOUT))
        finally:
            ctl[READER_SLEEP] = asleep - 1
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
