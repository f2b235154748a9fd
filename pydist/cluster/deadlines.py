"""Deadlines on blocking exchanges, all kept by one thread.

A hello or a join exchange over a fresh connection must not block forever: when its
deadline passes, the connection is aborted, and the blocked read fails. A
``threading.Timer`` per exchange would start a thread each time -- four for every worker
that joins, on the path each new worker takes -- and ``Thread.start`` waits until the new
thread runs. Here one daemon thread keeps them all in a heap: started by the first
deadline, it ends once none has been pending for a second or two (the next one starts it
again).
"""
from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable

__all__ = ["Deadline", "after"]


class Deadline:
    """``action`` once ``when`` (monotonic seconds) passes, unless cancelled first."""

    __slots__ = ("when", "action", "fired", "cancelled")

    def __init__(self, when: float, action: Callable[[], object]) -> None:
        self.when, self.action = when, action
        self.fired = False
        self.cancelled = False

    def cancel(self) -> None:
        with _lock:
            if self.cancelled or self.fired:
                return
            self.cancelled = True
            _pending[0] -= 1
            if not _pending[0]:
                _heap.clear()       # nothing left to wait for: the keeper ends at its next look

    def expired(self) -> bool:
        """Whether the action has run (or is running)."""
        return self.fired


LINGER = 1.0        # seconds the keeper waits for a new deadline before it ends
_lock = threading.Lock()
_changed = threading.Condition(_lock)
_heap: list[tuple[float, int, Deadline]] = []
_order = itertools.count()
_keeper: list[threading.Thread] = []
_pending = [0]      # deadlines in the heap neither cancelled nor fired
_wake_at = [0.0]    # when the keeper looks at the heap next (LINGER from its last look, at most)


def after(seconds: float, action: Callable[[], object]) -> Deadline:
    """Run ``action`` (in the keeper thread) ``seconds`` from now, unless cancelled."""
    d = Deadline(time.monotonic() + seconds, action)
    with _lock:
        heapq.heappush(_heap, (d.when, next(_order), d))
        _pending[0] += 1
        if not _keeper:
            t = threading.Thread(target=_keep, name="pydist-deadlines", daemon=True)
            _keeper.append(t)
            t.start()
        elif d.when < _wake_at[0]:
            _changed.notify()   # (rare: the keeper looks every LINGER, and deadlines are longer)
    return d


def _keep() -> None:
    """The keeper: run each deadline's action when it passes; drop the cancelled ones; end
    when it finds nothing to wait for twice in a row. Setting or cancelling a deadline does
    not wake it (most are cancelled long before they pass): it looks every LINGER seconds."""
    empty = False
    while True:
        with _lock:
            while True:
                while _heap and _heap[0][2].cancelled:
                    heapq.heappop(_heap)
                now = time.monotonic()
                if not _heap:
                    if empty:
                        _keeper.clear()     # (under the lock: the next ``after`` starts one)
                        return
                    empty, nap = True, LINGER
                else:
                    empty = False
                    nap = _heap[0][0] - now
                    if nap <= 0:
                        due = heapq.heappop(_heap)[2]
                        due.fired = True
                        _pending[0] -= 1
                        break
                    nap = min(nap, LINGER)
                _wake_at[0] = now + nap
                _changed.wait(nap)
        try:
            due.action()
        except Exception:       # (an abort of a connection already gone)
            pass


def _after_fork_in_child() -> None:
    """A forked child starts with no keeper thread and none of the parent's deadlines."""
    global _lock, _changed
    _lock = threading.Lock()
    _changed = threading.Condition(_lock)
    _heap.clear()
    _keeper.clear()
    _pending[0] = 0
    _wake_at[0] = 0.0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
