"""Where the two processes of a connection run, as far as a spinning end needs to know.

A spin pays only while the peer runs on another vCPU (``wait.py``). Each process writes the
vCPU it runs on (``sched_getcpu``, a vDSO call of ~0.2 µs) into a word of the segment: the
``ring.WRITER_CPU`` word of the ring it produces, when it starts to wait and when it wakes
from a sleep. The waiting end compares that word with its own vCPU:

* the peer was last seen on another vCPU: spin;
* we have just woken the peer from its sleep: spin too. The OS puts a woken process on an
  idle vCPU rather than on the one we keep busy, so the two drift apart;
* the peer was last seen awake on our vCPU, or is pinned to it: sleep at once, so that it
  can run.

Where ``sched_getcpu`` is missing, the ends spin only when their CPU affinities are disjoint.

Two processes that block in turn tend to stay on one vCPU, though: the one woken preempts
the one that woke it, and neither ever finds a reason to leave. A process that allows it
(``allow_moves()``: pydist's worker processes do; a master never moves) therefore moves the
waiting thread to another vCPU when it keeps finding its peer awake on its own and nothing
else wants the other vCPUs (``/proc/loadavg`` counts the runnable tasks): it restricts the
thread to another vCPU, which migrates it at once, and gives it its whole CPU mask back
right away, so nothing stays pinned. At most one move per ``MOVE_EVERY`` seconds.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

__all__ = ["Placement", "current_cpu", "allow_moves", "MOVE_AFTER", "MOVE_EVERY", "MOVED"]

MOVE_AFTER = 4  # waits in a row that find the peer awake on our vCPU before we move
MOVE_EVERY = 0.05  # seconds, at least, between two moves of one connection's waiter
MOVED = 2  # what `Placement.apart()` answers right after a move
_movable = False


def _cpu_reader() -> Callable[[], int] | None:
    """``sched_getcpu`` from the C library, or None where there is none. Called with the GIL
    held (``PyDLL``): releasing it for 50 ns could hand it to another thread for 5 ms."""
    try:
        fn = ctypes.PyDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn if fn() >= 0 else None


_getcpu = _cpu_reader()


def current_cpu() -> int | None:
    """The vCPU this thread runs on now, or None where that cannot be read."""
    return None if _getcpu is None else _getcpu()


def allow_moves(allowed: bool = True) -> None:
    """Let waiting threads of this process move to another vCPU (see the module's story)."""
    global _movable
    _movable = allowed


def _runnable() -> int:
    """Tasks running or ready to run on the whole machine (a large number if unknown)."""
    try:
        fd = os.open("/proc/loadavg", os.O_RDONLY)
        try:
            fields = os.read(fd, 128).split()
        finally:
            os.close(fd)
        return int(fields[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return 1 << 30


def _move_off(cpu: int) -> bool:
    """Move this thread off ``cpu`` to another vCPU of its mask if one is free; True if it
    moved. Its mask is the same afterwards."""
    try:
        mask = os.sched_getaffinity(0)
        others = sorted(mask - {cpu})
        # We and the peer share one vCPU: with no more runnable tasks than vCPUs, one is free.
        if not others or _runnable() > len(mask):
            return False
        target = next((c for c in others if c > cpu), others[0])  # the next one round
        try:
            os.sched_setaffinity(0, {target})  # migrates this thread now
        finally:
            os.sched_setaffinity(0, mask)
        return True
    except (OSError, AttributeError):
        return False


class Placement:
    """Where this process and the peer of one connection run (one per connection).

    ``own`` and ``peer`` are the control words (``"Q"`` views) of the ring this process
    produces and of the ring it consumes; ``word`` is the index of the CPU word in each
    (written only by that ring's producer: its vCPU + 1, 0 while unknown). ``peer_cpus`` is
    the peer's CPU affinity when the connection was made (None: unknown). ``may_move``: this
    end may move its thread, if the process allows it; one end of a connection only, so that
    the two never chase each other (pydist's accepting end: a worker, dialed by its master).
    """

    __slots__ = ("_own", "_peer", "_word", "_only", "_fallback", "_woke", "_same", "_next_move",
                 "_may_move")

    def __init__(self, own: memoryview, peer: memoryview, word: int,
                 peer_cpus: frozenset[int] | None = None, *, may_move: bool = False) -> None:
        self._own, self._peer, self._word = own, peer, word
        self._may_move = may_move
        # A peer pinned to one vCPU can run nowhere else: never spin while we run there.
        self._only = next(iter(peer_cpus)) + 1 if peer_cpus and len(peer_cpus) == 1 else -1
        self._fallback = False
        if peer_cpus is not None and hasattr(os, "sched_getaffinity"):
            self._fallback = not peer_cpus & os.sched_getaffinity(0)
        self._woke = False
        self._same = 0
        self._next_move = 0.0
        self.publish()

    def publish(self) -> None:
        """Tell the peer which vCPU this process runs on now."""
        if _getcpu is not None:
            self._own[self._word] = _getcpu() + 1

    def woke_peer(self) -> None:
        """We have just posted the sleeping peer: the OS places it anew, so its CPU word
        says nothing for now."""
        self._woke = True

    def apart(self) -> int:
        """Whether the peer can run on another vCPU than this thread while we spin (a hint:
        a wrong answer costs one wasted spin or one sleep, never correctness): 0 no, 1 yes,
        ``MOVED`` yes because this thread has just moved (see the module's story). Also
        tells the peer where we run."""
        if _getcpu is None:
            return int(self._fallback)
        self._own[self._word] = cpu = _getcpu() + 1
        woke, self._woke = self._woke, False
        if cpu != self._only:
            if woke:
                return 1
            peer = self._peer[self._word]
            if peer != cpu:
                self._same = 0
                return int(peer != 0)
        # The peer runs on our vCPU, or waits to: let it run, and leave if we may.
        if _movable and self._may_move:
            self._same += 1
            if self._same >= MOVE_AFTER and time.monotonic() >= self._next_move:
                self._same = 0
                self._next_move = time.monotonic() + MOVE_EVERY
                if _move_off(cpu - 1):
                    self.publish()
                    return MOVED
        return 0
