"""Memory ordering between the two ends of a ring, on x86 and everywhere else.

The producer copies data, then stores ``HEAD``; the consumer loads ``HEAD``, then copies
data out, then stores ``TAIL`` (see ``ring.py`` for the layout). Two orderings are needed:

1. data stores become visible before the ``HEAD`` store that covers them (and the
   consumer's data loads are not satisfied before its ``HEAD`` load), with the same for
   ``TAIL`` and the overwriting of consumed bytes;
2. "store my sleep word, then load the peer's counter" on one side against "store my
   counter, then load the peer's sleep word" on the other (a Dekker pattern) must not both
   read stale values, or a wake-up is lost.

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
  only as a hint and re-reads it under the mutex before touching data; the CPU words
  (``placement.py``) are hints that no correctness rests on.
* In both modes a blocked end also wakes every ``WAIT_TIMEOUT`` and re-checks, so even a lost
  wake-up (which the above rules out) would cost latency, not a hang.
"""
from __future__ import annotations

import os
import platform
import threading

import posix_ipc

from ..errors import TransportBroken
from .wait import WAIT_TIMEOUT, LinkState

__all__ = ["tso_by_default", "TsoFence", "LockedFence", "Fence"]

_TSO_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}


def tso_by_default() -> bool:
    """True where plain loads/stores give the ordering the ring needs (x86);
    ``PYDIST_SHM_FENCE=tso``/``locked`` forces a mode."""
    forced = os.environ.get("PYDIST_SHM_FENCE", "").lower()
    if forced in ("tso", "locked"):
        return forced == "tso"
    return platform.machine().lower() in _TSO_MACHINES


class TsoFence:
    """Orderings on x86-64: plain accesses, plus a locked instruction for store→load."""

    tso = True

    def __init__(self, ctl: memoryview) -> None:
        self._ctl = ctl
        self._lock = threading.Lock()
        self.load = ctl.__getitem__
        self.store = ctl.__setitem__

    def store_load(self, i: int, value: int, j: int) -> int:
        self._ctl[i] = value
        self._lock.acquire()  # lock cmpxchg: a full barrier between the store and the load
        self._lock.release()
        return self._ctl[j]


class LockedFence:
    """Orderings anywhere: every shared access inside a process-shared mutex."""

    tso = False

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


Fence = TsoFence | LockedFence
